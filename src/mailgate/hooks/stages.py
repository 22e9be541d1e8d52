"""The stages of a session, in the order a session meets them; the bottom of ``mailgate.hooks``
(every other module of the package may import it, it imports none of them)."""

from __future__ import annotations

from typing import Final

#: Every stage, in the order a session meets them.
STAGES: Final = (
    "connect",
    "tls",
    "helo",
    "auth",
    "mail",
    "rcpt",
    "vrfy",
    "data_start",
    "message",
    "reset",
    "close",
)
#: Stages that only tell: what their steps return is ignored.
NOTIFICATIONS: Final = frozenset({"reset", "close"})

__all__ = ["NOTIFICATIONS", "STAGES"]
