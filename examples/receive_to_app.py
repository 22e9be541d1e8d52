"""Receive mail into your application.

Accept mail only for your own domains (refused at RCPT, before any message byte is sent),
then hand every message to your code: here it is parsed with the stdlib ``email`` package
and its subject printed. Run it and send it a message:

    python examples/receive_to_app.py --domain example.com
    swaks --server 127.0.0.1:2525 --to you@example.com --header "Subject: hi"

Stop it with Ctrl-C (or SIGTERM): transactions in flight are finished first.
"""

from __future__ import annotations

import argparse
import asyncio

from mailgate import Address, Envelope, Message, Reject, Server, Session


def main() -> int:
    parser = argparse.ArgumentParser(description="Receive mail into an application.")
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    parser.add_argument(
        "--domain",
        action="append",
        help="accept mail for this domain; repeatable (default: example.com)",
    )
    args = parser.parse_args()
    domains = {d.lower() for d in args.domain or ["example.com"]}

    # Settings are those of `mailgate serve`; from code nothing is stored on disk unless
    # you ask (maildir=..., mbox=...): the message hook below is the delivery.
    # local_domains: mail for these is accepted from anyone. Without it only loopback
    # (relay_networks) and authenticated users could send: every other client would get
    # "554 5.7.1 Relay access denied" for every recipient.
    server = Server(
        hostname="localhost", listen=args.listen, local_domains=sorted(domains), max_size="10M"
    )

    @server.on_rcpt
    def only_our_domains(session: Session, envelope: Envelope, address: Address) -> None:
        # A plain function works as well as a coroutine. `address` is a str with
        # .local, .domain and .params (the ESMTP parameters of RCPT TO). Relay control
        # lets clients on loopback send anywhere; this hook keeps them to our domains too.
        if address.domain.lower() not in domains:
            raise Reject(550, "no mailboxes here for that domain", enhanced="5.1.2")

    @server.on_message
    async def hand_to_app(session: Session, envelope: Envelope, message: Message) -> None:
        # as_email() reads the spooled file: keep it off the event loop.
        parsed = await asyncio.to_thread(message.as_email)
        recipients = ", ".join(envelope.rcpt_tos)
        print(
            f"message {message.id} from <{envelope.sender}> to {recipients}: "
            f"subject {parsed['Subject']!r}, {message.size} bytes"
        )
        # Raising Reject or TempFail here refuses the message; returning accepts it (250).

    return server.run()  # until SIGINT/SIGTERM; logs "listening on HOST port N"


if __name__ == "__main__":
    raise SystemExit(main())
