"""Supervise a local etcd member: start a new cluster, join one, leave it.

Blixard nodes can run their own etcd member (like k3s' embedded etcd) so a
cluster needs nothing installed but Debian's ``etcd-server``. This module owns
the member's process and its data directory (``<blixard data dir>/etcd/<name>``);
membership changes go through :class:`~blixard.store.etcd.EtcdStore` so all
etcd API calls stay in one module.

Why a child process dies with its parent (PR_SET_PDEATHSIG): a member left
running after its Blixard node died would keep voting in the quorum while the
node's lease expires, which is the opposite of what failover assumes. Linux
ties that signal to the *thread* that forked the child: spawn members from a
thread that lives as long as the node (the event loop's thread).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from blixard.domain.errors import BlixardError, StoreUnavailable, ValidationError
from blixard.store.etcd import ClusterNotReady, EtcdStore, Member, TlsConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class EtcdNotInstalled(BlixardError):
    code = "etcd_not_installed"


@dataclass(frozen=True, slots=True)
class MemberTls:
    """TLS of a member's client and peer ports, with client certificates required.

    One CA signs every member's certificate and every client's (Blixard nodes
    and operators). The member's certificate must name 127.0.0.1/its host.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    def args(self) -> list[str]:
        files = [
            "--cert-file", str(self.cert_file),
            "--key-file", str(self.key_file),
            "--trusted-ca-file", str(self.ca_file),
            "--client-cert-auth",
            "--peer-cert-file", str(self.cert_file),
            "--peer-key-file", str(self.key_file),
            "--peer-trusted-ca-file", str(self.ca_file),
            "--peer-client-cert-auth",
        ]  # fmt: skip
        return files

    def client(self) -> TlsConfig:
        """The member's own certificate also serves as a client certificate for probes."""
        return TlsConfig(self.ca_file, self.cert_file, self.key_file)


def member_data_dir(blixard_data_dir: Path, name: str) -> Path:
    """Where a supervised member keeps its data: ``<blixard data dir>/etcd/<name>``."""
    return blixard_data_dir / "etcd" / name


