"""Parameters of a simulated run: the real system's timings, the rules modelled, the load.

Why in one place: every figure the simulation reports depends on these, so
they are printed with the results and default to the real defaults (the
source of each is named beside it). Ranges are ``(low, high)`` and drawn
uniformly from the run's seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Timing:
    #: agent/registration.py ``ttl_s`` (daemon config ``lease_ttl_s``, default 5).
    lease_ttl_s: int = 5
    #: agent/reconciler.py ``fence_margin_s`` (and election.py's TTL/5).
    fence_margin_s: float = 1.0
    #: controllers/plan.py ``Policy.failover_grace_s``.
    failover_grace_s: float = 1.5
    #: daemon config ``store_timeout_s``: a request with no answer fails after it.
    store_timeout_s: float = 5.0
    #: Round trip of one store request from a node (request + response).
    store_latency_s: Range = (0.001, 0.005)
    #: The same on a node with the "slow disk" fault.
    slow_store_latency_s: Range = (0.1, 2.0)
    #: From a commit to a watcher's receiving it.
    watch_delay_s: Range = (0.001, 0.010)
    #: controllers/vms.py ``coalesce_s`` and ``resync_s``.
    coalesce_s: float = 0.02
    controller_resync_s: float = 5.0
    #: agent/reconciler.py ``resync_s`` and ``stable_after_s``.
    agent_resync_s: float = 5.0
    stable_after_s: float = 30.0
    #: drivers: spawn -> ready line (a microVM's boot).
    boot_s: Range = (0.05, 3.0)
    #: A workload's own shutdown after SIGTERM.
    shutdown_s: Range = (0.02, 1.5)
    #: agent/reconciler.py ``stop_timeout_s`` (daemon default 30).
    stop_timeout_s: float = 30.0
    #: drivers/executor.py: the shim looks at the fence ten times a second.
    shim_poll_s: float = 0.1
    #: agent/reconciler.py ``_keep_fence_deadline`` sleeps 0.1 s between publications.
    fence_keeper_s: float = 0.1
    #: A daemon whose start failed is started again by its service manager after this.
    daemon_restart_s: float = 2.0
    #: From a controller leader's end to the next leader's first read (election).
    election_s: Range = (0.2, 6.0)
    #: Agents' monotonic clocks run at 1 +- this rate (the documented assumption: the
    #: rates agree within the fencing margin; see docs/architecture.md "Simulation").
    clock_drift: float = 0.001


@dataclass(frozen=True, slots=True)
class Model:
    """Which version of a rule is modelled. The defaults are the code as it is.

    The simulation found each of the first five rules unsafe (or, for the
    keepalive, costly) as they were; the code now follows the safe version and
    the switch brings the old one back, which ``tests/simulation`` uses to show
    the checker catches it. The others model the code as it is, and a fix
    proposed but not made (``fixed()`` turns the needed ones on).
    """

    #: The daemon gives the agent ``lease_remaining`` on etcd (daemon/node.py). False:
    #: as it was (no fencing at all: ``may_run()`` always true, no fence links).
    fencing_wired: bool = True
    #: A clean daemon stop revokes the node's lease (registration.close()) although its
    #: tasks keep running until their shims' deadline. False (now, on etcd): it does not.
    revoke_on_stop: bool = False
    #: The agent acts on the answer to its start (and resume) announcement whenever it
    #: comes back. False (now): only before the fencing deadline that held when it asked
    #: (reconciler.py ``fence_deadline``), since after it the controller may have failed over.
    late_answers_trusted: bool = False
    #: Stopping a task the shim paused at the fencing deadline sends SIGTERM *and
    #: SIGCONT* (process driver ``stop``): the workload runs again for its shutdown.
    #: False (now): the agent kills a fence-paused task instead (reconciler.py
    #: ``_stop_task``, ``_remove``).
    stop_resumes_fenced: bool = False
    #: The keepalive loop sleeps TTL/3 *after* each answer, so slow answers let the
    #: fencing deadline pass with the lease alive. False (now): paced by the clock.
    keepalive_after_answer: bool = False
    #: registration.py sets ``valid_until`` from a new lease *before* the liveness key
    #: is put (as the code is). Never seen to break an invariant; False puts it after.
    valid_before_liveness_key: bool = True
    #: The shim's "already paused" is its own variable (executor.py ``paused``): once the
    #: agent resumes the workload (SIGCONT, marker removed) while the deadline is still
    #: past, the shim does not pause it again (as the code is; the agent's answer check
    #: covers it). False: the proposed fix in depth, in which the shim pauses again
    #: whenever it is late and the ``fenced-paused`` marker is gone.
    shim_remembers_pause: bool = True
    #: A node that (re)takes its lease is placeable at once, while fence-paused stale
    #: copies may still hold its memory (as the code is). True: the proposed fix, emulated
    #: -- the node is marked not ready until its agent has reconciled its local tasks,
    #: and the controller places nothing on a node that is not ready.
    ready_after_reconcile: bool = False
    #: A stopped instance started again goes back to its old node when no other node
    #: has room, even if its old node has none either (plan.py ``_sync_spec``, as the
    #: code is). True: the proposed fix, emulated around plan() -- it stays stopped,
    #: waiting for room, rather than overcommit its node.
    restart_waits_for_room: bool = False
    #: A deliberately broken shim that ignores the fencing deadline (tests only).
    shim_ignores_fence: bool = False

    @classmethod
    def fixed(cls) -> Model:
        """The code as it is plus the proposed fixes not made yet that the simulation
        showed to be needed (``ready_after_reconcile``, ``restart_waits_for_room``)."""
        return cls(ready_after_reconcile=True, restart_waits_for_room=True)


@dataclass(frozen=True, slots=True)
class Load:
    """The cluster and what happens to it."""

    node_vcpus: int = 8
    node_memory_mib: int = 8192
    #: VMs at the start, per node.
    vms_per_node: float = 1.0
    #: The workload generator keeps the summed requests under this share of capacity.
    max_demand: float = 0.55
    #: Mean seconds between faults, and between workload changes.
    fault_interval_s: float = 5.0
    workload_interval_s: float = 6.0
    #: At most this share of the nodes is faulty at once (at least one node).
    max_faulty_share: float = 0.25
    #: A node crash is permanent (the host is lost) with this probability.
    permanent_loss_p: float = 0.1
    #: A boot fails (no ready line) with this probability.
    boot_failure_p: float = 0.02
    #: Relative weights of the users' changes (see workload.py).
    workload_weights: tuple[tuple[str, float], ...] = (
        ("create", 3.0),
        ("scale", 4.0),
        ("delete", 1.5),
        ("power", 1.0),
        ("restart", 1.0),
        ("drain", 0.7),
        ("cordon", 0.5),
    )
    #: Relative weights of the fault kinds (see faults.py).
    fault_weights: tuple[tuple[str, float], ...] = (
        ("node_crash", 1.0),
        ("daemon_crash", 2.0),
        ("daemon_stop", 1.0),
        ("partition", 2.0),
        ("pause", 1.5),
        ("slow_disk", 1.0),
        ("leader_change", 0.7),
        ("task_crash", 1.0),
    )


@dataclass(frozen=True, slots=True)
class SimConfig:
    seed: int = 0
    nodes: int = 8
    #: Virtual seconds; the last ``quiet_s`` of them have no faults and no changes.
    duration_s: float = 180.0
    quiet_s: float = 30.0
    timing: Timing = field(default_factory=Timing)
    model: Model = field(default_factory=Model)
    load: Load = field(default_factory=Load)
    #: Check every invariant over the whole cluster after every event (slow; the
    #: default checks, after every event, what that event touched).
    paranoid: bool = False
