"""Plugins in an ordered chain, and a middleware around every stage.

Three small plugins, each a class with a ``name`` and ``on_<stage>`` methods:

* ``mailboxes`` refuses unknown recipients at RCPT;
* ``spam-words`` reads the message and refuses it when it contains a listed word;
* ``printer`` prints what was accepted.

They are registered in the "wrong" order on purpose: ``before=``/``after=`` put them in
the right one (printed at start). The ``timing`` middleware wraps every stage and prints
how long its chain took. Try it:

    python examples/plugin_chain.py
    swaks --server 127.0.0.1:2525 --to alice@example.com --body "hello"
    swaks --server 127.0.0.1:2525 --to alice@example.com --body "cheap viagra"
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mailgate import Address, Envelope, HookContext, Message, Reject, Server, Session


class Mailboxes:
    """Only these recipients exist."""

    name = "mailboxes"

    def __init__(self, addresses: set[str]) -> None:
        self.addresses = {a.lower() for a in addresses}

    def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        if address.lower() not in self.addresses:
            raise Reject(550, f"no mailbox {address} here", enhanced="5.1.1")


class SpamWords:
    """Refuses a message that contains one of ``words``; notes the check for later steps."""

    name = "spam-words"

    def __init__(self, words: list[str]) -> None:
        self.words = [w.lower().encode() for w in words]

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        # read() refuses (raises) above its limit; stream with `async for` for big mail.
        text = (await message.read(limit=1024 * 1024)).lower()
        if any(word in text for word in self.words):
            raise Reject(554, "message looks like spam", enhanced="5.7.1")
        # session.notes is shared by the plugins of one connection.
        session.notes["spam-words"] = "clean"


class Printer:
    name = "printer"

    def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        verdict = session.notes.get("spam-words", "unchecked")
        print(f"accepted {message.id} for {', '.join(envelope.rcpt_tos)} ({verdict})")


async def timing(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
    """Middleware: runs around the chain of every stage, sees its result (or exception)."""
    started = time.perf_counter()
    try:
        return await call_next()
    finally:
        elapsed = (time.perf_counter() - started) * 1000
        print(f"timing: {ctx.stage} took {elapsed:.2f} ms (session {ctx.session.id})")


def main() -> int:
    parser = argparse.ArgumentParser(description="An ordered chain of plugins.")
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    args = parser.parse_args()

    # local_domains: mail for example.com is accepted from any client, not only loopback.
    server = Server(hostname="localhost", listen=args.listen, local_domains=["example.com"])
    server.use(timing)
    server.add_plugin(Printer(), after="spam-words")
    server.add_plugin(SpamWords(["viagra", "lottery"]), after="mailboxes")
    server.add_plugin(Mailboxes({"alice@example.com", "bob@example.com"}), before="spam-words")
    print("chain:", " -> ".join(server.hooks.names()))
    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
