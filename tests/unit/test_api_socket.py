"""The API's listening socket: accepted connections must have TCP_NODELAY.

Without it every response on a kept-alive connection waited for the client's
delayed ACK (~40 ms measured by benchmarks/vm.py): asyncio sets TCP_NODELAY
on accepted sockets only when the listening socket says its protocol is TCP.
"""

from __future__ import annotations

import asyncio
import socket

from blixard.daemon.node import bind_api_socket


async def test_accepted_connections_have_nodelay() -> None:
    sock = bind_api_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await seen != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
