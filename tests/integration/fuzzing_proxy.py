"""A TCP proxy between a real client and a real server that mangles the timing of the bytes.

Modelled on asyncpg's ``TCPFuzzingProxy``: it never changes a byte, only how and when bytes
arrive: split into 1-byte pieces, delayed, stalled for a while, or cut off after a given count
(the connection is then closed both ways, as a dying peer or a broken network would).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class Mangling:
    """How one direction's bytes are passed on."""

    piece: int = 65536  # the most bytes passed on at once (1: every byte alone)
    delay: float = 0.0  # seconds before each piece
    stall_after: int | None = None  # after this many bytes, pass nothing for ``stall_for`` s
    stall_for: float = 0.0
    cut_after: int | None = None  # after this many bytes, close the connection both ways


class FuzzingProxy:
    """Listens on 127.0.0.1:0 and forwards every connection to ``target`` (``tcp://HOST:PORT``)."""

    def __init__(
        self, target: str, upstream: Mangling | None = None, downstream: Mangling | None = None
    ) -> None:
        host, _, port = target.removeprefix("tcp://").rpartition(":")
        self._target = (host, int(port))
        self.upstream = upstream or Mangling()  # client -> server
        self.downstream = downstream or Mangling()  # server -> client
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""
        self.cut = asyncio.Event()  # set once a connection was cut

    async def __aenter__(self) -> FuzzingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        writers = (client_w, server_w)
        up = asyncio.create_task(self._pump(client_r, server_w, self.upstream, writers))
        down = asyncio.create_task(self._pump(server_r, client_w, self.downstream, writers))
        self._tasks |= {up, down}
        for task in (up, down):
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        how: Mangling,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        passed, stalled = 0, False
        try:
            while data := await reader.read(65536):
                while data:
                    limit = how.piece
                    if how.cut_after is not None:
                        limit = min(limit, how.cut_after - passed)
                    if how.stall_after is not None and not stalled:
                        limit = min(limit, max(how.stall_after - passed, 1))
                    piece, data = data[:limit], data[limit:]
                    if how.delay:
                        await asyncio.sleep(how.delay)
                    writer.write(piece)
                    await writer.drain()
                    passed += len(piece)
                    if how.stall_after is not None and not stalled and passed >= how.stall_after:
                        stalled = True
                        await asyncio.sleep(how.stall_for)
                    if how.cut_after is not None and passed >= how.cut_after:
                        self.cut.set()
                        for each in writers:
                            each.transport.abort()
                        return
                    if how.piece == 1:
                        await asyncio.sleep(0)  # let the other side read each byte alone
            writer.write_eof()
        except (ConnectionError, RuntimeError, OSError):
            for each in writers:
                each.transport.abort()
