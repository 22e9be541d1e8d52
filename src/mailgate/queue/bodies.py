"""Message bodies as files in the queue directory, for stores that keep them on the local
file system (the SQLite store).

Layout::

    <queue>/bodies/<message id>       one file per message, whatever its recipient count
    <queue>/tmp/<instance>.lock       held (flock) by a live store instance
    <queue>/tmp/<instance>/<id>       a second name of a body while its enqueue commits

An enqueue writes (or hard-links) the body under the instance's ``tmp/`` directory,
fsyncs it, links it into ``bodies/``, fsyncs ``bodies/`` and only then commits the rows;
after the commit the ``tmp/`` name is dropped. So a file in ``bodies/`` whose message
row does not exist is either

* in flight: its enqueue has not committed yet, and its ``tmp/`` name, made before the
  ``bodies/`` name and removed only after the commit, is still there; or
* garbage: an enqueue that died before its commit, or a delete that died between
  removing the rows and the file.

A process that died leaves its lock free, so an opener can tell its ``tmp/`` names from
those of a live process (the server, while ``mailgate queue`` runs). Recovery lists
``bodies/``, then the live instances' ``tmp/`` names, then the rows (under the database's
write lock, so no enqueue commits meanwhile): a body in none of the last two is garbage.
Nothing a live process is writing is ever taken for an orphan. (The link count is no
guide: a hard-linked spool file of the caller has a second name of its own.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["BodyDirectory", "fsync_directory", "run_to_end"]

log = logging.getLogger("mailgate.queue")

T = TypeVar("T")

_COPY_BLOCK = 1024 * 1024
# Async chunks are gathered to this size before one write in a thread: few thread hops
# for small chunks, bounded memory for any body size.
_WRITE_BUFFER = 256 * 1024
# Filesystems without hard links answer these; the body is copied instead.
_NO_HARD_LINKS = {
    errno.EXDEV,
    errno.EPERM,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.ENOSYS,
    errno.EMLINK,
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: A hidden lock file younger than this may be a starting instance's, not a dead one's.
_HIDDEN_GRACE = 10.0


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (a new or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


async def run_to_end(
    executor: concurrent.futures.Executor | None, function: Callable[..., T], *arguments: Any
) -> T:
    """Run a blocking call in a thread; if the caller is cancelled meanwhile, wait for
    the thread to finish before passing the cancellation on: clean-up that follows
    (closing the file it writes, removing the file it links) must not race with it."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, functools.partial(function, *arguments))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class BodyDirectory:
    """The body files of one queue directory, as seen by one store instance.

    Construction creates the directories and takes this instance's lock; ``close()``
    releases it. Methods are blocking: the store calls them from worker threads.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bodies = self.root / "bodies"
        self.tmp = self.root / "tmp"
        self._create_directories()
        host = _UNSAFE.sub("_", socket.gethostname() or "localhost")[:40]
        self.instance = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self.staging = self.tmp / self.instance
        # The lock is taken before its name appears (a reaper must never see a free lock
        # of a live instance), and the staging directory made after it (a directory
        # without a lock file is a dead instance's).
        self._lock_fd = self._take_lock()
        self.staging.mkdir(mode=0o700)
        self._closed = False
        self._bodies_fd = os.open(self.bodies, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._sync_lock = threading.Lock()

    def _take_lock(self) -> int:
        """Create this instance's lock file under a hidden name, lock it, then give it its
        name. Another process opening the queue at the same moment may reap the hidden
        file between its creation and its lock (it looks like a dead instance's): then try
        again with a new one; the reaper leaves young hidden files alone (``_HIDDEN_GRACE``),
        so this settles at once."""
        lock_path = self.tmp / f"{self.instance}.lock"
        for attempt in range(5):
            hidden = self.tmp / f".{self.instance}.{attempt}.new"
            fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(hidden, lock_path)
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                _unlink_quietly(hidden)
                continue
            return fd
        raise OSError(errno.EAGAIN, "cannot create a lock file for this process", str(self.tmp))

    def _create_directories(self) -> None:
        created: list[Path] = []
        for directory in (self.root, self.bodies, self.tmp):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                created.append(directory)
        # A queue directory whose bodies/ vanished on power loss would lose messages
        # whose rows survived.
        for directory in created:
            fsync_directory(directory.parent)

    # --- writing ------------------------------------------------------------------------

    def path(self, message_id: str) -> Path:
        return self.bodies / message_id

    def _staged(self, message_id: str) -> Path:
        return self.staging / message_id

    def stage_bytes(self, message_id: str, data: bytes | bytearray | memoryview) -> int:
        """Write a body held in memory (fsynced) and link it into ``bodies/``."""
        staged = self._staged(message_id)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(staged)
            raise
        os.close(fd)
        return self._publish(message_id)

    def stage_path(self, message_id: str, source: Path, *, synced: bool) -> int:
        """A spooled file: hard-linked when on the same file system (no copy), copied in
        blocks otherwise. The caller must not modify the file afterwards (a hard link
        shares it); it may remove its own name."""
        staged = self._staged(message_id)
        try:
            os.link(source, staged)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            self._copy(source, staged)
        else:
            if not synced:
                _fsync_path(staged)
        return self._publish(message_id)

    def _copy(self, source: Path, staged: Path) -> None:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(source, "rb") as reader:
                while block := reader.read(_COPY_BLOCK):
                    _write_all(fd, block)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(staged)
            raise
        os.close(fd)

    async def stage_stream(
        self,
        message_id: str,
        chunks: AsyncIterable[bytes],
        executor: concurrent.futures.Executor | None = None,
    ) -> int:
        """Write a body from an async iterator, in bounded blocks, in worker threads
        (``executor``; the loop's default when ``None``)."""

        async def call(function: Callable[..., T], *arguments: Any) -> T:
            return await run_to_end(executor, function, *arguments)

        staged = self._staged(message_id)
        fd = await call(os.open, staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in chunks:
                pending.append(bytes(chunk))
                pending_size += len(chunk)
                if pending_size >= _WRITE_BUFFER:
                    block = b"".join(pending)
                    pending.clear()
                    pending_size = 0
                    await call(_write_all, fd, block)
            block = b"".join(pending)
            pending.clear()
            await call(self._finish_stream, fd, block)
        except BaseException:
            await asyncio.shield(call(self._abandon_fd, fd, staged))
            raise
        return await call(self._publish, message_id)

    @staticmethod
    def _finish_stream(fd: int, block: bytes) -> None:
        try:
            _write_all(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _abandon_fd(fd: int, staged: Path) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)
        _unlink_quietly(staged)

    def _publish(self, message_id: str) -> int:
        """Link the staged body into ``bodies/``; returns its size. ``bodies/`` itself is
        fsynced later, once for many enqueues (:meth:`sync`)."""
        staged = self._staged(message_id)
        try:
            os.link(staged, self.path(message_id))
            return os.stat(staged).st_size
        except BaseException:
            self.discard(message_id)
            raise

    def sync(self) -> None:
        """fsync ``bodies/``: every body linked before the call is durable after it."""
        with self._sync_lock:
            os.fsync(self._bodies_fd)

    def unstage(self, message_id: str) -> None:
        """After the commit: drop the ``tmp/`` name (no fsync: if the removal is lost in
        a crash, recovery removes it again; the body is safe in ``bodies/``)."""
        _unlink_quietly(self._staged(message_id))

    def discard(self, message_id: str) -> None:
        """An enqueue that failed before its commit: remove both names."""
        _unlink_quietly(self.path(message_id))
        _unlink_quietly(self._staged(message_id))

    def remove(self, message_id: str) -> None:
        """A deleted message's body (its rows are gone already)."""
        _unlink_quietly(self.path(message_id))

    # --- reading --------------------------------------------------------------------------

    def exists(self, message_id: str) -> bool:
        return self.path(message_id).exists()

    # --- recovery -------------------------------------------------------------------------

    def reap_dead_instances(self) -> tuple[list[str], list[str]]:
        """Remove the ``tmp/`` names of instances whose process is gone.

        Returns ``(dead, live)`` instance names (``live`` includes this one).
        """
        dead: list[str] = []
        live: list[str] = [self.instance]
        for lock_path in sorted(self.tmp.glob("*.lock")):
            name = lock_path.name[: -len(".lock")]
            if name == self.instance:
                continue
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # another opener reaped it just now
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live.append(name)
                    continue
                shutil.rmtree(self.tmp / name, ignore_errors=True)
                _unlink_quietly(lock_path)
                dead.append(name)
            finally:
                os.close(fd)
        # Lock files of instances that died before giving theirs its name; a young one may
        # be an instance starting right now, between creating and locking it.
        for hidden in self.tmp.glob(".*.new"):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - hidden.stat().st_mtime < _HIDDEN_GRACE:
                    continue
                fd = os.open(hidden, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # still being created by a live instance
                else:
                    _unlink_quietly(hidden)
                finally:
                    os.close(fd)
        # Staging directories without a lock file: an instance that died between the two.
        known = {self.instance, *live, *dead}
        for entry in self.tmp.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in known:
                lock_path = self.tmp / f"{entry.name}.lock"
                if not lock_path.exists():
                    shutil.rmtree(entry, ignore_errors=True)
        return dead, live

    def staged_names(self, instances: Iterable[str]) -> set[str]:
        """Bodies the given (live) instances are enqueueing right now."""
        names: set[str] = set()
        for instance in instances:
            with contextlib.suppress(FileNotFoundError):
                names.update(os.listdir(self.tmp / instance))
        return names

    def all_bodies(self) -> set[str]:
        with os.scandir(self.bodies) as entries:
            return {entry.name for entry in entries}

    def close(self) -> None:
        """Release this instance's lock and remove its (empty) staging directory."""
        if self._closed:
            return
        self._closed = True
        shutil.rmtree(self.staging, ignore_errors=True)
        _unlink_quietly(self.tmp / f"{self.instance}.lock")
        os.close(self._lock_fd)
        os.close(self._bodies_fd)
