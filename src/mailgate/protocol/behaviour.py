"""How a persona *behaves*, not only how it words things: the knobs of the rule table
(:mod:`mailgate.protocol.rules`) a product sets differently from mailgate.

A :class:`Behaviour` is kept in :attr:`Persona.behaviour <mailgate.protocol.persona.Persona.behaviour>`
and read by :class:`~mailgate.protocol.ServerConnection`; the protocol stays the one place
that decides. The default is mailgate's own behaviour (strict RFC 5321), so a server
without a persona is unchanged.

=====================  ===========  =====================================================
field                  default      meaning
=====================  ===========  =====================================================
hello_required         True         MAIL, ETRN and AUTH need HELO/EHLO first. False: accepted
                                    before it (Postfix ``smtpd_helo_required = no``); RCPT
                                    and DATA before MAIL then get ``need_mail`` /
                                    ``data_need_mail`` rather than ``need_hello``.
sequence_first         False        Check the sequence (503) before the argument's syntax
                                    (501), as Postfix does for MAIL, RCPT and DATA. BDAT
                                    keeps its own order (its chunk must be read).
lenient_paths          False        ``MAIL FROM:a@b`` without angle brackets, and
                                    unqualified ``<user>`` paths (Address with an empty
                                    domain), are accepted (Postfix
                                    ``strict_rfc821_envelopes = no``).
loose_local_parts      False        With ``lenient_paths``: ``<local@domain>`` whose local part
                                    is longer than RFC 5321 allows or has characters it does
                                    not (``<a@@b.example>``) is accepted, the domain after the
                                    last "@" (Postfix).
lenient_hello          False        HELO/EHLO with more than one word is accepted (the first
                                    word is the name) instead of ``hello_syntax``.
ignored_arguments      ()           Verbs whose argument is ignored rather than refused
                                    (Postfix: QUIT).
long_lines             "refuse"     A command line over the limit: ``"refuse"`` answers
                                    ``line_too_long``; ``"close"`` answers it and hangs
                                    up (Sendmail's "Command too long, possible attack");
                                    ``"truncate"`` cuts it at the limit,
                                    drops the rest of the line and answers what is left
                                    (Postfix's ``line_length_limit``). AUTH exchange lines
                                    are always refused.
line_limit             None         The command line limit the product has (Postfix 2048),
                                    CRLF included; None: the server's ``max_command_line``.
error_limit            None         One count of every error reply (unknown, syntax,
                                    sequence, a refusal by policy, a failed AUTH); when it
                                    reaches this number ``too_many_errors`` follows the
                                    error's reply and the connection closes (Postfix
                                    ``smtpd_hard_error_limit`` 20). None: mailgate's
                                    separate ``max_unknown_commands``/``max_bad_commands``.
etrn                   False        Offer ETRN (RFC 1985) and answer it as the product
                                    refuses it: ``etrn_argument_required``,
                                    ``etrn_syntax``, ``etrn_refused`` (nothing is ever
                                    flushed: there is no queue to run).
sync_check             False        Exim's ``smtp_enforce_sync``: a command that must end
                                    a pipelined group (rules.SYNC_VERBS: HELO, EHLO, DATA,
                                    VRFY, EXPN, NOOP, ETRN, STARTTLS, unknown verbs; also
                                    MAIL, RCPT, RSET while PIPELINING is not offered) with
                                    more input already behind it gets
                                    ``synchronization_error`` and the connection closes.
forbidden_commands     ()           Unknown verbs (HTTP's GET, POST, CONNECT) answered with
                                    ``forbidden_command`` and a close, as Postfix's
                                    ``smtpd_forbidden_commands`` does.
forbid_bogus_commands  False        Also unknown commands that start with something other
                                    than a letter (a TLS hello, binary noise) or look like
                                    a mail header (``Subject:``), as Postfix does.
early_talkers          "refuse"     A client that talks before the banner: ``"refuse"``
                                    (554, mailgate's early-talker check) or ``"greet"``
                                    (the bytes wait and are answered after the banner, as
                                    Postfix without postscreen does). Read by the server.
starttls_in_transaction False       STARTTLS is accepted inside a mail transaction, which
                                    the TLS upgrade then ends (RFC 3207 4.2), as Postfix
                                    and Exim do; False: ``not_in_transaction``.
extensions_need_ehlo   False        STARTTLS and AUTH exist only when this session's EHLO
                                    offered them: before EHLO, after HELO, and STARTTLS
                                    under TLS get ``not_implemented`` (Exim's "503 AUTH
                                    command used when not advertised").
etrn_accepted          False        With ``etrn``: ETRN for a domain is answered
                                    ``etrn_started`` (Sendmail starts a queue run; here
                                    nothing is flushed, there is no queue).
unknown_command_limit  None         Unknown commands a session may send: the next one is
                                    answered ``too_many_unknown_commands`` instead, and the
                                    connection closes (Exim's smtp_max_unknown_commands,
                                    3). None: mailgate's ``max_unknown_commands``.
verify_needs_hello     False        VRFY and EXPN need HELO/EHLO first:
                                    ``vrfy_need_hello`` (Sendmail's needvrfyhelo and
                                    needexpnhelo, Debian's default).
domain_literals        True         Addresses with a domain literal (``x@[192.0.2.1]``)
                                    are taken; False: MAIL and RCPT with one get
                                    ``domain_literal`` (Exim's allow_domain_literals
                                    default).
size_value_ignored_if_bad False     ``MAIL ... SIZE=abc`` is taken as if SIZE were absent
                                    (Exim skips it, Sendmail reads it as 0); False:
                                    ``size_syntax``.
size_without_number    False        EHLO lists ``SIZE`` without a number, as Sendmail does
                                    with MaxMessageSize 0 (no limit of its own); the
                                    server's limit is still enforced.
sender_before_hello    False        RCPT, DATA and BDAT before HELO/EHLO are answered as
                                    before MAIL (``need_mail``, ``data_need_mail``) even
                                    though MAIL needs HELO: the product looks for a sender
                                    first (Exim's "503 sender not yet given").
hello_name_check       False        The HELO/EHLO name must be letters, digits, ``.`` and
                                    ``-``, or an address literal holding an IP address;
                                    else ``hello_bad_name`` (Exim's check_helo()).
nul_first              False        A command line with a NUL byte gets ``nul_characters``
                                    before anything else is looked at, its verb too
                                    (Exim's "501 NUL characters are not allowed").
long_local_parts       False        Local parts longer than RFC 5321's 64 octets are taken
                                    (the path must still fit its 256), as Exim and Sendmail
                                    do.
unqualified_paths      True         With ``lenient_paths``: an unqualified ``<user>`` is
                                    taken. False: refused as the strict parser refuses it
                                    (``sender_unqualified``/``recipient_unqualified``;
                                    ``<Postmaster>`` stays a valid recipient), as Exim does
                                    for remote clients.
repeat_rcpt_error      False        DATA/BDAT without an accepted recipient repeats the RCPT
                                    refusal when every RCPT since MAIL (or RSET, HELO) got
                                    the same one: ``rcpt_errors_repeated``'s lines come
                                    first; and if the command before was a RCPT in a
                                    session that offered PIPELINING, the last line is
                                    ``need_rcpt_after_rcpt`` (Exim's "All RCPT commands
                                    were rejected with this error").
pipe_connect_sync      False        With ``sync_check``, the check Exim makes while
                                    PIPECONNECT may be used: until the first DATA or BDAT
                                    only MAIL and RCPT are checked (when PIPELINING was not
                                    offered: after HELO, or before any greeting), then the
                                    full check. The command sent too soon gets
                                    ``synchronization_error`` instead of its reply.
bdat_needs_rset        False        Between BDAT chunks, a command other than BDAT, RSET,
                                    NOOP and QUIT gets ``data_after_bdat``; after it every
                                    command but RSET and QUIT (a BDAT's chunk too: it is read
                                    as commands) gets ``bdat_needs_rset``, and QUIT is
                                    answered, then ``bdat_abandoned`` (Exim's bdat_getc()).
allowed_before_hello   ()           Verbs of MAIL, ETRN and AUTH accepted before HELO/EHLO
                                    although ``hello_required`` (Sendmail: AUTH).
hello_name_characters  None         The characters besides ASCII letters and digits a
                                    HELO/EHLO name may have; any other is answered
                                    ``hello_bad_name`` (Sendmail: ``[].-_#:``). None: any
                                    word is taken.
hello_name_max_length  None         A longer HELO/EHLO name is answered ``hello_bad_name``
                                    (Sendmail's MAXNAME, 256). None: no limit of its own.
nul_ends_command       False        A NUL byte ends a command line and the rest of the line
                                    is ignored, as a C string ends (Sendmail: ``NOOP\0x``
                                    is NOOP).
unimplemented_commands ()           Verbs the product knows but refuses, answered
                                    ``not_implemented`` (Sendmail: SEND, SAML, SOML, TURN).
sync_until_pipelining  False        Sendmail's pipelining check: until an EHLO offered
                                    PIPELINING, every command with more input already
                                    behind it gets ``synchronization_error``.
sync_error_refuses     False        After ``synchronization_error`` the session serves only
                                    QUIT (``only_quit`` for the rest, as Sendmail does)
                                    instead of closing.
repeated_recipient_as_first False  A recipient given again in the same transaction is
                                    echoed (``{path}`` in ``recipient_ok``) as it was written
                                    the first time: Sendmail answers with the address it
                                    has already (``RCPT TO: <a@b>`` after ``RCPT TO:a@b``
                                    says ``a@b... Recipient ok``).
unqualified_recipient_qualified False An unqualified recipient (``<user>``) is echoed
                                    (``{path}`` in ``recipient_ok``) with the server's
                                    domain added, the host name's parent
                                    (``<user@example.com>`` on mail.example.com), as
                                    Sendmail qualifies it.
spaced_local_parts     False        With ``lenient_paths``: a local part with spaces and no
                                    quotes (``<a b@example.net>``) is taken, as Sendmail's
                                    parser takes it; it is kept quoted (``"a b"@...``), the
                                    same mailbox in RFC 5321's syntax.
echo_shortened         None         Echoed values (``{argument}``, ``{path}``,
                                    ``{parameters}``, ``{response}``, ``{word}``) this long or
                                    longer show their first and last (n-3)/2 characters
                                    around ``...``, as Sendmail's shortenstring() does
                                    (MAXSHORTSTR, 203). None: the echo's own bound.
hello_kept_after_tls   False        After the STARTTLS upgrade MAIL is taken without a new
                                    HELO/EHLO (Sendmail keeps the greeting's state); False:
                                    the session starts over (RFC 3207 4.2).
=====================  ===========  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

LONG_LINE_MODES = ("refuse", "truncate", "close")
EARLY_TALKER_MODES = ("refuse", "greet")
#: Verbs ``ignored_arguments`` may name: those whose argument mailgate otherwise refuses.
IGNORABLE_ARGUMENT_VERBS = frozenset({"QUIT", "RSET", "DATA", "STARTTLS"})
#: Verbs that need HELO/EHLO first by default and that ``allowed_before_hello`` may free
#: (rules.HELLO_GOVERNED).
HELLO_OPTIONAL_VERBS = frozenset({"MAIL", "ETRN", "AUTH"})
#: The shortest line limit a persona may set (RFC 5321 4.5.3.1.4: at least 512).
MIN_LINE_LIMIT = 512
MAX_LINE_LIMIT = 1024 * 1024


class BehaviourError(ValueError):
    """A Behaviour built with values that cannot work; the message names the field."""


@dataclass(frozen=True, slots=True)
class Behaviour:
    """See the module docstring for every field."""

    hello_required: bool = True
    sequence_first: bool = False
    lenient_paths: bool = False
    loose_local_parts: bool = False
    lenient_hello: bool = False
    ignored_arguments: frozenset[str] = frozenset()
    long_lines: str = "refuse"
    line_limit: int | None = None
    error_limit: int | None = None
    etrn: bool = False
    sync_check: bool = False
    forbidden_commands: frozenset[str] = frozenset()
    forbid_bogus_commands: bool = False
    early_talkers: str = "refuse"
    starttls_in_transaction: bool = False
    extensions_need_ehlo: bool = False
    etrn_accepted: bool = False
    verify_needs_hello: bool = False
    unknown_command_limit: int | None = None
    size_without_number: bool = False
    domain_literals: bool = True
    size_value_ignored_if_bad: bool = False
    sender_before_hello: bool = False
    hello_name_check: bool = False
    nul_first: bool = False
    long_local_parts: bool = False
    unqualified_paths: bool = True
    repeat_rcpt_error: bool = False
    pipe_connect_sync: bool = False
    bdat_needs_rset: bool = False
    allowed_before_hello: frozenset[str] = frozenset()
    hello_name_characters: str | None = None
    hello_name_max_length: int | None = None
    nul_ends_command: bool = False
    unimplemented_commands: frozenset[str] = frozenset()
    sync_until_pipelining: bool = False
    sync_error_refuses: bool = False
    hello_kept_after_tls: bool = False
    repeated_recipient_as_first: bool = False
    echo_shortened: int | None = None
    spaced_local_parts: bool = False
    unqualified_recipient_qualified: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hello_required",
            "sequence_first",
            "lenient_paths",
            "loose_local_parts",
            "lenient_hello",
            "etrn",
            "sync_check",
            "forbid_bogus_commands",
            "starttls_in_transaction",
            "extensions_need_ehlo",
            "etrn_accepted",
            "verify_needs_hello",
            "size_without_number",
            "domain_literals",
            "size_value_ignored_if_bad",
            "sender_before_hello",
            "hello_name_check",
            "nul_first",
            "long_local_parts",
            "unqualified_paths",
            "repeat_rcpt_error",
            "pipe_connect_sync",
            "bdat_needs_rset",
            "nul_ends_command",
            "sync_until_pipelining",
            "sync_error_refuses",
            "hello_kept_after_tls",
            "repeated_recipient_as_first",
            "spaced_local_parts",
            "unqualified_recipient_qualified",
        ):
            if not isinstance(getattr(self, name), bool):
                raise BehaviourError(f"{name}: expected true or false")
        if self.long_lines not in LONG_LINE_MODES:
            raise BehaviourError(
                f"long_lines: {self.long_lines!r} is not one of {', '.join(LONG_LINE_MODES)}"
            )
        if self.early_talkers not in EARLY_TALKER_MODES:
            raise BehaviourError(
                f"early_talkers: {self.early_talkers!r} is not one of "
                f"{', '.join(EARLY_TALKER_MODES)}"
            )
        if self.line_limit is not None and (
            isinstance(self.line_limit, bool)
            or not isinstance(self.line_limit, int)
            or not MIN_LINE_LIMIT <= self.line_limit <= MAX_LINE_LIMIT
        ):
            raise BehaviourError(
                f"line_limit: expected a whole number from {MIN_LINE_LIMIT} to "
                f"{MAX_LINE_LIMIT}, got {self.line_limit!r}"
            )
        if self.error_limit is not None and (
            isinstance(self.error_limit, bool)
            or not isinstance(self.error_limit, int)
            or not 1 <= self.error_limit <= 10_000
        ):
            raise BehaviourError(
                f"error_limit: expected a whole number from 1 to 10000, got {self.error_limit!r}"
            )
        if self.unknown_command_limit is not None and (
            isinstance(self.unknown_command_limit, bool)
            or not isinstance(self.unknown_command_limit, int)
            or not 1 <= self.unknown_command_limit <= 10_000
        ):
            raise BehaviourError(
                "unknown_command_limit: expected a whole number from 1 to 10000, got "
                f"{self.unknown_command_limit!r}"
            )
        if isinstance(self.ignored_arguments, str):
            raise BehaviourError("ignored_arguments: give a set of verbs, not a string")
        verbs = frozenset(str(v).upper() for v in self.ignored_arguments)
        unknown = sorted(verbs - IGNORABLE_ARGUMENT_VERBS)
        if unknown:
            raise BehaviourError(
                f"ignored_arguments: {unknown[0]!r} is not a verb whose argument can be "
                f"ignored ({', '.join(sorted(IGNORABLE_ARGUMENT_VERBS))})"
            )
        object.__setattr__(self, "ignored_arguments", verbs)
        if isinstance(self.forbidden_commands, str):
            raise BehaviourError("forbidden_commands: give a set of verbs, not a string")
        forbidden = frozenset(str(v).upper() for v in self.forbidden_commands)
        if not all(v.isascii() and v.isalpha() for v in forbidden):
            raise BehaviourError("forbidden_commands: verbs are letters only")
        object.__setattr__(self, "forbidden_commands", forbidden)
        for name in ("allowed_before_hello", "unimplemented_commands"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise BehaviourError(f"{name}: give a set of verbs, not a string")
            verbs = frozenset(str(v).upper() for v in value)
            if not all(v.isascii() and v.isalpha() for v in verbs):
                raise BehaviourError(f"{name}: verbs are letters only")
            object.__setattr__(self, name, verbs)
        wrong = sorted(self.allowed_before_hello - HELLO_OPTIONAL_VERBS)
        if wrong:
            raise BehaviourError(
                f"allowed_before_hello: {wrong[0]!r} is not one of "
                f"{', '.join(sorted(HELLO_OPTIONAL_VERBS))}"
            )
        if self.hello_name_characters is not None and (
            not isinstance(self.hello_name_characters, str)
            or not all(
                c.isascii() and c.isprintable() and not c.isalnum() and c != " "
                for c in self.hello_name_characters
            )
        ):
            raise BehaviourError(
                "hello_name_characters: expected a string of ASCII punctuation (letters "
                f"and digits are always allowed), got {self.hello_name_characters!r}"
            )
        if self.echo_shortened is not None and (
            isinstance(self.echo_shortened, bool)
            or not isinstance(self.echo_shortened, int)
            or not 10 <= self.echo_shortened <= 400
        ):
            raise BehaviourError(
                f"echo_shortened: expected a whole number from 10 to 400, got "
                f"{self.echo_shortened!r}"
            )
        if self.hello_name_max_length is not None and (
            isinstance(self.hello_name_max_length, bool)
            or not isinstance(self.hello_name_max_length, int)
            or not 1 <= self.hello_name_max_length <= MAX_LINE_LIMIT
        ):
            raise BehaviourError(
                f"hello_name_max_length: expected a whole number from 1 to {MAX_LINE_LIMIT}, "
                f"got {self.hello_name_max_length!r}"
            )

    def as_mapping(self) -> Mapping[str, Any]:
        """The fields that differ from the default, as a profile file writes them."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value != getattr(DEFAULT_BEHAVIOUR, item.name):
                out[item.name] = sorted(value) if isinstance(value, frozenset) else value
        return MappingProxyType(out)


#: mailgate's own behaviour.
DEFAULT_BEHAVIOUR = Behaviour()
#: Every field name, for profile readers ("did you mean" on unknown keys).
BEHAVIOUR_FIELDS: frozenset[str] = frozenset(f.name for f in fields(Behaviour))

__all__ = [
    "BEHAVIOUR_FIELDS",
    "DEFAULT_BEHAVIOUR",
    "EARLY_TALKER_MODES",
    "HELLO_OPTIONAL_VERBS",
    "IGNORABLE_ARGUMENT_VERBS",
    "LONG_LINE_MODES",
    "Behaviour",
    "BehaviourError",
]
