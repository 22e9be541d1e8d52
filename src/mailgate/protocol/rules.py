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

A persona's :class:`~mailgate.protocol.behaviour.Behaviour` adjusts the table, never
the code paths: :func:`rules_for` gives the table a connection applies.

- ``hello_required = False``: the verbs in ``HELLO_GOVERNED`` with ``CONNECTED`` in
  their accepted states (MAIL, ETRN, AUTH), and RCPT/DATA/BDAT before HELO are answered as
  before MAIL (``need_mail``, ``data_need_mail``) rather than ``need_hello``.
- ``allowed_before_hello``: those verbs of ``HELLO_GOVERNED`` are accepted in
  ``CONNECTED`` although ``hello_required``; ``sender_before_hello``: RCPT/DATA/BDAT
  before HELO are answered as before MAIL.
- ``sequence_first``: step 5 comes before step 4 (503 outranks 501), BDAT aside.
- ``ignored_arguments``: those verbs' argument becomes optional and is ignored.
- ``etrn``: the ETRN row's extension is offered.
- ``sync_check``: a step 0 before the others: a verb in ``SYNC_VERBS`` (or in
  ``SYNC_VERBS_UNPIPELINED`` without PIPELINING) with input behind it -> 554, close.
  ``sync_until_pipelining``: every verb, until PIPELINING was offered; with
  ``sync_error_refuses`` the session then serves only QUIT (``REFUSED``) instead.
- ``lenient_paths``/``lenient_hello`` widen step 4's grammar; ``long_lines`` and
  ``line_limit`` change step 1 (cut the line instead of refusing it);
  ``error_limit`` replaces the unknown/bad command counts by one count of every error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from .behaviour import DEFAULT_BEHAVIOUR, Behaviour


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
    # ETRN's missing domain is answered after the sequence (as the products do).
    Rule("ETRN",     frozenset({State.READY}),                 None,              Arg.OPTIONAL, "ETRN"),
    # Sendmail's verbose mode; exists only for a persona that offers VERB.
    Rule("VERB",     _SESSION,                                 None,              Arg.OPTIONAL, "VERB"),
)}
# fmt: on

#: Reply names (see mailgate.protocol.persona) for the guards and the sequence errors.
GUARD_REPLIES = {
    "not-binarymime": "binarymime_needs_bdat",
    "tls-inactive": "tls_already_active",
    "not-authenticated": "auth_already",
}
#: The persona's ``sync_check`` (Exim's smtp_enforce_sync, RFC 2920 3.1): verbs that must
#: be the last of a pipelined group, always (unknown verbs too) ...
SYNC_VERBS = frozenset({"HELO", "EHLO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "ETRN", "STARTTLS"})
#: ... and verbs that may be pipelined only once PIPELINING was offered.
SYNC_VERBS_UNPIPELINED = frozenset({"MAIL", "RCPT", "RSET"})
#: Verbs that need HELO/EHLO only when the persona's ``hello_required`` says so.
HELLO_GOVERNED = frozenset({"MAIL", "ETRN", "AUTH"})
#: Verbs that, before HELO with ``hello_required = False``, are judged as in READY.
BEFORE_MAIL = frozenset({"RCPT", "DATA", "BDAT"})
SEQUENCE_REPLIES = {
    State.CONNECTED: "need_hello",
    State.READY: "need_mail",
    State.MAIL: "need_rcpt",
    State.REFUSED: "only_quit",
}


#: Reply names for a verb's missing argument where the product words it apart from
#: ``argument_required`` (see persona.FALLBACKS).
ARGUMENT_REPLIES = {
    "HELO": "hello_argument_required",
    "EHLO": "hello_argument_required",
    "LHLO": "hello_argument_required",
    "MAIL": "mail_argument_required",
    "RCPT": "rcpt_argument_required",
    "VRFY": "vrfy_argument_required",
    "EXPN": "expn_argument_required",
    "AUTH": "auth_argument_required",
    "BDAT": "bdat_syntax",
}


def rules_for(behaviour: Behaviour) -> dict[str, Rule]:
    """The state table as a connection with ``behaviour`` applies it (see the module
    docstring); ``RULES`` itself for the default behaviour."""
    if behaviour == DEFAULT_BEHAVIOUR:
        return RULES
    table: dict[str, Rule] = {}
    for verb, rule in RULES.items():
        if verb in HELLO_GOVERNED and (
            not behaviour.hello_required or verb in behaviour.allowed_before_hello
        ):
            rule = replace(rule, allowed=rule.allowed | {State.CONNECTED})
        if verb in behaviour.ignored_arguments and rule.arg is Arg.NONE:
            rule = replace(rule, arg=Arg.OPTIONAL)
        if verb in ("VRFY", "EXPN") and behaviour.verify_needs_hello:
            rule = replace(rule, allowed=rule.allowed - {State.CONNECTED})
        if verb == "STARTTLS" and behaviour.starttls_in_transaction:
            # The upgrade resets the session, the transaction with it (RFC 3207 4.2).
            rule = replace(rule, allowed=rule.allowed | {State.MAIL, State.RCPT})
        table[verb] = rule
    return table


__all__ = [
    "ARGUMENT_REPLIES",
    "BEFORE_MAIL",
    "GUARD_REPLIES",
    "HELLO_GOVERNED",
    "RULES",
    "SEQUENCE_REPLIES",
    "SYNC_VERBS",
    "SYNC_VERBS_UNPIPELINED",
    "Arg",
    "Rule",
    "State",
    "rules_for",
]
