"""AUTH against a fixed user list given on the command line (development use).

Passwords are compared in constant time; each failure is slowed down so guessing is
expensive (the protocol layer disconnects after repeated failures).
"""

from __future__ import annotations

import asyncio
import hmac

from mailgate.hooks import Accept, AuthCredentials, Reject, Session


class StaticUsers:
    name = "static-users"

    def __init__(self, users: dict[str, str], *, failure_delay: float = 0.5) -> None:
        self.users = dict(users)
        self.failure_delay = failure_delay

    async def on_auth(self, session: Session, credentials: AuthCredentials) -> Accept:
        if self._valid(credentials):
            return Accept()
        await asyncio.sleep(self.failure_delay)
        raise Reject("Authentication credentials invalid", code=535, status="5.7.8")

    def _valid(self, credentials: AuthCredentials) -> bool:
        secret = self.users.get(credentials.username)
        # Compare against something even for unknown users so timing does not tell.
        known = secret is not None
        secret = secret if secret is not None else "\0unknown-user\0"
        if credentials.authzid not in (None, credentials.username):
            return False  # acting for another identity is not something static users may do
        if credentials.mechanism == "CRAM-MD5":
            ok = credentials.verify_cram_md5(secret)
        elif credentials.password is not None:
            ok = hmac.compare_digest(credentials.password.encode(), secret.encode())
        else:
            ok = False  # XOAUTH2 tokens are not passwords
        return ok and known
