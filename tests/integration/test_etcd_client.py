"""The etcd client's own promises, against real etcd members on 127.0.0.1:
TLS with client certificates, no blind retry after an ambiguous failure, and
membership changes through the member supervisor."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from blixard.domain.errors import StoreUnavailable, ValidationError
from blixard.store.etcd import EtcdStore, TlsConfig
from blixard.store.etcd_member import EtcdMember, MemberTls, member_data_dir, remove_member
from blixard.store.protocol import Compare, Put
from tests.support.etcd_cluster import EtcdCluster, free_port
from tests.support.tls import make_pki


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server_cert, server_key = pki.issue("member")
    client_cert, client_key = pki.issue("blixard-node")
    member = EtcdMember(
        name="tls0",
        data_dir=tmp_path / "etcd" / "tls0",
        client_url=f"https://127.0.0.1:{free_port()}",
        peer_url=f"https://127.0.0.1:{free_port()}",
        tls=MemberTls(pki.ca_cert, server_cert, server_key),
    )
    await member.start_new_cluster()
    try:
        good = EtcdStore(
            [member.client_url], timeout_s=3, tls=TlsConfig(pki.ca_cert, client_cert, client_key)
        )
        rev = await good.put("/tls/k", b"secret")
        kv = await good.get("/tls/k")
        assert kv is not None and kv.mod_revision == rev and kv.value == b"secret"
        await good.close()

        no_client_cert = EtcdStore([member.client_url], timeout_s=1, tls=TlsConfig(pki.ca_cert))
        with pytest.raises(StoreUnavailable) as info:
            await no_client_cert.get("/tls/k")
        assert "1s" in str(info.value)
        await no_client_cert.close()

        other_ca = make_pki(tmp_path / "other", "other-ca")
        wrong_ca = EtcdStore(
            [member.client_url],
            timeout_s=1,
            tls=TlsConfig(other_ca.ca_cert, client_cert, client_key),
        )
        with pytest.raises(StoreUnavailable) as info:
            await wrong_ca.get("/tls/k")
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        await wrong_ca.close()
    finally:
        member.stop()


class DropFirstAnswerProxy:
    """Forwards TCP to etcd but cuts the client off as etcd's first answer arrives.

    etcd has then applied the request, and the client cannot know: the
    ambiguous failure a client must never retry blindly.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def forward_requests() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()

        pump = asyncio.create_task(forward_requests())
        await up_reader.read(1)  # etcd answered: the request was applied
        self.dropped += 1
        pump.cancel()
        writer.transport.abort()
        up_writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_no_blind_retry_after_ambiguous_failure(etcd1: EtcdCluster) -> None:
    real = etcd1.endpoints[0]
    proxy = DropFirstAnswerProxy(int(real.rsplit(":", 1)[1]))
    proxy_url = f"http://127.0.0.1:{await proxy.start()}"
    # The proxy comes first: every request reaches etcd through it and loses its answer.
    client = EtcdStore([proxy_url, real], timeout_s=3)
    direct = etcd1.client()
    key = "/ambiguous/counter"
    await direct.put(key, b"0")
    seen = await direct.get(key)
    assert seen is not None

    with pytest.raises(StoreUnavailable):
        await client.txn([Compare.mod(key, seen.mod_revision)], [Put(key, b"1")])
    with pytest.raises(StoreUnavailable):
        await client.put("/ambiguous/plain", b"x")
    after = await direct.get(key)
    assert after is not None and after.value == b"1" and after.version == seen.version + 1
    assert proxy.dropped == 2  # each write went out once, and was not sent again to `real`

    # A read is safe to repeat: it fails over to the next endpoint and succeeds.
    kv = await client.get(key)
    assert kv is not None and kv.value == b"1"
    await client.close()
    await direct.close()
    await proxy.close()


async def test_members_join_and_leave(tmp_path: Path) -> None:
    def member(name: str) -> EtcdMember:
        return EtcdMember(
            name=name,
            data_dir=member_data_dir(tmp_path / "blixard", name),
            client_url=f"http://127.0.0.1:{free_port()}",
            peer_url=f"http://127.0.0.1:{free_port()}",
        )

    first, second, third = member("node-a"), member("node-b"), member("node-c")
    assert first.data_dir == tmp_path / "blixard" / "etcd" / "node-a"
    await first.start_new_cluster()
    store = EtcdStore([first.client_url], timeout_s=5)
    try:
        await store.put("/members/before", b"1")
        await second.join(store)
        await third.join(EtcdStore([first.client_url, second.client_url], timeout_s=5))
        members = await store.member_list()
        assert sorted(m.name for m in members) == ["node-a", "node-b", "node-c"]

        # Data written before the joins is on the new members; writes replicate.
        on_third = EtcdStore([third.client_url], timeout_s=5)
        kv = await on_third.get("/members/before")
        assert kv is not None and kv.value == b"1"
        await on_third.put("/members/after", b"2")
        kv = await store.get("/members/after")
        assert kv is not None and kv.value == b"2"

        with pytest.raises(ValidationError):
            await second.join(store)  # a member with data cannot join afresh

        leaving = next(m for m in members if m.name == "node-c")
        await remove_member(store, leaving.id)
        third.stop()
        assert sorted(m.name for m in await store.member_list()) == ["node-a", "node-b"]
        with pytest.raises(ValidationError):
            await remove_member(store, leaving.id)  # not a member any more
        await on_third.close()

        b = next(m for m in await store.member_list() if m.name == "node-b")
        await remove_member(store, b.id)
        second.stop()
        only = await store.member_list()
        assert [m.name for m in only] == ["node-a"]
        with pytest.raises(ValidationError) as info:
            await remove_member(store, only[0].id)
        assert "last member" in info.value.reason
        assert (await store.get("/members/after")) is not None
    finally:
        await store.close()
        for m in (first, second, third):
            m.stop()


async def test_member_that_cannot_start_fails_clearly(tmp_path: Path) -> None:
    busy = EtcdMember(
        name="busy",
        data_dir=tmp_path / "etcd" / "busy",
        client_url=f"http://127.0.0.1:{free_port()}",
        peer_url=f"http://127.0.0.1:{free_port()}",
    )
    await busy.start_new_cluster()
    clash = EtcdMember(
        name="clash",
        data_dir=tmp_path / "etcd" / "clash",
        client_url=busy.client_url,  # already taken
        peer_url=f"http://127.0.0.1:{free_port()}",
    )
    try:
        with pytest.raises(StoreUnavailable) as info:
            await clash.start_new_cluster(timeout_s=10)
        assert "exited" in str(info.value) and str(clash.log_path) in str(info.value)
    finally:
        busy.stop()
        clash.stop()
