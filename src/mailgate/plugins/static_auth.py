"""AUTH against a fixed user list given on the command line (development use).

Passwords are compared in constant time, and unknown users cost the same as known ones.
The server slows down each failure and disconnects after repeated ones.
"""

from __future__ import annotations

from mailgate.hooks import Accept, AuthAttempt, Reject, Session

_UNKNOWN = "\0unknown-user\0"


class StaticUsers:
    name = "static-users"
    #: The plaintext secret is at hand, so CRAM-MD5 can be checked too.
    auth_mechanisms = ("PLAIN", "LOGIN", "CRAM-MD5")

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)

    async def on_auth(self, session: Session, auth: AuthAttempt) -> Accept | None:
        secret = self.users.get(auth.username)
        # Check against something even for unknown users so timing does not tell.
        ok = auth.verify(secret if secret is not None else _UNKNOWN)
        if secret is None:
            return None  # not one of ours: another backend (or none, and so 535) decides
        # Acting for another identity is not something static users may do.
        if ok and auth.authzid in (None, "", auth.username):
            return Accept()
        raise Reject(535, "Authentication credentials invalid", enhanced="5.7.8")
