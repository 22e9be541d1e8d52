"""A private Redis server for the test suite: Debian's ``redis-server`` on a free port of
127.0.0.1, in a temporary directory, without persistence, gone at the end.

Used when ``MAILGATE_TEST_REDIS_URL`` names no server; tests that stop and start Redis
(outages) always start their own.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["REDIS_URL_VARIABLE", "PrivateRedis", "free_port", "redis_server_binary"]

REDIS_URL_VARIABLE = "MAILGATE_TEST_REDIS_URL"
# A fresh redis-server answers within milliseconds; a stuck one is an error, not a hang.
_START_TIMEOUT = 15.0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """``PrivateRedis.start()`` ... ``server.stop()``; :meth:`restart` brings it back on
    the same port (an outage that ends). ``url`` is its database 0."""

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, binary: str | None = None) -> PrivateRedis:
        found = binary or redis_server_binary()
        if found is None:
            raise RuntimeError("redis-server is not installed (scripts/install-test-deps)")
        directory = Path(tempfile.mkdtemp(prefix="mailgate-redis-"))
        server = cls(found, directory, free_port())
        server.restart()
        return server

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart(self) -> None:
        """Start the server (again), on its port; waits until it answers PING."""
        if self.running:
            return
        for attempt in range(3):
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.directory),
                    "--protected-mode", "no",
                    "--loglevel", "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and self._process.poll() is None:
                if _ping(self.port):
                    return
                time.sleep(0.02)
            self._kill()
            if attempt < 2:
                self.port = free_port()  # taken meanwhile by someone else: another port
                self.url = f"redis://127.0.0.1:{self.port}/0"
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def pause(self) -> None:
        """Stop the server (SIGKILL: an outage, not a shutdown); :meth:`restart` ends it."""
        self._kill()

    def stop(self) -> None:
        self._kill()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)
