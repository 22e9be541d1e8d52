"""Local deliveries as message hooks: the blocking, fsyncing work runs in a thread."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailgate.hooks import Envelope, HookError, Message, Session

from .maildir import MaildirStore
from .mbox import MboxStore


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

        def deliver() -> None:
            # One trip to a worker thread: make the spool durable, then link it into new/.
            # The spool's tmp name stays for later message steps; the server removes it.
            message.sync()
            self.store.deliver_spooled(path, synced=True, keep_source=True)

        await loop.run_in_executor(None, deliver)


class MboxDelivery:
    """Append to an mbox file (mboxrd), locked with fcntl and a dotlock, fsynced."""

    name = "mbox"

    def __init__(self, path: Path) -> None:
        self.store = MboxStore(path)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError("mbox delivery needs spooled message bytes")
        loop = asyncio.get_running_loop()
        path = message.path
        sender = message.envelope.sender or None

        def deliver() -> None:
            self.store.deliver_spooled(path, sender=sender, received_at=message.received_at)

        await loop.run_in_executor(None, deliver)
