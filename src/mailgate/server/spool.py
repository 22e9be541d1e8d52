"""The file a message is streamed into while it arrives, and Maildir unique names.

The spool file is named like a Maildir message so that, when the spool directory is a
Maildir's ``tmp/``, delivery is a hard link into ``new/`` with no copy of the data.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = [
    "SpoolFile",
    "SpoolPool",
    "SpoolSource",
    "register_spool_source",
    "unique_name",
    "unregister_spool_source",
    "write_all",
]

log = logging.getLogger("mailgate.server")

# Writes are gathered to this size: fewer syscalls for the small slices a pipelined
# client produces, while larger slices go straight to the kernel without a copy.
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

    Writes are gathered in a buffer of its own up to 256 KiB (a BufferedWriter over a
    FileIO cost two more system calls per file, fstat and lseek, at its creation).

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
        self._setup(path, fd)

    @classmethod
    def existing(cls, path: Path, source: SpoolSource | None = None) -> SpoolFile:
        """A spool over an empty file made for it elsewhere (by a Maildir's commit
        process, which makes them where creating a file costs the server no GIL);
        ``source`` is asked to remove its name when it is discarded."""
        spool = cls.__new__(cls)
        spool._setup(Path(path), os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        spool._source = source
        return spool

    def _setup(self, path: Path, fd: int) -> None:
        self.path = path
        self.size = 0
        self._source: SpoolSource | None = None
        self._fd: int | None = fd
        self._buffer = bytearray()
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
        if self._fd is None:
            raise ValueError(f"spool file {self.path} is no longer writable")
        # Counted in bytes, also for a memoryview of wider items.
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        buffer = self._buffer
        if len(buffer) + size <= _BUFFER_SIZE:
            buffer += data
        else:
            # Large slices go straight to the kernel, without a copy into the buffer.
            self._write_buffer()
            write_all(self._fd, data)
        self.size += size

    def _write_buffer(self) -> None:
        if self._buffer:
            assert self._fd is not None
            # Swapped out first: what fails to be written is lost with the message, which
            # fails anyway (and a failed write's traceback may still hold a view of it).
            buffer, self._buffer = self._buffer, bytearray()
            write_all(self._fd, buffer)

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync), so readers of ``path`` see them all."""
        if self._fd is not None:
            self._write_buffer()

    def finish(self) -> None:
        """Write what is buffered and fsync; the file is complete and durable afterwards.

        Only the file's data is synced; the directory entry is made durable by whatever
        gives the file its final name (Maildir ``new/``) or copies it elsewhere.
        Thread-safe and idempotent: concurrent or repeated calls fsync once.
        """
        with self._finish_lock:
            if self._finished:
                return
            fd = self._fd
            if fd is None:
                raise ValueError(f"spool file {self.path} was discarded")
            self._fd = None
            # On failure the file is closed too: the caller can only discard it now.
            try:
                buffer, self._buffer = self._buffer, bytearray()
                if buffer:
                    write_all(fd, buffer)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._finished = True

    def discard(self) -> None:
        """Close and unlink. Idempotent; after a Maildir delivery the name is already gone."""
        if not self._discarded:
            self._discarded = True
            source = self._source
            if source is None or not source.remove_spool(self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        # Unlinked first, so a buffered tail never reaches a disk; it is dropped here.
        self._buffer = bytearray()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def open_for_reading(self) -> BinaryIO:
        """A new reader over everything written so far (all of the message once finished)."""
        if self._discarded:
            raise ValueError(f"spool file {self.path} was discarded")
        self.flush()
        return open(self.path, "rb")

    def __repr__(self) -> str:
        state = "discarded" if self._discarded else "finished" if self._finished else "open"
        return f"<SpoolFile {self.path} size={self.size} {state}>"


class SpoolSource(Protocol):
    """Something that makes empty spool files in a directory without a thread of the
    server's process (:func:`register_spool_source`)."""

    def make_spools(
        self, loop: asyncio.AbstractEventLoop, directory: Path, count: int
    ) -> asyncio.Future[list[Path]] | None:
        """Up to ``count`` new empty files in ``directory``, or None: not now (the pool
        then makes them in a worker thread)."""

    def remove_spool(self, path: Path) -> bool:
        """Remove the name ``path`` soon, after everything asked of the source before
        (a discarded spool file: no system call on the event loop's thread); False:
        remove it yourself."""


_sources: dict[Path, SpoolSource] = {}


def register_spool_source(directory: Path, source: SpoolSource) -> None:
    """Let ``source`` make the spool files of ``directory`` (a Maildir's tmp/ whose
    commit process makes them without the GIL hand-overs of a worker thread)."""
    _sources[Path(directory)] = source


def unregister_spool_source(directory: Path, source: SpoolSource) -> None:
    if _sources.get(Path(directory)) is source:
        del _sources[Path(directory)]


class SpoolPool:
    """Spool files made ahead of need, a batch at a time off the event loop's thread.

    Creating a file may wait for the file system (on ext4 without a journal it scans
    the recently freed inodes; on a disk busy with the fsyncs of durable deliveries it
    waits), so a message's spool file was made in a worker thread: a thread hop per
    message, with its wake-ups and lock hand-overs. The pool makes a batch of empty files
    in one hop (or has a :class:`SpoolSource` registered for its directory make them: a
    Maildir's commit process) and hands them out without one, refilling when half are
    gone; a pool found empty doubles its size, up to ``max_size``, so that it keeps up
    with as many concurrent messages as the server sees. The files are kept closed (no
    file descriptor each) and opened when handed out. An empty pool (the first message,
    a burst, a disk that refuses new files) answers None and the caller makes its file
    as before, so errors are reported where they always were. Files wait at most
    ``max_age`` seconds (then they are removed and made anew): far younger than the age
    at which a starting worker takes a spool file for an orphan. :meth:`aclose` removes
    those left, and a crash leaves them to the orphan removal at the next start.
    """

    def __init__(
        self, directory: Path, *, size: int = 32, max_size: int = 512, max_age: float = 30.0
    ) -> None:
        self.directory = Path(directory)
        self.size = size
        self.max_size = max(size, max_size)
        self.max_age = max_age
        self._files: collections.deque[tuple[float, Path]] = collections.deque()
        self._refilling: asyncio.Future[list[Path]] | None = None
        self._primed = False  # a first batch arrived: empty now means outrun
        self._closed = False

    def __len__(self) -> int:
        return len(self._files)

    @property
    def refilling(self) -> bool:
        """Whether a batch of files is being made now."""
        return self._refilling is not None

    def paths(self) -> set[Path]:
        """The files waiting to be handed out."""
        return {path for _, path in self._files}

    def take(self, loop: asyncio.AbstractEventLoop) -> SpoolFile | None:
        """A fresh spool file, or None when none is ready (make one yourself)."""
        now = time.monotonic()
        found = None
        files = self._files
        while files:
            made, path = files.popleft()
            if now - made <= self.max_age:
                try:
                    found = SpoolFile.existing(path, _sources.get(self.directory))
                except OSError as exc:  # removed by someone else, or no fds left
                    log.debug("spool pool: cannot open %s: %s", path, exc)
                    _remove(path)
                    continue
                break
            _remove(path)
        if found is None and self._primed and not self._closed:
            # Outrun: more messages at once than the pool holds.
            self.size = min(self.size * 2, self.max_size)
        if not self._closed and self._refilling is None and len(files) <= self.size // 2:
            count = self.size - len(files)
            source = _sources.get(self.directory)
            coming = source.make_spools(loop, self.directory, count) if source else None
            if coming is None:
                coming = loop.run_in_executor(None, self._make, count)
            self._refilling = coming
            coming.add_done_callback(self._refilled)
        return found

    def _make(self, count: int) -> list[Path]:
        made: list[Path] = []
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            for _ in range(count):
                path = self.directory / unique_name()
                os.close(os.open(path, flags, 0o600))
                made.append(path)
        except OSError as exc:
            # A full or read-only disk: what was made is used; the next message makes its
            # own file and reports the error to its client.
            log.debug("spool pool: made %d of %d files: %s", len(made), count, exc)
        return made

    def _refilled(self, future: asyncio.Future[list[Path]]) -> None:
        self._refilling = None
        if future.cancelled():
            return
        if future.exception() is not None:
            log.debug("spool pool: no files made: %s", future.exception())
            return
        made = future.result()
        if self._closed:
            for path in made:
                _remove(path)
            return
        now = time.monotonic()
        self._files.extend((now, path) for path in made)
        self._primed = True

    async def aclose(self) -> None:
        """Remove the files not handed out, after waiting for a refill in progress (its
        files would otherwise be left behind when the loop stops)."""
        self._closed = True
        refilling = self._refilling
        if refilling is not None:
            with contextlib.suppress(Exception):
                for path in await asyncio.shield(refilling):
                    _remove(path)
        while self._files:
            _, path = self._files.popleft()
            _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
