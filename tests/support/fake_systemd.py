"""A FAKE systemd for the systemd driver's tests. It is not systemd and never the real path.

* :class:`FakeBus` runs a private ``dbus-daemon`` (Debian package ``dbus-daemon``) with a
  config file of its own: one unix socket in a private temporary directory, no TCP, no
  service activation (the stock session config would try to activate
  ``org.freedesktop.systemd1`` from /usr/share/dbus-1/services). The daemon gets SIGKILL if
  the test process dies (PR_SET_PDEATHSIG), and is stopped at the end of each test.
* :class:`FakeSystemd` owns ``org.freedesktop.systemd1`` on that bus (over jeepney, in the
  test's event loop) and answers exactly the calls the driver makes, as
  org.freedesktop.systemd1(5) documents them: ``Manager.Subscribe``, ``LoadUnit``,
  ``StartUnit``/``StopUnit``/``RestartUnit`` (queued jobs, ``JobNew``/``JobRemoved``),
  ``KillUnit``, ``Properties.Get`` (the manager's ``Version``) and ``Properties.GetAll`` of a
  unit's ``org.freedesktop.systemd1.Unit`` and ``.Service`` interfaces, with systemd's
  object paths (``/org/freedesktop/systemd1/unit/nginx_2eservice``), error names
  (``org.freedesktop.systemd1.NoSuchUnit``, ...) and ``PropertiesChanged`` on every state
  change. Like systemd, it sends signals only once a client called ``Subscribe()``.
* The test defines the units (:class:`FakeUnitSpec`), can crash one (:meth:`FakeSystemd.crash`)
  or delete its unit file (:meth:`FakeSystemd.remove_unit_file`), and reads every call that
  reached the fake in :attr:`FakeSystemd.calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    HeaderFields,
    MatchRule,
    new_error,
    new_method_return,
    new_signal,
)
from jeepney.bus_messages import message_bus  # type: ignore[import-untyped]
from jeepney.io.asyncio import open_dbus_router  # type: ignore[import-untyped]

from blixard.drivers import executor

FAKE_NAME = "org.freedesktop.systemd1"
FAKE_MANAGER_PATH = "/org/freedesktop/systemd1"
FAKE_UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
FAKE_VERSION = "255-fake"

ERR_NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
ERR_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
ERR_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
ERR_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
ERR_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"

# waitid(2) si_code, as systemd reports it in ExecMainCode.
CLD_EXITED, CLD_KILLED = 1, 2
#: Signals systemd counts as a clean end of a daemon (is_clean_exit, EXIT_CLEAN_DAEMON).
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
JOB_MODES = {
    "replace",
    "fail",
    "isolate",
    "ignore-dependencies",
    "ignore-requirements",
    "flush",
    "replace-irreversibly",
    "triggering",
    "restart-dependencies",
}
_UNIT_TYPES = "service|socket|target|device|mount|automount|swap|timer|path|slice|scope"
#: unit_name_is_valid(): allowed characters, an optional template instance, a known type.
_VALID_UNIT = re.compile(rf"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.({_UNIT_TYPES})")

FAKE_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def fake_unit_path(name: str) -> str:
    """systemd's bus_label_escape: every byte but [A-Za-z0-9] (and a leading digit) as _xx."""
    if not name:
        return FAKE_UNIT_PREFIX + "_"
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalpha() or (i > 0 and ch.isdigit())):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return FAKE_UNIT_PREFIX + "".join(out)


# ---------------------------------------------------------------------------- the bus


