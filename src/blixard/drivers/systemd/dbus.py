"""A thin asyncio D-Bus client for systemd's manager, on jeepney (pure Python, no C).

Only what the driver uses of org.freedesktop.systemd1(5)
(https://www.freedesktop.org/software/systemd/man/latest/org.freedesktop.systemd1.html):

* ``Manager.Subscribe()`` once per connection: systemd sends its signals only
  while at least one client subscribed.
* ``Manager.LoadUnit(s name) -> o``, ``StartUnit``/``StopUnit``/``RestartUnit(s name,
  s mode) -> o job`` (mode ``"replace"``), ``KillUnit(s name, s whom, i signal)``.
* ``org.freedesktop.DBus.Properties.Get``/``GetAll`` on the manager (``Version``)
  and on unit objects.
* Signals, through match rules restricted to sender ``org.freedesktop.systemd1``:
  ``Manager.JobRemoved(u id, o job, s unit, s result)`` and
  ``org.freedesktop.DBus.Properties.PropertiesChanged(s, a{sv}, as)`` on a unit's path.

Signals are used only as wake-ups: whoever receives one reads the state again
with a method call to systemd's name, so a lost, merged or forged signal can
cost a read, never a wrong state.

Every call carries ``NO_AUTO_START`` (the bus never tries to activate systemd),
has a timeout, and an error reply becomes a :class:`BusError` naming the D-Bus
error (``org.freedesktop.systemd1.NoSuchUnit``, ...). The connection is opened
on first use and again after it was lost; a lost connection wakes every watch
with ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from jeepney import (  # type: ignore[import-untyped]
    DBusAddress,
    HeaderFields,
    MatchRule,
    MessageFlag,
    MessageType,
    new_method_call,
)
from jeepney.auth import BEGIN, Authenticator  # type: ignore[import-untyped]
from jeepney.bus import get_bus  # type: ignore[import-untyped]
from jeepney.io.asyncio import DBusConnection  # type: ignore[import-untyped]

from blixard.drivers.protocol import DriverError

SYSTEMD_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
BUS_NAME = "org.freedesktop.DBus"
BUS_PATH = "/org/freedesktop/DBus"

DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
#: sd-bus's default method call timeout.
DEFAULT_CALL_TIMEOUT_S = 25.0

NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
_UNREACHABLE_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",
    }
)
_DENIED_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    }
)


class BusUnreachable(DriverError):
    """systemd's bus (or systemd on it) could not be reached."""

    code = "systemd_unreachable"


class BusError(DriverError):
    """systemd answered a call with a D-Bus error."""

    def __init__(self, call: str, name: str, text: str) -> None:
        hint = ""
        if name in _DENIED_ERRORS:
            hint = " (the agent needs root, or a polkit rule allowing it to manage units)"
        super().__init__(f"{call}: {name}: {text}{hint}")
        self.call = call
        self.name = name
        self.text = text


@dataclass(frozen=True, slots=True)
class Signal:
    path: str
    interface: str
    member: str
    body: tuple[object, ...]


@dataclass(eq=False)
class _Watch:
    path: str
    interface: str
    member: str
    #: Required string arguments by position (like a match rule's ``argN``).
    args: dict[int, str]
    queue: asyncio.Queue[Signal | None] = field(default_factory=asyncio.Queue)

    def matches(self, msg: Any) -> bool:
        fields = msg.header.fields
        if (
            fields.get(HeaderFields.path) != self.path
            or fields.get(HeaderFields.interface) != self.interface
            or fields.get(HeaderFields.member) != self.member
        ):
            return False
        body = msg.body
        return all(n < len(body) and body[n] == value for n, value in self.args.items())

    def rule(self) -> str:
        match = MatchRule(
            type="signal",
            sender=SYSTEMD_NAME,
            path=self.path,
            interface=self.interface,
            member=self.member,
        )
        for n, value in self.args.items():
            match.add_arg_condition(n, value)
        return cast(str, match.serialise())


