"""The host side of the guest agent protocol (the guest side is the image's ``/init``).

The guest agent is busybox ``ash`` on a virtio-serial port; its protocol is
documented with its script in ``blixard/images/function_agent.py`` (this layer
may not import that one: the protocol text below is the contract). In short,
every message is a header line with byte counts, then exactly that many
bytes, so events and outputs may hold anything, NUL and newlines included:

    host:  PING                                         guest:  PONG
    host:  INSTALL <n> <mode> <epoch|-> <hex> + n bytes  guest:  INSTALLED
    host:  RUN <request id> <n> <mode> <limit> + n bytes guest:  DONE <rc> <size> <s> <e>
                                                                 + s bytes stdout + e bytes stderr

``mode`` ``r``: the guest reads the payload with its shell's ``read`` (no fork,
one syscall per byte): only for short payloads without NUL; ``h``: ``head -c``.

Strictly one request at a time: the guest reads payloads with ``head -c``,
which may buffer past its count, so sending ahead of an answer would lose bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The protocol this host speaks (announced by the guest in READY and in the image manifest).
AGENT_VERSION = "blixard-function-agent/1"

_TOKEN = re.compile(r"[A-Za-z0-9._:-]+")

#: Longest header line accepted from the guest.
HEADER_LIMIT = 256

#: Longest payload the guest reads with its shell's ``read`` (~8 us a byte under
#: TCG here, against ~5-13 ms for the fork of ``head -c``).
SHELL_READ_MAX = 1024


def payload_mode(data: bytes) -> str:
    """``r`` (shell read, no fork) for short payloads without NUL, else ``h`` (head -c)."""
    return "r" if len(data) <= SHELL_READ_MAX and b"\0" not in data else "h"


class AgentError(Exception):
    """The channel broke (EOF, VM gone) or the guest said something off-protocol."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """One invocation as the guest reported it."""

    exit_code: int
    #: Size of the handler's stdout; ``stdout`` is empty when it exceeded the limit.
    stdout_size: int
    stdout: bytes
    #: Last bytes of stderr (only when the exit status is not 0).
    stderr_tail: bytes


def handler_script(
    function: str, handler: str, args: Sequence[str], env: Mapping[str, str]
) -> bytes:
    """What the guest sources for each invocation: env exports, ``set --`` args, the handler.

    The handler is a shell command line for the guest's ``sh``; the values
    around it are quoted so nothing the user wrote is reinterpreted.
    ``BLIXARD_FUNCTION`` is set as for the ``command`` runtime.
    """
    lines = ["# written by the blixard microvm runtime"]
    lines.append(f"export BLIXARD_FUNCTION={shlex.quote(function)}")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    if args:
        lines.append("set -- " + " ".join(shlex.quote(a) for a in args))
    lines.append(handler)
    return ("\n".join(lines) + "\n").encode()


def request_token(request_id: str) -> str:
    """The request id as one header word (``-`` if it is not a plain token)."""
    ok = 0 < len(request_id) <= 128 and _TOKEN.fullmatch(request_id) is not None
    return request_id if ok else "-"


class AgentChannel:
    """The host's end of one VM's agent port (a unix-socket chardev QEMU connected to)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def _header(self) -> list[str]:
        try:
            line = await self._reader.readline()
        except (OSError, ValueError) as exc:  # ValueError: a line past the stream limit
            raise AgentError(f"guest agent channel failed: {exc}") from None
        if not line.endswith(b"\n"):
            raise AgentError("guest agent channel closed (the VM is gone)")
        if len(line) > HEADER_LIMIT:
            raise AgentError(f"guest agent sent an oversized header: {line[:80]!r}")
        return line.decode(errors="replace").split()

    async def _exactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise AgentError("guest agent channel closed mid-answer (the VM is gone)") from None
        except OSError as exc:
            raise AgentError(f"guest agent channel failed: {exc}") from None

    async def _send(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise AgentError(f"cannot write to the guest agent: {exc}") from None

    async def _expect(self, word: str) -> list[str]:
        fields = await self._header()
        if not fields or fields[0] != word:
            raise AgentError(f"guest agent answered {' '.join(fields)!r}, expected {word}")
        return fields

    async def ready(self) -> str:
        """Wait for the agent's READY (after a boot); returns its protocol version."""
        fields = await self._expect("READY")
        version = fields[1] if len(fields) > 1 else ""
        if version != AGENT_VERSION:
            raise AgentError(f"guest agent speaks {version!r}, this host {AGENT_VERSION!r}")
        return version

    async def ping(self) -> None:
        await self._send(b"PING\n")
        await self._expect("PONG")

    async def install(self, script: bytes, *, set_clock: bool) -> None:
        """Install the handler script and stir the guest's entropy pool.

        ``set_clock`` also sets the guest's clock to the host's (one fork of
        ``date`` in the guest): needed once after a restore from a template.
        """
        seed = os.urandom(32).hex()
        epoch = str(int(time.time())) if set_clock else "-"
        header = f"INSTALL {len(script)} {payload_mode(script)} {epoch} {seed}\n"
        await self._send(header.encode() + script)
        await self._expect("INSTALLED")

    async def run(self, request_id: str, event: bytes, limit: int) -> RunResult:
        """One invocation: the event on the handler's stdin, at most ``limit`` bytes back."""
        header = f"RUN {request_token(request_id)} {len(event)} {payload_mode(event)} {limit}\n"
        await self._send(header.encode() + event)
        fields = await self._expect("DONE")
        try:
            rc, size, sent, err = (int(f) for f in fields[1:5])
        except ValueError:
            raise AgentError(f"guest agent sent a bad answer: {' '.join(fields)!r}") from None
        if len(fields) != 5 or min(rc, size, sent, err) < 0 or sent > limit or err > 65_536:
            raise AgentError(f"guest agent sent a bad answer: {' '.join(fields)!r}")
        stdout = await self._exactly(sent)
        stderr = await self._exactly(err)
        return RunResult(rc, size, stdout, stderr)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
