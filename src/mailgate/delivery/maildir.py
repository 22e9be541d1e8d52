"""Maildir delivery (cr.yp.to/proto/maildir.html) that is durable before it returns.

A message is complete in ``tmp/`` and fsynced, then hard-linked into ``new/`` and
``new/`` is fsynced: once ``deliver_*`` returns, a crash or power loss cannot lose it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from pathlib import Path

from mailgate.server.spool import SpoolFile, unique_name

__all__ = ["MaildirStore", "fsync_directory"]

log = logging.getLogger(__name__)

_LINK_ATTEMPTS = 16
_COPY_BLOCK = 1024 * 1024
# Filesystems without hard links (some FUSE, SMB, vfat) answer these; rename still works
# and the unique name makes overwriting another message practically impossible.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def fsync_directory(path: Path) -> None:
    """Make the entries of a directory (a new name, a removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """fsync of one directory, shared by concurrent callers (group commit).

    A caller that made a change needs *a* fsync that started after its change. While one
    fsync runs, later callers wait for it to end and then let one of them run the next one,
    which covers all their changes at once: under load, one fsync serves many deliveries.
    """

    def __init__(self, path: Path) -> None:
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


class MaildirStore:
    """One Maildir (no sub-folders); safe to share between threads and processes."""

    root: Path
    tmp_dir: Path
    new_dir: Path
    cur_dir: Path

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.new_dir = self.root / "new"
        self.cur_dir = self.root / "cur"
        if create:
            self._create()
        else:
            for directory in (self.tmp_dir, self.new_dir, self.cur_dir):
                if not directory.is_dir():
                    raise FileNotFoundError(
                        errno.ENOENT, "not a Maildir (missing tmp/, new/ or cur/)", str(directory)
                    )
        tmp = os.stat(self.tmp_dir)
        self._tmp_id = (tmp.st_dev, tmp.st_ino)
        self._new_sync = _GroupSync(self.new_dir)

    def _create(self) -> None:
        created_root = False
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            created_root = True
        created_sub = False
        for directory in (self.tmp_dir, self.new_dir, self.cur_dir):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue
            created_sub = True
        # A Maildir whose new/ vanishes on power loss would lose the first deliveries.
        if created_sub or created_root:
            fsync_directory(self.root)
        if created_root:
            fsync_directory(self.root.parent)

    def deliver_spooled(
        self, spool: SpoolFile | Path, *, synced: bool = False, keep_source: bool = False
    ) -> str:
        """Deliver a finished spool file into ``new/``; returns the message's file name.

        A spool in ``tmp/`` is linked, not copied, and its tmp name is removed (a
        ``SpoolFile``'s ``discard()`` is then a no-op). A spool elsewhere is copied and
        left in place. A plain ``Path`` in ``tmp/`` is fsynced here unless the caller says
        it already is (``synced=True``; the server fsyncs before message hooks run).
        ``keep_source``: leave the tmp name for its owner to remove (the server's spool,
        which later message steps still read).
        """
        if isinstance(spool, SpoolFile):
            if not spool.finished or spool.discarded:
                raise ValueError(f"{spool!r} must be finished (fsynced) before delivery")
            source = spool.path
        else:
            source = Path(spool)
        if not self._in_tmp(source):
            return self._copy_and_publish(source)
        if not isinstance(spool, SpoolFile) and not synced:
            _fsync_file(source)
        return self._publish(source, keep_source=keep_source)

    def stage_spooled(self, source: Path, *, synced: bool = False) -> Path:
        """The first phase of a two-phase delivery: a durable copy of ``source`` under a
        new name in ``tmp/`` (a hard link when ``source`` is in ``tmp/``: no copy), not
        visible to readers. :meth:`commit_staged` publishes it, :meth:`abort_staged`
        removes it; a crash in between leaves a ``tmp/`` file, which the server's start
        and Maildir readers clean up."""
        source = Path(source)
        if not self._in_tmp(source):
            copy = SpoolFile(self.tmp_dir)
            try:
                with open(source, "rb") as reader:
                    shutil.copyfileobj(reader, copy, _COPY_BLOCK)
                copy.finish()
            except BaseException:
                copy.discard()
                raise
            return copy.path
        if not synced:
            _fsync_file(source)
        for _ in range(_LINK_ATTEMPTS):
            staged = self.tmp_dir / unique_name()
            try:
                os.link(source, staged)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                shutil.copyfile(source, staged)
                _fsync_file(staged)
            return staged
        raise FileExistsError(errno.EEXIST, "no free unique name in tmp/", str(self.tmp_dir))

    def commit_staged(self, staged: Path) -> str:
        """Publish a file made by :meth:`stage_spooled` into ``new/`` (durable when this
        returns); returns its name there."""
        return self._publish(staged)

    def abort_staged(self, staged: Path) -> None:
        """Drop a file made by :meth:`stage_spooled`: the message is not delivered here."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)

    def deliver_bytes(self, data: bytes) -> str:
        """Deliver a message held in memory, as durably as ``deliver_spooled``."""
        spool = SpoolFile(self.tmp_dir)
        try:
            spool.write(data)
            spool.finish()
            return self._publish(spool.path)
        finally:
            spool.discard()

    def _in_tmp(self, source: Path) -> bool:
        if source.parent == self.tmp_dir:
            return True
        try:
            here = os.stat(source.parent)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == self._tmp_id

    def _copy_and_publish(self, source: Path) -> str:
        copy = SpoolFile(self.tmp_dir)
        try:
            with open(source, "rb") as reader:
                shutil.copyfileobj(reader, copy, _COPY_BLOCK)
            copy.finish()
            return self._publish(copy.path)
        finally:
            copy.discard()

    def _publish(self, tmp_path: Path, *, keep_source: bool = False) -> str:
        """Link a durable file from tmp/ into new/, drop the tmp name (unless
        ``keep_source``), fsync new/."""
        name = tmp_path.name
        for _ in range(_LINK_ATTEMPTS):
            target = self.new_dir / name
            try:
                os.link(tmp_path, target)
            except FileExistsError:
                name = unique_name()
                continue
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if target.exists():
                    name = unique_name()
                    continue
                if keep_source:  # no hard links here: the source must stay, so copy
                    shutil.copyfile(tmp_path, target)
                    _fsync_file(target)
                else:
                    os.rename(tmp_path, target)
            break
        else:
            raise FileExistsError(errno.EEXIST, "no free unique name in new/", str(self.new_dir))
        try:
            if not keep_source:
                os.unlink(tmp_path)
        except FileNotFoundError:
            pass  # the rename fallback already moved it
        except OSError as exc:
            # The message is in new/ already; failing now would make the client send it
            # again. A stale tmp/ name is what Maildir readers clean up anyway.
            log.warning("delivered %s but could not remove %s: %s", name, tmp_path, exc)
        self._new_sync.sync()
        return name