class _Link:
    """One authenticated connection with a receiver task matching replies and signals."""

    def __init__(self, conn: Any, watches: set[_Watch]) -> None:
        self.conn = conn
        self.serials = itertools.count(1)
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.watches = watches
        self.closed = False
        self.receiver = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        try:
            while True:
                msg = await self.conn.receive()
                self._dispatch(msg)
        except Exception:  # EOF, a socket error, or bytes jeepney cannot parse
            pass  # whatever it was, this connection is over: fail its calls, wake its watches
        finally:
            self._lost()

    def _dispatch(self, msg: Any) -> None:
        kind = msg.header.message_type
        if kind in (MessageType.method_return, MessageType.error):
            future = self.replies.pop(msg.header.fields.get(HeaderFields.reply_serial, -1), None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif kind == MessageType.signal:
            for watch in list(self.watches):
                if watch.matches(msg):
                    watch.queue.put_nowait(
                        Signal(watch.path, watch.interface, watch.member, tuple(msg.body))
                    )

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self.replies.values():
            if not future.done():
                future.set_exception(BusUnreachable("the D-Bus connection closed"))
        self.replies.clear()
        for watch in list(self.watches):
            watch.queue.put_nowait(None)
        self.conn.writer.close()

    async def send(self, msg: Any) -> asyncio.Future[Any]:
        """Send a method call; the future gets its reply message."""
        if self.closed:
            raise BusUnreachable("the D-Bus connection closed")
        serial = next(self.serials)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[serial] = future
        try:
            await self.conn.send(msg, serial=serial)
        except OSError as exc:
            self.replies.pop(serial, None)
            self._lost()
            raise BusUnreachable(f"the D-Bus connection failed: {exc}") from exc
        return future

    async def send_no_reply(self, msg: Any) -> None:
        """Send a message that asks for no reply (best effort: errors are ignored)."""
        if self.closed:
            return
        msg.header.flags |= MessageFlag.no_reply_expected | MessageFlag.no_auto_start
        with contextlib.suppress(OSError):
            await self.conn.send(msg, serial=next(self.serials))

    async def close(self) -> None:
        self.receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.receiver
        self._lost()
        with contextlib.suppress(OSError):
            await self.conn.writer.wait_closed()


class SystemdBus:
    """A connection to the bus that systemd's manager is on (see the module docstring)."""

    def __init__(self, address: str, *, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S) -> None:
        self.address = address
        self.call_timeout_s = call_timeout_s
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()
        self._watches: set[_Watch] = set()

    # ----------------------------------------------------------------- connection

    async def _connected(self) -> _Link:
        link = self._link
        if link is not None and not link.closed:
            return link
        async with self._connecting:
            if self._link is not None and not self._link.closed:
                return self._link
            self._link = await self._open()
            return self._link

    async def _open(self) -> _Link:
        try:
            socket_path = get_bus(self.address)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise BusUnreachable(f"unusable D-Bus address {self.address!r}: {exc}") from exc
        try:
            async with asyncio.timeout(self.call_timeout_s):
                reader, writer = await asyncio.open_unix_connection(socket_path)
                try:
                    auth = Authenticator()
                    for line in auth:
                        writer.write(line)
                        await writer.drain()
                        answer = await reader.read(1024)
                        if not answer:
                            raise EOFError("the bus closed the connection during authentication")
                        auth.feed(answer)
                    writer.write(BEGIN)
                    await writer.drain()
                    link = _Link(DBusConnection(reader, writer), self._watches)
                    bus = DBusAddress(BUS_PATH, bus_name=BUS_NAME, interface=BUS_NAME)
                    hello = await self._exchange(link, new_method_call(bus, "Hello"), "Hello")
                    link.conn.unique_name = hello[0]
                    # Watches that outlived a lost connection are woken with None and
                    # re-register; nothing to restore here but systemd's subscription.
                    manager = DBusAddress(
                        MANAGER_PATH, bus_name=SYSTEMD_NAME, interface=MANAGER_IFACE
                    )
                    await self._exchange(link, new_method_call(manager, "Subscribe"), "Subscribe")
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError as exc:
            raise BusUnreachable(
                f"no answer from {self.address} within {self.call_timeout_s:g}s"
            ) from exc
        except (
            OSError,
            EOFError,
            ValueError,
        ) as exc:  # jeepney's AuthenticationError is a ValueError
            raise BusUnreachable(f"cannot connect to D-Bus at {self.address}: {exc}") from exc
        return link

    async def _exchange(self, link: _Link, msg: Any, what: str) -> tuple[object, ...]:
        msg.header.flags |= MessageFlag.no_auto_start
        future = await link.send(msg)
        reply = await future
        if reply.header.message_type == MessageType.error:
            name = str(reply.header.fields.get(HeaderFields.error_name, "unknown error"))
            text = str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""
            if name in _UNREACHABLE_ERRORS:
                raise BusUnreachable(f"{what}: systemd is not reachable on {self.address}: {text}")
            raise BusError(what, name, text)
        return tuple(reply.body)

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    # ----------------------------------------------------------------- calls

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str | None = None,
        body: tuple[object, ...] = (),
    ) -> tuple[object, ...]:
        """Call a method of systemd and return its reply's body; BusError on an error reply."""
        what = f"{interface.rsplit('.', 1)[-1]}.{member}"
        try:
            async with asyncio.timeout(self.call_timeout_s):
                link = await self._connected()
                msg = new_method_call(
                    DBusAddress(path, bus_name=SYSTEMD_NAME, interface=interface),
                    member,
                    signature,
                    body,
                )
                return await self._exchange(link, msg, what)
        except TimeoutError as exc:
            raise BusUnreachable(
                f"{what}: no answer from systemd within {self.call_timeout_s:g}s"
            ) from exc

    async def manager(
        self, member: str, signature: str | None = None, *args: object
    ) -> tuple[object, ...]:
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, args)

    async def load_unit(self, unit: str) -> str:
        """LoadUnit: the unit's object path (of a ``not-found`` stub if it has no file)."""
        (path,) = await self.manager("LoadUnit", "s", unit)
        return str(path)

    async def unit_job(self, method: str, unit: str, mode: str = "replace") -> str:
        """StartUnit/StopUnit/RestartUnit: the queued job's object path."""
        (job,) = await self.manager(method, "ss", unit, mode)
        return str(job)

    async def kill_unit(self, unit: str, signal: int, whom: str = "all") -> None:
        await self.manager("KillUnit", "ssi", unit, whom, signal)

    async def get_all(self, path: str, interface: str) -> dict[str, object]:
        """Properties.GetAll, variants unwrapped."""
        (props,) = await self.call(path, PROPERTIES_IFACE, "GetAll", "s", (interface,))
        if not isinstance(props, dict):
            raise DriverError(f"GetAll({interface}) on {path}: unexpected answer {props!r}")
        return {str(k): _unwrap(v) for k, v in props.items()}

    async def get(self, path: str, interface: str, name: str) -> object:
        (value,) = await self.call(path, PROPERTIES_IFACE, "Get", "ss", (interface, name))
        return _unwrap(value)

    # ----------------------------------------------------------------- signals

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, interface: str, member: str, args: dict[int, str] | None = None
    ) -> AsyncIterator[asyncio.Queue[Signal | None]]:
        """Receive the matching signals of systemd while inside; ``None`` = connection lost.

        The match is in place (AddMatch answered) before the body runs, so a
        state read inside cannot miss a change that happened after it.
        """
        watch = _Watch(path, interface, member, dict(args or {}))
        rule = watch.rule()
        bus = DBusAddress(BUS_PATH, bus_name=BUS_NAME, interface=BUS_NAME)
        try:
            async with asyncio.timeout(self.call_timeout_s):
                link = await self._connected()
                self._watches.add(watch)
                await self._exchange(
                    link, new_method_call(bus, "AddMatch", "s", (rule,)), "AddMatch"
                )
        except TimeoutError as exc:
            self._watches.discard(watch)
            raise BusUnreachable(f"AddMatch: no answer within {self.call_timeout_s:g}s") from exc
        except BaseException:
            self._watches.discard(watch)
            raise
        try:
            yield watch.queue
        finally:
            self._watches.discard(watch)
            # Best effort, without waiting for the answer: a rule left behind
            # only costs a few messages until the connection closes.
            await link.send_no_reply(new_method_call(bus, "RemoveMatch", "s", (rule,)))


def _unwrap(value: object) -> object:
    """jeepney gives a variant as (signature, value)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return value[1]
    return value
