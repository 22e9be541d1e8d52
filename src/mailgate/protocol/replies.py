"""SMTP replies as values: a code, an optional enhanced status code, and text lines.

Replies are immutable so the standard ones below can be shared between connections.
Rendering follows RFC 5321 4.2.1 (``250-`` on every line but the last) and RFC 2034:
when enhanced status codes are in use, every line of a 2xx/4xx/5xx reply carries the
code, except the greeting and the EHLO reply (callers pass ``enhanced=False`` there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


class ReplyError(ValueError):
    """Raised when a Reply is built with values that cannot be sent on the wire."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.

    ``code`` is the three-digit basic code, ``status`` the RFC 3463 enhanced code
    (``"5.1.1"``) or ``None``, ``lines`` the human-readable text, one entry per line.
    """

    code: int
    status: str | None = None
    lines: tuple[str, ...] = ("",)
    #: The wire form, rendered once for each value of ``enhanced`` (the standard replies
    #: are shared by every connection: most replies sent are rendered already).
    _wire: list[bytes | None] = field(
        default_factory=lambda: [None, None], init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ReplyError(f"reply code out of range: {self.code}")
        if self.status is not None:
            if not _ENHANCED.match(self.status):
                raise ReplyError(f"malformed enhanced status code: {self.status!r}")
            if self.status[0] != str(self.code)[0]:
                raise ReplyError(
                    f"enhanced status {self.status} does not match reply class {self.code}"
                )
        if isinstance(self.lines, str):
            object.__setattr__(self, "lines", (self.lines,))
        if not self.lines:
            object.__setattr__(self, "lines", ("",))
        for line in self.lines:
            if "\r" in line or "\n" in line:
                raise ReplyError("reply text must not contain CR or LF")

    @classmethod
    def of(cls, code: int, status: str | None, *lines: str) -> Reply:
        return cls(code, status, tuple(lines) or ("",))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def render(self, enhanced: bool = True) -> bytes:
        """The wire form: every line CRLF-terminated, ``-`` after the code on all but
        the last. The enhanced code is written when ``enhanced`` and the reply has one,
        and never on 3xx intermediate replies (RFC 2034 covers 2xx, 4xx and 5xx only)."""
        index = 1 if enhanced else 0
        wire = self._wire[index]
        if wire is None:
            wire = self._wire[index] = self._render(index == 1)
        return wire

    def _render(self, enhanced: bool) -> bytes:
        prefix_status = enhanced and self.status is not None and self.code // 100 != 3
        code = str(self.code)
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            if prefix_status:
                body = f"{self.status} {line}" if line else str(self.status)
            else:
                body = line
            # An empty text leaves the code alone ("250", "250-"); a text keeps its spaces
            # (a product's reply may end in one: Exim's "may not follow <a@b> ").
            out.append((f"{code}{sep}{body}" if body else f"{code}{sep}".rstrip(" ")) + "\r\n")
        # Text is ASCII in practice; UTF-8 keeps SMTPUTF8 sessions able to echo addresses.
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return self.render().decode("utf-8", "replace").rstrip("\r\n")


# Standard replies. Texts are mailgate's own. Each constant is also a reply name a Persona
# can override (its lower-case name; mailgate.protocol.persona documents them all). A text
# with {placeholders} is a template: send it through Persona.format, never as it is.
OK = Reply(250, "2.0.0", ("OK",))
SENDER_OK = Reply(250, "2.1.0", ("Sender OK",))
RECIPIENT_OK = Reply(250, "2.1.5", ("Recipient OK",))
MESSAGE_ACCEPTED = Reply(250, "2.0.0", ("Message accepted",))
RESET_OK = Reply(250, "2.0.0", ("Reset OK",))
NOOP_OK = Reply(250, "2.0.0", ("OK",))
START_DATA = Reply(354, None, ("End data with <CR><LF>.<CR><LF>",))
BYE = Reply(221, "2.0.0", ("Bye",))
READY_FOR_TLS = Reply(220, "2.0.0", ("Ready to start TLS",))
AUTH_OK = Reply(235, "2.7.0", ("Authentication succeeded",))
VRFY_DEFAULT = Reply(252, "2.5.0", ("Cannot verify the user; send mail to try delivery",))
EXPN_DEFAULT = Reply(502, "5.5.1", ("EXPN is not available",))

UNKNOWN_COMMAND = Reply(500, "5.5.2", ("Command not recognized",))
LINE_TOO_LONG = Reply(500, "5.5.2", ("Line too long",))
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", ("Authentication exchange line is too long",))
SYNTAX_ERROR = Reply(501, "5.5.2", ("Syntax error",))
NOT_IMPLEMENTED = Reply(502, "5.5.1", ("Command not implemented",))
BAD_SEQUENCE = Reply(503, "5.5.1", ("Bad sequence of commands",))
BAD_PARAMETER = Reply(555, "5.5.4", ("Unknown or invalid parameter",))
# A parameter mailgate does not know, or one whose extension is not offered (a persona
# may word it apart from a bad value: Sendmail's "FOO parameter unrecognized").
UNKNOWN_PARAMETER = Reply(555, "5.5.4", ("Unknown or invalid parameter",))
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", ("Too many recipients",))
MESSAGE_TOO_BIG = Reply(552, "5.3.4", ("Message size exceeds fixed maximum message size",))
AUTH_FAILED = Reply(535, "5.7.8", ("Authentication credentials invalid",))
AUTH_CANCELLED = Reply(501, "5.7.0", ("Authentication cancelled",))
AUTH_BAD_BASE64 = Reply(501, "5.5.2", ("Cannot decode base64 response",))
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", ("Unrecognized authentication mechanism",))
AUTH_ALREADY = Reply(503, "5.5.1", ("Already authenticated",))
AUTH_REQUIRES_TLS = Reply(
    538, "5.7.11", ("Encryption required for requested authentication mechanism",)
)
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", ("Non-ASCII address requires SMTPUTF8",))
BAD_ADDRESS = Reply(553, "5.1.3", ("Address syntax or characters not allowed",))
TOO_MANY_ERRORS = Reply(421, "4.7.0", ("Too many errors, closing connection",))
SHUTTING_DOWN = Reply(421, "4.3.2", ("Service shutting down, closing connection",))
IDLE_TIMEOUT = Reply(421, "4.4.2", ("Idle timeout, closing connection",))
BARE_NEWLINE = Reply(
    554, "5.5.2", ("Message refused: bare CR or LF followed by '.' (see SMTP smuggling)",)
)
BARE_NEWLINE_STRICT = Reply(554, "5.5.2", ("Message refused: bare CR or LF in message data",))
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", ("Message refused: a line exceeds the length limit",))

# Replies with a name so a persona can reword them; some are templates.
MESSAGE_QUEUED = Reply(250, "2.0.0", ("Message accepted as {queue_id}",))
BDAT_CHUNK_OK = Reply(250, "2.0.0", ("{size} octets received",))
# PRDR (draft-hall-prdr-00): after the message of a MAIL ... PRDR transaction, the 353,
# then one reply per recipient, then the message's own reply.
PRDR_SENDER_OK = Reply(250, "2.1.0", ("Sender OK",))
PRDR_START = Reply(353, None, ("PRDR content analysis beginning",))
PRDR_RECIPIENT_OK = Reply(250, "2.1.5", ("Recipient accepted",))
HELP = Reply(214, "2.0.0", ("Commands: {commands}", "End of HELP"))
INVALID_UTF8 = Reply(500, "5.5.2", ("Invalid UTF-8 in command",))
CONTROL_CHARACTERS = Reply(501, "5.5.2", ("Control characters not allowed",))
ARGUMENT_NOT_ALLOWED = Reply(501, "5.5.4", ("{verb} takes no argument",))
ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
HELLO_SYNTAX = Reply(501, "5.5.4", ("Syntax: {verb} hostname",))
MAIL_SYNTAX = Reply(501, "5.5.4", ("Syntax: MAIL FROM:<address>",))
RCPT_SYNTAX = Reply(501, "5.5.4", ("Syntax: RCPT TO:<address>",))
BDAT_SYNTAX = Reply(501, "5.5.4", ("Syntax: BDAT size [LAST]",))
AUTH_SYNTAX = Reply(501, "5.5.4", ("Syntax: AUTH mechanism [initial-response]",))
NEED_HELLO = Reply(503, "5.5.1", ("Send HELO/EHLO first",))
NEED_MAIL = Reply(503, "5.5.1", ("Send MAIL first",))
NEED_RCPT = Reply(503, "5.5.1", ("Send RCPT first",))
ONLY_QUIT = Reply(503, "5.5.1", ("Service refused; only QUIT is accepted",))
SENDER_ALREADY_SPECIFIED = Reply(503, "5.5.1", ("Sender already specified",))
DATA_AFTER_BDAT = Reply(503, "5.5.1", ("DATA cannot be mixed with BDAT",))
NOT_IN_TRANSACTION = Reply(503, "5.5.1", ("{verb} is not allowed inside a mail transaction",))
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", ("BODY=BINARYMIME requires BDAT, not DATA",))
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", ("TLS already active",))
# Replies for one situation of a more general name (persona.FALLBACKS): a persona that
# does not override one gets the general name's reply (its own override, if any).
EMPTY_LINE = Reply(500, "5.5.2", ("Command not recognized",))
HELLO_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
MAIL_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
RCPT_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
VRFY_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
# Exim words EXPN's apart (its ACL refusal) from VRFY's ("501 empty address").
EXPN_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
# AUTH without a mechanism (Exim answers it as an unknown, empty mechanism).
AUTH_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("{verb} requires an argument",))
DATA_NEED_MAIL = Reply(503, "5.5.1", ("Send MAIL first",))
AUTH_BAD_BASE64_INITIAL = Reply(501, "5.5.2", ("Cannot decode base64 response",))
SIZE_SYNTAX = Reply(555, "5.5.4", ("Invalid SIZE value",))
XCLIENT_NOT_ALLOWED = Reply(502, "5.5.1", ("Command not implemented",))
# Behaviour forbidden_commands / forbid_bogus_commands: an answer, then a close.
FORBIDDEN_COMMAND = Reply(221, "2.7.0", ("Not an SMTP command, closing connection",))
ETRN_IN_TRANSACTION = Reply(503, "5.5.1", ("{verb} is not allowed inside a mail transaction",))
# ETRN (RFC 1985), offered only by a persona whose behaviour says so; nothing is flushed.
ETRN_ARGUMENT_REQUIRED = Reply(501, "5.5.4", ("Syntax: ETRN domain",))
ETRN_SYNTAX = Reply(501, "5.5.4", ("Invalid ETRN domain",))
ETRN_REFUSED = Reply(459, "4.7.1", ("<{domain}>: node not allowed",))
# VRFY of a name without a domain: vrfy_default's reply unless a persona words it apart
# (persona.FALLBACKS); it may be a refusal too (Exim: "501 root: recipient address must
# contain a domain").
VRFY_UNQUALIFIED = Reply(252, "2.5.0", ("Cannot verify the user; send mail to try delivery",))
# Behaviour etrn_accepted (Sendmail): ETRN is answered as started; nothing is flushed.
ETRN_STARTED = Reply(250, "2.0.0", ("Queuing for node {domain} started",))
# VERB (Sendmail's verbose mode; offered only by a persona listing VERB): acknowledged,
# nothing else changes (the product would report delivery steps, there are none here).
VERBOSE_OK = Reply(250, "2.0.0", ("Verbose mode",))
# Behaviour domain_literals = false: MAIL/RCPT with an address literal as domain.
DOMAIN_LITERAL = Reply(501, "5.1.3", ("<{address}>: domain literals not allowed",))
# Behaviour verify_needs_hello (Sendmail's needvrfyhelo/needexpnhelo).
VRFY_NEED_HELLO = Reply(503, "5.5.1", ("Send HELO/EHLO first",))
# Behaviour unknown_command_limit (Exim): sent instead of the unknown command's reply.
TOO_MANY_UNKNOWN_COMMANDS = Reply(421, "4.7.0", ("Too many unknown commands",))
# Sent by servers outside the SMTP dialogue (before the banner, or instead of it); a
# persona words them in the product's texts (Persona.outside_reply).
TOO_MANY_CLIENTS = Reply(421, "4.7.0", ("Too many connections, try again later",))
TOO_MANY_FROM_IP = Reply(421, "4.7.0", ("Too many connections from your address",))
PROXY_REQUIRED = Reply(421, "4.7.0", ("Connections must come through the proxy",))
PROXY_REFUSED = Reply(421, "4.7.0", ("PROXY header missing or invalid",))
EARLY_TALKER = Reply(554, "5.5.1", ("Protocol error: data sent before the greeting",))
# A persona with sync_check: input behind a command that must end a pipelined group.
SYNCHRONIZATION_ERROR = Reply(554, "5.5.0", ("SMTP synchronization error",))
# Behaviour hello_name_check, hello_name_characters, hello_name_max_length: a HELO/EHLO
# name the product refuses.
HELLO_BAD_NAME = Reply(501, "5.5.4", ("Syntax: {verb} hostname",))
# Behaviour nul_first: a NUL byte in a command line, answered before its verb is read.
NUL_CHARACTERS = Reply(501, "5.5.2", ("Control characters not allowed",))
# Behaviour repeat_rcpt_error: lines put before DATA's 503 when every RCPT was refused
# with the same reply ({rcpt_error}); and DATA's 503 right after such a RCPT.
RCPT_ERRORS_REPEATED = Reply(
    503, "5.5.1", ("All RCPT commands were rejected with this error:", "{rcpt_error}")
)
NEED_RCPT_AFTER_RCPT = Reply(503, "5.5.1", ("Send RCPT first",))
# Behaviour bdat_needs_rset: a BDAT transfer broken off by another command.
BDAT_NEEDS_RSET = Reply(503, "5.5.1", ("BDAT transfer broken off; send RSET",))
BDAT_ABANDONED = Reply(421, "4.4.2", ("Message transfer abandoned",))
# Sent (its lines before the final reply) only by a persona that gives it: the last BDAT
# chunk's own acknowledgement (Exim's "250- 22 byte chunk, total 22").
BDAT_LAST_CHUNK_OK = Reply(250, "2.0.0", ("{size} octets received, {total} in all",))
# STARTTLS inside a mail transaction, where the product words it apart from AUTH's
# (Sendmail: "TLS not permitted during a mail transaction").
TLS_IN_TRANSACTION = Reply(503, "5.5.1", ("{verb} is not allowed inside a mail transaction",))
# HELP with a topic the persona's help_topics do not have (only with help_topics).
HELP_UNKNOWN_TOPIC = Reply(504, "5.3.0", ('HELP topic "{topic}" unknown',))
# Pass-through names: by default the parser's own reply is sent (its text is {detail}).
BAD_SENDER_ADDRESS = Reply(501, "5.1.7", ("{detail}",))
BAD_RECIPIENT_ADDRESS = Reply(501, "5.1.3", ("{detail}",))
PARAMETER_SYNTAX = Reply(501, "5.5.4", ("{detail}",))
AUTH_MALFORMED = Reply(501, "5.5.2", ("{detail}",))
# The parser's refusals by kind (AddressError.kind), for a persona that words them apart
# from bad_sender_address/bad_recipient_address (which they fall back to by role).
ADDRESS_UNTERMINATED = Reply(501, "5.5.2", ("{detail}",))
ADDRESS_LOCAL_PART = Reply(501, "5.1.3", ("{detail}",))
ADDRESS_DOMAIN = Reply(501, "5.1.3", ("{detail}",))
ADDRESS_TOO_LONG = Reply(501, "5.1.3", ("{detail}",))
NULL_RECIPIENT = Reply(501, "5.1.3", ("{detail}",))
SENDER_UNQUALIFIED = Reply(501, "5.1.7", ("{detail}",))
RECIPIENT_UNQUALIFIED = Reply(501, "5.1.3", ("{detail}",))
# A MAIL parameter mailgate knows whose extension the session did not offer.
MAIL_PARAMETER_NOT_OFFERED = Reply(555, "5.5.4", ("{detail}",))