@dataclass
class EtcdMember:
    """One local etcd member process.

    ``client_url``/``peer_url`` are what it listens on and advertises; tests and
    single-machine clusters use 127.0.0.1 with distinct ports.
    """

    name: str
    data_dir: Path
    client_url: str
    peer_url: str
    binary: str = "etcd"
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    extra_args: list[str] = field(default_factory=list)
    tls: MemberTls | None = None
    die_with_parent: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def has_data(self) -> bool:
        return (self.data_dir / "member").is_dir()

    def _args(self, initial_cluster: Mapping[str, str] | None, state: str) -> list[str]:
        exe = shutil.which(self.binary)
        if exe is None:
            raise EtcdNotInstalled(
                f"the etcd binary {self.binary!r} is not on PATH "
                "(Debian: apt-get install etcd-server)"
            )
        args = [
            exe,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_timeout_ms),
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            args += self.tls.args()
        if initial_cluster is not None and not self.has_data():
            cluster = ",".join(f"{n}={u}" for n, u in initial_cluster.items())
            args += ["--initial-cluster", cluster, "--initial-cluster-state", state]
        return args + self.extra_args

    def _spawn(self, initial_cluster: Mapping[str, str] | None, state: str) -> None:
        if self.running():
            raise ValidationError("etcd_member", f"member {self.name} is already running")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        args = self._args(initial_cluster, state)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )

    async def start_new_cluster(self, timeout_s: float = 20.0) -> None:
        """Bootstrap a one-member cluster (or restart this member from its data)."""
        self._spawn({self.name: self.peer_url}, "new")
        await self.wait_healthy(timeout_s)

    def start_static(self, initial_cluster: Mapping[str, str]) -> None:
        """Start as one of a statically bootstrapped cluster; does not wait for quorum
        (the other members are not up yet): call wait_healthy once all are started."""
        self._spawn(initial_cluster, "new")

    async def restart(self, timeout_s: float = 20.0) -> None:
        """Start again from the existing data directory."""
        if not self.has_data():
            raise ValidationError("etcd_member", f"member {self.name} has no data to restart from")
        self._spawn(None, "existing")
        await self.wait_healthy(timeout_s)

    async def join(self, store: EtcdStore, timeout_s: float = 30.0) -> Member:
        """Add this member to the cluster ``store`` talks to, then start it.

        etcd's order: announce the member (member add), then start it with the
        member list the cluster returned and state "existing".
        """
        self._check_no_data()
        member, members = await _until_ready(lambda: store.member_add([self.peer_url]), timeout_s)
        await self.start_joined(initial_cluster(members, member.id, self.name), timeout_s)
        return member

    async def start_joined(self, initial: Mapping[str, str], timeout_s: float = 30.0) -> None:
        """Start as a member another node already announced (its ``member add``), with
        state "existing" and the member list that announcement returned.

        On a timeout the process is left running: the caller stops it.
        """
        self._check_no_data()
        self._spawn(initial, "existing")
        await self.wait_healthy(timeout_s)

    def _check_no_data(self) -> None:
        if self.has_data():
            raise ValidationError(
                "etcd_member",
                f"{self.data_dir} already holds member data; remove it to join afresh",
            )

    async def wait_healthy(self, timeout_s: float) -> None:
        """Wait until the member answers /health with a leader, or fail clearly."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        verify: ssl.SSLContext | bool = self.tls.client().context() if self.tls else True
        async with httpx.AsyncClient(timeout=1.0, verify=verify) as client:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise StoreUnavailable(
                        f"etcd member {self.name} exited with code {self._proc.returncode}; "
                        f"see {self.log_path}"
                    )
                try:
                    resp = await client.get(self.client_url + "/health")
                    if resp.status_code == 200 and resp.json().get("health") == "true":
                        return
                    last = resp.text.strip()
                except httpx.HTTPError as exc:
                    last = str(exc) or type(exc).__name__
                await asyncio.sleep(0.05)
        raise StoreUnavailable(
            f"etcd member {self.name} not healthy after {timeout_s:g}s ({last}); "
            f"see {self.log_path}"
        )

    def signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


T = TypeVar("T")


def initial_cluster(members: list[Member], new_id: int, new_name: str) -> dict[str, str]:
    """``--initial-cluster`` for a member just added: ``{name: peer URL}`` of every member.

    A member announced but not started yet has no name; the new one is ``new_name``,
    any other gets a placeholder (etcd matches an existing cluster by peer URLs).
    """
    initial: dict[str, str] = {}
    for m in members:
        if not m.peer_urls:
            continue
        name = m.name or (new_name if m.id == new_id else f"unstarted-{m.id:x}")
        initial[name] = m.peer_urls[0]
    return initial


async def _until_ready(call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Repeat a membership change etcd refused as "unhealthy cluster" (see ClusterNotReady)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except ClusterNotReady:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def add_member(
    store: EtcdStore, peer_url: str, timeout_s: float = 30.0
) -> tuple[Member, list[Member]]:
    """Announce a member another host will start (``start_joined`` there); returns it and
    the member list to start it with. Retried while etcd answers "unhealthy cluster"."""
    return await _until_ready(lambda: store.member_add([peer_url]), timeout_s)


async def remove_member(store: EtcdStore, member_id: int, timeout_s: float = 30.0) -> None:
    """Remove a member from the cluster; the last member can never be removed."""
    members = await store.member_list()
    if not any(m.id == member_id for m in members):
        raise ValidationError("member", f"etcd member {member_id:x} is not in the cluster")
    if len(members) <= 1:
        raise ValidationError("member", "cannot remove the last member of the etcd cluster")
    await _until_ready(lambda: store.member_remove(member_id), timeout_s)
