"""Local deliveries as message hooks: the blocking, fsyncing work runs in a thread.

Both are two-phase (``Message.stage``, see docs/plugins.md): the message hook prepares,
and the message becomes visible only once every required delivery of the message has
accepted it; a refusal or failure of another delivery leaves no copy here.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mailgate.hooks import Envelope, HookError, Message, Session, TempFail
from mailgate.server.spool import register_spool_source, unregister_spool_source

from .commit_process import ProcessCommitter
from .maildir import MaildirStore, fsync_file
from .mbox import MboxStore

T = TypeVar("T")
_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _storage_full() -> TempFail:
    """What a full disk or quota answers: 452 4.3.1, as RFC 3463 asks."""
    return TempFail(452, "Insufficient system storage, try again later", enhanced="4.3.1")


def _storage_checked(work: Callable[[], T]) -> Callable[[], T]:
    """``work`` with a full disk or quota (often seen only at fsync, with delayed
    allocation) answered ``452 4.3.1``, as RFC 3463 asks, instead of a failed hook's 451."""

    def checked() -> T:
        try:
            return work()
        except OSError as exc:
            if exc.errno in _STORAGE_FULL:
                raise _storage_full() from exc
            raise

    return checked


class MaildirDelivery:
    """Deliver into a Maildir. Spooled files already in its tmp/ are hard-linked (no copy).

    The message step only registers the delivery (no file is touched, no thread hop);
    once every required step accepted the message, the commit hands the spool to the
    Maildir's :class:`GroupCommitter`, which makes it durable (fsync of the file, link
    into new/, fsync of new/ shared by every message committed with it) in one trip to
    its thread. Should a later message step rewrite the spool (a header added: a new
    file, the old one removed), the Maildir's version is first given a durable name of
    its own in tmp/ (one worker-thread trip, only then).
    """

    name = "maildir"

    def __init__(self, root: Path) -> None:
        self.store = MaildirStore(root)
        self.committer = ProcessCommitter(self.store)
        # When the server spools into this Maildir's tmp/ (``mailgate serve --maildir``),
        # its spool files are made by the same helper process.
        register_spool_source(self.store.tmp_dir, self.committer)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError("Maildir delivery needs spooled message bytes")
        staged = _StagedMaildir(self, message, message.path)
        message.stage(staged.commit, staged.abort, name=self.name)
        message.before_rewrite(staged.pin)

    async def aclose(self) -> None:
        """Let the committer finish what waits, then end it (a disk that hangs does not
        hold the shutdown longer than 30 s per stage: its threads are daemons, and its
        helper process ends at the end of its input)."""
        unregister_spool_source(self.store.tmp_dir, self.committer)
        await self.committer.aclose(30.0)


class _StagedMaildir:
    """One message's Maildir delivery between its message step and the verdict."""

    def __init__(self, delivery: MaildirDelivery, message: Message, path: Path) -> None:
        self.delivery = delivery
        self.message = message
        self.path = path  # the spool as the Maildir step saw it
        self.staged: Path | None = None  # its own durable tmp/ name, once pinned
        self.settled = False

    async def pin(self) -> None:
        """A later step is about to replace the spool: keep this version (fsynced) under
        a name of its own in tmp/, as the first phase of a two-phase delivery."""
        if self.staged is not None or self.settled:
            return
        message, path, store = self.message, self.path, self.delivery.store

        def prepare() -> Path:
            return store.stage_spooled(path, synced=message.sync())

        loop = asyncio.get_running_loop()
        self.staged = await loop.run_in_executor(None, _storage_checked(prepare))

    async def commit(self) -> str:
        self.settled = True
        committer = self.delivery.committer
        if self.staged is not None:
            future = committer.submit(self.staged, synced=True)
        else:
            if self.message.path != self.path:  # pragma: no cover - pin() runs before a rewrite
                raise HookError("the spool changed under the Maildir delivery")
            # The server's spool: its own finish() is the fsync, and the server removes its
            # tmp/ name afterwards. A message without a spool of its own to sync (a
            # background step's copy) is fsynced by its path instead.
            message, path = self.message, self.path

            def sync() -> None:
                if not message.sync():
                    fsync_file(path)

            future = committer.submit(path, sync=sync, keep_source=True)
        try:
            return await future
        except OSError as exc:
            if exc.errno in _STORAGE_FULL:
                raise _storage_full() from exc
            raise

    def abort(self) -> None:
        self.settled = True
        if self.staged is not None:
            self.delivery.store.abort_staged(self.staged)


class MboxDelivery:
    """Append to an mbox file (mboxrd), locked with fcntl and a dotlock, fsynced."""

    name = "mbox"

    def __init__(self, path: Path) -> None:
        self.store = MboxStore(path)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError("mbox delivery needs spooled message bytes")
        sender = message.envelope.sender or None

        def deliver() -> None:
            # The path at commit time: a later step may have added a header (a new file).
            path = message.path
            assert path is not None
            self.store.deliver_spooled(path, sender=sender, received_at=message.received_at)

        # An append cannot be hidden until later: the whole delivery is the commit, made
        # only once every required delivery accepted the message.
        message.stage(deliver, name=self.name)