class FakeBus:
    """A private dbus-daemon on a unix socket in a temporary directory of its own."""

    def __init__(self, directory: Path, process: asyncio.subprocess.Process, address: str) -> None:
        self.directory = directory
        self.process = process
        self.address = address

    @staticmethod
    async def start() -> FakeBus:
        # A short path: a unix socket path must fit in 108 bytes.
        directory = Path(tempfile.mkdtemp(prefix="fake-bus-"))
        socket = directory / "bus"
        config = directory / "fake-bus.conf"
        config.write_text(FAKE_BUS_CONFIG.format(socket=socket))
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError("dbus-daemon is missing: scripts/setup.sh installs it")
        with (directory / "dbus-daemon.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                daemon,
                f"--config-file={config}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                preexec_fn=executor.die_with_parent,
            )
        bus = FakeBus(directory, process, "")
        try:
            assert process.stdout is not None
            async with asyncio.timeout(10):
                line = await process.stdout.readline()
            if not line:
                raise RuntimeError(f"dbus-daemon did not start: {bus.log()}")
            bus.address = line.decode().strip()
        except BaseException:
            await bus.stop()
            raise
        return bus

    def log(self) -> str:
        path = self.directory / "dbus-daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def kill(self) -> None:
        """Kill the daemon now (every connection is lost)."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.process.wait()
            except TimeoutError:
                await self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------------- the units


@dataclass(frozen=True)
class FakeUnitSpec:
    """A unit the fake knows, and how its main process behaves."""

    name: str
    #: "runs" until stopped or crashed; "fails" exits with ``exit_status`` while starting;
    #: "hangs" stays activating until a stop.
    behaviour: Literal["runs", "fails", "hangs"] = "runs"
    exit_status: int = 1
    #: Ignores SIGTERM: a stop ends only through KillUnit.
    stop_hangs: bool = False
    #: How long activating and deactivating last.
    transition_s: float = 0.02
    status_text: str = ""


@dataclass(frozen=True)
class FakeCall:
    """One method call that reached the fake."""

    sender: str
    path: str
    interface: str
    member: str
    args: tuple[Any, ...]


@dataclass(eq=False)
class _FakeUnit:
    spec: FakeUnitSpec | None  # None: a not-found stub made by LoadUnit
    name: str
    load_state: str = "loaded"
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    main_pid: int = 0
    exec_main_code: int = 0
    exec_main_status: int = 0
    active_enter_us: int = 0
    job: asyncio.Task[None] | None = None
    killed: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    @property
    def path(self) -> str:
        return fake_unit_path(self.name)

    def unit_props(self) -> dict[str, tuple[str, Any]]:
        error = ("", "")
        if self.load_state == "not-found":
            error = (ERR_NO_SUCH_UNIT, f"Unit {self.name} not found.")
        return {
            "Id": ("s", self.name),
            "LoadState": ("s", self.load_state),
            "ActiveState": ("s", self.active_state),
            "SubState": ("s", self.sub_state),
            "ActiveEnterTimestamp": ("t", self.active_enter_us),
            "LoadError": ("(ss)", error),
        }

    def service_props(self) -> dict[str, tuple[str, Any]]:
        return {
            "MainPID": ("u", self.main_pid),
            "ExecMainCode": ("i", self.exec_main_code),
            "ExecMainStatus": ("i", self.exec_main_status),
            "Result": ("s", self.result),
            "StatusText": ("s", self.spec.status_text if self.spec else ""),
        }


class _Reply(Exception):
    """An error reply to send (name, text)."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


_SIGNATURES = {
    (MANAGER, "Subscribe"): "",
    (MANAGER, "LoadUnit"): "s",
    (MANAGER, "StartUnit"): "ss",
    (MANAGER, "StopUnit"): "ss",
    (MANAGER, "RestartUnit"): "ss",
    (MANAGER, "KillUnit"): "ssi",
    (PROPERTIES, "Get"): "ss",
    (PROPERTIES, "GetAll"): "s",
}


