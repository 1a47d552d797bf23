"""The guest agent protocol, both ends, without a VM: the agent's serving loop runs
under the host's busybox ``sh`` on one end of a socketpair, :class:`AgentChannel`
on the other. Milliseconds instead of a boot, and the same script the guest runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blixard.functions.microvm.agent import (
    AgentChannel,
    AgentError,
    handler_script,
    payload_mode,
    request_token,
)
from blixard.images.function_agent import AGENT_VERSION, agent_loop_script

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentChannel]:
    (tmp_path / "fn").mkdir()
    (tmp_path / "io").mkdir()
    host, guest = socket.socketpair()
    script = (
        f"exec 3<&0 0</dev/null; fn={tmp_path}/fn io={tmp_path}/io rnd=/dev/null\n"
        + agent_loop_script()
    )
    proc = await asyncio.create_subprocess_exec(BUSYBOX, "sh", "-c", script, stdin=guest)
    guest.close()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    channel = AgentChannel(reader, writer)
    assert await channel.ready() == AGENT_VERSION
    yield channel
    channel.close()
    proc.kill()
    await proc.wait()


async def install(agent: AgentChannel, handler: str, *args: str, **env: str) -> None:
    await agent.install(handler_script("fn1", handler, args, env), set_clock=False)


async def test_ping_install_and_run(agent: AgentChannel) -> None:
    await agent.ping()
    await install(agent, 'read -r e; echo "{\\"e\\":$e,\\"id\\":\\"$BLIXARD_REQUEST_ID\\"}"')
    result = await agent.run("req-7", b"[1,2]\n", 1024)
    assert (result.exit_code, result.stdout, result.stderr_tail) == (
        0,
        b'{"e":[1,2],"id":"req-7"}\n',
        b"",
    )


@pytest.mark.parametrize(
    "event",
    [
        b"",
        b"no newline",
        b"a\x00b\nc",  # NUL: head -c mode
        bytes(range(1, 256)),  # every other byte: shell read mode
        bytes(range(256)) * 40,  # long: head -c mode
        b"\n\n  trailing spaces  \n",
    ],
)
async def test_events_and_outputs_round_trip_byte_exact(agent: AgentChannel, event: bytes) -> None:
    await install(agent, "cat")
    result = await agent.run("r", event, 1 << 20)
    assert result.exit_code == 0
    assert result.stdout_size == len(event)
    assert result.stdout == event


async def test_args_env_and_function_name_are_quoted(agent: AgentChannel) -> None:
    await install(
        agent,
        'printf "%s|%s|%s|%s" "$1" "$2" "$FOO" "$BLIXARD_FUNCTION"',
        "a b",
        "$x'",
        FOO="`id`;",
    )
    result = await agent.run("r", b"", 1024)
    assert result.stdout == b"a b|$x'|`id`;|fn1"


async def test_failure_sends_stderr_tail_and_agent_goes_on(agent: AgentChannel) -> None:
    await install(
        agent,
        'read -r e; [ "$e" = ok ] && { echo 1; exit 0; }; '
        'echo partial; echo "it broke" >&2; exit 4',
    )
    result = await agent.run("r", b"no\n", 1024)
    assert (result.exit_code, result.stdout, result.stderr_tail) == (4, b"partial\n", b"it broke\n")
    assert (await agent.run("r", b"ok\n", 1024)).stdout == b"1\n"


async def test_output_over_the_limit_is_reported_not_sent(agent: AgentChannel) -> None:
    await install(agent, "head -c 5000 /dev/zero; echo x >&2")
    result = await agent.run("r", b"", 4096)
    assert (result.stdout_size, result.stdout) == (5000, b"")
    assert (await agent.run("r", b"", 8192)).stdout == b"\x00" * 5000


async def test_a_handler_cannot_write_to_the_channel(agent: AgentChannel) -> None:
    await install(agent, "echo '\"x\"' >&3; echo 1")
    result = await agent.run("r", b"", 1024)
    assert result.stdout == b"1\n"
    await agent.ping()


async def test_syntax_error_and_exit_in_handler_leave_the_agent_serving(
    agent: AgentChannel,
) -> None:
    await install(agent, "if then fi (")
    assert (await agent.run("r", b"", 1024)).exit_code != 0
    await install(agent, "exit 0")
    assert (await agent.run("r", b"", 1024)).exit_code == 0
    await agent.ping()


async def test_eof_is_agent_error(tmp_path: Path) -> None:
    host, guest = socket.socketpair()
    guest.close()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    with pytest.raises(AgentError, match="closed"):
        await AgentChannel(reader, writer).ready()
    writer.close()


def test_payload_mode_and_request_token() -> None:
    assert payload_mode(b"x" * 1024) == "r"
    assert payload_mode(b"x" * 1025) == "h"
    assert payload_mode(b"a\x00") == "h"
    assert request_token("abc-1.2:3") == "abc-1.2:3"
    assert request_token("a b") == "-"
    assert request_token("") == "-"
    assert os.path.exists(BUSYBOX)
