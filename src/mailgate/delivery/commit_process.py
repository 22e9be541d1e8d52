"""Durable Maildir commits made by a helper process (``_maildir_commitd.py``).

:class:`GroupCommitter` makes a message durable in threads of the server's process: the
fsync of the file, its link into new/ and the fsync of new/ are system calls, and each
one a thread makes hands the GIL to and from the event loop's thread. Measured under
``smtp-source`` (1 KB, a connection per message), those hand-overs (futex calls, context
switches) cost the event loop's thread more than half again its CPU per message. The
helper process makes the same system calls without sharing a GIL with the server; the
event loop only writes a request to a socket and reads the answers, one read for every
batch the helper committed.

The promise is the same as GroupCommitter's: a future resolves with the message's name
in new/ only once the helper has fsynced the file, linked it into new/ and completed an
fsync of new/ that began after the link (see the helper's docstring); it fails
otherwise, also when the helper ends before it answered (the message may then be in new/
or not: the client is told to try again, a duplicate is possible, a loss is not).

The file must be complete on disk (written, not necessarily synced) when it is submitted:
the helper fsyncs it by its path. The server's spool is (the connection flushes it before
any message step runs, since steps read ``message.path``).

A source outside tmp/ (a copy is needed) and a server whose Python cannot start the
helper (no ``sys.executable``, no helper file: a zipapp) use the threads of a
:class:`GroupCommitter` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailgate.server.spool import unique_name

from .maildir import GroupCommitter, MaildirStore

__all__ = ["ProcessCommitter"]

log = logging.getLogger(__name__)

_HELPER = Path(__file__).with_name("_maildir_commitd.py")
_KEEP_SOURCE = 1
_SYNCED = 2
_CREATE = 4
_REMOVE = 8
_READ_SIZE = 65536


class _ThisProcess:
    """This process's id, kept up to date across fork (a getpid system call per message
    is what it saves: a forked worker must not use its parent's helper)."""

    pid = os.getpid()

    @classmethod
    def forked(cls) -> None:
        cls.pid = os.getpid()


os.register_at_fork(after_in_child=_ThisProcess.forked)


class HelperEnded(OSError):
    """The commit process ended before it answered: the message may or may not be in
    new/ (the client is told to try again)."""


