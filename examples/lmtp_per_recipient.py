"""An LMTP server that answers for each recipient on its own.

In LMTP (RFC 2033) the server gives one reply per recipient after the message: a mail
store can deliver to one mailbox and refuse another. A message hook does that by
returning a dict (or a list in recipient order) with one answer per recipient: None or
True for delivered, a Reject or TempFail for not. Recipients missing from a dict get the
default (delivered).

Here each mailbox is a Maildir under ``--mail-root`` with a quota; a message that does
not fit is refused for that mailbox only (452 4.2.2, try again later). Try it with an
LMTP client, e.g. ``swaks --protocol LMTP --server 127.0.0.1:2424 --to alice@example.com``.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
from pathlib import Path
from typing import Any

from mailgate import Address, Envelope, Message, Reject, Server, Session, TempFail

#: Mailbox -> quota in bytes.
QUOTAS = {"alice@example.com": 10 * 1024 * 1024, "tiny@example.com": 1024}


def used_bytes(maildir: Path) -> int:
    return sum(f.stat().st_size for sub in ("new", "cur") for f in (maildir / sub).glob("*"))


def main() -> int:
    parser = argparse.ArgumentParser(description="LMTP with one answer per recipient.")
    parser.add_argument("--listen", default="127.0.0.1:2424", metavar="HOST:PORT")
    parser.add_argument("--mail-root", default="mailboxes", type=Path)
    args = parser.parse_args()
    root: Path = args.mail_root
    root.mkdir(parents=True, exist_ok=True)

    server = Server(hostname="localhost", listen=args.listen, lmtp=True)

    @server.on_rcpt
    def known_mailbox(session: Session, envelope: Envelope, address: Address) -> None:
        if address.lower() not in QUOTAS:
            raise Reject(550, "no such mailbox", enhanced="5.1.1")

    @server.on_message
    async def deliver(session: Session, envelope: Envelope, message: Message) -> dict[str, Any]:
        data = await message.read()

        def store(rcpt: str) -> Any:
            # Blocking file work: runs in a thread (below), one mailbox after another.
            # (The stdlib's mailbox module does not fsync; a real store should.)
            folder = root / rcpt.lower()
            box = mailbox.Maildir(folder, create=True)
            if used_bytes(folder) + len(data) > QUOTAS[rcpt.lower()]:
                return TempFail(452, "mailbox full", enhanced="4.2.2")
            box.add(data)
            print(f"delivered {message.id} to {rcpt}")
            return None

        return {rcpt: await asyncio.to_thread(store, rcpt) for rcpt in envelope.rcpt_tos}

    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
