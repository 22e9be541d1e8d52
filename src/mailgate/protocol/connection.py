"""The SMTP/LMTP server connection: a sans-IO state machine in the style of h11.

How to drive it::

    conn = ServerConnection(config)
    conn.receive_data(bytes_from_socket)      # b"" when the peer closed
    while True:
        event = conn.next_event()
        if event is NEED_DATA: break           # flush data_to_send(), read more
        if event is PAUSED: ...                # a policy point is waiting for respond()
        if isinstance(event, PolicyPoint): conn.respond(reply_or_None)
        ...
    socket.write(conn.data_to_send())

The rules and the order they are applied in are in :mod:`mailgate.protocol.rules`
(``RULES``, the state table).

Replies always leave in the order the commands arrived: while a policy point waits for
:meth:`ServerConnection.respond`, nothing after it is parsed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from . import replies
from .address import (
    Address,
    AddressError,
    parse_forward_path,
    parse_plain_path,
    parse_reverse_path,
    split_path_and_params,
)
from .config import ProtocolConfig
from .data import BdatReader, DotReader
from .events import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    CommandRejected,
    ConnectionClosed,
    DataChunk,
    DataComplete,
    DataDiscarded,
    DataStart,
    DiscardReason,
    Event,
    Greeting,
    Hello,
    Limit,
    LimitExceeded,
    MailFrom,
    PolicyPoint,
    RcptTo,
    StartTLS,
    TransactionReset,
    Verify,
    Xclient,
    Xforward,
)
from .params import ParamContext, ParamError, parse_params, split_params
from .persona import (
    ADDRESS_KIND_REPLIES,
    CONSTANT_NAMES,
    ECHO_PLACEHOLDERS,
    CurrentDate,
    echo,
    echo_values,
)
from .replies import Reply
from .rules import (
    ARGUMENT_REPLIES,
    BEFORE_MAIL,
    GUARD_REPLIES,
    SEQUENCE_REPLIES,
    SYNC_VERBS,
    SYNC_VERBS_UNPIPELINED,
    Arg,
    Rule,
    State,
    rules_for,
)
from .sasl import (
    MECHANISMS,
    Challenge,
    Mechanism,
    SaslError,
    decode_response,
    encode_challenge,
    xoauth2_error_challenge,
)
from .xclient import XclientError, parse_xclient, parse_xforward

#: Longest piece of an unknown command line echoed in the reply ({command}).
_MAX_ECHO: Final = 200
#: Characters of an unknown HELP topic echoed ({topic}; Sendmail's "%.10s").
_HELP_TOPIC_ECHO = 10
_NOTHING: Final[frozenset[str]] = frozenset()
_BDAT_MAX_DIGITS: Final = 18

#: _take_line's answer for a line that was too long and has been answered already.
_ANSWERED = b"<answered>"

# The states (and Arg's members), as module constants: ``State.X`` is a Python-level descriptor call on the
# enum class in CPython 3.11 (~190 ns, in the compiled build too), a constant is one
# global lookup (a native global when compiled). Every state change and test of a command
# reads some.
_AUTH: Final = State.AUTH
_BDAT: Final = State.BDAT
_BDAT_OPEN: Final = State.BDAT_OPEN
_CLOSED: Final = State.CLOSED
_CONNECTED: Final = State.CONNECTED
_DATA: Final = State.DATA
_GREETING: Final = State.GREETING
_MAIL: Final = State.MAIL
_RCPT: Final = State.RCPT
_READY: Final = State.READY
_REFUSED: Final = State.REFUSED
_TLS_PENDING: Final = State.TLS_PENDING
_ARG_NONE: Final = Arg.NONE
_ARG_REQUIRED: Final = Arg.REQUIRED

_XCLIENT_CAPS = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"
_XFORWARD_CAPS = "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"


@dataclass(slots=True)
class Transaction:
    """The envelope being built between MAIL and the end of data."""

    sender: Address | None
    params: dict[str, str | None]
    smtputf8: bool
    recipients: list[Address]
    bdat_size: int = 0
    #: Each recipient's path as the client first wrote it (made safe to echo), for a
    #: persona with ``repeated_recipient_as_first``; None otherwise.
    written: dict[tuple[str, str], str] | None = None

    # Made at every MAIL: an __init__ mypyc compiles (see the note in events.py).
    def __init__(
        self,
        sender: Address | None,
        params: dict[str, str | None],
        smtputf8: bool,
        recipients: list[Address],
        bdat_size: int = 0,
        written: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.sender = sender
        self.params = params
        self.smtputf8 = smtputf8
        self.recipients = recipients
        self.bdat_size = bdat_size
        self.written = written


class ProtocolError(Exception):
    """Misuse of the API by the caller (answering when nothing is pending, ...)."""


#: Placeholders whose values come from the configuration alone: a banner made only of
#: these is the same for every connection.
_CONFIG_PLACEHOLDERS = frozenset({"hostname", "software", "protocol", "max_size", "max_recipients"})
#: ... and those a greeting line made only of which is the same for the same HELO name and
#: client address (the cache key of _Look.hellos).
_HELLO_CACHE_PLACEHOLDERS = _CONFIG_PLACEHOLDERS | {"helo", "client_ip"}
#: Default HELO/EHLO answers kept per configuration; the cache starts over when full (a
#: client changing its name at every connection only costs the answer made anew).
_MAX_HELLOS = 256


class _Look:
    """What a connection needs of its persona on the hot path, resolved once per
    configuration (see :func:`_look_for`)."""

    __slots__ = (
        "after_tls",
        "banner",
        "banner_wire",
        "bare_newline",
        "behaviour",
        "bye_wire",
        "close_long_lines",
        "echoes_recipients",
        "enhanced",
        "error_limit",
        "first_checks",
        "hello_cacheable",
        "hello_name_characters",
        "hello_name_check",
        "hello_name_max_length",
        "hellos",
        "hidden_verbs",
        "ignored_arguments",
        "lenient_paths",
        "lmtp",
        "long_local_parts",
        "max_command_line",
        "max_data_line",
        "max_recipients",
        "max_size",
        "message_accepted",
        "message_accepted_wire",
        "nul_ends_command",
        "overridden",
        "persona",
        "ready",
        "recipient_ok",
        "recipient_ok_wire",
        "repeat_rcpt_error",
        "rules",
        "sender_ok",
        "sender_ok_wire",
        "sequence_first",
        "sequence_needs_ehlo",
        "start_data_wire",
        "static",
        "truncate",
    )

    def __init__(self, config: ProtocolConfig) -> None:
        persona = config.persona
        self.persona = persona
        behaviour = persona.behaviour
        self.behaviour = behaviour
        #: The state table with the persona's knobs applied (rules.rules_for).
        self.rules = rules_for(behaviour)
        #: The command line limit: the product's own when the persona has one.
        self.max_command_line = behaviour.line_limit or config.max_command_line
        #: Cut long command lines instead of refusing them.
        self.truncate = behaviour.long_lines == "truncate"
        #: Answer a long command line and hang up (Sendmail's 421).
        self.close_long_lines = behaviour.long_lines == "close"
        self.error_limit = behaviour.error_limit
        #: Whether recipient_ok's {path} is the persona's recipient echo, not the line's.
        self.echoes_recipients = (
            behaviour.repeated_recipient_as_first or behaviour.unqualified_recipient_qualified
        )
        #: Cut a command line at its first NUL byte.
        self.nul_ends_command = behaviour.nul_ends_command
        #: The characters a HELO name may have besides letters and digits (None: any).
        self.hello_name_characters: frozenset[str] | None = (
            None
            if behaviour.hello_name_characters is None
            else frozenset(behaviour.hello_name_characters)
        )
        #: A knob that looks at a command line before its verb (ServerConnection.
        #: _first_checks): False for mailgate's own behaviour, so a line costs one test.
        self.first_checks = (
            behaviour.sync_check
            or behaviour.sync_until_pipelining
            or behaviour.nul_first
            or behaviour.repeat_rcpt_error
            or behaviour.bdat_needs_rset
        )
        #: name -> ready reply, or None for a reply with placeholders.
        self.static: Callable[[str], Reply | None] = persona.static_lookup
        self.overridden = persona.overridden
        self.hidden_verbs = persona.hidden_verbs
        #: Whether enhanced status codes are written (and ENHANCEDSTATUSCODES offered).
        self.enhanced = (
            config.enhanced_status_codes
            and persona.enhanced_status_codes
            and "ENHANCEDSTATUSCODES" not in persona.hidden_capabilities
        )
        #: EHLO keywords offered only in an encrypted session (their MAIL parameters are
        #: refused with 530 before it, as not offered when the persona hides them).
        hidden = persona.hidden_capabilities
        self.after_tls = frozenset(
            {"REQUIRETLS"} if config.requiretls and "REQUIRETLS" not in hidden else ()
        )
        #: The default answers of every message when the persona has them without
        #: placeholders (else None: made for each answer), and their wire forms, rendered
        #: once here instead of at every answer: for the hot paths of the _answer_*
        #: methods, only when the answer is what they expect (a positive MAIL and RCPT
        #: answer, a 354 to DATA), else None and the answer takes the long way.
        self.sender_ok = persona.static_lookup("sender_ok")
        self.recipient_ok = persona.static_lookup("recipient_ok")
        self.message_accepted = persona.static_lookup("message_accepted")
        start_data = persona.static_lookup("start_data")
        self.sender_ok_wire = _wire_of(self.sender_ok, self.enhanced, 200)
        self.recipient_ok_wire = _wire_of(self.recipient_ok, self.enhanced, 200)
        self.message_accepted_wire = _wire_of(self.message_accepted, self.enhanced, 200)
        #: 354 is sent without its enhanced code (RFC 2034 covers 2xx, 4xx, 5xx).
        self.start_data_wire = _wire_of(start_data, False, 354)
        #: _sequence_error's first check (Exim's STARTTLS/AUTH only after its EHLO) applies.
        self.sequence_needs_ehlo = behaviour.extensions_need_ehlo
        # What every message reads of the persona's behaviour and of the configuration,
        # copied: in the compiled build this class is native and its attributes are read
        # in C, while Behaviour and ProtocolConfig stay interpreted (a lookup by name).
        self.sequence_first = behaviour.sequence_first
        self.ignored_arguments = behaviour.ignored_arguments
        self.repeat_rcpt_error = behaviour.repeat_rcpt_error
        self.lenient_paths = behaviour.lenient_paths
        self.long_local_parts = behaviour.long_local_parts
        self.hello_name_check = behaviour.hello_name_check
        self.hello_name_max_length = behaviour.hello_name_max_length
        self.lmtp = config.lmtp
        self.max_recipients = config.max_recipients
        self.max_size: int | None = config.max_message_size or None
        self.max_data_line = config.max_data_line
        self.bare_newline = config.bare_newline
        bye = persona.static_lookup("bye")
        #: QUIT's answer (a 221, whatever the persona words it), when it has no placeholder.
        self.bye_wire = None if bye is None else bye.render(self.enhanced)
        #: Whether the default answer to HELO (index 0) and EHLO/LHLO (1) is the same for
        #: every connection with the same HELO name, client address, TLS and trust: its
        #: greeting line uses no date and no echo of the command. Such answers are kept in
        #: ``hellos`` (see ServerConnection._answer_hello): clients greet with the same
        #: name connection after connection.
        self.hello_cacheable = tuple(
            persona.greeting_fields(esmtp) <= _HELLO_CACHE_PLACEHOLDERS for esmtp in (False, True)
        )
        self.hellos: dict[tuple[bool, str, str, bool, bool], tuple[bytes, frozenset[str]]] = {}
        #: The banner when no placeholder of it changes between connections (no date, no
        #: client address), else None: made anew for each connection.
        self.banner: Reply | None = None
        if persona.banner_fields <= _CONFIG_PLACEHOLDERS:
            # No client placeholder in it, so no client address is needed.
            self.banner = persona.banner_reply(_Values(config, "", {}))
        #: That banner on the wire (without enhanced code, as every greeting), if a 220.
        self.banner_wire = None
        if self.banner is not None and self.banner.code == 220:
            self.banner_wire = self.banner.render(enhanced=False)
        #: The verbs that exist for every connection of this configuration (in its mode,
        #: offered, not hidden): for these, _command goes straight to the checks of the
        #: line. XCLIENT and XFORWARD depend on the client, and take the long way.
        self.ready: dict[str, Rule] = {
            verb: rule
            for verb, rule in self.rules.items()
            if rule.extension not in ("XCLIENT", "XFORWARD")
            and _verb_in_mode(config, rule)
            and _offered(config, False, rule)
            and verb not in persona.hidden_verbs
        }


def _wire_of(reply: Reply | None, enhanced: bool, lowest: int) -> bytes | None:
    """``reply`` on the wire if its code is at least ``lowest`` and below 400, else None."""
    if reply is None or not lowest <= reply.code < 400:
        return None
    return reply.render(enhanced)


#: Configurations seen, by identity, with what connections need of them; the entry keeps
#: its configuration alive, so an id is never reused while cached. Configurations are
#: few (start and reload); the bound only guards against a caller making one per
#: connection.
_LOOKS: dict[int, tuple[ProtocolConfig, _Look]] = {}
_MAX_LOOKS = 64


def _look_for(config: ProtocolConfig) -> _Look:
    entry = _LOOKS.get(id(config))
    if entry is not None and entry[0] is config:
        return entry[1]
    look = _Look(config)
    if len(_LOOKS) >= _MAX_LOOKS:
        _LOOKS.clear()
    _LOOKS[id(config)] = (config, look)
    return look


# Module functions, not methods: _Look calls them with a configuration before any connection
# exists (methods of the compiled ServerConnection accept only a ServerConnection).
def _verb_in_mode(config: ProtocolConfig, rule: Rule) -> bool:
    if rule.extension == "SMTP":
        return not config.lmtp
    if rule.extension == "LMTP":
        return config.lmtp
    return True


def _offered(config: ProtocolConfig, peer_trusted: bool, rule: Rule) -> bool:
    ext = rule.extension
    cfg = config
    if rule.verb in cfg.disabled_commands:
        return False
    if ext is None or ext in ("SMTP", "LMTP"):
        return True
    if ext == "CHUNKING":
        return cfg.chunking
    if ext == "VRFY":
        return cfg.vrfy
    if ext == "EXPN":
        return cfg.expn
    if ext == "STARTTLS":
        # Still "offered" once TLS is on, so a second STARTTLS is a sequence error.
        return cfg.starttls
    if ext == "AUTH":
        return bool(cfg.auth_mechanisms)
    if ext == "XCLIENT":
        return cfg.xclient and peer_trusted
    if ext == "XFORWARD":
        return cfg.xforward and peer_trusted
    if ext == "ETRN":
        return cfg.persona.behaviour.etrn
    if ext == "VERB":
        return "VERB" in cfg.persona.capability_order
    return False  # pragma: no cover - every extension is listed above


def _common_value(config: ProtocolConfig, client_ip: str, key: str) -> object:
    """A placeholder value any text may use, computed when a text uses it."""
    cfg = config
    if key == "hostname":
        return cfg.hostname
    if key == "client_ip":
        return client_ip
    if key == "software":
        return cfg.software
    if key == "protocol":
        return "LMTP" if cfg.lmtp else "ESMTP"
    if key == "date":
        return CurrentDate(cfg.clock)
    if key == "date_padded":
        return CurrentDate(cfg.clock, padded=True)
    if key == "date_gmt":
        return CurrentDate(cfg.clock, gmt=True)
    if key == "max_size":
        return cfg.max_message_size or 0
    if key == "max_recipients":
        return cfg.max_recipients
    raise KeyError(key)


class _Values(dict[str, object]):
    """Placeholder values: the ones given, then the connection's common ones (hostname,
    client_ip, date...) and the echo of the command being answered (persona.echo_values),
    computed only when a text uses them."""

    __slots__ = ("_client_ip", "_config", "_said", "_said_verb")

    def __init__(
        self,
        config: ProtocolConfig,
        client_ip: str,
        values: dict[str, object],
        said_verb: str = "",
        said: str = "",
    ) -> None:
        super().__init__(values)
        self._config = config
        self._client_ip = client_ip
        self._said_verb = said_verb
        self._said = said

    def __missing__(self, key: str) -> object:
        if key in ECHO_PLACEHOLDERS:
            echoed = echo_values(self._said_verb, self._said)
            limit = self._config.persona.behaviour.echo_shortened
            if limit is not None:
                echoed = {name: _shortened(value, limit) for name, value in echoed.items()}
            for name, value in echoed.items():
                self.setdefault(name, value)
            return echoed[key]
        return _common_value(self._config, self._client_ip, key)


class ServerConnection:
    """One server-side SMTP or LMTP session. See the module docstring."""

    # Slots keep attribute access fast however many there are (a plain instance dict
    # stops sharing its keys above about 30 attributes, and every access slows down);
    # __dict__ keeps instances open to extra attributes.
    __slots__ = (
        "__dict__",
        "_auth_failures",
        "_bad_commands",
        "_bdat",
        "_bdat_broken",
        "_bdat_chunk_size",
        "_bdat_discard",
        "_bdat_ending",
        "_bdat_last",
        "_bdat_pending_size",
        "_bdat_resume",
        "_buf",
        "_data_seen",
        "_dot",
        "_eof",
        "_errors",
        "_events",
        "_extensions",
        "_look",
        "_on_line",
        "_out",
        "_pending",
        "_pos",
        "_rcpt_error",
        "_rcpt_errors_same",
        "_rcpt_prev",
        "_rcpt_was",
        "_said",
        "_said_verb",
        "_sasl",
        "_sasl_final_reply",
        "_short_line",
        "_skipping_long_line",
        "_unknown_commands",
        "authenticated_as",
        "client_ip",
        "config",
        "esmtp",
        "helo_name",
        "peer_trusted",
        "state",
        "tls_active",
        "transaction",
    )

    def __init__(
        self,
        config: ProtocolConfig,
        *,
        tls_active: bool = False,
        peer_trusted: bool = False,
        client_ip: str = "",
        on_line: Callable[[bytes], None] | None = None,
    ) -> None:
        """``on_line``: called with each command line and AUTH continuation line as it is
        parsed, without its line end, before it is acted on (a transcript recorder);
        message content and lines refused as too long do not come to it."""
        self.config = config
        self.tls_active = tls_active
        self.peer_trusted = peer_trusted
        #: The client's address, for the persona's {client_ip}; the caller keeps it up to
        #: date (PROXY, XCLIENT).
        self.client_ip = client_ip
        self.state = _GREETING
        self.esmtp = False
        self.helo_name: str | None = None
        self.authenticated_as: str | None = None
        self.transaction: Transaction | None = None

        #: Received bytes not yet parsed from ``_pos`` on: the bytes of one receive_data as
        #: they came (most reads hold whole commands, or a whole small message: nothing
        #: is copied to parse them), a bytearray while bytes are left over to add to.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        #: Replies not yet taken by data_to_send, as rendered: most often one pre-rendered
        #: answer, handed on as it is (no bytearray to grow, copy and clear per command).
        self._out: list[bytes] = []
        #: Events not yet taken by next_event, oldest first: a list, not a deque (a few at
        #: most, and a list's len, append and pop(0) are native calls in the compiled build).
        self._events: list[Event] = []
        self._pending: PolicyPoint | None = Greeting()
        self._events.append(self._pending)

        self._unknown_commands = 0
        self._bad_commands = 0
        #: Every error reply so far (the persona's error_limit counts them all).
        self._errors = 0
        self._auth_failures = 0
        self._skipping_long_line = False
        #: The command line being answered, for the persona's echo placeholders: its verb
        #: (upper-case; empty for a line of an AUTH exchange) and what followed it.
        self._said_verb = ""
        self._said = ""
        #: The persona's repeat_rcpt_error: the first refusal of a RCPT since MAIL (RSET,
        #: HELO), whether every one since was the same, and whether this command and the
        #: one before were RCPTs the product counts as valid (not out of sequence).
        self._rcpt_error: str | None = None
        self._rcpt_errors_same = True
        self._rcpt_was = False
        self._rcpt_prev = False
        #: A DATA or BDAT was seen (the persona's pipe_connect_sync checks fully after it).
        self._data_seen = False
        #: The persona's bdat_needs_rset: a BDAT transfer was broken off.
        self._bdat_broken = False
        #: The transfer ending now came by BDAT LAST (bdat_last_chunk_ok).
        self._bdat_ending = False

        self._dot: DotReader | None = None
        self._bdat: BdatReader | None = None
        self._bdat_last = False
        self._bdat_pending_size = 0
        self._bdat_chunk_size = 0
        self._bdat_resume = _READY
        self._extensions: frozenset[str] = frozenset()
        #: While a BDAT chunk is read only to be thrown away: the reply owed after it, and
        #: why.
        self._bdat_discard: tuple[Reply, DiscardReason] | None = None
        self._sasl: Mechanism | None = None
        self._sasl_final_reply: Reply | None = None
        self._look = _look_for(config)
        #: A line this long is within every line limit (_line_limit need not be asked).
        self._short_line = min(self._look.max_command_line, config.max_auth_line)
        #: Told each command and AUTH line before it is acted on; None costs one test per
        #: line. (Not methods rebound on the instance: a class compiled by mypyc, the
        #: optional build of setup.py, has no instance __dict__ to rebind them in.)
        self._on_line = on_line

    # --- public API ------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        state = self.state
        if state is _TLS_PENDING or state is _CLOSED:
            return  # plaintext after STARTTLS is an injection attempt; after close, noise
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            # Everything before is parsed: these bytes are the buffer, not copied into one
            # (a line or a message then costs one copy, its slice, instead of three).
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif isinstance(buf, bytearray):
            # A bytearray grows in place: a long message or a pipelined burst arriving in
            # many small reads is not copied again at each read.
            if pos:
                del buf[:pos]
                self._pos = 0
            buf += data
        else:
            with memoryview(buf) as view:
                rest = bytearray(view[pos:])
            rest += data
            self._buf = rest
            self._pos = 0

    def next_event(self) -> Event:
        """The next event, ``NEED_DATA`` or ``PAUSED``."""
        events = self._events
        while True:
            if events:
                return events.pop(0)
            if self._pending is not None:
                return PAUSED
            state = self.state
            if state is _CLOSED:
                return NEED_DATA
            if self._pos >= len(self._buf) and state is not _BDAT and not self._eof:
                # Everything received is parsed (asked once after every command): only a
                # BDAT chunk (a BDAT 0 completes without a byte) goes on without input.
                return NEED_DATA
            # One unit of input: a command line, an AUTH line, or message data. (Written
            # out here rather than in a method: this runs for every command.)
            if state is _DATA:
                parsed = self._step_data()
            elif state is _BDAT:
                parsed = self._step_bdat()
            else:
                line = self._take_line()
                parsed = line is not None
                if line is not None and line is not _ANSWERED:
                    if self._on_line is not None:
                        self._on_line(line)
                    if state is _AUTH:
                        self._auth_line(line)
                    else:
                        self._command(line)
            if not parsed:
                if self._eof:
                    # Nothing more to parse; the peer's close ends the session.
                    self._peer_closed()
                    continue
                return NEED_DATA

    def respond(self, reply: Reply | Sequence[Reply] | None = None) -> None:
        """Answer the policy point last returned by :meth:`next_event`.

        ``None`` gives the default success reply. For LMTP ``DataComplete`` a sequence
        gives one reply per recipient; a single reply is used for all of them.
        """
        point = self._pending
        if point is None:
            raise ProtocolError("respond() called with no policy point pending")
        if self._events and any(event is point for event in self._events):
            raise ProtocolError("respond() called before the policy point was taken")
        self._pending = None
        if reply is None or isinstance(reply, Reply):
            single = reply
            if single is not None and self._look.overridden:
                single = self._adapt_answer(point, single)
        elif isinstance(point, DataComplete):
            answers = list(reply)
            if self._look.overridden:
                answers = [self._adapt_answer(point, answer) for answer in answers]
            self._complete_data(point, answers)
            return
        else:
            raise ProtocolError("a sequence of replies is only valid for LMTP DataComplete")
        # The answers of every message called directly (a native call in the compiled
        # build), the rest through the table.
        if type(point) is MailFrom:
            self._answer_mail(point, single)
        elif type(point) is RcptTo:
            self._answer_rcpt(point, single)
        elif type(point) is DataStart:
            self._answer_data_start(point, single)
        elif type(point) is DataComplete:
            self._answer_data_complete(point, single)
        else:
            _ANSWERS[type(point)](self, point, single)
        if (
            self._look.error_limit is not None
            and single is not None
            and not single.is_positive
            and not isinstance(point, Greeting)
        ):
            self._count_error()

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer; call after handling events. Empty if none."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def close(self, reply: Reply | None = replies.SHUTTING_DOWN) -> None:
        """Close from the server side (idle timeout, shutdown): queue ``reply`` (421).
        A standard constant (``replies.IDLE_TIMEOUT``) is sent as the persona words it."""
        if self.state is _CLOSED:
            return
        if reply is not None:
            self._send(self._adapt(reply))
        self._enter_closed("server")

    def tls_established(self) -> None:
        """The caller finished the TLS handshake after STARTTLS: the session starts over
        (RFC 3207 4.2) and the client must send EHLO again."""
        if self.state is not _TLS_PENDING:
            raise ProtocolError("tls_established() outside a STARTTLS upgrade")
        self.tls_active = True
        self._buf = b""
        self._pos = 0
        if self._look.behaviour.hello_kept_after_tls and self.helo_name is not None:
            # Sendmail keeps the greeting across the upgrade: MAIL needs no new EHLO.
            self._abort_transaction()
            self.authenticated_as = None
            self.state = _READY
            if self.esmtp:
                self._extensions = frozenset(c.split(" ", 1)[0] for c in self._capabilities())
            return
        self._reset_session()
        self.state = _CONNECTED

    @property
    def extensions(self) -> frozenset[str]:
        """EHLO keywords this connection offers right now (what ESMTP params may use)."""
        return self._extensions

    @property
    def buffered(self) -> int:
        """Received bytes not yet parsed (for back-pressure decisions)."""
        return len(self._buf) - self._pos

    @property
    def mid_line(self) -> bool:
        """Part of a command line has arrived but not its end (also while the rest of a
        line refused as too long is skipped): what a per-command deadline measures. Never
        true for message data."""
        if self._skipping_long_line:
            return True
        state = self.state
        return len(self._buf) > self._pos and state is not _DATA and state is not _BDAT

    # --- the parser ----------------------------------------------------------------------

    def _take_line(self) -> bytes | None:
        """The next line without its line end; None if incomplete; _ANSWERED if the line
        was too long and has been answered already."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos <= self._short_line:
                return None  # within every limit: wait for the rest
            limit = self._line_limit(pos, len(buf) - pos)
            if len(buf) - pos > limit:
                # Too long already: answer once, then drop bytes up to the next LF.
                if not self._skipping_long_line:
                    self._skipping_long_line = True
                    if self._truncates():
                        # The product cuts the line and answers what it got (Postfix).
                        self._pos = len(buf)
                        return bytes(buf[pos : pos + limit])
                    self._line_too_long()
                self._pos = len(buf)
                return _ANSWERED
            return None
        self._pos = end + 1
        if self._skipping_long_line:
            self._skipping_long_line = False
            return _ANSWERED
        length = end - pos + 1
        if length > self._short_line:
            limit = self._line_limit(pos, length)
            if length > limit:
                if self._truncates():
                    return bytes(buf[pos : pos + limit])
                self._line_too_long()
                return _ANSWERED
        stop = end - 1 if end > pos and buf[end - 1] == 13 else end
        if type(buf) is bytes:
            return buf[pos:stop]
        return bytes(buf[pos:stop])

    def _line_limit(self, start: int, length: int) -> int:
        """The longest line allowed for the line at ``start``. AUTH lines may be longer
        (RFC 4954 4)."""
        cfg = self.config
        if self.state is _AUTH:
            return cfg.max_auth_line
        limit = self._look.max_command_line
        if length > limit and self._buf[start : start + 5].upper() == b"AUTH ":
            return max(limit, cfg.max_auth_line)
        return limit

    def _truncates(self) -> bool:
        """A long line is cut, not refused (the persona's long_lines), outside AUTH."""
        return self._look.truncate and self.state is not _AUTH

    def _line_too_long(self) -> None:
        in_auth = self.state is _AUTH
        self._said_verb = self._said = ""  # nothing of the line is echoed
        if in_auth:
            self._sasl = None
            self._sasl_final_reply = None
            self.state = self._after_auth()
        close = self._look.close_long_lines and not in_auth
        self._events.append(LimitExceeded(Limit.COMMAND_LINE_LENGTH, closing=close))
        self._reject(b"", self._r("auth_line_too_long" if in_auth else "line_too_long"), bad=True)
        if close:
            self._enter_closed(Limit.COMMAND_LINE_LENGTH.value)

    def _command(self, line: bytes) -> None:
        look = self._look
        if look.nul_ends_command:
            nul = line.find(0)
            if nul >= 0:
                line = line[:nul]  # as a C string ends (Sendmail)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._said_verb = self._said = ""
            self._reject(line, self._r("invalid_utf8"), unknown=True)
            return
        verb, _, arg = text.partition(" ")
        rule = look.ready.get(verb)  # the verb as clients write it: no upper-case copy
        if rule is None:
            verb = verb.upper()
            rule = look.ready.get(verb)
        self._said_verb = verb
        self._said = arg
        if look.first_checks and self._first_checks(line, text, verb):
            return
        if rule is None:
            if not text.strip(" \t"):
                empty = self._r("empty_line", verb="", command=echo(text[:_MAX_ECHO]))
                self._reject(line, empty, unknown=True)
                return
            rule = self._known_verb(line, text, verb)
            if rule is None:
                return
        # Every control is unprintable: the common printable line skips the regex.
        if not text.isprintable() and _has_control(text):
            self._reject(line, self._r("control_characters"), bad=True)
            return
        arg = arg.strip(" ")
        if look.sequence_first and verb != "BDAT" and not self._sequence_ok(rule, line):
            return
        if rule.arg is _ARG_NONE and arg:
            self._reject(line, self._r("argument_not_allowed", verb=verb), bad=True)
            return
        if rule.arg is _ARG_REQUIRED and not arg:
            name = ARGUMENT_REPLIES.get(verb, "argument_required")
            self._reject(line, self._r(name, verb=verb), bad=True)
            return
        if verb in look.ignored_arguments:
            arg = ""
        # The commands of every message called directly (a native call in the compiled
        # build), the rest through the table.
        if verb == "MAIL":
            self._cmd_mail(rule, line, arg)
        elif verb == "RCPT":
            self._cmd_rcpt(rule, line, arg)
        elif verb == "DATA":
            self._cmd_data(rule, line, arg)
        elif verb == "EHLO" or verb == "HELO":
            self._cmd_hello(rule, line, arg)
        elif verb == "QUIT":
            self._cmd_quit(rule, line, arg)
        else:
            _COMMANDS[verb](self, rule, line, arg)

    def _first_checks(self, line: bytes, text: str, verb: str) -> bool:
        """Step 0, for a persona whose product looks at a line before its verb (see
        _Look.first_checks). True when the line has been answered."""
        behaviour = self._look.behaviour
        if behaviour.repeat_rcpt_error:
            self._rcpt_prev = self._rcpt_was
            self._rcpt_was = False
        if self._bdat_broken:
            # Exim's repeat_until_rset: only RSET (a normal RSET) and QUIT get out.
            if verb == "RSET":
                self._bdat_broken = False
                return False
            if verb == "QUIT":
                self._bdat_broken = False
                self._send(self._r("bye"))
                self._send(self._r("bdat_abandoned"))
                self._enter_closed("quit")
                return True
            self._reject(line, self._r("bdat_needs_rset"), bad=True)
            return True
        if behaviour.nul_first and "\x00" in text:
            self._reject(line, self._r("nul_characters"), bad=True)
            return True
        if (
            behaviour.bdat_needs_rset
            and self.state is _BDAT_OPEN
            and verb not in ("BDAT", "RSET", "NOOP", "QUIT")
        ):
            self._bdat_broken = True
            self._reject(line, self._r("data_after_bdat", verb=verb), bad=True)
            return True
        return (
            (behaviour.sync_check or behaviour.sync_until_pipelining)
            and self._pos < len(self._buf)
            and self._breaks_sync(verb)
        )

    def _breaks_sync(self, verb: str) -> bool:
        """Step 0 of a persona with sync_check: input already behind a command that must
        end a pipelined group. Answers, closes (or refuses the session) and returns True
        when it does."""
        if self.state is _REFUSED:
            return False  # refused already: only QUIT is served
        behaviour = self._look.behaviour
        piped = "PIPELINING" in self._extensions
        if behaviour.sync_until_pipelining and not piped:
            pass  # Sendmail: nothing may be pipelined before PIPELINING was offered
        elif not behaviour.sync_check:
            return False
        elif behaviour.pipe_connect_sync and not self._data_seen:
            # Exim while PIPECONNECT may be used: only MAIL and RCPT are checked (after
            # their ACL, so only when they would be taken), unless PIPELINING was offered.
            if verb not in ("MAIL", "RCPT") or piped:
                return False
            rule = self._look.rules[verb]
            if self.state not in rule.allowed:
                return False
        elif verb in SYNC_VERBS_UNPIPELINED:
            if piped:
                return False
        elif verb not in SYNC_VERBS and verb in self._look.rules:
            return False  # MAIL/RCPT/RSET aside, only these and unknown verbs must sync
        self._send(self._r("synchronization_error"))
        if behaviour.sync_error_refuses:
            self._abort_transaction()
            self.state = _REFUSED
            self._events.append(CommandRejected(b"", self._r("synchronization_error")))
            return True
        self._enter_closed("synchronization-error")
        return True

    def _known_verb(self, line: bytes, text: str, verb: str) -> Rule | None:
        """The rule of a verb that is not ready for every connection: unknown, hidden, not
        offered, or offered to some clients only. Answers and returns None when the verb
        does not exist here."""
        rule = self._look.rules.get(verb)
        if rule is not None and rule.extension == "VERB" and not self._offered(rule):
            rule = None  # Sendmail's verb: no other look has it, not even as "not offered"
        if rule is None and self._forbidden(verb):
            forbidden = self._r("forbidden_command", verb=echo(verb))
            self._send(forbidden)
            self._events.append(CommandRejected(line, forbidden))
            self._enter_closed("forbidden-command")
            return None
        if rule is None and verb in self._look.behaviour.unimplemented_commands:
            # A verb the product knows and refuses (Sendmail: TURN, SEND, SAML, SOML).
            refusal = self._r("not_implemented", verb=verb, command=echo(text[:_MAX_ECHO]))
            self._reject(line, refusal, bad=True)
            return None
        if (
            rule is None
            or not verb.isascii()
            or not self._verb_in_mode(rule)
            or verb in self._look.hidden_verbs
            # ETRN exists only for a persona whose product has it.
            or (rule.extension == "ETRN" and not self._look.behaviour.etrn)
        ):
            # The client's words, made safe (printable ASCII) like every echo.
            unknown = self._r("unknown_command", verb=echo(verb), command=echo(text[:_MAX_ECHO]))
            self._reject(line, unknown, unknown=True)
            return None
        if not self._offered(rule):
            name = "xclient_not_allowed" if verb in ("XCLIENT", "XFORWARD") else "not_implemented"
            self._reject(line, self._r(name, verb=verb, command=echo(text[:_MAX_ECHO])), bad=True)
            return None
        return rule

    def _forbidden(self, verb: str) -> bool:
        """An unknown verb the persona's product hangs up on (Postfix: GET, POST, CONNECT,
        anything not starting with a letter, a mail header)."""
        behaviour = self._look.behaviour
        if verb in behaviour.forbidden_commands:
            return True
        if not behaviour.forbid_bogus_commands:
            return False
        if not verb[:1].isascii() or not verb[:1].isalpha():
            return True
        return _HEADER_NAME.fullmatch(verb) is not None

    def _verb_in_mode(self, rule: Rule) -> bool:
        return _verb_in_mode(self.config, rule)

    def _offered(self, rule: Rule) -> bool:
        return _offered(self.config, self.peer_trusted, rule)

    def _sequence_ok(self, rule: Rule, line: bytes) -> bool:
        """Step 5: answer 503 and return False if the verb is out of sequence."""
        if self.state in rule.allowed and not self._look.sequence_needs_ehlo:
            guard = rule.guard
            if guard is None or self._guard_holds(guard):
                return True  # what _sequence_error finds at once
        error = self._sequence_error(rule)
        if error is not None:
            self._reject(line, error, bad=True)
        return error is None

    def _sequence_error(self, rule: Rule) -> Reply | None:
        state = self.state
        behaviour = self._look.behaviour
        if (
            behaviour.extensions_need_ehlo
            and rule.verb in ("STARTTLS", "AUTH")
            and rule.verb not in self._extensions
        ):
            # Exim: not offered in this session's EHLO (none yet, HELO, or under TLS).
            return self._r("not_implemented", verb=rule.verb)
        if state not in rule.allowed:
            verb = rule.verb
            if (
                state is _CONNECTED
                and verb in BEFORE_MAIL
                and (not behaviour.hello_required or behaviour.sender_before_hello)
            ):
                state = _READY  # what is missing is MAIL (no HELO needed, or Exim)
            name = SEQUENCE_REPLIES.get(state, "bad_sequence")
            in_transaction = state in (_MAIL, _RCPT, _BDAT_OPEN)
            if verb == "MAIL" and in_transaction:
                name = "sender_already_specified"
            elif verb == "DATA" and state is _BDAT_OPEN:
                name = "data_after_bdat"
            elif verb in ("DATA", "BDAT") and state is _READY:
                name = "data_need_mail"
            elif verb == "ETRN" and in_transaction:
                name = "etrn_in_transaction"
            elif verb == "STARTTLS" and in_transaction:
                name = "tls_in_transaction"
            elif verb in ("AUTH", "XCLIENT", "XFORWARD") and in_transaction:
                name = "not_in_transaction"
            elif verb in ("VRFY", "EXPN") and state is _CONNECTED:
                name = "vrfy_need_hello"
            if behaviour.repeat_rcpt_error and verb in ("DATA", "BDAT"):
                return self._repeat_rcpt_error(name, verb)
            return self._r(name, verb=verb)
        guard = rule.guard
        if guard is not None and not self._guard_holds(guard):
            return self._r(GUARD_REPLIES[guard])
        return None

    def _repeat_rcpt_error(self, name: str, verb: str) -> Reply:
        """DATA/BDAT without a recipient, as Exim answers it: the RCPTs' one refusal
        repeated first, and "Valid" right after a RCPT in a pipelining session."""
        if (
            name in ("need_rcpt", "data_need_mail", "need_mail")
            and self._rcpt_prev
            and "PIPELINING" in self._extensions
        ):
            name = "need_rcpt_after_rcpt"
        final = self._r(name, verb=verb)
        error = self._rcpt_error
        if error is None or not self._rcpt_errors_same:
            return final
        before = self._r("rcpt_errors_repeated", rcpt_error=error)
        return Reply(final.code, final.status, (*before.lines, *final.lines))

    def _note_rcpt_error(self, text: str) -> None:
        if self._rcpt_error is None:
            self._rcpt_error = text
        elif text != self._rcpt_error:
            self._rcpt_errors_same = False

    def _forget_rcpt_errors(self) -> None:
        self._rcpt_error = None
        self._rcpt_errors_same = True

    def _guard_holds(self, guard: str) -> bool:
        if guard == "tls-inactive":
            return not self.tls_active
        if guard == "not-authenticated":
            return self.authenticated_as is None
        if guard == "not-binarymime":
            tx = self.transaction
            return tx is None or tx.params.get("BODY") != "BINARYMIME"
        return True  # pragma: no cover

    # --- command handlers --------------------------------------------------------------

    def _cmd_hello(self, rule: Rule, line: bytes, arg: str) -> None:
        if " " in arg or "\t" in arg:
            if not self._look.behaviour.lenient_hello:
                self._reject(line, self._r("hello_syntax", verb=rule.verb), bad=True)
                return
            arg = arg.split()[0]  # the product takes the first word as the name
        if (self._look.hello_name_check and not _hello_name_ok(arg)) or (
            not self._hello_name_fits(arg)
        ):
            self._reject(line, self._r("hello_bad_name", verb=rule.verb), bad=True)
            return
        if not self._sequence_ok(rule, line):
            return
        self._pause(Hello(rule.verb, arg))

    def _hello_name_fits(self, name: str) -> bool:
        """The persona's check of a HELO name's characters and length (Sendmail's)."""
        look = self._look
        limit = look.hello_name_max_length
        if limit is not None and len(name) > limit:
            return False
        allowed = look.hello_name_characters
        if allowed is None:
            return True
        return all((c.isascii() and c.isalnum()) or c in allowed for c in name)

    def _cmd_mail(self, rule: Rule, line: bytes, arg: str) -> None:
        if self._rcpt_error is not None:
            self._forget_rcpt_errors()  # Exim's smtp_reset() at MAIL
        parsed = self._envelope_command(rule, line, arg, "FROM:", parse_reverse_path)
        if parsed is not None:
            point = MailFrom(*parsed)
            self._pending = point  # _pause, written out: once per message
            self._events.append(point)

    def _cmd_rcpt(self, rule: Rule, line: bytes, arg: str) -> None:
        noting = self._look.repeat_rcpt_error
        mark = len(self._out)
        if noting:
            # Exim: a RCPT refused for want of a sender is not a valid RCPT.
            self._rcpt_was = self.transaction is not None
        parsed = self._envelope_command(rule, line, arg, "TO:", parse_forward_path)
        if parsed is None:
            if noting:
                self._note_own_refusal(mark)
            return
        address, params, written = parsed
        assert address is not None and self.transaction is not None
        if len(self.transaction.recipients) >= self._look.max_recipients:
            self._events.append(LimitExceeded(Limit.RECIPIENTS, closing=False))
            self._send(self._r("too_many_recipients"))
            if noting:
                self._note_own_refusal(mark)
            return
        point = RcptTo(address, params, written)
        self._pending = point  # _pause, written out: once per recipient
        self._events.append(point)

    def _note_own_refusal(self, mark: int) -> None:
        """The engine's own refusal of a RCPT, as sent from ``_out[mark]`` on: its first
        line, code included (Exim keeps what its smtp_printf() wrote)."""
        first = b"".join(self._out[mark:]).split(b"\r\n", 1)[0]
        if first:
            self._note_rcpt_error(first.decode("ascii", "replace"))

    def _envelope_command(
        self,
        rule: Rule,
        line: bytes,
        arg: str,
        keyword: str,
        parse_path: Callable[..., Address | None],
    ) -> tuple[Address | None, dict[str, str | None], str] | None:
        """MAIL FROM / RCPT TO through steps 4-6: the path and the parameters' syntax
        (501), the sequence (503), the parameters' meaning (555), then whether a UTF-8
        address is allowed (553). Answers and returns None on the first failure."""
        is_mail = rule.verb == "MAIL"
        start = len(keyword)
        if not arg.startswith(keyword) and arg[:start].upper() != keyword:
            # Sendmail's skipword(): the word it scanned, up to a ":" or a space.
            scanned = _FIRST_WORD.match(arg)
            word = self._echo(scanned[0] if scanned is not None else "")
            name = "mail_syntax" if is_mail else "rcpt_syntax"
            self._reject(line, self._r(name, word=word), bad=True)
            return None
        look = self._look
        behaviour = look.behaviour
        lenient = look.lenient_paths
        try:
            address: Address | None
            # What follows the keyword, read where it is (no copy of it is made).
            plain = parse_plain_path(arg, look.long_local_parts, start)
            after = "" if plain is not None else arg[start:]
            if plain is not None:
                # The common <local@host.name>: what the full way below would make of it.
                address, written, rest = plain
            elif lenient and not after.lstrip(" ").startswith("<"):
                # strict_rfc821_envelopes = no: a bare path up to the first space.
                written, _, rest = after.lstrip(" ").partition(" ")
                path, rest = f"<{written}>", rest.strip(" ")
            else:
                path, rest = split_path_and_params(after)
                written = path
            if plain is None:
                # UTF-8 is judged after the parameters: MAIL's own SMTPUTF8 may allow it.
                try:
                    address = parse_path(
                        path, smtputf8=True, long_local_parts=behaviour.long_local_parts
                    )
                except AddressError:
                    address = (
                        _lenient_address(
                            path, behaviour.loose_local_parts, behaviour.unqualified_paths
                        )
                        if lenient
                        else None
                    )
                    if address is None and lenient and behaviour.spaced_local_parts:
                        address = _spaced_address(path, behaviour.long_local_parts)
                    if address is None:
                        raise
            pairs = split_params(rest) if rest else []
        # One name per exception type: mypyc (the optional compiled build) gives a name one
        # type for the whole function.
        except AddressError as bad_address:
            name = "bad_sender_address" if is_mail else "bad_recipient_address"
            kind = ADDRESS_KIND_REPLIES.get(bad_address.kind)
            if kind is not None and kind[0 if is_mail else 1] in self._look.overridden:
                name = kind[0 if is_mail else 1]  # the persona words this kind apart
            self._reject(line, self._refusal(name, bad_address.reply), bad=True)
            return None
        except ParamError as bad_syntax:
            refusal = self._refusal(
                "parameter_syntax", bad_syntax.reply, parameter=echo(bad_syntax.parameter or "")
            )
            self._reject(line, refusal, bad=True)
            return None
        if plain is not None and not pairs:
            # The common MAIL and RCPT: a plain path (a host name, no address literal;
            # ASCII, no UTF-8 to judge) and no parameter: only the sequence is left, and
            # in sequence without a guard (what _sequence_ok finds first) it holds.
            if (
                self.state not in rule.allowed or look.sequence_needs_ehlo or rule.guard is not None
            ) and not self._sequence_ok(rule, line):
                return None
            return address, {}, written
        if (
            address is not None
            and address.domain.startswith("[")
            and not self._look.behaviour.domain_literals
        ):
            # Exim's default (allow_domain_literals = false): refused as a syntax error.
            self._reject(line, self._r("domain_literal", address=str(address)), bad=True)
            return None
        if not self._sequence_ok(rule, line):
            return None
        tx = self.transaction
        in_utf8_transaction = tx is not None and tx.smtputf8
        verb: Literal["MAIL", "RCPT"] = "MAIL" if is_mail else "RCPT"
        params: dict[str, str | None] = {}
        if pairs:  # none is the common case: nothing to judge, no context to make
            context = ParamContext(
                verb,
                self._extensions,
                self._max_size(),
                in_utf8_transaction,
                _NOTHING if self.tls_active or not self.esmtp else self._look.after_tls,
            )
            if self._look.behaviour.size_value_ignored_if_bad and is_mail:
                # Exim skips a SIZE it cannot read; Sendmail reads "abc" as 0. Either way
                # the MAIL is taken as if no size had been declared.
                pairs = [
                    (key, value)
                    for key, value in pairs
                    if key.upper() != "SIZE" or value is None or value.isdigit()
                ]
            try:
                params = parse_params(pairs, context)
            except ParamError as bad_param:
                name = "unknown_parameter" if bad_param.unknown else "bad_parameter"
                if bad_param.not_offered and is_mail:
                    name = "mail_parameter_not_offered"
                refusal = self._refusal(
                    name,
                    bad_param.reply,
                    parameter=echo(bad_param.parameter or ""),
                    keyword=echo(bad_param.keyword or ""),
                )
                self._reject(line, refusal, bad=True)
                return None
        utf8_allowed = "SMTPUTF8" in params if is_mail else in_utf8_transaction
        # A plain path is ASCII (parse_plain_path): only another can need SMTPUTF8.
        if plain is None and address is not None and address.is_utf8 and not utf8_allowed:
            self._reject(line, self._r("smtputf8_required"), bad=True)
            return None
        return address, params, written

    def _cmd_data(self, rule: Rule, line: bytes, arg: str) -> None:
        self._data_seen = True
        if not self._sequence_ok(rule, line):
            return
        point = DataStart(bdat=False)
        self._pending = point  # _pause, written out: once per message
        self._events.append(point)

    def _cmd_bdat(self, rule: Rule, line: bytes, arg: str) -> None:
        words = arg.split(" ")
        if (
            len(words) > 2
            or not words[0].isdigit()
            or not words[0].isascii()
            or len(words[0]) > _BDAT_MAX_DIGITS
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            self._reject(line, self._r("bdat_syntax"), bad=True)
            return
        self._data_seen = True
        size = int(words[0])
        error = self._sequence_error(rule)
        if error is not None:
            # RFC 3030: a failed BDAT still consumes its chunk; the reply follows the chunk.
            self._reject(line, error, bad=True, send=False)
            if self.state is not _CLOSED:  # the error may have hit the bad-command limit
                self._discard_chunk(size, error, DiscardReason.REJECTED)
            return
        self._bdat_last = len(words) == 2
        if self.state is _RCPT:
            self._bdat_pending_size = size
            self._pause(DataStart(bdat=True))
        else:
            self._start_chunk(size)

    def _cmd_rset(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        if self._rcpt_error is not None:
            self._forget_rcpt_errors()
        self._abort_transaction()
        self._send(self._look.static("reset_ok") or self._r("reset_ok"))

    def _cmd_noop(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        self._send(self._look.static("noop_ok") or self._r("noop_ok"))

    def _cmd_quit(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        wire = self._look.bye_wire
        if wire is not None:
            self._out.append(wire)
        else:
            self._send(self._r("bye"))
        self._enter_closed("quit")

    def _cmd_help(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        verbs = sorted(
            v
            for v, r in self._look.rules.items()
            if self._verb_in_mode(r) and self._offered(r) and v not in self._look.hidden_verbs
        )
        general = self._r("help", commands=" ".join(verbs))
        persona = self._look.persona
        if arg.strip(" \t") and persona.help_topics:  # blanks alone: the general text
            lines = persona.help_topic(arg)
            if lines is None:
                # Sendmail: 'HELP topic "xyzzy" unknown', the word lower-cased, cut to 10.
                topic = echo(arg.strip().lower()[:_HELP_TOPIC_ECHO])
                self._reject(line, self._r("help_unknown_topic", topic=topic))
                return
            # The topic's lines, closed by the general text's last line (End of HELP info).
            general = Reply(general.code, general.status, (*lines, general.lines[-1]))
        self._send(general)

    def _cmd_verify(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        self._pause(Verify(arg, expand=rule.verb == "EXPN"))

    def _cmd_starttls(self, rule: Rule, line: bytes, arg: str) -> None:
        if not self._sequence_ok(rule, line):
            return
        self._pause(StartTLS())

    def _cmd_auth(self, rule: Rule, line: bytes, arg: str) -> None:
        words = arg.split(" ")
        if len(words) > 2 or not words[0]:
            self._reject(line, self._r("auth_syntax"), bad=True)
            return
        if not self._sequence_ok(rule, line):
            return
        name = words[0].upper()
        mechanism = MECHANISMS.get(name)
        if mechanism is None or name not in self.config.auth_mechanisms:
            refusal = self._r("auth_unknown_mechanism", mechanism=echo(words[0]))
            self._reject(line, refusal, bad=True)
            return
        if not (self.tls_active or not self.config.auth_requires_tls):
            self._reject(line, self._r("auth_requires_tls"), bad=True)
            return
        try:
            initial = (
                decode_response(words[1].encode("ascii", "replace"), allow_empty_marker=True)
                if len(words) == 2
                else None
            )
            self._sasl = mechanism(self.config.hostname)
            result = self._sasl.start(initial)
        except SaslError as exc:
            self._sasl = None
            if exc.reply is replies.AUTH_BAD_BASE64:
                refusal = self._r("auth_bad_base64_initial")  # Postfix words it apart
            else:
                refusal = self._refusal("auth_malformed", exc.reply)
            self._reject(line, refusal, bad=True)
            return
        self._sasl_result(result)

    def _cmd_xclient(self, rule: Rule, line: bytes, arg: str) -> None:
        try:
            attributes = parse_xclient(arg)
        except XclientError as exc:
            self._reject(line, exc.reply, bad=True)
            return
        if not self._sequence_ok(rule, line):
            return
        self._pause(Xclient(attributes))

    def _cmd_xforward(self, rule: Rule, line: bytes, arg: str) -> None:
        try:
            attributes = parse_xforward(arg)
        except XclientError as exc:
            self._reject(line, exc.reply, bad=True)
            return
        if not self._sequence_ok(rule, line):
            return
        self._pause(Xforward(attributes))

    def _cmd_verb(self, rule: Rule, line: bytes, arg: str) -> None:
        # Sendmail ignores VERB's argument; verbose mode changes nothing here (no
        # delivery steps to report), so the acknowledgement is the whole answer.
        if not self._sequence_ok(rule, line):
            return
        self._send(self._r("verbose_ok"))

    def _cmd_etrn(self, rule: Rule, line: bytes, arg: str) -> None:
        # RFC 1985, answered as the product refuses it: there is no queue to flush.
        if not self._sequence_ok(rule, line):
            return
        if not arg or " " in arg:
            self._reject(line, self._r("etrn_argument_required"), bad=True)
            return
        domain = arg[1:] if arg[0] in "@#" else arg
        if not _ETRN_DOMAIN.fullmatch(domain):
            self._reject(line, self._r("etrn_syntax", domain=echo(domain)), bad=True)
            return
        if self._look.behaviour.etrn_accepted:
            self._send(self._r("etrn_started", domain=domain))
            return
        self._reject(line, self._r("etrn_refused", domain=domain), bad=True)

    # --- answers to policy points --------------------------------------------------------

    def greet(self) -> bytes | None:
        """Answer the connection's :class:`Greeting` with the default banner now, when that
        banner is made once per configuration (no date or client address in it): the
        Greeting is taken (:meth:`next_event` will not return it), the session is
        CONNECTED, and the banner's bytes are returned for the caller to send (they are not
        queued for :meth:`data_to_send`). None, with nothing done, when the banner is made
        for each connection or the Greeting is no longer the one thing waiting: take it
        from :meth:`next_event` and :meth:`respond` as usual. For a caller with nothing to
        decide at connect (no hook): the same as ``next_event()`` then ``respond(None)``,
        without the event's round trip on every connection."""
        wire = self._look.banner_wire
        events = self._events
        if wire is None or len(events) != 1 or events[0] is not self._pending:
            return None
        if type(self._pending) is not Greeting or self.state is not State.GREETING:
            return None
        events.clear()
        self._pending = None
        self.state = State.CONNECTED
        return wire

    def _answer_greeting(self, point: Greeting, reply: Reply | None) -> None:
        if reply is None:
            wire = self._look.banner_wire
            if wire is not None:
                self._out.append(wire)
                self.state = _CONNECTED
                return
            reply = self._banner()
        self._out.append(reply.render(enhanced=False))
        if reply.code == 220:
            self.state = _CONNECTED
        elif reply.code == 421:
            self._enter_closed("refused")
        else:
            self.state = _REFUSED

    def _answer_hello(self, point: Hello, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._send(reply)
            return
        self._abort_transaction()
        if self._rcpt_error is not None:
            self._forget_rcpt_errors()
        self.helo_name = point.domain
        esmtp = point.verb != "HELO"
        self.esmtp = esmtp
        self.state = _READY
        look = self._look
        key: tuple[bool, str, str, bool, bool] | None = None
        if reply is None and look.hello_cacheable[1 if esmtp else 0]:
            key = (esmtp, point.domain, self.client_ip, self.tls_active, self.peer_trusted)
            known = look.hellos.get(key)
            if known is not None:
                self._out.append(known[0])
                self._extensions = known[1]
                return
        capabilities = self._capabilities() if esmtp else []
        self._extensions = frozenset(c.split(" ", 1)[0] for c in capabilities)
        # A policy's own positive reply replaces the greeting line only: the capabilities
        # are what this connection really offers, so they always follow.
        if reply is not None and reply.lines and reply.lines[0]:
            first = reply.lines[0]
        else:
            persona = self._look.persona
            first = persona.greeting_line(self.esmtp, self._values({"helo": point.domain}))
        code = reply.code if reply is not None else 250
        wire = Reply(code, None, (first, *capabilities)).render(enhanced=False)
        self._out.append(wire)
        if key is not None:
            if len(look.hellos) >= _MAX_HELLOS:
                look.hellos.clear()
            look.hellos[key] = (wire, self._extensions)

    def _answer_mail(self, point: MailFrom, reply: Reply | None) -> None:
        params = point.params
        if reply is None and not params:
            # Hot path: the default answer, rendered once per configuration.
            wire = self._look.sender_ok_wire
            if wire is not None:
                self.transaction = Transaction(point.address, params, False, [])
                self.state = _MAIL
                self._out.append(wire)
                return
        if reply is None and "PRDR" in params:
            reply = self._r("prdr_sender_ok", address=point.address)
        reply = reply or self._look.sender_ok or self._r("sender_ok", address=point.address)
        if reply.is_positive:
            self.transaction = Transaction(
                sender=point.address,
                params=params,
                smtputf8="SMTPUTF8" in params,
                recipients=[],
            )
            self.state = _MAIL
        self._send(reply)

    def _answer_rcpt(self, point: RcptTo, reply: Reply | None) -> None:
        look = self._look
        tx = self.transaction
        if reply is None and tx is not None and not look.echoes_recipients:
            # Hot path: the default answer, rendered once per configuration.
            wire = look.recipient_ok_wire
            if wire is not None:
                tx.recipients.append(point.address)
                self.state = _RCPT
                self._out.append(wire)
                return
        if reply is None and look.echoes_recipients:
            reply = self._r("recipient_ok", address=point.address, path=self._recipient_echo(point))
        reply = reply or look.recipient_ok or self._r("recipient_ok", address=point.address)
        if reply.is_positive and self.transaction is not None:
            self.transaction.recipients.append(point.address)
            self.state = _RCPT
        elif not reply.is_positive and self._look.behaviour.repeat_rcpt_error:
            # A policy's refusal: its text (Exim's smtp_respond() keeps the message).
            self._note_rcpt_error(reply.lines[0])
        self._send(reply)

    def _echo(self, text: str) -> str:
        """``text`` (the client's) made safe to echo, shortened as the persona does."""
        limit = self._look.behaviour.echo_shortened
        return echo(text) if limit is None else _shortened(echo(text), limit)

    def _echo_path(self) -> str:
        """The RCPT path as written, made safe (and shortened) as {path} is."""
        path = echo_values("RCPT", self._said)["path"]
        limit = self._look.behaviour.echo_shortened
        return path if limit is None else _shortened(path, limit)

    def _recipient_echo(self, point: RcptTo) -> str:
        """The recipient as the persona echoes it ({path}): as written, qualified with the
        server's domain (unqualified_recipient_qualified), or as written the first time in
        this transaction (repeated_recipient_as_first)."""
        behaviour = self._look.behaviour
        path = self._echo_path()
        address = point.address
        if behaviour.unqualified_recipient_qualified and not address.domain:
            domain = self.config.hostname.partition(".")[2] or self.config.hostname
            qualified = self._echo(f"{address.local_part}@{domain}")
            path = f"<{qualified}>" if path.startswith("<") else qualified
        tx = self.transaction
        if behaviour.repeated_recipient_as_first and tx is not None:
            if tx.written is None:
                tx.written = {}
            key = (address.local_part, address.domain.lower())
            path = tx.written.setdefault(key, path)
        return path

    def _answer_data_start(self, point: DataStart, reply: Reply | None) -> None:
        tx = self.transaction
        assert tx is not None
        if point.bdat:
            size = self._bdat_pending_size
            if reply is not None and not reply.is_positive:
                self._abort_transaction()
                self._discard_chunk(size, reply, DiscardReason.REJECTED)
                return
            self._start_chunk(size)
            return
        wire = self._look.start_data_wire if reply is None else None
        if wire is None:
            reply = reply or self._r("start_data")
            if reply.code != 354:
                self._send(reply)
                return
            wire = reply.render(enhanced=False)
        self._out.append(wire)
        look = self._look
        self._dot = DotReader(
            max_size=look.max_size, max_line=look.max_data_line, bare_newline=look.bare_newline
        )
        self.state = _DATA

    def _answer_data_complete(self, point: DataComplete, reply: Reply | None) -> None:
        look = self._look
        if reply is None:
            wire = look.message_accepted_wire
            tx = self.transaction
            if (
                wire is not None
                and not look.lmtp
                and not self._bdat_ending
                and self._rcpt_error is None
                and (tx is None or "PRDR" not in tx.params)
            ):
                # Hot path: what _complete_data does for one default SMTP answer.
                self._out.append(wire)
                self.transaction = None
                self.state = _READY
                return
        accepted = look.message_accepted or self._r("message_accepted")
        self._complete_data(point, [reply or accepted])

    def _complete_data(self, point: DataComplete, answers: list[Reply]) -> None:
        if self.config.lmtp:
            count = len(point.recipients)
            if len(answers) == 1:
                answers = answers * count
            elif len(answers) != count:
                raise ProtocolError(f"LMTP needs {count} replies, got {len(answers)}")
        elif len(answers) != 1:
            raise ProtocolError("SMTP DataComplete takes a single reply")
        tx = self.transaction
        if self._rcpt_error is not None:
            self._forget_rcpt_errors()
        if self._bdat_ending:
            self._bdat_ending = False
            answer = answers[0] or self._r("message_accepted")
            if (
                "bdat_last_chunk_ok" in self._look.overridden
                and answer.is_positive
                and not self.config.lmtp
            ):
                chunk = self._r("bdat_last_chunk_ok", size=self._bdat_chunk_size, total=point.size)
                answers = [Reply(answer.code, answer.status, (*chunk.lines, *answer.lines))]
        if not self.config.lmtp and tx is not None and "PRDR" in tx.params:
            answer = answers[0] or self._r("message_accepted")
            # A refused message keeps its one reply (the draft lets the server answer
            # for all recipients at once); an accepted one is answered per recipient.
            if answer.is_positive:
                self._send(self._r("prdr_start"))
                for recipient in point.recipients:
                    self._send(self._r("prdr_recipient_ok", address=str(recipient)))
        for answer in answers:
            self._send(answer or self._r("message_accepted"))
        self.transaction = None
        self.state = _READY

    def _answer_auth(self, point: AuthCredentials, reply: Reply | None) -> None:
        mechanism = MECHANISMS.get(point.mechanism)
        if (
            mechanism is not None
            and mechanism.capture_only
            and (reply is None or reply.is_positive)
        ):
            # DIGEST-MD5: success needs rspauth, which only the real password gives.
            reply = self._r("auth_failed")
        if reply is None or reply.is_positive:
            self.authenticated_as = point.username
            self._sasl = None
            self.state = self._after_auth()
            self._send(reply or self._r("auth_ok"))
            return
        if point.mechanism == "XOAUTH2" and reply.is_permanent:
            # The client must see the JSON error and answer it before the final reply.
            self._sasl_final_reply = reply
            self._out.append(b"334 " + encode_challenge(xoauth2_error_challenge()) + b"\r\n")
            self.state = _AUTH
            return
        self._auth_failed(reply)

    def _answer_starttls(self, point: StartTLS, reply: Reply | None) -> None:
        reply = reply or self._r("ready_for_tls")
        self._send(reply)
        if reply.code == 220:
            # CVE-2024-34083 class: whatever followed STARTTLS in plaintext is dropped.
            self._buf = b""
            self._pos = 0
            self.state = _TLS_PENDING

    def _answer_verify(self, point: Verify, reply: Reply | None) -> None:
        if reply is None:
            if point.expand:
                name = "expn_default"
            elif "@" not in point.argument:
                name = "vrfy_unqualified"  # Exim refuses a bare name
            else:
                name = "vrfy_default"
            reply = self._r(name, address=echo(point.argument))
        self._send(reply)

    def _answer_xclient(self, point: Xclient, reply: Reply | None) -> None:
        if reply is not None and not reply.is_positive:
            self._send(reply)
            return
        self._reset_session()
        self.state = _CONNECTED
        if reply is None:
            reply = self._banner()
        self._out.append(reply.render(enhanced=False))

    def _answer_xforward(self, point: Xforward, reply: Reply | None) -> None:
        self._send(reply or self._r("ok"))

    # --- DATA and BDAT ---------------------------------------------------------------------

    def _step_data(self) -> bool:
        reader = self._dot
        assert reader is not None
        chunks, end, done = reader.feed(self._buf, self._pos)
        consumed = end != self._pos
        self._pos = end
        for chunk in chunks:
            self._events.append(DataChunk(chunk))
        if not done:
            return consumed or bool(chunks)
        self._dot = None
        tx = self.transaction
        assert tx is not None
        if reader.error is not None:
            reply = self._adapt(reader.error_reply or replies.MESSAGE_TOO_BIG)
            self._send(reply)
            self._events.append(DataDiscarded(reader.error, reply))
            self.transaction = None
            self.state = _READY
            return True
        self.state = _READY  # provisional: DataComplete's answer ends the transaction
        self._pending = DataComplete(reader.size, tuple(tx.recipients))
        self._events.append(self._pending)
        return True

    def _start_chunk(self, size: int) -> None:
        tx = self.transaction
        assert tx is not None
        limit = self._max_size()
        if limit and tx.bdat_size + size > limit:
            # RFC 3030: the oversized chunk is read and dropped, then answered 552.
            tx.bdat_size += size
            self._abort_transaction(notify=False)
            self._discard_chunk(size, self._r("message_too_big"), DiscardReason.TOO_BIG)
            return
        tx.bdat_size += size
        self._bdat = BdatReader(size)
        self._bdat_chunk_size = size
        self.state = _BDAT
        self._bdat_discard = None

    def _discard_chunk(self, size: int, reply: Reply, reason: DiscardReason) -> None:
        self._bdat = BdatReader(size)
        self._bdat_discard = (reply, reason)
        self._bdat_resume = self.state if self.state is not _BDAT else _READY
        self.state = _BDAT

    def _step_bdat(self) -> bool:
        reader = self._bdat
        assert reader is not None
        chunk, end, done = reader.feed(self._buf, self._pos)
        consumed = end != self._pos
        self._pos = end
        discard = self._bdat_discard
        if chunk and discard is None:
            self._events.append(DataChunk(chunk))
        if not done:
            return consumed
        self._bdat = None
        if discard is not None:
            self._bdat_discard = None
            reply, reason = discard
            self.state = self._bdat_resume
            if reason is DiscardReason.TOO_BIG:
                self._events.append(DataDiscarded(DiscardReason.TOO_BIG, reply))
                self.state = _READY
            self._send(reply)
            return True
        tx = self.transaction
        assert tx is not None
        if not self._bdat_last:
            self.state = _BDAT_OPEN
            self._send(self._r("bdat_chunk_ok", size=self._bdat_chunk_size))
            return True
        self.state = _READY
        self._bdat_ending = True
        self._pending = DataComplete(tx.bdat_size, tuple(tx.recipients))
        self._events.append(self._pending)
        return True

    # --- AUTH ------------------------------------------------------------------------------

    def _auth_line(self, line: bytes) -> None:
        if self._sasl_final_reply is not None:
            # The client's answer to the XOAUTH2 error challenge; its content is ignored.
            final, self._sasl_final_reply = self._sasl_final_reply, None
            self._auth_failed(final)
            return
        mechanism = self._sasl
        assert mechanism is not None
        self._said_verb = ""
        self._said = line.decode("ascii", "replace")
        try:
            result = mechanism.step(decode_response(line, allow_empty_marker=False))
        except SaslError as exc:
            self._sasl = None
            self.state = self._after_auth()
            self._send(self._refusal("auth_malformed", exc.reply))
            return
        self._sasl_result(result)

    def _sasl_result(self, result: Challenge | AuthCredentials) -> None:
        if isinstance(result, Challenge):
            self.state = _AUTH
            self._out.append(b"334 " + encode_challenge(result.data) + b"\r\n")
            return
        self.state = self._after_auth()
        self._pause(result)

    def _after_auth(self) -> State:
        """The state an AUTH exchange returns to: READY, or CONNECTED when it came before
        HELO/EHLO (behaviour allowed_before_hello: the greeting is still owed)."""
        return _READY if self.helo_name is not None else _CONNECTED

    def _auth_failed(self, reply: Reply) -> None:
        self._sasl = None
        self.state = self._after_auth()
        self._auth_failures += 1
        self._send(reply)
        if reply.code == 421:  # the reply already closes the session (a policy's refusal)
            self._enter_closed("refused")
            return
        if self._auth_failures >= self.config.max_auth_failures:
            self._events.append(LimitExceeded(Limit.AUTH_FAILURES, closing=True))
            self._send(self._r("too_many_errors"))
            self._enter_closed("too-many-auth-failures")

    # --- capabilities ----------------------------------------------------------------------

    def _capabilities(self) -> list[str]:
        cfg = self.config
        caps: list[str] = []
        persona = self._look.persona
        if cfg.pipelining:
            caps.append("PIPELINING")
            if "PIPECONNECT" in persona.capability_order:
                caps.append("PIPECONNECT")
        size = self._max_size()
        if size and not self._look.behaviour.size_without_number:
            caps.append(f"SIZE {size}")
        else:
            caps.append("SIZE")
        if cfg.eightbitmime:
            caps.append("8BITMIME")
        if cfg.smtputf8:
            caps.append("SMTPUTF8")
        if self._look.enhanced:
            caps.append("ENHANCEDSTATUSCODES")
        if cfg.chunking:
            caps.append("CHUNKING")
            if cfg.binarymime:
                caps.append("BINARYMIME")
        if cfg.dsn:
            caps.append("DSN")
        if cfg.starttls and not self.tls_active and "STARTTLS" not in cfg.disabled_commands:
            caps.append("STARTTLS")
        if cfg.requiretls and self.tls_active:
            caps.append("REQUIRETLS")
        auth_now = self.tls_active or not cfg.auth_requires_tls
        if cfg.auth_mechanisms and auth_now and "AUTH" not in cfg.disabled_commands:
            caps.append("AUTH " + " ".join(cfg.auth_mechanisms))
        if cfg.xclient and self.peer_trusted:
            caps.append(_XCLIENT_CAPS)
        if cfg.xforward and self.peer_trusted:
            caps.append(_XFORWARD_CAPS)
        if cfg.vrfy and "VRFY" not in cfg.disabled_commands:
            caps.append("VRFY")
        # EXPN is answered by every look but listed only by a persona that names it.
        if cfg.expn and "EXPN" in persona.capability_order and "EXPN" not in cfg.disabled_commands:
            caps.append("EXPN")
        if "VERB" in persona.capability_order and "VERB" not in cfg.disabled_commands:
            caps.append("VERB")
        if "DELIVERBY" in persona.capability_order and not cfg.lmtp:
            caps.append("DELIVERBY")
        if self._look.behaviour.etrn and "ETRN" not in cfg.disabled_commands:
            caps.append("ETRN")
        if "PRDR" in persona.capability_order and not cfg.lmtp:
            caps.append("PRDR")
        caps.append("HELP")
        if (
            persona.hidden_capabilities
            or persona.unadvertised_capabilities
            or persona.capability_order
        ):
            return persona.order_capabilities(caps)
        return caps

    def _max_size(self) -> int | None:
        return self._look.max_size

    # --- helpers -----------------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.render(self._look.enhanced))

    # --- the persona ---------------------------------------------------------------------

    def _r(self, name: str, /, **values: object) -> Reply:
        """The persona's reply ``name``, its placeholders filled from ``values``."""
        reply = self._look.static(name)
        if reply is not None:
            return reply
        return self._look.persona.format_map(name, self._values(values))

    def _values(self, values: dict[str, object]) -> _Values:
        return _Values(self.config, self.client_ip, values, self._said_verb, self._said)

    def _banner(self) -> Reply:
        return self._look.banner or self._look.persona.banner_reply(self._values({}))

    def _refusal(self, name: str, reply: Reply, /, **values: object) -> Reply:
        """A parser's reply as the persona words it: a standard constant
        (``SMTPUTF8_REQUIRED``...) becomes the persona's version of that constant, a
        specific text the persona's reply ``name`` if it overrides it."""
        if not self._look.overridden:
            return reply
        name = CONSTANT_NAMES.get(id(reply), name)
        return self._look.persona.adapt(name, reply, self._values(dict(values)))

    def _adapt(self, reply: Reply, /, **values: object) -> Reply:
        """A standard constant given by the caller (``replies.AUTH_FAILED``) as the persona
        words it; any other reply unchanged."""
        if not self._look.overridden:
            return reply
        name = CONSTANT_NAMES.get(id(reply))
        if name is None:
            return reply
        return self._look.persona.adapt(name, reply, self._values(values))

    def _adapt_answer(self, point: PolicyPoint, reply: Reply) -> Reply:
        if isinstance(point, MailFrom | RcptTo):
            return self._adapt(reply, address=point.address)
        if isinstance(point, Verify):
            return self._adapt(reply, address=echo(point.argument))
        return self._adapt(reply)

    def _pause(self, point: PolicyPoint) -> None:
        self._pending = point
        self._events.append(point)

    def _reject(
        self,
        line: bytes,
        reply: Reply,
        *,
        unknown: bool = False,
        bad: bool = False,
        send: bool = True,
    ) -> None:
        limit = self._look.behaviour.unknown_command_limit
        if unknown and limit is not None:
            self._unknown_commands += 1
            if self._unknown_commands > limit:
                # Exim: the command over the limit gets only the limit's reply.
                self._events.append(CommandRejected(line, reply))
                self._events.append(LimitExceeded(Limit.UNKNOWN_COMMANDS, closing=True))
                self._send(self._r("too_many_unknown_commands"))
                self._enter_closed(Limit.UNKNOWN_COMMANDS.value)
                return
        if send:
            self._send(reply)
        self._events.append(CommandRejected(line, reply))
        if reply.code == 521:
            # RFC 7504: 521 says the server does not accept mail; it closes at once.
            self._enter_closed("refused")
            return
        if self._look.error_limit is not None:
            if unknown or bad:
                self._count_error()
            return
        if unknown:
            if limit is not None:
                return  # counted above, against the persona's own limit
            self._unknown_commands += 1
            if self._unknown_commands > self.config.max_unknown_commands:
                self._too_many(Limit.UNKNOWN_COMMANDS)
        elif bad:
            self._bad_commands += 1
            if self._bad_commands > self.config.max_bad_commands:
                self._too_many(Limit.BAD_COMMANDS)

    def _count_error(self) -> None:
        """One more error reply under the persona's error_limit: at the limit the
        product's "too many errors" follows at once and the connection closes."""
        self._errors += 1
        limit = self._look.error_limit
        if limit is not None and self._errors >= limit and self.state is not _CLOSED:
            self._too_many(Limit.ERRORS)

    def _too_many(self, limit: Limit) -> None:
        self._events.append(LimitExceeded(limit, closing=True))
        self._send(self._r("too_many_errors"))
        self._enter_closed(limit.value)

    def _abort_transaction(self, *, notify: bool = True) -> None:
        if self.transaction is not None:
            self.transaction = None
            if notify:
                self._events.append(TransactionReset())
        if self.state in (_MAIL, _RCPT, _BDAT_OPEN):
            self.state = _READY

    def _reset_session(self) -> None:
        self._abort_transaction()
        self.esmtp = False
        self._extensions = frozenset()
        self.helo_name = None
        self.authenticated_as = None

    def _enter_closed(self, reason: str) -> None:
        if self.state is _CLOSED:
            return
        if self.transaction is not None:
            self.transaction = None
            self._events.append(TransactionReset())
        self._dot = None
        self._bdat = None
        self.state = _CLOSED
        self._pending = None
        self._events.append(ConnectionClosed(reason))

    def _peer_closed(self) -> None:
        self._enter_closed("peer-closed")


#: C0 controls (TAB aside), DEL and C1 controls: never valid in a command line.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


#: A HELO name as Exim's check_helo() takes it (without helo_allow_chars).
_HELLO_NAME = re.compile(r"[A-Za-z0-9.-]+")


def _hello_name_ok(name: str) -> bool:
    """Letters, digits, dots and hyphens, or an address literal holding an IP address
    (``[192.0.2.1]``, ``[IPv6:...]``, ``[IPv4:...]``)."""
    if name.startswith("["):
        if not name.endswith("]"):
            return False
        inner = name[1:-1]
        version = None
        if inner[:5].lower() in ("ipv6:", "ipv4:"):
            version = 6 if inner[3] == "6" else 4
            inner = inner[5:]
        try:
            address = ipaddress.ip_address(inner)
        except ValueError:
            return False
        return version is None or address.version == version
    return _HELLO_NAME.fullmatch(name) is not None


#: An ETRN argument: a host name or an address literal (RFC 1985 with RFC 5321 literals).
_ETRN_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.?|\[[!-Z^-~]{1,253}\]"
)
#: A first word that is a mail header's name and colon (``SUBJECT:``), as Postfix's
#: is_header() sees it.
_HEADER_NAME = re.compile(r"[!-9;-~]+:")


def _shortened(text: str, limit: int) -> str:
    """Sendmail's shortenstring(): a text ``limit`` long or longer as its first and last
    (limit-3)/2 characters around "..."."""
    if len(text) < limit:
        return text
    half = (limit - 3) // 2
    return text[:half] + "..." + text[-half:]


#: The first word of MAIL's or RCPT's argument, up to a colon or a space (never fails).
_FIRST_WORD: Final = re.compile(r"[^: ]*")
#: An unqualified mailbox (``<root>``): a dot-string local part alone.
_UNQUALIFIED = re.compile(
    r"<([A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*)>"
)


#: What a lenient product (Postfix, strict_rfc821_envelopes = no) takes as an address:
#: no spaces, brackets or controls; the domain after the last "@".
_LENIENT_ADDRESS = re.compile(r"<([!-;=?-~]+)@([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>")


def _lenient_address(path: str, loose: bool, unqualified: bool = True) -> Address | None:
    """A path the strict parser refused, as a lenient product takes it, or None: an
    unqualified ``<user>`` (an Address with an empty domain: the product qualifies it
    with its own domain) unless ``unqualified`` is False, or with ``loose``
    ``<local@domain>`` with a local part longer than RFC 5321 allows or with characters
    it does not (``<a@@b.example>``)."""
    match = _UNQUALIFIED.fullmatch(path)
    if match is not None:
        if not unqualified:
            return None
        return Address(match[1], "") if len(match[1]) <= 64 or loose else None
    if not loose:
        return None
    match = _LENIENT_ADDRESS.fullmatch(path)
    if match is None or len(path) > 1024:
        return None
    return Address(match[1], match[2])


#: ``<a b@domain>``: a local part of words separated by single spaces, no quote or
#: backslash (they would not survive quoting), and a host name.
_SPACED_ADDRESS = re.compile(
    r"<([!#-;=?-\[\]-~]+(?: [!#-;=?-\[\]-~]+)+)@([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>"
)


def _spaced_address(path: str, long_local_parts: bool) -> Address | None:
    """``<a b@domain>`` as Sendmail takes it, or None; the local part is kept quoted
    (``"a b"@domain``: the same mailbox in RFC 5321's syntax), so what the server passes
    on is a valid address."""
    match = _SPACED_ADDRESS.fullmatch(path)
    if match is None or len(match[1]) > (256 if long_local_parts else 64):
        return None
    return Address(f'"{match[1]}"', match[2])


__all__ = [
    "ProtocolError",
    "ServerConnection",
    "Transaction",
]


# Dispatch tables: module level, not class attributes, so that mypyc (the optional compiled
# build, setup.py) can compile ServerConnection as a native class.
_COMMANDS: Final[dict[str, Callable[[ServerConnection, Rule, bytes, str], None]]] = {
    "HELO": ServerConnection._cmd_hello,
    "EHLO": ServerConnection._cmd_hello,
    "LHLO": ServerConnection._cmd_hello,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "HELP": ServerConnection._cmd_help,
    "VRFY": ServerConnection._cmd_verify,
    "EXPN": ServerConnection._cmd_verify,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
    "XCLIENT": ServerConnection._cmd_xclient,
    "XFORWARD": ServerConnection._cmd_xforward,
    "ETRN": ServerConnection._cmd_etrn,
    "VERB": ServerConnection._cmd_verb,
}

_ANSWERS: Final[dict[type[PolicyPoint], Callable[..., None]]] = {
    Greeting: ServerConnection._answer_greeting,
    Hello: ServerConnection._answer_hello,
    MailFrom: ServerConnection._answer_mail,
    RcptTo: ServerConnection._answer_rcpt,
    DataStart: ServerConnection._answer_data_start,
    DataComplete: ServerConnection._answer_data_complete,
    AuthCredentials: ServerConnection._answer_auth,
    StartTLS: ServerConnection._answer_starttls,
    Verify: ServerConnection._answer_verify,
    Xclient: ServerConnection._answer_xclient,
    Xforward: ServerConnection._answer_xforward,
}