class ProcessCommitter:
    """Durable delivery into one Maildir through a helper process, in batches (see the
    module docstring). Same :meth:`submit` as :class:`GroupCommitter`; bound to one event
    loop at a time (a submit from another loop, or from a forked child, starts a helper
    of its own)."""

    def __init__(self, store: MaildirStore) -> None:
        self.store = store
        #: Copies of files from outside tmp/, and everything when no helper can start.
        self.fallback = GroupCommitter(store)
        self._pid = _ThisProcess.pid
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # What waits for each request: a commit's future (the name in new/), or a spool
        # request's future with the directory its files are in.
        self._waiting: dict[int, tuple[asyncio.Future[Any], Path | None]] = {}
        self._ids = itertools.count(1)
        self._outgoing = bytearray()
        self._send_scheduled = False
        self._writing = False  # the socket was full: a writer callback sends the rest
        self._incoming = b""
        self._ended: asyncio.Future[None] | None = None
        #: No helper could be started: the threads of ``fallback`` do the work.
        self.unavailable = False
        #: Messages the helper committed (for tests and the curious).
        self.committed = 0

    @property
    def pid(self) -> int | None:
        """The helper process's id while one runs for this process, else None."""
        process = self._process
        if process is None or self._pid != _ThisProcess.pid or process.poll() is not None:
            return None
        return process.pid

    def submit(
        self,
        source: Path,
        *,
        sync: Callable[[], None] | None = None,
        synced: bool = False,
        keep_source: bool = False,
    ) -> asyncio.Future[str]:
        """Deliver ``source`` (a complete file) into new/ durably; the future gives its
        name there. ``sync`` (what would make ``source`` durable in a thread) is only
        used by the thread fallback: the helper fsyncs ``source`` by its path, unless
        ``synced``. ``keep_source``: leave ``source``'s name in tmp/ for its owner (the
        name in new/ is then a fresh one)."""
        source = Path(source)
        loop = asyncio.get_running_loop()
        if self._pid != _ThisProcess.pid:
            self._forked()
        if not self.unavailable and self.store._in_tmp(source):
            if (self._channel is None or self._loop is not loop) and not self._start(loop):
                self.unavailable = True
            else:
                return self._request(loop, source, synced=synced, keep_source=keep_source)
        return self.fallback.submit(source, sync=sync, synced=synced, keep_source=keep_source)

    def make_spools(
        self, loop: asyncio.AbstractEventLoop, directory: Path, count: int
    ) -> asyncio.Future[list[Path]] | None:
        """Empty spool files made by the helper in ``directory`` (the Maildir's tmp/),
        for the server's :class:`~mailgate.server.spool.SpoolPool`; None when there is
        no helper (the pool makes them in a thread then)."""
        if self._pid != _ThisProcess.pid:
            self._forked()
        if self.unavailable:
            return None
        if (self._channel is None or self._loop is not loop) and not self._start(loop):
            self.unavailable = True
            return None
        names = "/".join(unique_name() for _ in range(count))
        future: asyncio.Future[list[Path]] = loop.create_future()
        self._send_request(loop, future, _CREATE, Path(directory), names, directory=directory)
        return future

    def remove_spool(self, path: Path) -> bool:
        """Have the helper remove a discarded spool file's name, after what it was sent
        before (its commit has been answered by then). No answer is awaited: should the
        helper end first, the name stays in tmp/ for the orphan removal at the next
        start (and for Maildir readers, which remove old tmp/ files)."""
        loop = self._loop
        if self._channel is None or loop is None or self._pid != _ThisProcess.pid:
            return False
        # Not sent on its own: it goes with the next request (a commit, more spool files,
        # the end at aclose), so that it costs neither a write here nor a wake-up there.
        self._outgoing += b"0\0%d\0%s\0\0" % (_REMOVE, os.fsencode(path))
        return True

    def _request(
        self, loop: asyncio.AbstractEventLoop, source: Path, *, synced: bool, keep_source: bool
    ) -> asyncio.Future[str]:
        future: asyncio.Future[str] = loop.create_future()
        name = unique_name() if keep_source else source.name
        flags = (_KEEP_SOURCE if keep_source else 0) | (_SYNCED if synced else 0)
        self._send_request(loop, future, flags, source, name)
        return future

    def _send_request(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any] | None,
        flags: int,
        path: Path,
        name: str,
        *,
        directory: Path | None = None,
    ) -> None:
        job_id = next(self._ids)
        if future is not None:
            self._waiting[job_id] = (future, directory)
        self._outgoing += b"%d\0%d\0%s\0%s\0" % (
            job_id,
            flags,
            os.fsencode(path),
            os.fsencode(name),
        )
        if not self._send_scheduled and not self._writing:
            # Sent once per turn of the loop: the messages of one turn share a write.
            self._send_scheduled = True
            loop.call_soon(self._send)

    # --- the helper process -----------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._channel is not None:
            self._detach(HelperEnded(errno.EIO, "the event loop changed"))
        if not sys.executable or not _HELPER.is_file():
            log.warning(
                "Maildir %s: no helper process here; committing in threads", self.store.root
            )
            return False
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", str(_HELPER), str(self.store.new_dir)],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            log.warning(
                "Maildir %s: cannot start the commit process (%s); committing in threads",
                self.store.root,
                exc,
            )
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self._process = process
        self._channel = ours
        self._loop = loop
        self._incoming = b""
        self._outgoing.clear()
        self._send_scheduled = False
        self._writing = False
        self._ended = None
        loop.add_reader(ours.fileno(), self._readable)
        return True

    def _send(self) -> None:
        self._send_scheduled = False
        channel = self._channel
        if channel is None or not self._outgoing:
            return
        try:
            sent = channel.send(self._outgoing)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._detach(HelperEnded(exc.errno or errno.EIO, f"commit process: {exc}"))
            return
        del self._outgoing[:sent]
        if self._outgoing and not self._writing:
            assert self._loop is not None
            self._writing = True
            self._loop.add_writer(channel.fileno(), self._writable)

    def _writable(self) -> None:
        self._send()
        if not self._outgoing and self._writing and self._channel is not None:
            assert self._loop is not None
            self._writing = False
            self._loop.remove_writer(self._channel.fileno())

    def _readable(self) -> None:
        channel = self._channel
        if channel is None:
            return
        try:
            data = channel.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._detach(HelperEnded(exc.errno or errno.EIO, f"commit process: {exc}"))
            return
        if not data:
            self._detach(HelperEnded(errno.EIO, "the Maildir commit process ended"))
            return
        fields = (self._incoming + data).split(b"\0")
        whole = (len(fields) - 1) // 3 * 3
        self._incoming = b"\0".join(fields[whole:])
        waiting = self._waiting
        for i in range(0, whole, 3):
            future, directory = waiting.pop(int(fields[i]), (None, None))
            if future is None or future.done():
                continue
            code = int(fields[i + 1])
            text = os.fsdecode(fields[i + 2])
            if code:
                future.set_exception(OSError(code, text))
            elif directory is not None:
                future.set_result([directory / name for name in text.split("/") if name])
            else:
                self.committed += 1
                future.set_result(text)

    def _detach(self, error: OSError) -> None:
        """The helper is gone (or being left): fail what waits for it; the next submit
        starts another one."""
        channel, self._channel = self._channel, None
        loop = self._loop
        if channel is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(channel.fileno())
                if self._writing:
                    loop.remove_writer(channel.fileno())
            channel.close()
        self._writing = False
        self._outgoing.clear()
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done() and not future.get_loop().is_closed():
                future.set_exception(error)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # It ends at the end of its input (just closed); reaped when it has.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().run_in_executor(None, process.wait)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _forked(self) -> None:
        # A forked worker shares neither its parent's helper nor its waiters.
        self._pid = _ThisProcess.pid
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._process = None
        self._loop = None
        self._waiting = {}
        self._outgoing.clear()
        self._send_scheduled = False
        self._writing = False

    async def aclose(self, timeout: float = 30.0) -> None:
        """Let the helper answer what it was sent, then end it (it ends at the end of its
        input); then end the fallback's threads. A later submit starts a new helper."""
        channel = self._channel
        process = self._process
        if channel is not None and self._pid == _ThisProcess.pid:
            loop = asyncio.get_running_loop()
            self._ended = loop.create_future()
            self._send()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self._outgoing and self._channel is not None:
                        await asyncio.sleep(0.01)
            if self._channel is not None:
                with contextlib.suppress(OSError):
                    channel.shutdown(socket.SHUT_WR)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._ended
            if self._channel is not None:
                self._detach(HelperEnded(errno.EIO, "the Maildir commit process did not end"))
            if process is not None:
                try:
                    await loop.run_in_executor(None, process.wait, timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.fallback.close, timeout)
