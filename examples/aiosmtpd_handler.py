"""Run an aiosmtpd handler class on mailgate, unchanged.

``Handler`` below is written exactly as for aiosmtpd (``handle_RCPT`` appends to
``envelope.rcpt_tos`` and answers with a reply string, ``handle_DATA`` reads
``envelope.content``); it does not import anything from mailgate. ``HandlerAdapter``
runs it on mailgate's hooks. From the command line, the same handler runs with

    cd examples && mailgate serve --sink --aiosmtpd-handler aiosmtpd_handler:Handler

Try it:

    python examples/aiosmtpd_handler.py
    swaks --server 127.0.0.1:2525 --to alice@example.com --header "Subject: hello"
"""

from __future__ import annotations

import argparse
import email
import email.policy
from typing import Any


class Handler:
    """An aiosmtpd handler: accepts mail for example.com and prints each message."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not address.lower().endswith("@example.com"):
            return "550 5.1.2 not relaying to that domain"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        print(
            f"aiosmtpd handler: message from {envelope.mail_from} "
            f"(peer {session.peer[0]}) to {', '.join(envelope.rcpt_tos)}: "
            f"subject {message['Subject']!r}"
        )
        return "250 Message accepted for delivery"


def main() -> int:
    from mailgate import Server
    from mailgate.compat.aiosmtpd import HandlerAdapter

    parser = argparse.ArgumentParser(description="An aiosmtpd handler on mailgate.")
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    args = parser.parse_args()

    # local_domains: mail for example.com is accepted from any client, not only loopback.
    server = Server(hostname="localhost", listen=args.listen, local_domains=["example.com"])
    # hostname: what the handler sees as server.hostname (aiosmtpd's default is the FQDN).
    server.add_plugin(HandlerAdapter(Handler(), hostname=server.options.hostname))
    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
