"""The file a message is streamed into while it arrives, and Maildir unique names.

The spool file is named like a Maildir message so that, when the spool directory is a
Maildir's ``tmp/``, delivery is a hard link into ``new/`` with no copy of the data.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import io
import itertools
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO

__all__ = ["SpoolFile", "SpoolPool", "unique_name", "write_all"]

log = logging.getLogger("mailgate.server")

# Writes are gathered to this size: fewer syscalls for the small slices a pipelined
# client produces, while larger slices go straight to the kernel without a copy
# (io.BufferedWriter does both in C, faster than coalescing by hand in Python).
_BUFFER_SIZE = 256 * 1024
_CREATE_ATTEMPTS = 16

_counter = itertools.count()
_counter_lock = threading.Lock()
_hostname: str | None = None


class _ProcessIdentity:
    """The pid and a random source, drawn once per process (again in a forked child):
    the name of every spool file used to cost a getpid and a getrandom system call, and
    in the thread that makes spool files each system call is a GIL hand-over."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pid = os.getpid()
        self.random = random.Random(os.urandom(32))


_identity = _ProcessIdentity()
os.register_at_fork(after_in_child=_identity.reset)


def _escaped_hostname() -> str:
    # "/" would make a path and ":" starts the Maildir info suffix, so both are escaped
    # the way Courier and Dovecot do; computed once per process like they do.
    global _hostname
    if _hostname is None:
        name = socket.gethostname() or "localhost"
        _hostname = name.replace("/", "\\057").replace(":", "\\072")
    return _hostname


def unique_name(now: float | None = None) -> str:
    """A Maildir unique name: ``<sec>.M<usec>P<pid>Q<n>R<random>.<host>``.

    The pid and counter keep names apart between threads and worker processes of one
    host; the random part covers pid reuse and clock steps backwards.
    """
    if now is None:
        now = time.time()
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    identity = _identity
    return (
        f"{seconds}.M{usec}P{identity.pid}Q{n}"
        f"R{identity.random.getrandbits(64):016x}.{_escaped_hostname()}"
    )


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class SpoolFile:
    """A message being received, streamed to disk as it arrives (never held in memory).

    Not thread-safe: one connection owns it; ``finish`` may run in an executor thread
    as long as nothing writes concurrently.
    """

    path: Path
    size: int

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(_CREATE_ATTEMPTS):
            path = directory / unique_name()
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(
                errno.EEXIST, "could not create a uniquely named spool file", str(directory)
            )
        self.path = path
        self.size = 0
        self._file: io.BufferedWriter | None = io.BufferedWriter(
            io.FileIO(fd, "wb", closefd=True), buffer_size=_BUFFER_SIZE
        )
        self._finished = False
        self._discarded = False
        # finish() may be called by a delivery's thread and by the server; once is enough.
        self._finish_lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def discarded(self) -> bool:
        return self._discarded

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise ValueError(f"spool file {self.path} is no longer writable")
        # BufferedWriter.write counts bytes, also for a memoryview of wider items.
        self.size += self._file.write(data)

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync), so readers of ``path`` see them all."""
        if self._file is not None:
            self._file.flush()

    def finish(self) -> None:
        """Write what is buffered and fsync; the file is complete and durable afterwards.

        Only the file's data is synced; the directory entry is made durable by whatever
        gives the file its final name (Maildir ``new/``) or copies it elsewhere.
        Thread-safe and idempotent: concurrent or repeated calls fsync once.
        """
        with self._finish_lock:
            if self._finished:
                return
            if self._file is None:
                raise ValueError(f"spool file {self.path} was discarded")
            file, self._file = self._file, None
            # On failure the file is closed too: the caller can only discard it now.
            with file:
                file.flush()
                os.fsync(file.fileno())
            self._finished = True

    def discard(self) -> None:
        """Close and unlink. Idempotent; after a Maildir delivery the name is already gone."""
        if not self._discarded:
            self._discarded = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._file is not None:
            # Closed after the unlink, so the buffered tail it flushes never reaches a disk.
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()

    def open_for_reading(self) -> BinaryIO:
        """A new reader over everything written so far (all of the message once finished)."""
        if self._discarded:
            raise ValueError(f"spool file {self.path} was discarded")
        if self._file is not None:
            self._file.flush()
        return open(self.path, "rb")

    def __repr__(self) -> str:
        state = "discarded" if self._discarded else "finished" if self._finished else "open"
        return f"<SpoolFile {self.path} size={self.size} {state}>"


class SpoolPool:
    """Spool files made ahead of need, a batch at a time in one worker thread.

    Creating a file may wait for the file system's journal (on a disk busy with the
    fsyncs of durable deliveries it does), so a message's spool file was made in a worker
    thread: a thread hop per message, with its wake-ups and lock hand-overs. The pool
    makes ``size`` files in one hop and hands them out without one, refilling when half
    are gone. An empty pool (the first message, a burst, a disk that refuses new files)
    answers None and the caller makes its file as before, so errors are reported where
    they always were. Files wait at most ``max_age`` seconds (then they are removed and
    made anew): far younger than the age at which a starting worker takes a spool file
    for an orphan. The files are empty until used; :meth:`close` removes those left, and
    a crash leaves them to the orphan removal at the next start.
    """

    def __init__(self, directory: Path, *, size: int = 32, max_age: float = 30.0) -> None:
        self.directory = directory
        self.size = size
        self.max_age = max_age
        self._files: collections.deque[tuple[float, SpoolFile]] = collections.deque()
        self._refilling: asyncio.Future[list[SpoolFile]] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._files)

    @property
    def refilling(self) -> bool:
        """Whether a batch of files is being made now."""
        return self._refilling is not None

    def paths(self) -> set[Path]:
        """The files waiting to be handed out."""
        return {spool.path for _, spool in self._files}

    def take(self, loop: asyncio.AbstractEventLoop) -> SpoolFile | None:
        """A fresh spool file, or None when none is ready (make one yourself)."""
        now = time.monotonic()
        found = None
        while self._files:
            made, spool = self._files.popleft()
            if now - made <= self.max_age:
                found = spool
                break
            spool.discard()
        if not self._closed and self._refilling is None and len(self._files) <= self.size // 2:
            self._refilling = loop.run_in_executor(None, self._make, self.size - len(self._files))
            self._refilling.add_done_callback(self._refilled)
        return found

    def _make(self, count: int) -> list[SpoolFile]:
        made: list[SpoolFile] = []
        try:
            for _ in range(count):
                made.append(SpoolFile(self.directory))
        except OSError as exc:
            # A full or read-only disk: what was made is used; the next message makes its
            # own file and reports the error to its client.
            log.debug("spool pool: made %d of %d files: %s", len(made), count, exc)
        return made

    def _refilled(self, future: asyncio.Future[list[SpoolFile]]) -> None:
        self._refilling = None
        if future.cancelled() or future.exception() is not None:
            return
        made = future.result()
        if self._closed:
            for spool in made:
                spool.discard()
            return
        now = time.monotonic()
        self._files.extend((now, spool) for spool in made)

    async def aclose(self) -> None:
        """Remove the files not handed out, after waiting for a refill in progress (its
        files would otherwise be left behind when the loop stops)."""
        self._closed = True
        refilling = self._refilling
        if refilling is not None:
            with contextlib.suppress(Exception):
                made = await asyncio.shield(refilling)
                for spool in made:
                    spool.discard()
        while self._files:
            _, spool = self._files.popleft()
            spool.discard()
