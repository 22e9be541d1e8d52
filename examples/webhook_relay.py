"""Turn incoming mail into HTTP requests to your web application.

Every accepted message is POSTed to ``--webhook URL`` before the client gets its 250: a
``multipart/form-data`` request with an ``envelope`` part (JSON: sender, recipients,
session) and a ``message`` part (the raw message). The endpoint's answer becomes the SMTP
answer: 2xx delivers, 413 and other 4xx refuse the message for good (552/554), 5xx and
connection failures are retried and then answered with 451, so the sender tries again
later. The text of a ``text/plain`` refusal is passed on in the SMTP reply.

``mailgate serve --sink --webhook URL`` does the same without code; this program adds an
API key header, a recipient check, and a line printed per message. Try it:

    python examples/webhook_relay.py --webhook http://127.0.0.1:8000/inbound-mail
    swaks --server 127.0.0.1:2525 --to support@example.com
"""

from __future__ import annotations

import argparse
import os

from mailgate import Address, Envelope, Message, Reject, Server, Session
from mailgate.delivery.webhook import WebhookDelivery


def main() -> int:
    parser = argparse.ArgumentParser(description="Relay incoming mail to a webhook.")
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    parser.add_argument("--webhook", default="http://127.0.0.1:8000/inbound-mail", metavar="URL")
    args = parser.parse_args()

    # local_domains: mail for example.com is accepted from any client, not only loopback.
    server = Server(
        hostname="localhost", listen=args.listen, local_domains=["example.com"], max_size="20M"
    )

    @server.on_rcpt
    def our_domain(session: Session, envelope: Envelope, address: Address) -> None:
        if address.domain.lower() != "example.com":
            raise Reject(550, "no such domain here", enhanced="5.1.2")

    webhook = WebhookDelivery(
        args.webhook,
        headers={"X-Api-Key": os.environ.get("WEBHOOK_API_KEY", "dev-key")},
        timeout=10,  # seconds per POST
        retries=2,  # then 451: the sender's server tries again later
    )
    server.add_plugin(webhook)

    # Runs after the webhook step, so only for messages the endpoint took.
    @server.on_message(after=webhook.name)
    def log_it(session: Session, envelope: Envelope, message: Message) -> None:
        print(f"relayed {message.id} for {', '.join(envelope.rcpt_tos)} to {webhook.url}")

    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
