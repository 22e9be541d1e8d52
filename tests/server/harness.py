"""Run a real mailgate server on 127.0.0.1 for tests: in a thread, or as a CLI subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trustme

from mailgate import Server
from mailgate.hooks import (
    Hooks,
)
from mailgate.server import ListenAddress, ServerOptions

RECEIVED = re.compile(rb"^Received: .*?\r\n(?![ \t])", re.S)


def strip_received(data: bytes) -> bytes:
    """The stored message without the Received header the server prepended."""
    match = RECEIVED.match(data)
    assert match, f"no Received header at the top: {data[:200]!r}"
    return data[match.end() :]


@dataclasses.dataclass
class Certs:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "mx.test")
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    ca_file = directory / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)


class ThreadedServer:
    """A Server running in its own event loop thread."""

    def __init__(self, options: ServerOptions, hooks: Hooks) -> None:
        self.options = options
        self.hooks = hooks
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.server = Server(self.options, self.hooks)
            await self.server.start()

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:  # handed to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ThreadedServer:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def port(self, index: int = 0) -> int:
        assert self.server is not None
        return self.server.listening[index][1][1]

    def call(self, func: Callable[[], object]) -> object:
        """Run ``func`` on the server's loop and return its result."""

        async def wrapper() -> object:
            result = func()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(60)

    def stop(self) -> None:
        if self.server is not None and self.loop.is_running():
            self.call(self.server.shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


@contextlib.contextmanager
def running_server(
    tmp_path: Path,
    hooks: Hooks | None = None,
    **overrides: object,
) -> Iterator[ThreadedServer]:
    fields: dict[str, object] = {
        "listen": (ListenAddress("127.0.0.1", 0),),
        "hostname": "mx.test",
        "maildir": tmp_path / "maildir",
        "state_dir": tmp_path / "state",
        "log_level": "DEBUG",
    }
    fields.update(overrides)
    options = ServerOptions(**fields)  # type: ignore[arg-type]
    hooks = hooks or Hooks()
    server = ThreadedServer(options, hooks).start()
    try:
        yield server
    finally:
        server.stop()


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    if not new.exists():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


class CLIServer:
    """``python -m mailgate serve ...`` as a subprocess; the port is read from its log."""

    LISTENING = re.compile(r"listening on (\S+) port (\d+)")

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.ports: list[int] = []
        self.log: list[str] = []
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()
        self._expected = 1

    def start(self, expected_listeners: int = 1, timeout: float = 30) -> CLIServer:
        self._expected = expected_listeners
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", *self.args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.kill()
            raise AssertionError("server did not start:\n" + "\n".join(self.log))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            match = self.LISTENING.search(line)
            if match:
                self.ports.append(int(match.group(2)))
                if len(self.ports) >= self._expected:
                    self._listening.set()
        self._listening.set()

    @property
    def port(self) -> int:
        return self.ports[0]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def text(self) -> str:
        return "\n".join(self.log)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll a condition with a deadline (for effects with no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def spool_leftovers(server: ThreadedServer, directory: Path, timeout: float = 5.0) -> list[Path]:
    """Files in the spool ``directory`` that are not empty files the server made ahead
    for the next messages (its spool pool): what a finished or cut-off message left."""
    deadline = time.monotonic() + timeout
    while True:
        inner = server.server
        pool = inner.spool_pool if inner is not None else None
        if pool is None or not pool.refilling or time.monotonic() > deadline:
            waiting = pool.paths() if pool is not None else set()
            return sorted(p for p in directory.iterdir() if p not in waiting)
        time.sleep(0.01)
