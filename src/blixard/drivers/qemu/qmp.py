"""A small QMP client: one short connection per command batch.

QMP is line-delimited JSON over a unix socket: a greeting, then
``qmp_capabilities``, then commands whose answers (``return`` or ``error``)
may be preceded by asynchronous ``event`` messages. That is little enough to
speak directly with asyncio, with precise types and timeouts, rather than
through a dependency.

Connections are short on purpose: a QEMU monitor serves one client at a
time, so a client that stayed connected would lock out every other agent
process (or an operator's ``socat``). The driver serialises its own calls.

A unix socket path is limited to 107 bytes; longer paths (deep run
directories) are reached through ``/proc/self/fd/<dir fd>/<name>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

_LINE_LIMIT = 1 << 20
_UNIX_PATH_MAX = 107


class QmpError(Exception):
    """The monitor cannot be reached or answered badly (QEMU gone, socket missing)."""


class QmpCommandError(QmpError):
    """QEMU refused a command; ``error_class`` is QMP's class (e.g. GenericError)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if len(str(path).encode()) <= _UNIX_PATH_MAX:
        return await asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT)
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        return await asyncio.open_unix_connection(
            f"/proc/self/fd/{dir_fd}/{path.name}", limit=_LINE_LIMIT
        )
    finally:
        os.close(dir_fd)


class Qmp:
    """An open, negotiated QMP session; use ``async with Qmp.connect(path) as qmp``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        #: Events seen while waiting for answers (POWERDOWN, SHUTDOWN, STOP, ...).
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: Path, timeout_s: float = 5.0) -> Qmp:
        """Connect, read the greeting and leave negotiation mode."""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await _open(path)
                session = cls(reader, writer)
                try:
                    greeting = await session._read()
                    if "QMP" not in greeting:
                        raise QmpError(f"{path}: not a QMP monitor (greeting {greeting!r})")
                    await session.execute("qmp_capabilities")
                except BaseException:
                    await session.close()
                    raise
                return session
        except TimeoutError:
            raise QmpError(f"{path}: no QMP greeting within {timeout_s}s") from None
        except OSError as exc:
            raise QmpError(f"{path}: cannot connect: {exc.strerror or exc}") from None

    async def __aenter__(self) -> Qmp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:  # ValueError: a line over the limit
            raise QmpError(f"QMP read failed: {exc}") from None
        if not line:
            raise QmpError("QMP connection closed by QEMU")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP sent invalid JSON: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QmpError(f"QMP sent a non-object: {line[:200]!r}")
        return message

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout_s: float = 5.0
    ) -> Any:
        """Run one command; returns its ``return`` value, raises QmpCommandError on ``error``."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
                while True:
                    message = await self._read()
                    if "event" in message:
                        self.events.append(message)
                        continue
                    if message.get("id") != self._next_id:
                        continue
                    if "error" in message:
                        error = message["error"]
                        raise QmpCommandError(
                            command, str(error.get("class")), str(error.get("desc"))
                        )
                    return message.get("return")
        except TimeoutError:
            raise QmpError(f"QMP {command}: no answer within {timeout_s}s") from None
        except OSError as exc:
            raise QmpError(f"QMP {command}: {exc}") from None


async def qmp_call(
    path: Path, command: str, arguments: Mapping[str, Any] | None = None, timeout_s: float = 5.0
) -> Any:
    """Connect, run one command, disconnect."""
    async with await Qmp.connect(path, timeout_s) as qmp:
        return await qmp.execute(command, arguments, timeout_s)
