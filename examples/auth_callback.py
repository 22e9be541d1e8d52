"""Authenticate users with your own callback, over STARTTLS.

The ``on_auth`` callback gets an ``AuthAttempt``; ``auth.verify(password)`` checks it for
PLAIN and LOGIN (a constant-time comparison) and for CRAM-MD5 (where no password travels).
Return True to let the user in, False (or nothing) to refuse with 535. Failed attempts are
slowed down by the server and the connection is closed after three of them.

AUTH is only offered after STARTTLS. Without ``tls_cert``/``tls_key`` the server makes a
self-signed development certificate in its state directory (``~/.local/state/mailgate``
from code); clients will not trust it: fine for trying things out, not for production.
Try it:

    python examples/auth_callback.py
    swaks --server 127.0.0.1:2525 --tls --auth-user alice --auth-password wonderland \\
        --from alice@example.com --to bob@example.com
"""

from __future__ import annotations

import argparse

from mailgate import Address, AuthAttempt, Envelope, Message, Reject, Server, Session

# In a real application: look the user up in your database. verify() needs the plain
# password only for CRAM-MD5; with PLAIN/LOGIN you can check auth.password against a hash.
USERS = {"alice": "wonderland", "bob": "builder"}


def main() -> int:
    parser = argparse.ArgumentParser(description="AUTH with a callback, over STARTTLS.")
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    parser.add_argument("--tls-cert", help="certificate chain (PEM); default: development one")
    parser.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    args = parser.parse_args()

    server = Server(
        hostname="localhost",
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        # A callback can check PLAIN and LOGIN; verify() makes CRAM-MD5 possible too.
        auth_mechanisms=["PLAIN", "LOGIN", "CRAM-MD5"],
    )

    @server.on_auth
    def check_password(session: Session, auth: AuthAttempt) -> bool:
        secret = USERS.get(auth.username)
        return secret is not None and auth.verify(secret)

    @server.on_mail
    def require_login(session: Session, envelope: Envelope, address: Address) -> None:
        if not session.authenticated:
            raise Reject(530, "Authentication required", enhanced="5.7.0")

    @server.on_message
    def show(session: Session, envelope: Envelope, message: Message) -> None:
        tls = session.tls
        print(
            f"{session.user} (AUTH {session.auth_mechanism}) sent {message.id} "
            f"to {', '.join(envelope.rcpt_tos)} over {tls.version if tls else 'plain text'}"
        )

    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
