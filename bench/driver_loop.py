"""The server's per-message Python cost without sockets: ConnectionDriver objects of a real
``mailgate serve --sink`` configuration (built-in relay control, INFO log lines to a file)
fed the load shape of smtp-source (HELO, MAIL, RCPT, DATA, 1 KiB, QUIT) through a fake
transport, on uvloop. What is left out is the kernel's part (accept, send, recv) and the
event loop's polling; what is measured is the CPU time of the process per message.

    PYTHONPATH=src python bench/driver_loop.py reuse 20000     # one connection, many messages
    PYTHONPATH=src python bench/driver_loop.py new 5000        # a connection per message
    PYTHONPATH=src python bench/driver_loop.py reuse 20000 --profile [cumulative]

Steadier than a loaded server on a shared machine (no client, no scheduler between the
two): compare two trees with interleaved runs and take the median or the minimum.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mailgate.cli import build_parser
from mailgate.composition.server import Server
from mailgate.config import build_options
from mailgate.server.connection import ConnectionDriver
from mailgate.server.logs import setup_logging

BODY = b"".join(b"X" * 78 + b"\r\n" for _ in range(12))
HEADER = b"From: <a@x.test>\r\nTo: <postmaster>\r\nSubject: test\r\nMessage-Id: <1@x.test>\r\n\r\n"
MESSAGE = (
    b"MAIL FROM:<a@x.test>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    HEADER + BODY + b".\r\n",
)


class FakeTransport(asyncio.Transport):
    """Keeps what the server writes; a loopback peer on port 40000."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}
        return extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def send(driver: ConnectionDriver, line: bytes) -> None:
    """One command, and the loop turned until the server has answered it (a hook task)."""
    driver.data_received(line)
    while driver._task is not None:
        await asyncio.sleep(0)


async def session(server: Server, messages: int) -> FakeTransport:
    driver = ConnectionDriver(server)
    transport = FakeTransport()
    driver.connection_made(transport)
    while driver._task is not None:
        await asyncio.sleep(0)
    await send(driver, b"HELO client.test\r\n")
    for _ in range(messages):
        for line in MESSAGE:
            await send(driver, line)
    await send(driver, b"QUIT\r\n")
    driver.connection_lost(None)
    return transport


async def main(mode: str, count: int, profile: str | None) -> None:
    args = build_parser().parse_args(
        ["serve", "--listen", "127.0.0.1:0", "--sink", "--max-clients-per-ip", "100000"]
    )
    options = build_options(args)
    setup_logging("text", "INFO")
    log_file = Path(tempfile.mkdtemp()) / "server.log"
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(log_file.open("w"))
    server = Server(options)
    await server.start()
    # Warm-up: every path once, caches filled.
    assert (await session(server, 200)).out[-2].startswith(b"250")
    for _ in range(200):
        await session(server, 1)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    if mode == "reuse":
        transport = await session(server, count)
        assert transport.out[-2].startswith(b"250"), transport.out[-3:]
    else:
        for _ in range(count):
            await session(server, 1)
    if profiler is not None:
        profiler.disable()
    used = time.process_time() - started
    print(f"{mode}: {1e6 * used / count:.1f} us/msg CPU (in-process, no I/O)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(profile).print_stats(40)
    await server.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "reuse"
    if mode not in ("reuse", "new"):
        raise SystemExit("usage: driver_loop.py reuse|new [COUNT] [--profile [SORT]]")
    count = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 20000
    profile = None
    if "--profile" in sys.argv:
        rest = sys.argv[sys.argv.index("--profile") + 1 :]
        profile = rest[0] if rest else "tottime"
    import uvloop

    uvloop.run(main(mode, count, profile))
