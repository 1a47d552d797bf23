"""systemd units as the driver sees them: checked names, and their state in Blixard's terms.

Unit names
----------
:func:`check_unit_name` is the domain's rule (:func:`blixard.domain.names.validate_unit_name`,
the same one a stored ``ServiceSpec.unit`` passed): letters, digits, ``:``, ``-``, ``_``,
``.``, one ``@`` for a template instance, a known unit type suffix (``.service`` is added
when none is given), at most 255 characters. It refuses, naming the field and why: shell
metacharacters (``;``, ``$``, ``(``, backticks, ``|``, ``&``, ...), spaces and other
whitespace, path separators (``/``), ``..``, the empty name, and over-long names. It is
stricter than systemd.unit(5), which also allows ``\\`` escapes: a name reaches every
node's systemd, so Blixard accepts only names that need no escaping anywhere. Every name
is checked before any D-Bus message is built.

State mapping
-------------
systemd's ``ActiveState`` (org.freedesktop.systemd1(5), "Unit Objects") becomes a
:class:`~blixard.drivers.protocol.TaskStatus`; ``SubState``, the type's ``Result`` and the
main process's ``ExecMainCode``/``ExecMainStatus`` (waitid(2)'s ``si_code``/``si_status``)
go into the message and the exit fields:

=================  =========  ===============================================================
ActiveState        TaskState  exit fields and message
=================  =========  ===============================================================
``active``         RUNNING    "active (running)"
``reloading``      RUNNING    "reloading (...)"
``refreshing``     RUNNING    "refreshing (...)" (newer systemd)
``activating``     RUNNING    "starting (...)": start/restart wait for their job to end;
                              also systemd's own ``Restart=`` (SubState ``auto-restart``)
``deactivating``   RUNNING    "stopping (...)": it still runs until systemd is done
``inactive``       EXITED     systemd judged the end clean: ``exit_code`` 0; the main
                              process's real exit (e.g. "killed by SIGTERM" after a stop, or
                              a code listed in SuccessExitStatus=) is in the message
``failed``         EXITED     the failure: ``exit_code`` = ExecMainStatus if the main
                              process exited non-zero, ``signal`` = ExecMainStatus if a
                              signal killed it, both None otherwise (e.g. ``Result=timeout``,
                              ``start-limit-hit``); the message names ``Result``
``maintenance``    EXITED     ``exit_code`` None: not running, systemd is cleaning it
anything else      RUNNING    never reported ended unless systemd says so: an agent that
                              restarts on EXITED must not start a second copy
=================  =========  ===============================================================

``LoadState`` ``not-found`` (no unit file) of a unit that is not running raises
:class:`UnitNotFound` (a :class:`~blixard.drivers.protocol.TaskGone`); a unit whose file
was removed while it runs keeps its ActiveState, the message says so.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass

from blixard.domain.names import UNIT_TYPES, validate_unit_name
from blixard.drivers.protocol import TaskGone, TaskState, TaskStatus

__all__ = [
    "UNIT_TYPES",
    "UnitNotFound",
    "UnitState",
    "check_unit_name",
    "task_status",
    "type_interface",
]

#: waitid(2) si_code values systemd reports in ExecMainCode.
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3

_RUNNING_STATES = frozenset({"active", "reloading", "refreshing", "activating", "deactivating"})
_VERB = {"activating": "starting", "deactivating": "stopping"}

#: The type-specific D-Bus interface of each unit type (org.freedesktop.systemd1(5)).
_TYPE_INTERFACES = {
    "service": "Service",
    "socket": "Socket",
    "target": "Target",
    "timer": "Timer",
    "path": "Path",
    "mount": "Mount",
    "automount": "Automount",
    "swap": "Swap",
    "slice": "Slice",
}


class UnitNotFound(TaskGone):
    """systemd has no such unit on this node (LoadState ``not-found``, or NoSuchUnit)."""

    code = "unit_not_found"


def check_unit_name(value: object, field: str = "unit") -> str:
    """The unit name to send to systemd, or ValidationError(field, reason); see the module doc."""
    return validate_unit_name(value, field)


def type_interface(unit: str) -> str:
    """``org.freedesktop.systemd1.Service`` for ``nginx.service``, and so on."""
    suffix = unit.rpartition(".")[2]
    return f"org.freedesktop.systemd1.{_TYPE_INTERFACES[suffix]}"


@dataclass(frozen=True, slots=True)
class UnitState:
    """The properties of one unit the driver reads (Unit interface + the type's interface)."""

    unit: str
    load_state: str
    active_state: str
    sub_state: str
    #: The type's ``Result`` ("success", "exit-code", "signal", ...); "" if the type has none.
    result: str = ""
    main_pid: int = 0
    exec_main_code: int = 0
    exec_main_status: int = 0
    #: CLOCK_REALTIME microseconds of the last entry into ``active`` (0: never).
    active_enter_us: int = 0
    status_text: str = ""
    load_error: str = ""

    @staticmethod
    def from_properties(
        unit: str, unit_props: Mapping[str, object], type_props: Mapping[str, object]
    ) -> UnitState:
        """Build from GetAll of org.freedesktop.systemd1.Unit and of the type's interface."""
        load_error = unit_props.get("LoadError")
        error_text = ""
        if isinstance(load_error, tuple) and len(load_error) == 2 and load_error[0]:
            error_text = f"{load_error[1]} ({load_error[0]})"
        return UnitState(
            unit=unit,
            load_state=_text(unit_props, "LoadState"),
            active_state=_text(unit_props, "ActiveState"),
            sub_state=_text(unit_props, "SubState"),
            result=_text(type_props, "Result"),
            main_pid=_number(type_props, "MainPID"),
            exec_main_code=_number(type_props, "ExecMainCode"),
            exec_main_status=_number(type_props, "ExecMainStatus"),
            active_enter_us=_number(unit_props, "ActiveEnterTimestamp"),
            status_text=_text(type_props, "StatusText"),
            load_error=error_text,
        )

    @property
    def summary(self) -> str:
        """Like systemctl's "Active:" line: ``active (running)``, ``failed (Result: exit-code)``."""
        text = f"{self.active_state} ({self.sub_state})" if self.sub_state else self.active_state
        if self.active_state == "failed" and self.result:
            text = f"{self.active_state} (Result: {self.result})"
        return text


def _text(props: Mapping[str, object], name: str) -> str:
    value = props.get(name, "")
    return value if isinstance(value, str) else str(value)


def _number(props: Mapping[str, object], name: str) -> int:
    value = props.get(name, 0)
    return value if isinstance(value, int) else 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _main_exit(state: UnitState) -> str:
    """How the main process ended, as systemctl says it: "code=exited, status=1"."""
    if state.exec_main_code == CLD_EXITED:
        return f"main process exited, code=exited, status={state.exec_main_status}"
    if state.exec_main_code in (CLD_KILLED, CLD_DUMPED):
        how = "killed" if state.exec_main_code == CLD_KILLED else "dumped"
        return (
            f"main process exited, code={how}, "
            f"status={state.exec_main_status}/{_signal_name(state.exec_main_status)}"
        )
    return "no main process exit recorded"


def task_status(state: UnitState, *, missing_is_gone: bool = True) -> TaskStatus:
    """The unit's state in Blixard's terms (the table of the module docstring).

    ``missing_is_gone=False`` maps a stopped unit without a file like any stopped
    unit (what a stop that just ended it reports) instead of raising UnitNotFound.
    """
    name, active = state.unit, state.active_state
    if missing_is_gone and state.load_state == "not-found" and active not in _RUNNING_STATES:
        why = f": {state.load_error}" if state.load_error else ""
        raise UnitNotFound(f"{name}: systemd has no such unit on this node (not-found){why}")
    notes = []
    if state.load_state not in ("loaded", ""):
        notes.append(f"unit file {state.load_state}")
    if state.status_text:
        notes.append(f"status: {state.status_text!r}")
    tail = "".join(f"; {note}" for note in notes)
    if active in _RUNNING_STATES:
        verb = _VERB.get(active, active)
        sub = f" ({state.sub_state})" if state.sub_state else ""
        return TaskStatus(TaskState.RUNNING, message=f"{name} {verb}{sub}{tail}")
    if active == "inactive":
        return TaskStatus(
            TaskState.EXITED,
            exit_code=0,
            message=f"{name} inactive ({state.sub_state or 'dead'}); {_main_exit(state)}{tail}",
        )
    if active == "failed":
        exit_code: int | None = None
        sig: int | None = None
        if state.exec_main_code == CLD_EXITED and state.exec_main_status != 0:
            exit_code = state.exec_main_status
        elif state.exec_main_code in (CLD_KILLED, CLD_DUMPED):
            sig = state.exec_main_status
        return TaskStatus(
            TaskState.EXITED,
            exit_code=exit_code,
            signal=sig,
            message=f"{name} failed (Result: {state.result or 'unknown'}); "
            f"{_main_exit(state)}{tail}",
        )
    if active == "maintenance":
        return TaskStatus(TaskState.EXITED, message=f"{name} in maintenance (not running){tail}")
    return TaskStatus(
        TaskState.RUNNING,
        message=f"{name} in unknown ActiveState {active!r}: not assumed ended{tail}",
    )
