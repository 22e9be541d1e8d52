"""The Maildir commit process: makes files durable and gives them their name in new/.

Run by :class:`mailgate.delivery.commit_process.ProcessCommitter` as
``python -I _maildir_commitd.py NEW_DIR`` with a stream socket as its standard input. It
imports nothing but the standard library (it is started by file path, in isolated mode,
so that it starts in a few milliseconds and holds little memory).

Why a process: the fsyncs, links and directory fsyncs of a durable delivery are system
calls; made by threads of the server's own process, every one of them hands the GIL to
and from the event loop's thread (futex calls and context switches that cost the server
more CPU per message than the system calls themselves). Here they share no GIL with the
server.

Requests, each field ended by a NUL byte: ``id``, ``flags``, the source path, the name
to give it in new/. Flags: 1 keep the source (link; else the source's name is removed
after the link), 2 the source is already durable (no fsync of it). Answers: ``id``,
``errno`` (0: done), then the name given in new/ or the error's text. Flag 4 asks for
empty spool files instead: the path is a directory (the Maildir's tmp/) and the name
field holds the names to create there, separated by "/"; the answer lists those made
(an error only when none could be). Flag 8 asks for the path to be removed (a spool
file the server is done with), without an answer.

An answer is sent only once the file's data and inode are durable (fsync), its name is
in new/, and an fsync of new/ that began after that link has completed; a failed fsync of
new/ removes the batch's names from new/ again before the failure is answered. Batches:
each idle thread takes its share of the waiting requests, so under load one fsync of new/
serves many messages and the file fsyncs of two threads overlap on the disk.

The process ignores SIGINT and SIGTERM (a signal to the server's process group must not
end it before the server has answered what it committed): it ends at the end of its
input, once every request read has been answered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import socket
import sys
import threading

THREADS = 2
_KEEP_SOURCE = 1
_SYNCED = 2
_CREATE = 4
_REMOVE = 8
_LINK_ATTEMPTS = 16
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _fsync_path(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """fsync of one directory, shared by concurrent callers (group commit).

    A caller that made a change needs *an* fsync that started after its change. While one
    fsync runs, later callers wait for it to end and then let one of them run the next one,
    which covers all their changes at once: under load, one fsync serves many deliveries.
    The server's own commit threads (``maildir.GroupCommitter``) use this class too.
    """

    def __init__(self, path: bytes | str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._changes = 0  # changes made so far (sequence numbers)
        self._synced = 0  # every change up to this one is durable
        self._running = False

    def sync(self) -> None:
        """Call after changing the directory; returns once that change is durable."""
        with self._cond:
            self._changes += 1
            mine = self._changes
            while self._synced < mine:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._changes  # this fsync starts after all of these
                self._cond.release()
                try:
                    os.fsync(self._fd)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._synced = max(self._synced, covered)

    def close(self) -> None:
        os.close(self._fd)


class Committer:
    def __init__(self, new_dir: bytes, channel: socket.socket) -> None:
        self.new_dir = new_dir
        self.channel = channel
        self.directory = GroupSync(new_dir)
        self.cond = threading.Condition(threading.Lock())
        self.send_lock = threading.Lock()
        self.waiting: list[tuple[bytes, int, bytes, bytes]] = []
        self.idle = 0
        self.ended = False

    def run(self) -> None:
        threads = [threading.Thread(target=self.work, daemon=True) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        pending = b""
        while True:
            try:
                data = self.channel.recv(65536)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            except OSError:
                data = b""
            if not data:
                break
            fields = (pending + data).split(b"\0")
            whole = (len(fields) - 1) // 4 * 4
            pending = b"\0".join(fields[whole:])
            jobs = [
                (fields[i], int(fields[i + 1]), fields[i + 2], fields[i + 3])
                for i in range(0, whole, 4)
            ]
            if jobs:
                with self.cond:
                    self.waiting.extend(jobs)
                    if self.idle:
                        self.cond.notify()
        with self.cond:
            self.ended = True
            self.cond.notify_all()
        for thread in threads:
            thread.join()

    def work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    if self.ended:
                        return
                    self.idle += 1
                    self.cond.wait()
                    self.idle -= 1
                share = -(-len(self.waiting) // (self.idle + 1))
                batch = self.waiting[:share]
                del self.waiting[:share]
                if self.waiting and self.idle:
                    self.cond.notify()
            self.answer(self.commit(batch))

    def commit(self, batch: list[tuple[bytes, int, bytes, bytes]]) -> list[bytes]:
        answers: list[bytes] = []
        linked: list[tuple[bytes, bytes]] = []
        for job_id, flags, source, name in batch:
            if flags & _CREATE:
                answers.append(_create(job_id, source, name))
                continue
            if flags & _REMOVE:
                # A spool file the server is done with (its commit, if any, was answered
                # before the server asked): not answered.
                with contextlib.suppress(OSError):
                    os.unlink(source)
                continue
            try:
                if not flags & _SYNCED:
                    _fsync_path(source)
                name = self.link(source, name, keep=bool(flags & _KEEP_SOURCE))
            except OSError as exc:
                answers.append(_answer(job_id, exc.errno or errno.EIO, exc.strerror or str(exc)))
                continue
            linked.append((job_id, name))
        if linked:
            try:
                self.directory.sync()
            except OSError as exc:
                for job_id, name in linked:
                    # Not durable, so not delivered: the name must not stay beside the
                    # copy the client's retry makes.
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.new_dir, name))
                    answers.append(_answer(job_id, exc.errno or errno.EIO, exc.strerror or ""))
            else:
                answers.extend(_answer(job_id, 0, name) for job_id, name in linked)
        return answers

    def link(self, source: bytes, name: bytes, *, keep: bool) -> bytes:
        for _ in range(_LINK_ATTEMPTS):
            target = os.path.join(self.new_dir, name)
            try:
                os.link(source, target)
            except FileExistsError:
                name = _another_name(name)
                continue
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if os.path.lexists(target):
                    name = _another_name(name)
                    continue
                # No hard links on this file system: copy (the source stays) or move.
                if keep:
                    shutil.copyfile(source, target)
                    _fsync_path(target)
                else:
                    os.rename(source, target)
                return name
            if not keep:
                with contextlib.suppress(OSError):
                    os.unlink(source)
            return name
        raise FileExistsError(errno.EEXIST, "no free unique name in new/")

    def answer(self, answers: list[bytes]) -> None:
        if not answers:
            return
        with self.send_lock, contextlib.suppress(OSError):
            self.channel.sendall(b"".join(answers))


def _create(job_id: bytes, directory: bytes, names: bytes) -> bytes:
    """Empty spool files for the server (creating a file is a system call that, on ext4
    without a journal, scans the recently freed inodes: the dearest one per message)."""
    made: list[bytes] = []
    error: OSError | None = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for name in names.split(b"/"):
        try:
            os.close(os.open(os.path.join(directory, name), flags, 0o600))
        except FileExistsError:
            continue
        except OSError as exc:
            error = exc
            break
        made.append(name)
    if not made and error is not None:
        return _answer(job_id, error.errno or errno.EIO, error.strerror or str(error))
    return _answer(job_id, 0, b"/".join(made))


def _another_name(name: bytes) -> bytes:
    """A taken Maildir name made unique again: random hex added to its unique part
    (``<sec>.<unique>.<host>``), the rest kept."""
    parts = name.split(b".", 2)
    extra = b"X" + secrets.token_hex(8).encode()
    if len(parts) == 3:
        return b"%s.%s%s.%s" % (parts[0], parts[1], extra, parts[2])
    return name + extra


def _answer(job_id: bytes, code: int, text: bytes | str) -> bytes:
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    return b"%s\0%d\0%s\0" % (job_id, code, text.replace(b"\0", b""))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    new_dir = os.fsencode(argv[1])
    channel = socket.socket(fileno=0)
    Committer(new_dir, channel).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
