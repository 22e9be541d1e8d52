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

from .maildir import MaildirStore
from .mbox import MboxStore

T = TypeVar("T")
_STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _storage_checked(work: Callable[[], T]) -> Callable[[], T]:
    """``work`` with a full disk or quota (often seen only at fsync, with delayed
    allocation) answered ``452 4.3.1``, as RFC 3463 asks, instead of a failed hook's 451."""

    def checked() -> T:
        try:
            return work()
        except OSError as exc:
            if exc.errno in _STORAGE_FULL:
                raise TempFail(
                    452, "Insufficient system storage, try again later", enhanced="4.3.1"
                ) from exc
            raise

    return checked


class MaildirDelivery:
    """Deliver into a Maildir. Spooled files already in its tmp/ are hard-linked (no copy)."""

    name = "maildir"

    def __init__(self, root: Path) -> None:
        self.store = MaildirStore(root)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError("Maildir delivery needs spooled message bytes")
        loop = asyncio.get_running_loop()
        path = message.path
        store = self.store

        def prepare() -> Path:
            # One trip to a worker thread: make the spool durable, then give it a second
            # name in tmp/ that later message steps (a header added: a new spool) and the
            # server's removal of the spool leave alone.
            message.sync()
            return store.stage_spooled(path, synced=True)

        staged = await loop.run_in_executor(None, _storage_checked(prepare))
        message.stage(
            lambda: store.commit_staged(staged),
            lambda: store.abort_staged(staged),
            name=self.name,
        )


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
