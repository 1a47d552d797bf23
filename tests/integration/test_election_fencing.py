"""A leader cut off from the store stops acting as leader before its lease can expire.

This is the property failover and fencing rest on (docs/architecture.md,
"Leader election"): nobody else can be elected before the lease expires, and
the cut-off leader's own clock says it is no longer leader before that.
"""

from __future__ import annotations

import asyncio
import time

from blixard.store.election import Election
from tests.support.etcd_cluster import EtcdCluster


async def test_cut_off_leader_steps_down_before_its_lease_expires(
    fresh_etcd1: EtcdCluster,
) -> None:
    store = fresh_etcd1.client(timeout_s=0.5)
    leader = Election(store, "fencing", "node-a", ttl_s=3)
    await leader.campaign()
    assert leader.is_leader()
    await asyncio.sleep(1.2)  # at least one keepalive went through
    last_proof = leader._valid_until - leader.ttl_s  # when that keepalive was sent
    fresh_etcd1.members[0].kill()
    cut_off_at = time.monotonic()
    while leader.is_leader():  # noqa: ASYNC110 - polls a clock-based predicate
        await asyncio.sleep(0.01)
    stepped_down_at = time.monotonic()
    # The store cannot expire the lease before last_proof + ttl; the leader is out earlier,
    # by at least its safety margin.
    assert stepped_down_at <= last_proof + leader.ttl_s - leader.safety_margin_s + 0.05
    assert stepped_down_at - cut_off_at < leader.ttl_s
    assert leader.lost.is_set() or not leader.is_leader()
    await leader._stop_keepalive()
    await store.close()


async def test_standby_takes_over_only_after_the_lease_expired(
    fresh_etcd1: EtcdCluster,
) -> None:
    a_store, b_store = fresh_etcd1.client(), fresh_etcd1.client()
    a = Election(a_store, "handover", "node-a", ttl_s=2)
    b = Election(b_store, "handover", "node-b", ttl_s=2)
    await a.campaign()
    b_task = asyncio.create_task(b.campaign())
    await asyncio.sleep(0.5)
    await a._stop_keepalive()  # a "crashes": no more keepalives, no resign
    crashed_at = time.monotonic()
    last_valid = a._valid_until
    await asyncio.wait_for(b_task, 10)
    elected_at = time.monotonic()
    assert b.is_leader()
    # Never two leaders: b was elected only after a's own clock had already ruled it out.
    assert elected_at >= last_valid - a.safety_margin_s
    assert not a.is_leader()
    assert elected_at - crashed_at < 2 + 3  # the TTL plus etcd's expiry granularity
    await b.resign()
    await a_store.close()
    await b_store.close()


async def test_lost_is_signalled_in_time_even_when_the_store_hangs(
    fresh_etcd1: EtcdCluster,
) -> None:
    """The store's own timeout (5 s) is longer than the lease: ``lost`` must not wait for it."""
    store = fresh_etcd1.client(timeout_s=5.0)
    leader = Election(store, "slow-store", "node-a", ttl_s=3)
    await leader.campaign()
    await asyncio.sleep(1.2)
    fresh_etcd1.members[0].kill()
    await asyncio.wait_for(leader.lost.wait(), 10)
    signalled_at = time.monotonic()
    # Set no later than the end of proven leadership (plus scheduling slack).
    assert signalled_at <= leader._valid_until - leader.safety_margin_s + 0.3
    await leader._stop_keepalive()
    await store.close()
