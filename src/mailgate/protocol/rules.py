"""The rule table of the SMTP/LMTP server connection: the states, and for every verb the
states it is accepted in, the state a successful answer moves to, its argument, the
extension that must be offered and an extra guard. :class:`~mailgate.protocol.ServerConnection`
applies it; the state-table tests are generated from it.

The rules, in the order they are applied to every command line:

1. The line must fit ``max_command_line`` (AUTH lines: ``max_auth_line``)  -> 500 5.5.2
2. The verb must be one this mode knows (LMTP: LHLO, not HELO/EHLO)          -> 500 5.5.2
3. The verb's extension must be offered to this connection right now         -> 502 5.5.1
4. The argument must match the verb's grammar (paths, BDAT size, ...)        -> 501
5. The current state must be one the verb's row in ``RULES`` allows, and the
   row's guard (not yet authenticated, TLS not yet active, ...) must hold     -> 503 5.5.1
6. ESMTP parameters must be known, offered and valid                          -> 555 5.5.4
7. What is left is policy: the caller answers the event.

Every transition is in ``RULES`` below: the states a verb is accepted in and the state
a successful answer moves to. Errors never change the state, except the limits that
close the connection (too many unknown or bad commands, too many failed AUTHs).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    GREETING = "greeting"  # banner not sent yet
    CONNECTED = "connected"  # banner sent; HELO/EHLO/LHLO not yet accepted
    READY = "ready"  # greeted; no mail transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading a BDAT chunk
    BDAT_OPEN = "bdat-open"  # between the chunks of a BDAT transaction
    AUTH = "auth"  # inside a SASL exchange
    TLS_PENDING = "tls-pending"  # 220 sent to STARTTLS; waiting for the handshake
    REFUSED = "refused"  # the greeting was 554: only QUIT is served (RFC 5321 3.1)
    CLOSED = "closed"

    # States are tested against sets on every command (rule.allowed, the driver's
    # receiving-data check): Enum's own __hash__ is a Python function; members are
    # singletons compared by identity, so the identity hash (in C) is as good.
    __hash__ = object.__hash__


_SESSION = frozenset({State.CONNECTED, State.READY, State.MAIL, State.RCPT, State.BDAT_OPEN})
_OUTSIDE_TRANSACTION = frozenset({State.CONNECTED, State.READY})


class Arg(Enum):
    NONE = "none"  # the verb takes no argument
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the state table."""

    verb: str
    allowed: frozenset[State]
    #: State after a successful answer (None: stays; handlers decide for the rest).
    success: State | None
    arg: Arg
    #: Name of the extension that must be offered for the verb to exist (step 3).
    extension: str | None = None
    #: Extra sequence condition checked with the state (step 5), and its reply.
    guard: str | None = None


# fmt: off
RULES: dict[str, Rule] = {r.verb: r for r in (
    #    verb        accepted in                               moves to           argument      extension   guard
    Rule("HELO",     _SESSION,                                 State.READY,       Arg.REQUIRED, "SMTP"),
    Rule("EHLO",     _SESSION,                                 State.READY,       Arg.REQUIRED, "SMTP"),
    Rule("LHLO",     _SESSION,                                 State.READY,       Arg.REQUIRED, "LMTP"),
    Rule("MAIL",     frozenset({State.READY}),                 State.MAIL,        Arg.REQUIRED),
    Rule("RCPT",     frozenset({State.MAIL, State.RCPT}),      State.RCPT,        Arg.REQUIRED),
    Rule("DATA",     frozenset({State.RCPT}),                  State.DATA,        Arg.NONE,     None,       "not-binarymime"),
    Rule("BDAT",     frozenset({State.RCPT, State.BDAT_OPEN}), State.BDAT,        Arg.REQUIRED, "CHUNKING"),
    Rule("RSET",     _SESSION,                                 None,              Arg.NONE),
    Rule("NOOP",     _SESSION,                                 None,              Arg.OPTIONAL),
    Rule("QUIT",     _SESSION | {State.REFUSED},               State.CLOSED,      Arg.NONE),
    Rule("HELP",     _SESSION,                                 None,              Arg.OPTIONAL),
    Rule("VRFY",     _SESSION,                                 None,              Arg.REQUIRED, "VRFY"),
    Rule("EXPN",     _SESSION,                                 None,              Arg.REQUIRED, "EXPN"),
    Rule("STARTTLS", _OUTSIDE_TRANSACTION,                     State.TLS_PENDING, Arg.NONE,     "STARTTLS", "tls-inactive"),
    Rule("AUTH",     frozenset({State.READY}),                 State.READY,       Arg.REQUIRED, "AUTH",     "not-authenticated"),
    Rule("XCLIENT",  _OUTSIDE_TRANSACTION,                     State.CONNECTED,   Arg.REQUIRED, "XCLIENT"),
    Rule("XFORWARD", _OUTSIDE_TRANSACTION,                     None,              Arg.REQUIRED, "XFORWARD"),
)}
# fmt: on

#: Reply names (see mailgate.protocol.persona) for the guards and the sequence errors.
GUARD_REPLIES = {
    "not-binarymime": "binarymime_needs_bdat",
    "tls-inactive": "tls_already_active",
    "not-authenticated": "auth_already",
}
SEQUENCE_REPLIES = {
    State.CONNECTED: "need_hello",
    State.READY: "need_mail",
    State.MAIL: "need_rcpt",
    State.REFUSED: "only_quit",
}


__all__ = ["GUARD_REPLIES", "RULES", "SEQUENCE_REPLIES", "Arg", "Rule", "State"]