class FakeSystemd:
    """Answers systemd's D-Bus calls for the units it was given (see the module docstring)."""

    def __init__(self, address: str, units: list[FakeUnitSpec]) -> None:
        self.address = address
        self.units = {spec.name: _FakeUnit(spec, spec.name) for spec in units}
        self.calls: list[FakeCall] = []
        self.subscribers: set[str] = set()
        self._router: Any = None
        self._router_cm: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._serve_task: asyncio.Task[None] | None = None
        self._job_ids = itertools.count(1)
        self._pids = itertools.count(4100)

    async def start(self) -> None:
        self._router_cm = open_dbus_router(bus=self.address)
        self._router = await self._router_cm.__aenter__()
        reply = await self._router.send_and_get_reply(
            message_bus.RequestName(FAKE_NAME, 4)  # DBUS_NAME_FLAG_DO_NOT_QUEUE
        )
        if reply.body != (1,):  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
            raise RuntimeError(f"the fake could not own {FAKE_NAME}: {reply.body}")
        ready = asyncio.Event()
        self._serve_task = asyncio.create_task(self._serve(ready))
        await ready.wait()

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._serve_task] if self._serve_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._router_cm is not None:
            with contextlib.suppress(Exception):
                await self._router_cm.__aexit__(None, None, None)

    def calls_to(self, member: str) -> list[FakeCall]:
        return [c for c in self.calls if c.member == member]

    # ------------------------------------------------------------------ test controls

    async def crash(
        self, name: str, *, signal_number: int | None = None, exit_status: int | None = None
    ) -> float:
        """The running unit's main process dies; returns the loop time the change was sent."""
        unit = self.units[name]
        assert unit.active_state == "active", f"{name} is {unit.active_state}, not active"
        if signal_number is not None:
            code, status, result = CLD_KILLED, signal_number, "signal"
        else:
            code, status, result = CLD_EXITED, exit_status or 1, "exit-code"
        await self._enter(
            unit, "failed", "failed", main_pid=0, code=code, status=status, result=result
        )
        return asyncio.get_running_loop().time()

    async def remove_unit_file(self, name: str) -> None:
        """The unit file was deleted and systemd reloaded: LoadState becomes not-found."""
        unit = self.units[name]
        unit.load_state = "not-found"
        await self._changed(unit, {"LoadState": ("s", "not-found")}, {})

    # ------------------------------------------------------------------ serving

    async def _serve(self, ready: asyncio.Event) -> None:
        with self._router.filter(MatchRule(type="method_call"), bufsize=0) as queue:
            ready.set()
            while True:
                msg = await queue.get()
                await self._answer(msg)

    async def _answer(self, msg: Any) -> None:
        fields = msg.header.fields
        call = FakeCall(
            sender=fields.get(HeaderFields.sender, ""),
            path=fields.get(HeaderFields.path, ""),
            interface=fields.get(HeaderFields.interface, ""),
            member=fields.get(HeaderFields.member, ""),
            args=tuple(msg.body),
        )
        self.calls.append(call)
        try:
            expected = _SIGNATURES.get((call.interface, call.member))
            if expected is None:
                raise _Reply(
                    ERR_UNKNOWN_METHOD,
                    f"Unknown method {call.member} or interface {call.interface}.",
                )
            signature = fields.get(HeaderFields.signature, "")
            if signature != expected:
                raise _Reply(
                    ERR_INVALID_ARGS,
                    f"Invalid arguments '{signature}' to call "
                    f"{call.interface}.{call.member}(), expecting '{expected}'.",
                )
            sig, body = await self._dispatch(call)
            await self._router.send(new_method_return(msg, sig, body))
        except _Reply as err:
            await self._router.send(new_error(msg, err.name, "s", (err.text,)))

    async def _dispatch(self, call: FakeCall) -> tuple[str | None, tuple[Any, ...]]:
        if call.interface == PROPERTIES:
            return self._properties(call)
        if call.path != FAKE_MANAGER_PATH:
            raise _Reply(ERR_UNKNOWN_OBJECT, f"Unknown object '{call.path}'.")
        if call.member == "Subscribe":
            self.subscribers.add(call.sender)
            return None, ()
        name = call.args[0]
        if not isinstance(name, str) or len(name) > 255 or not _VALID_UNIT.fullmatch(name):
            raise _Reply(ERR_INVALID_ARGS, f"Unit name {name} is not valid.")
        if call.member == "LoadUnit":
            return "o", ((await self._load(name)).path,)
        if call.member == "KillUnit":
            self._kill(self._loaded(name, stop=False), call.args[2])
            return None, ()
        mode = call.args[1]
        if mode not in JOB_MODES:
            raise _Reply(ERR_INVALID_ARGS, f"Job mode {mode} invalid.")
        verb = {"StartUnit": "start", "StopUnit": "stop", "RestartUnit": "restart"}[call.member]
        unit = self._loaded(name, stop=verb == "stop")
        return "o", (await self._queue_job(unit, verb),)

    def _properties(self, call: FakeCall) -> tuple[str, tuple[Any, ...]]:
        interface = call.args[0]
        if call.path == FAKE_MANAGER_PATH:
            if call.member == "Get" and interface == MANAGER and call.args[1] == "Version":
                return "v", (("s", FAKE_VERSION),)
            raise _Reply(ERR_UNKNOWN_PROPERTY, f"Unknown property or interface {call.args}.")
        unit = next((u for u in self.units.values() if u.path == call.path), None)
        if unit is None:
            raise _Reply(ERR_UNKNOWN_OBJECT, f"Unknown object '{call.path}'.")
        if interface == UNIT:
            props = unit.unit_props()
        elif interface == SERVICE and unit.name.endswith(".service"):
            props = unit.service_props()
        else:
            raise _Reply(ERR_UNKNOWN_INTERFACE, f"Unknown interface '{interface}'.")
        if call.member == "GetAll":
            return "a{sv}", (props,)
        if call.args[1] not in props:
            raise _Reply(ERR_UNKNOWN_PROPERTY, f"Unknown property '{call.args[1]}'.")
        return "v", (props[call.args[1]],)

    async def _load(self, name: str) -> _FakeUnit:
        unit = self.units.get(name)
        if unit is None:  # systemd makes a stub object for a unit without a file
            unit = self.units[name] = _FakeUnit(None, name, load_state="not-found")
            await self._emit(FAKE_MANAGER_PATH, MANAGER, "UnitNew", "so", (name, unit.path))
        return unit

    def _loaded(self, name: str, *, stop: bool) -> _FakeUnit:
        """bus_unit_validate_load_state(): no jobs for a unit without a file."""
        unit = self.units.get(name)
        if unit is None or unit.load_state == "not-found":
            if unit is not None and stop and unit.active_state != "inactive":
                return unit  # a running unit whose file is gone can still be stopped
            raise _Reply(ERR_NO_SUCH_UNIT, f"Unit {name} {'not loaded' if stop else 'not found'}.")
        return unit

    # ------------------------------------------------------------------ jobs

    async def _queue_job(self, unit: _FakeUnit, verb: str) -> str:
        job_id = next(self._job_ids)
        job_path = f"/org/freedesktop/systemd1/job/{job_id}"
        previous = unit.job
        if previous is not None and not previous.done():
            previous.cancel()  # mode "replace": the new job replaces the pending one
            with contextlib.suppress(asyncio.CancelledError):
                await previous
        await self._emit(FAKE_MANAGER_PATH, MANAGER, "JobNew", "uos", (job_id, job_path, unit.name))
        task = asyncio.create_task(self._run_job(unit, verb, job_id, job_path))
        unit.job = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job_path

    async def _run_job(self, unit: _FakeUnit, verb: str, job_id: int, job_path: str) -> None:
        try:
            await asyncio.sleep(0)  # the reply with the job path goes out first
            if verb in ("stop", "restart"):
                await self._stop(unit)
            result = "done"
            if verb in ("start", "restart"):
                result = await self._start(unit)
        except asyncio.CancelledError:
            await self._job_removed(job_id, job_path, unit.name, "canceled")
            raise
        await self._job_removed(job_id, job_path, unit.name, result)

    async def _job_removed(self, job_id: int, job_path: str, name: str, result: str) -> None:
        await self._emit(
            FAKE_MANAGER_PATH, MANAGER, "JobRemoved", "uoss", (job_id, job_path, name, result)
        )

    async def _start(self, unit: _FakeUnit) -> str:
        assert unit.spec is not None
        if unit.active_state == "active":
            return "done"
        pid = next(self._pids)
        await self._enter(unit, "activating", "start", main_pid=pid, code=0, status=0)
        if unit.spec.behaviour == "hangs":
            await asyncio.Event().wait()  # until a stop job replaces this one
        await asyncio.sleep(unit.spec.transition_s)
        if unit.spec.behaviour == "fails":
            await self._enter(
                unit,
                "failed",
                "failed",
                main_pid=0,
                code=CLD_EXITED,
                status=unit.spec.exit_status,
                result="exit-code",
            )
            return "failed"
        unit.active_enter_us = time.time_ns() // 1000
        await self._enter(unit, "active", "running", result="success")
        return "done"

    async def _stop(self, unit: _FakeUnit) -> None:
        if unit.active_state in ("inactive", "failed"):
            return
        assert unit.spec is not None
        await self._enter(unit, "deactivating", "stop-sigterm")
        while not unit.killed.empty():
            unit.killed.get_nowait()
        if unit.spec.stop_hangs:
            sig = await unit.killed.get()
        else:
            await asyncio.sleep(unit.spec.transition_s)
            sig = signal.SIGTERM
        if sig in CLEAN_SIGNALS:
            await self._enter(
                unit, "inactive", "dead", main_pid=0, code=CLD_KILLED, status=sig, result="success"
            )
        else:
            await self._enter(
                unit, "failed", "failed", main_pid=0, code=CLD_KILLED, status=sig, result="signal"
            )

    def _kill(self, unit: _FakeUnit, sig: int) -> None:
        if unit.active_state == "deactivating":
            unit.killed.put_nowait(sig)
        elif unit.active_state == "active" and sig not in (0, signal.SIGCONT):
            task = asyncio.create_task(self.crash(unit.name, signal_number=sig))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ state and signals

    async def _enter(
        self,
        unit: _FakeUnit,
        active: str,
        sub: str,
        *,
        main_pid: int | None = None,
        code: int | None = None,
        status: int | None = None,
        result: str | None = None,
    ) -> None:
        unit.active_state, unit.sub_state = active, sub
        service: dict[str, tuple[str, Any]] = {}
        if main_pid is not None:
            unit.main_pid = main_pid
            service["MainPID"] = ("u", main_pid)
        if code is not None:
            unit.exec_main_code = code
            service["ExecMainCode"] = ("i", code)
        if status is not None:
            unit.exec_main_status = status
            service["ExecMainStatus"] = ("i", status)
        if result is not None:
            unit.result = result
            service["Result"] = ("s", result)
        changed = {
            "ActiveState": ("s", active),
            "SubState": ("s", sub),
            "ActiveEnterTimestamp": ("t", unit.active_enter_us),
        }
        await self._changed(unit, changed, service)

    async def _changed(
        self,
        unit: _FakeUnit,
        unit_changes: dict[str, tuple[str, Any]],
        service_changes: dict[str, tuple[str, Any]],
    ) -> None:
        if service_changes and unit.name.endswith(".service"):
            await self._emit(
                unit.path,
                PROPERTIES,
                "PropertiesChanged",
                "sa{sv}as",
                (SERVICE, service_changes, []),
            )
        await self._emit(
            unit.path, PROPERTIES, "PropertiesChanged", "sa{sv}as", (UNIT, unit_changes, [])
        )

    async def _emit(
        self, path: str, interface: str, member: str, sig: str, body: tuple[Any, ...]
    ) -> None:
        if not self.subscribers:  # systemd: "signals are only sent out if a client subscribed"
            return
        await self._router.send(
            new_signal(DBusAddress(path, interface=interface), member, sig, body)
        )


@contextlib.asynccontextmanager
async def fake_systemd_on_private_bus(
    units: list[FakeUnitSpec],
) -> AsyncIterator[tuple[FakeSystemd, FakeBus]]:
    """A private bus with the fake on it; both stopped on exit."""
    bus = await FakeBus.start()
    fake = FakeSystemd(bus.address, units)
    try:
        await fake.start()
        yield fake, bus
    finally:
        await fake.stop()
        await bus.stop()


__all__ = [
    "FAKE_NAME",
    "FakeBus",
    "FakeCall",
    "FakeSystemd",
    "FakeUnitSpec",
    "fake_systemd_on_private_bus",
    "fake_unit_path",
]
