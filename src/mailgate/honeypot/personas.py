"""Product personas for honeypot mode, and TOML profile files that change them.

A :class:`PersonaProfile` is everything that makes mailgate look like one product: the
protocol :class:`~mailgate.protocol.persona.Persona` (banner, EHLO greeting and keyword
order, every reply text, HELP), the defaults a honeypot should use with it (host name
style, SASL mechanisms in the product's order, SIZE limit), the product's queue id format,
and the texts the server layer sends outside the protocol (relay denied, client rejected,
too many connections, message queued).

Built-in profiles are in :data:`PERSONAS`: ``postfix``, ``exim``, ``exchange``,
``sendmail`` and ``generic``. Each is a profile file shipped with the package
(``builtin_personas/<name>.toml``), read by :func:`load_profile` like a user's own. They
were written from each product's source code and documentation; where the exact text was
not certain the file's comment says ``UNSURE``, and the user documentation lists those
places. A persona only changes how mailgate *looks*: it
advertises nothing mailgate does not do (no ETRN, no PRDR, no NTLM...).

:func:`load_profile` reads a TOML profile: a ``base`` persona plus overrides. Every
mistake (unknown key, unknown reply name, malformed reply, unknown or missing placeholder)
is a :class:`ProfileError` naming the file and the key. The same format is produced by
:func:`dump_profile`, so ``dump_profile(PERSONAS["postfix"])`` is a complete example.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import string
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mailgate.protocol.behaviour import BEHAVIOUR_FIELDS, Behaviour, BehaviourError
from mailgate.protocol.config import ProtocolConfig
from mailgate.protocol.persona import (
    BANNER_PLACEHOLDERS,
    GREETING_PLACEHOLDERS,
    KEYWORDS,
    PLACEHOLDERS,
    REPLY_NAMES,
    Persona,
    PersonaError,
    clean,
    placeholders_in,
)
from mailgate.protocol.replies import Reply, ReplyError
from mailgate.protocol.sasl import MECHANISMS

__all__ = [
    "MAX_BANNER_DELAY",
    "MAX_REPLY_DELAY",
    "NO_DELAY",
    "PERSONAS",
    "PROFILE_KEYS",
    "QUEUE_ID_STYLES",
    "SERVER_PLACEHOLDERS",
    "SERVER_REPLY_NAMES",
    "TIMING_KEYS",
    "PersonaProfile",
    "ProfileError",
    "dump_profile",
    "format_reply",
    "load_profile",
    "parse_reply",
    "profile_from_mapping",
]


class ProfileError(ValueError):
    """A profile that cannot work. ``source`` is the file (or ``<built-in ...>``), ``key``
    the TOML key at fault (``replies.sender_ok``), empty for the file as a whole."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.detail = message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# --- the server layer's texts --------------------------------------------------------------

#: Texts the server layer (honeypot plugin, connection limits) sends outside the protocol,
#: with the placeholders each may use. ``message_queued`` is also a protocol reply name;
#: the profile's version may use ``{message_id}`` too (Exchange shows it).
SERVER_PLACEHOLDERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        # {path}: the path as the client wrote it (brackets, source route as sent).
        "relay_denied": frozenset({"hostname", "client_ip", "address", "path"}),
        "unknown_user": frozenset({"hostname", "client_ip", "address", "path"}),
        "rejected": frozenset({"hostname", "client_ip", "address"}),
        "too_many_connections": frozenset({"hostname", "client_ip"}),
        "insufficient_storage": frozenset({"hostname", "client_ip"}),
        "message_queued": frozenset({"hostname", "client_ip", "queue_id", "message_id"}),
        # VRFY/EXPN answered from the users and aliases (vrfy_answers_users): a user
        # without / with a full name, and a name that is neither user nor alias.
        "vrfy_user": frozenset({"hostname", "client_ip", "user"}),
        "vrfy_user_named": frozenset({"hostname", "client_ip", "user", "fullname"}),
        "vrfy_unknown_user": frozenset({"hostname", "client_ip", "address"}),
        # literal_senders_refused: a recipient of a sender at an address literal.
        "sender_domain_unknown": frozenset({"hostname", "client_ip", "address", "path", "sender"}),
        # The final reply of a PRDR transaction (Exim words it apart).
        "prdr_message_queued": frozenset({"hostname", "client_ip", "queue_id", "message_id"}),
        # A recipient whose local part restricted_local_parts refuses (Exim's Debian ACL).
        "restricted_characters": frozenset({"hostname", "client_ip", "address", "path"}),
    }
)
SERVER_REPLY_NAMES: frozenset[str] = frozenset(SERVER_PLACEHOLDERS)
#: The kind of reply each server text must be (what the server does with it).
_SERVER_CLASSES = {
    "relay_denied": "refusal",
    "unknown_user": "refusal",
    "rejected": "refusal",
    "too_many_connections": "refusal",
    # The client must come back later, not bounce the message.
    "insufficient_storage": "4xx",
    "message_queued": "2xx",
    "vrfy_user": "2xx",
    "vrfy_user_named": "2xx",
    "vrfy_unknown_user": "refusal",
    "sender_domain_unknown": "refusal",
    "prdr_message_queued": "2xx",
    "restricted_characters": "refusal",
}

#: Every top-level key of a profile file, with its meaning (the documentation's table).
PROFILE_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "base": "built-in persona the file starts from",
        "name": "profile name",
        "description": "one line for listings",
        "software": "product and version; {software} in any text",
        "hostname": "default host name (the server's hostname option wins)",
        "banner": "220 greeting text",
        "ehlo_greeting": "first line of the EHLO reply",
        "helo_greeting": "HELO reply text",
        "capabilities": "EHLO keyword order",
        "hidden_capabilities": "EHLO keywords to leave out (their verbs become unknown)",
        "unadvertised_capabilities": "EHLO keywords to leave out (their verbs still work)",
        "enhanced_status_codes": "write RFC 3463 codes",
        "help": "HELP reply lines (text only)",
        "help_code": "HELP reply code",
        "auth_mechanisms": "SASL mechanisms to offer, in order",
        "message_size_limit": "SIZE to advertise and enforce; 0 = no number",
        "queue_id": "queue id style",
        "local_users": "user names that exist at the persona's domains (others are unknown)",
        "vrfy_checks_users": "VRFY refuses unknown users and other domains as RCPT does",
        "percent_hack": "user%other@here is relaying to other (Postfix allow_percent_hack)",
        "full_names": "table: user = full name (the password file's GECOS), for VRFY/EXPN",
        "aliases": "table: alias = [users or addresses] (/etc/aliases); aliases are recipients",
        "vrfy_answers_users": "VRFY/EXPN answered from the users, full names and aliases "
        "(Sendmail)",
        "literal_senders_refused": "recipients of a sender at an address literal are refused "
        "(Sendmail's sender domain check)",
        "help_topics": "table: HELP topic = [lines] (Sendmail's helpfile)",
        "restricted_local_parts": "patterns of local parts refused at the persona's domains",
        "restricted_remote_local_parts": "patterns of local parts refused at other domains",
        "recipient_limit": "recipients per message the product takes (0: the server's)",
        "auth_failure_limit": "failed AUTHs before the product hangs up (0: the server's)",
        "behaviour": "table: how the product behaves (mailgate.protocol.behaviour)",
        "timing": "table: banner_delay and reply_delay, [min, max] seconds of jitter",
        "replies": "table: reply name = reply",
    }
)

#: Keys of the ``[timing]`` table: seconds, ``[min, max]``, a delay drawn uniformly from
#: that range before the banner / before each answer the honeypot paces.
TIMING_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "banner_delay": "seconds before the 220 greeting, [min, max]",
        "reply_delay": "seconds before each paced answer (HELO/EHLO, AUTH, MAIL, RCPT, DATA)",
    }
)
#: The longest delays a profile may ask for: well inside a client's patience (RFC 5321
#: 4.5.3.2: 5 minutes for the greeting) and the server's hook_timeout (30 s by default),
#: short enough that a persona never looks like a tarpit by accident.
MAX_BANNER_DELAY = 5.0
MAX_REPLY_DELAY = 2.0
_TIMING_BOUNDS = {"banner_delay": MAX_BANNER_DELAY, "reply_delay": MAX_REPLY_DELAY}
#: No delay: what every built-in persona has.
NO_DELAY: tuple[float, float] = (0.0, 0.0)

# --- queue ids -------------------------------------------------------------------------------

_B62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: Sendmail's QueueIdChars: base 60, 0-9 A-Z a-x.
_B60 = _B62[:60]


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        out.append(_B62[digit])
    return "".join(reversed(out))


def _postfix_id(now: float, rng: random.Random) -> str:
    # Short queue id: microseconds (5 hex digits) then the queue file's inode number in
    # hex, no padding: 10 to 12 upper-case hex digits, e.g. 4F2A31C0D8.
    usec = int((now % 1) * 1_000_000)
    return f"{usec:05X}{rng.randrange(0x10000, 0x1000000):X}"


def _exim_id(now: float, rng: random.Random) -> str:
    # Exim before 4.97: base-62 time, base-62 pid, base-62 fraction of a second in units
    # of 1/2000 s: 1tGXyz-0001Ab-Cd.
    usec = int((now % 1) * 1_000_000)
    return (
        f"{_base62(int(now), 6)}-{_base62(rng.randrange(1, 4_194_304), 6)}-"
        f"{_base62(usec // 500, 2)}"
    )


def _sendmail_id(now: float, rng: random.Random) -> str:
    # Sendmail 8.x: year % 60, month, day, hour, minute, second and a two-character
    # sequence in base 60, then the process id in six digits: 4B1AbCdE012345.
    tm = time.localtime(now)
    seq = rng.randrange(3600)
    head = (
        (tm.tm_year - 1900) % 60,
        tm.tm_mon - 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        min(tm.tm_sec, 59),
        seq // 60,
        seq % 60,
    )
    return "".join(_B60[i] for i in head) + f"{rng.randrange(1, 1_000_000):06d}"


def _exchange_id(now: float, rng: random.Random) -> str:
    # Exchange has no queue id on the wire; its reply shows [InternalId=<13 digits>].
    return str(rng.randrange(10**12, 10**13))


def _hex_id(now: float, rng: random.Random) -> str:
    return f"{rng.getrandbits(48):012X}"


@dataclass(frozen=True, slots=True)
class _QueueIdStyle:
    make: Callable[[float, random.Random], str]
    pattern: str


#: Queue id styles by name: how to make one and a regular expression that matches it.
QUEUE_ID_STYLES: Mapping[str, _QueueIdStyle] = MappingProxyType(
    {
        "postfix": _QueueIdStyle(_postfix_id, r"[0-9A-F]{10,12}"),
        "exim": _QueueIdStyle(_exim_id, r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"),
        "sendmail": _QueueIdStyle(_sendmail_id, r"[0-9A-Za-x]{8}[0-9]{6}"),
        "exchange": _QueueIdStyle(_exchange_id, r"[0-9]{13}"),
        "hex": _QueueIdStyle(_hex_id, r"[0-9A-F]{12}"),
    }
)
_SYSTEM_RANDOM = random.SystemRandom()

# --- reply strings ---------------------------------------------------------------------------

_REPLY_LINE = re.compile(
    r"(?P<code>[2-5][0-9][0-9])(?P<sep>[ -]|$)"
    r"(?:(?P<status>[245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$))?(?P<text>.*)",
    re.S,
)


def parse_reply(value: str | Iterable[str]) -> Reply:
    """A reply written as on the wire: ``"250 2.1.0 Ok"`` (code, optional enhanced code,
    text) or, for several lines, a list of such lines (``["214-2.0.0 a", "214 2.0.0 b"]``;
    every line with the same code and enhanced code). ValueError if malformed."""
    lines = [value] if isinstance(value, str) else list(value)
    if not lines:
        raise ValueError("empty list: give at least one line")
    code: str | None = None
    status: str | None = None
    texts: list[str] = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise ValueError(f"line {index + 1} is not a string: {line!r}")
        if "\n" in line or "\r" in line:
            raise ValueError("a line break inside a string: give several lines as a list")
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            raise ValueError(
                f"{line!r} does not start with a three-digit reply code (2xx to 5xx) "
                "and a space, as in '250 2.1.0 Ok'"
            )
        last = index == len(lines) - 1
        if match["sep"] == "-" and last:
            raise ValueError(
                f"{line!r}: the last line of a reply has a space after the code, not '-'"
            )
        if match["sep"] == " " and not last:
            raise ValueError(
                f"{line!r}: every line but the last has '-' after the code ('214-...')"
            )
        if index == 0:
            code, status = match["code"], match["status"]
        elif match["code"] != code:
            raise ValueError(f"line {index + 1} has code {match['code']}, line 1 has {code}")
        elif match["status"] != status:
            raise ValueError(
                f"line {index + 1} has enhanced code {match['status'] or 'none'}, "
                f"line 1 has {status or 'none'}"
            )
        texts.append(match["text"])
    assert code is not None
    try:
        return Reply(int(code), status, tuple(texts))
    except ReplyError as exc:
        raise ValueError(str(exc)) from None


def format_reply(reply: Reply) -> str | list[str]:
    """The inverse of :func:`parse_reply`: one string, or a list for several lines."""
    prefix = f"{reply.status} " if reply.status is not None else ""

    def written(separator: str, line: str) -> str:
        # An empty text leaves the code alone; a text keeps its own trailing spaces.
        head = f"{reply.code}{separator}{prefix}"
        return head + line if line else head.rstrip(" ")

    if len(reply.lines) == 1:
        return written(" ", reply.lines[0])
    last = len(reply.lines) - 1
    return [written(" " if i == last else "-", line) for i, line in enumerate(reply.lines)]


# --- placeholders ----------------------------------------------------------------------------

# Only for _fill_software, which rewrites texts; checking them is placeholders_in's job.
_FORMATTER = string.Formatter()


def _fill_software(text: str, software: str) -> str:
    """Put the profile's software name in for ``{software}`` (escaping its braces), so
    that no text depends on the server's own software setting."""
    if "{software}" not in text:
        return text
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError:
        return text  # the placeholder check reports it
    out = []
    for literal, name, spec, conversion in parsed:
        out.append(_escape(literal))
        if name is None:
            continue
        if name == "software" and not spec and not conversion:
            out.append(_escape(software))
        else:
            out.append(
                "{"
                + name
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
    return "".join(out)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _render(reply: Reply, values: Mapping[str, object], allowed: frozenset[str]) -> Reply:
    fields: set[str] = set()
    for line in reply.lines:
        fields |= placeholders_in(line, allowed)
    filled = {name: clean(values.get(name)) for name in fields}
    return Reply(reply.code, reply.status, tuple(line.format_map(filled) for line in reply.lines))


# --- the profile -----------------------------------------------------------------------------

# Defaults of the server-layer texts (a profile built in code without them).
_RELAY_DENIED = Reply(554, "5.7.1", ("Relay access denied",))
_UNKNOWN_USER = Reply(550, "5.1.1", ("<{address}>: User unknown",))
#: Local users every product has (the honeypot's ``local_users`` setting adds or replaces).
DEFAULT_LOCAL_USERS = ("root", "postmaster", "admin", "abuse")
_REJECTED = Reply(554, "5.7.1", ("Access denied",))
_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", ("Too many connections",))
_INSUFFICIENT_STORAGE = Reply(452, "4.3.1", ("Insufficient system storage",))
_MESSAGE_QUEUED = Reply(250, "2.0.0", ("OK: queued as {queue_id}",))
_VRFY_USER = Reply(250, "2.1.5", ("<{user}@{hostname}>",))
_VRFY_USER_NAMED = Reply(250, "2.1.5", ("{fullname} <{user}@{hostname}>",))
_VRFY_UNKNOWN_USER = Reply(550, "5.1.1", ("<{address}>: User unknown",))
_SENDER_DOMAIN_UNKNOWN = Reply(
    553, "5.1.8", ("<{address}>: Domain of sender address {sender} does not exist",)
)
#: prdr_message_queued's default: the profile's message_queued (see __post_init__).
_SAME_AS_QUEUED = Reply(250, "2.0.0", ("OK: queued as {queue_id}",))
_RESTRICTED_CHARACTERS = Reply(550, "5.1.3", ("<{address}>: Restricted characters in address",))


@dataclass(frozen=True, slots=True)
class PersonaProfile:
    """One product persona. Build one with :func:`load_profile`,
    :func:`profile_from_mapping` or take a built-in from :data:`PERSONAS`."""

    name: str
    #: The protocol persona: put it in ``ProtocolConfig(persona=...)`` (or
    #: ``ServerOptions.persona``).
    persona: Persona
    #: Product and version as the product shows it ("Postfix", "Exim 4.96").
    software: str
    description: str = ""
    #: The kind of host name the product usually has; the server's own ``hostname``
    #: setting wins.
    hostname: str = "mail.example.com"
    #: SASL mechanisms to offer, in the product's order (only ones mailgate implements).
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    #: The SIZE the product advertises by default; None: ``SIZE`` with no number.
    message_size_limit: int | None = 10_240_000
    #: Queue id style, a key of :data:`QUEUE_ID_STYLES`.
    queue_id_style: str = "hex"
    #: User names (local parts, compared without case) that exist at the persona's own
    #: domains: RCPT to any other local user gets ``unknown_user``.
    local_users: tuple[str, ...] = DEFAULT_LOCAL_USERS
    #: The product's recipients per message (Postfix smtpd_recipient_limit 1000); None:
    #: the server's max_recipients.
    recipient_limit: int | None = None
    #: Failed AUTHs before the product hangs up (None: the server's max_auth_failures).
    #: Postfix has no such limit of its own: its error limit (20) ends the session.
    auth_failure_limit: int | None = None
    #: VRFY looks the user up like RCPT: unknown users and other domains get
    #: ``unknown_user``/``relay_denied`` (Postfix); False: every VRFY gets ``vrfy_default``.
    vrfy_checks_users: bool = False
    #: ``user%other@here`` is mail for ``user@other``: relaying (Postfix allow_percent_hack).
    percent_hack: bool = False
    #: User -> full name (GECOS) for VRFY/EXPN answers (``vrfy_answers_users``).
    full_names: Mapping[str, str] = field(default_factory=dict)
    #: Alias -> the users or addresses it stands for; an alias is a valid recipient.
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: VRFY and EXPN answered from the users and aliases (``vrfy_user``,
    #: ``vrfy_user_named``, ``vrfy_unknown_user``), as Sendmail does.
    vrfy_answers_users: bool = False
    #: Recipients of a sender whose domain is an address literal are refused with
    #: ``sender_domain_unknown`` (Sendmail's sender domain check cannot resolve it).
    literal_senders_refused: bool = False
    #: Regular expressions (Python ``re``, searched in the local part: anchor them with
    #: ``^``) of recipients' local parts refused with ``restricted_characters`` before anything else
    #: is looked at: at the persona's own domains, and at any other domain (Debian's Exim
    #: ACL: ``^[.]``, ``^.*[@%!/|]``; and ``^[./|]``, ``^.*[@%!]``, ``^.*/\.\./``).
    restricted_local_parts: tuple[str, ...] = ()
    restricted_remote_local_parts: tuple[str, ...] = ()
    # Server-layer texts (templates; see SERVER_PLACEHOLDERS and :meth:`format`).
    relay_denied: Reply = _RELAY_DENIED
    unknown_user: Reply = _UNKNOWN_USER
    rejected: Reply = _REJECTED
    too_many_connections: Reply = _TOO_MANY_CONNECTIONS
    insufficient_storage: Reply = _INSUFFICIENT_STORAGE
    message_queued: Reply = _MESSAGE_QUEUED
    vrfy_user: Reply = _VRFY_USER
    vrfy_user_named: Reply = _VRFY_USER_NAMED
    vrfy_unknown_user: Reply = _VRFY_UNKNOWN_USER
    sender_domain_unknown: Reply = _SENDER_DOMAIN_UNKNOWN
    #: The final reply of a PRDR transaction; by default message_queued.
    prdr_message_queued: Reply = _SAME_AS_QUEUED
    restricted_characters: Reply = _RESTRICTED_CHARACTERS
    #: Timing jitter, seconds ``(min, max)``: a delay drawn from the range before the
    #: banner, and before each answer the honeypot paces. (0, 0): none.
    banner_delay: tuple[float, float] = NO_DELAY
    reply_delay: tuple[float, float] = NO_DELAY
    _server: Mapping[str, Reply] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        source = f"<profile {self.name!r}>"
        if self.queue_id_style not in QUEUE_ID_STYLES:
            raise ProfileError(source, "queue_id", _choice_error(self.queue_id_style))
        for mechanism in self.auth_mechanisms:
            if mechanism not in MECHANISMS:
                raise ProfileError(source, "auth_mechanisms", _mechanism_error(mechanism))
        for key, bound in _TIMING_BOUNDS.items():
            problem = _delay_problem(getattr(self, key), bound)
            if problem:
                raise ProfileError(source, f"timing.{key}", problem)
        if self.prdr_message_queued is _SAME_AS_QUEUED:
            object.__setattr__(self, "prdr_message_queued", self.message_queued)
        for key in ("restricted_local_parts", "restricted_remote_local_parts"):
            patterns = getattr(self, key)
            if isinstance(patterns, str):
                raise ProfileError(source, key, "give a list of patterns, not a string")
            object.__setattr__(self, key, tuple(patterns))
            for pattern in patterns:
                problem = _pattern_problem(pattern)
                if problem:
                    raise ProfileError(source, key, problem)
        server = {name: getattr(self, name) for name in SERVER_REPLY_NAMES}
        for name, reply in server.items():
            problem = _server_reply_problem(name, reply)
            if problem:
                raise ProfileError(source, f"replies.{name}", problem)
        object.__setattr__(self, "_server", server)

    # --- texts -----------------------------------------------------------------------------

    @property
    def vrfy(self) -> Reply:
        """The VRFY reply (a template: ``{address}`` is the argument)."""
        return self.persona.reply("vrfy_default")

    @property
    def expn(self) -> Reply:
        """The EXPN reply (only sent if EXPN is not hidden)."""
        return self.persona.reply("expn_default")

    @property
    def auth_failed(self) -> Reply:
        """What a refused AUTH gets."""
        return self.persona.reply("auth_failed")

    @property
    def timeout(self) -> Reply:
        """What an idle client gets before the server hangs up."""
        return self.persona.reply("idle_timeout")

    def format(self, name: str, /, **values: object) -> Reply:
        """The reply ``name`` with its placeholders filled from ``values`` (missing ones
        are empty, values are cleaned of control characters). ``name`` is a server text
        (:data:`SERVER_REPLY_NAMES`) or any protocol reply name."""
        server = self._server.get(name)
        if server is not None:
            return _render(server, values, SERVER_PLACEHOLDERS[name])
        if name not in REPLY_NAMES:
            raise KeyError(name)
        return self.persona.format(name, **values)

    # --- queue ids -------------------------------------------------------------------------

    @property
    def queue_id_pattern(self) -> str:
        """A regular expression matching this profile's queue ids."""
        return QUEUE_ID_STYLES[self.queue_id_style].pattern

    def new_queue_id(self, *, now: float | None = None, rng: random.Random | None = None) -> str:
        """A fresh queue id in the product's format."""
        moment = time.time() if now is None else now
        return QUEUE_ID_STYLES[self.queue_id_style].make(moment, rng or _SYSTEM_RANDOM)

    def new_message_id(self, hostname: str, *, rng: random.Random | None = None) -> str:
        """A Message-ID (without ``<>``) as the product would make one for a message that
        has none: 32 hex digits at the host."""
        return f"{(rng or _SYSTEM_RANDOM).getrandbits(128):032x}@{hostname}"

    def queued_reply(
        self,
        *,
        hostname: str,
        queue_id: str | None = None,
        message_id: str | None = None,
        client_ip: str = "",
        now: float | None = None,
        rng: random.Random | None = None,
        prdr: bool = False,
    ) -> Reply:
        """The end-of-data reply for an accepted message (``prdr``: of a PRDR transaction);
        a queue id (and a message id, for personas that show one) are made up when not
        given."""
        return self.format(
            "prdr_message_queued" if prdr else "message_queued",
            hostname=hostname,
            client_ip=client_ip,
            queue_id=queue_id or self.new_queue_id(now=now, rng=rng),
            message_id=message_id or self.new_message_id(hostname, rng=rng),
        )

    # --- use -------------------------------------------------------------------------------

    def protocol_config(self, **overrides: Any) -> ProtocolConfig:
        """A :class:`ProtocolConfig` with this persona, its host name, SASL mechanisms and
        size limit; ``overrides`` are further ProtocolConfig fields."""
        settings: dict[str, Any] = {
            "hostname": self.hostname,
            "persona": self.persona,
            "software": self.software,
            "auth_mechanisms": self.auth_mechanisms,
            "max_message_size": self.message_size_limit,
        }
        settings.update(overrides)
        return ProtocolConfig(**settings)


def _choice_error(value: object) -> str:
    close = difflib.get_close_matches(str(value), QUEUE_ID_STYLES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown queue id style {value!r}{hint}; known: {', '.join(sorted(QUEUE_ID_STYLES))}"


def _mechanism_error(value: object) -> str:
    return (
        f"{value!r} is not a SASL mechanism mailgate implements "
        f"({', '.join(MECHANISMS)}); a persona offers only what works"
    )


def _delay_problem(value: object, bound: float) -> str:
    """What is wrong with a ``(min, max)`` delay range, or the empty string."""
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return f"expected [min, max] in seconds, got {value!r}"
    low, high = float(value[0]), float(value[1])
    if not 0.0 <= low <= high <= bound:
        return f"expected 0 <= min <= max <= {bound:g} seconds, got [{low:g}, {high:g}]"
    return ""


def _pattern_problem(pattern: object) -> str:
    """What is wrong with a local-part pattern, or the empty string."""
    if not isinstance(pattern, str):
        return f"expected a pattern string, got {pattern!r}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a regular expression: {exc}"
    return ""


def _server_reply_problem(name: str, reply: Reply) -> str:
    allowed = SERVER_PLACEHOLDERS[name]
    try:
        fields: set[str] = set()
        for line in reply.lines:
            fields |= placeholders_in(line, allowed)
    except ValueError as exc:
        return str(exc)
    if _SERVER_CLASSES[name] == "refusal" and reply.is_positive:
        return f"must be a 4xx or 5xx refusal, not {reply.code}"
    if _SERVER_CLASSES[name] == "4xx" and reply.code // 100 != 4:
        return f"must be a 4xx temporary refusal, not {reply.code}"
    if _SERVER_CLASSES[name] == "2xx" and reply.code // 100 != 2:
        return f"must be a 2xx reply, not {reply.code}"
    if name in ("message_queued", "prdr_message_queued") and not fields & {
        "queue_id",
        "message_id",
    }:
        return "must show {queue_id} or {message_id} (the product always names the message)"
    return ""


# --- building a profile from a mapping (a TOML file or a built-in) -------------------------


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Typed access to a profile mapping; every error names the source and the key."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def error(self, key: str, message: str) -> ProfileError:
        return ProfileError(self.source, key, message)

    def string(self, key: str) -> str:
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}")
        return tuple(value)

    def boolean(self, key: str) -> bool:
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"expected a whole number from {low} to {high}, got {value!r}")
        return value


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _text_template(reader: _Reader, key: str, allowed: frozenset[str], software: str) -> str:
    """A banner/greeting text: its placeholders checked, {software} filled, and the host
    name first (RFC 5321 4.2: the greeting and the EHLO reply start with the domain)."""
    text = reader.string(key)
    try:
        placeholders_in(text, allowed | {"software"})
    except ValueError as exc:
        raise reader.error(key, str(exc)) from None
    if not text.startswith("{hostname}"):
        raise reader.error(
            key,
            "must start with {hostname} (RFC 5321 4.2: the server names itself first)",
        )
    return _fill_software(text, software)


def _reply_value(reader: _Reader, name: str, value: object, software: str) -> Reply:
    key = f"replies.{name}"
    if not isinstance(value, str | list):
        raise reader.error(key, f"expected a reply string like '250 2.1.0 Ok', got {_kind(value)}")
    try:
        reply = parse_reply(value)
    except ValueError as exc:
        raise reader.error(key, str(exc)) from None
    reply = Reply(reply.code, reply.status, tuple(_fill_software(t, software) for t in reply.lines))
    allowed = (
        SERVER_PLACEHOLDERS[name]
        if name in SERVER_REPLY_NAMES
        else PLACEHOLDERS[name] | {"software"}
    )
    try:
        for line in reply.lines:
            placeholders_in(line, allowed)
    except ValueError as exc:
        raise reader.error(key, str(exc)) from None
    if name in SERVER_REPLY_NAMES:
        problem = _server_reply_problem(name, reply)
        if problem:
            raise reader.error(key, problem)
    return reply


def _persona_error(reader: _Reader, kwargs: Mapping[str, Any], exc: PersonaError) -> ProfileError:
    """Name the key behind a PersonaError: try each part alone to find the culprit."""
    replies: Mapping[str, Any] = kwargs.get("replies", {})
    for name, reply in replies.items():
        try:
            Persona(replies={name: reply})
        except PersonaError as single:
            return reader.error(f"replies.{name}", _strip_where(str(single)))
    for key in (
        "capability_order",
        "hidden_capabilities",
        "unadvertised_capabilities",
        "banner",
        "ehlo_greeting",
    ):
        if key in kwargs:
            try:
                Persona(**{key: kwargs[key]})
            except PersonaError as single:
                toml_key = "capabilities" if key == "capability_order" else key
                return reader.error(toml_key, _strip_where(str(single)))
    return reader.error("", str(exc))


def _strip_where(message: str) -> str:
    # "reply 'x': text" / "banner: text" -> "text"
    head, sep, rest = message.partition(": ")
    return rest if sep and (head.startswith("reply ") or " " not in head) else message


def profile_from_mapping(
    data: Mapping[str, Any],
    *,
    base: str | PersonaProfile | None = None,
    source: str = "<mapping>",
) -> PersonaProfile:
    """A profile from a mapping shaped like a profile file (see :data:`PROFILE_KEYS`).

    The profile starts from ``data["base"]`` if given, else from ``base`` (a built-in name
    or a profile), else from ``generic``; keys in ``data`` replace the base's values, and
    ``replies`` entries replace single replies. ProfileError names ``source`` and the key.
    """
    reader = _Reader(data, source)
    for key in data:
        if key not in PROFILE_KEYS:
            raise reader.error(key, "unknown key" + _did_you_mean(key, PROFILE_KEYS))
    spec = _to_spec(_resolve_base(reader, base))
    merged_replies: dict[str, Any] = spec.pop("replies")
    if "help" in data or "help_code" in data:
        merged_replies.pop("help", None)  # the file's own HELP replaces the base's
    if "replies" in data:
        table = data["replies"]
        if not isinstance(table, Mapping):
            raise reader.error("replies", f"expected a table, got {_kind(table)}")
        if "help" in table and ("help" in data or "help_code" in data):
            raise reader.error(
                "replies.help", "give either help/help_code or replies.help, not both"
            )
        for name in table:
            if name not in REPLY_NAMES and name not in SERVER_REPLY_NAMES:
                raise reader.error(
                    f"replies.{name}",
                    "unknown reply name" + _did_you_mean(name, REPLY_NAMES | SERVER_REPLY_NAMES),
                )
        merged_replies.update(table)
    merged_timing: dict[str, Any] = spec.pop("timing")
    if "timing" in data:
        timing = data["timing"]
        if not isinstance(timing, Mapping):
            raise reader.error("timing", f"expected a table, got {_kind(timing)}")
        for name in timing:
            if name not in TIMING_KEYS:
                raise reader.error(
                    f"timing.{name}", "unknown key" + _did_you_mean(name, TIMING_KEYS)
                )
        merged_timing.update(timing)
    if "behaviour" in data:
        table = data["behaviour"]
        if not isinstance(table, Mapping):
            raise reader.error("behaviour", f"expected a table, got {_kind(table)}")
        # Like replies: the file's keys change the base's behaviour, the rest stays.
        spec["behaviour"] = {**spec.get("behaviour", {}), **table}
    for key in ("full_names", "aliases", "help_topics"):
        if key in data:
            table = data[key]
            if not isinstance(table, Mapping):
                raise reader.error(key, f"expected a table, got {_kind(table)}")
            # Like behaviour: the file's entries add to (or replace) the base's.
            spec[key] = {**spec.get(key, {}), **table}
    spec.update(
        {
            k: v
            for k, v in data.items()
            if k
            not in (
                "replies",
                "timing",
                "base",
                "behaviour",
                "full_names",
                "aliases",
                "help_topics",
            )
        }
    )
    spec["replies"] = merged_replies
    spec["timing"] = merged_timing
    return _build(_Reader(spec, source))


def _resolve_base(reader: _Reader, base: str | PersonaProfile | None) -> PersonaProfile:
    if "base" in reader.data:
        name = reader.string("base")
        if name == "none":
            return _NONE  # before PERSONAS exists: the built-ins themselves start here
        if name not in PERSONAS:
            raise reader.error(
                "base",
                f"unknown persona {name!r}{_did_you_mean(name, [*PERSONAS, 'none'])}; "
                f"built-in: {', '.join(PERSONAS)} (or none)",
            )
        return PERSONAS[name]
    if isinstance(base, PersonaProfile):
        return base
    if base is None:
        return PERSONAS["generic"]
    if base == "none":
        return _NONE
    if base not in PERSONAS:
        raise reader.error("base", f"unknown persona {base!r}{_did_you_mean(base, PERSONAS)}")
    return PERSONAS[base]


def _build(reader: _Reader) -> PersonaProfile:
    """The profile described by a complete mapping (the base merged with the file)."""
    data = reader.data
    software = reader.string("software") if "software" in data else ""
    kwargs: dict[str, Any] = {}
    if "banner" in data:
        kwargs["banner"] = _text_template(reader, "banner", BANNER_PLACEHOLDERS, software)
    for key in ("ehlo_greeting", "helo_greeting"):
        if key in data:
            kwargs[key] = _text_template(reader, key, GREETING_PLACEHOLDERS, software)
    if "capabilities" in data:
        kwargs["capability_order"] = _keywords(reader, "capabilities")
    if "hidden_capabilities" in data:
        kwargs["hidden_capabilities"] = frozenset(_keywords(reader, "hidden_capabilities"))
    if "unadvertised_capabilities" in data:
        kwargs["unadvertised_capabilities"] = frozenset(
            _keywords(reader, "unadvertised_capabilities")
        )
    if "enhanced_status_codes" in data:
        kwargs["enhanced_status_codes"] = reader.boolean("enhanced_status_codes")
    if "help_topics" in data:
        kwargs["help_topics"] = _help_topics(reader)
    if "behaviour" in data:
        kwargs["behaviour"] = _behaviour(reader)

    replies: dict[str, Reply] = {}
    server: dict[str, Reply] = {}
    table: Mapping[str, Any] = data.get("replies", {})
    for name, value in table.items():
        reply = _reply_value(reader, name, value, software)
        if name in SERVER_REPLY_NAMES:
            server[name] = reply
        # message_queued is both: the persona gets it when the protocol can fill it in.
        if name in REPLY_NAMES and (
            name not in SERVER_REPLY_NAMES or _fits(reply, PLACEHOLDERS[name])
        ):
            replies[name] = reply
    if "help" in data or "help_code" in data:
        lines = reader.strings("help") if "help" in data else ()
        code = reader.integer("help_code", 200, 299) if "help_code" in data else 214
        if not lines:
            raise reader.error("help", "give the HELP lines (or hide HELP)")
        texts = tuple(_fill_software(line, software) for line in lines)
        try:
            for line in texts:
                placeholders_in(line, PLACEHOLDERS["help"])
            replies["help"] = Reply(code, f"{code // 100}.0.0", texts)
        except (ValueError, ReplyError) as exc:
            raise reader.error("help", str(exc)) from None
    kwargs["replies"] = replies
    try:
        persona = Persona(**kwargs)
    except PersonaError as exc:
        raise _persona_error(reader, kwargs, exc) from None

    options: dict[str, Any] = {}
    if "description" in data:
        options["description"] = reader.string("description")
    if "hostname" in data:
        hostname = reader.string("hostname")
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", hostname):
            raise reader.error("hostname", f"{hostname!r} is not a host name")
        options["hostname"] = hostname
    if "auth_mechanisms" in data:
        mechanisms = tuple(m.upper() for m in reader.strings("auth_mechanisms"))
        for mechanism in mechanisms:
            if mechanism not in MECHANISMS:
                raise reader.error("auth_mechanisms", _mechanism_error(mechanism))
        if len(set(mechanisms)) != len(mechanisms):
            raise reader.error("auth_mechanisms", "a mechanism is listed twice")
        options["auth_mechanisms"] = mechanisms
    if "message_size_limit" in data:
        size = reader.integer("message_size_limit", 0, 2**53)
        options["message_size_limit"] = size or None
    if "queue_id" in data:
        style = reader.string("queue_id")
        if style not in QUEUE_ID_STYLES:
            raise reader.error("queue_id", _choice_error(style))
        options["queue_id_style"] = style
    timing: Mapping[str, Any] = data.get("timing", {})
    for key, bound in _TIMING_BOUNDS.items():
        if key in timing:
            value = timing[key]
            problem = _delay_problem(value, bound)
            if problem:
                raise reader.error(f"timing.{key}", problem)
            options[key] = (float(value[0]), float(value[1]))
    if "local_users" in data:
        options["local_users"] = _local_users(reader)
    if "vrfy_checks_users" in data:
        options["vrfy_checks_users"] = reader.boolean("vrfy_checks_users")
    if "percent_hack" in data:
        options["percent_hack"] = reader.boolean("percent_hack")
    for key in ("vrfy_answers_users", "literal_senders_refused"):
        if key in data:
            options[key] = reader.boolean(key)
    if "full_names" in data:
        options["full_names"] = _full_names(reader)
    if "aliases" in data:
        options["aliases"] = _aliases(reader)
    for key in ("restricted_local_parts", "restricted_remote_local_parts"):
        if key in data:
            patterns = reader.strings(key)
            for pattern in patterns:
                problem = _pattern_problem(pattern)
                if problem:
                    raise reader.error(key, problem)
            options[key] = patterns
    for key in ("recipient_limit", "auth_failure_limit"):
        if key in data:
            options[key] = reader.integer(key, 0, 1_000_000) or None
    options.update(server)
    return PersonaProfile(name=reader.string("name"), persona=persona, software=software, **options)


def _behaviour(reader: _Reader) -> Behaviour:
    """The ``[behaviour]`` table (see mailgate.protocol.behaviour for every key)."""
    table = reader.data["behaviour"]
    if isinstance(table, Behaviour):
        return table
    if not isinstance(table, Mapping):
        raise reader.error("behaviour", f"expected a table, got {_kind(table)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"behaviour.{key}"
        if key not in BEHAVIOUR_FIELDS:
            raise reader.error(where, "unknown key" + _did_you_mean(key, BEHAVIOUR_FIELDS))
        if key in (
            "ignored_arguments",
            "forbidden_commands",
            "allowed_before_hello",
            "unimplemented_commands",
        ):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise reader.error(where, f"expected a list of verbs, got {_kind(value)}")
            value = frozenset(value)
        elif key in ("line_limit", "error_limit"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise reader.error(where, f"expected a whole number, got {_kind(value)}")
            value = value or None  # 0: none (the server's own limits)
        values[key] = value
    try:
        return Behaviour(**values)
    except BehaviourError as exc:
        key, _, message = str(exc).partition(": ")
        raise reader.error(f"behaviour.{key}", message) from None


#: A user name as a local part (dot-string, no quoting), compared without case.
_USER = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")


def _local_users(reader: _Reader) -> tuple[str, ...]:
    users = reader.strings("local_users")
    for user in users:
        if not _USER.fullmatch(user) or len(user) > 64:
            raise reader.error("local_users", f"{user!r} is not a user name (a local part)")
    return tuple(dict.fromkeys(u.lower() for u in users))


#: A full name as the password file's GECOS gives it: printable ASCII, no comma (the
#: fields after the first comma are not the name), no angle brackets.
_FULL_NAME = re.compile(r"[ -+\--;=?-~]{1,80}")
#: An alias target: a user name or an address (no spaces, brackets or controls).
_ALIAS_TARGET = re.compile(r"[!-;=?-~]{1,254}")


def _table(reader: _Reader, key: str) -> Mapping[str, Any]:
    table = reader.data[key]
    if not isinstance(table, Mapping):
        raise reader.error(key, f"expected a table, got {_kind(table)}")
    return table


def _full_names(reader: _Reader) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for user, name in _table(reader, "full_names").items():
        where = f"full_names.{user}"
        if not _USER.fullmatch(user) or len(user) > 64:
            raise reader.error(where, f"{user!r} is not a user name (a local part)")
        if not isinstance(name, str) or not _FULL_NAME.fullmatch(name):
            raise reader.error(
                where, f"expected a full name (printable ASCII, no comma or <>), got {name!r}"
            )
        out[user.lower()] = name
    return MappingProxyType(out)


def _aliases(reader: _Reader) -> Mapping[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for alias, targets in _table(reader, "aliases").items():
        where = f"aliases.{alias}"
        if not _USER.fullmatch(alias) or len(alias) > 64:
            raise reader.error(where, f"{alias!r} is not an alias name (a local part)")
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and _ALIAS_TARGET.fullmatch(t) for t in targets)
        ):
            raise reader.error(
                where, f"expected a list of users or addresses, got {_kind(targets)}"
            )
        out[alias.lower()] = tuple(targets)
    return MappingProxyType(out)


def _help_topics(reader: _Reader) -> Mapping[str, tuple[str, ...]]:
    table = _table(reader, "help_topics")
    topics: dict[str, tuple[str, ...]] = {}
    for topic, lines in table.items():
        if not isinstance(lines, list) or not all(isinstance(v, str) for v in lines):
            raise reader.error(
                f"help_topics.{topic}", f"expected a list of lines, got {_kind(lines)}"
            )
        topics[topic] = tuple(lines)
    try:
        Persona(help_topics=topics)
    except PersonaError as exc:
        raise reader.error("help_topics", _strip_where(str(exc))) from None
    return topics


def _fits(reply: Reply, allowed: frozenset[str]) -> bool:
    try:
        for line in reply.lines:
            placeholders_in(line, allowed)
    except ValueError:
        return False
    return True


def _keywords(reader: _Reader, key: str) -> tuple[str, ...]:
    words = tuple(w.upper() for w in reader.strings(key))
    for word in words:
        if word not in KEYWORDS:
            raise reader.error(
                key,
                f"{word!r} is not an EHLO keyword mailgate offers{_did_you_mean(word, KEYWORDS)}"
                f"; known: {', '.join(sorted(KEYWORDS))} (a persona advertises only what "
                "mailgate implements)",
            )
    if len(set(words)) != len(words):
        raise reader.error(key, "a keyword is listed twice")
    return words


# --- back to a mapping ---------------------------------------------------------------------


def _to_spec(profile: PersonaProfile) -> dict[str, Any]:
    """The profile as a complete mapping in the file format (the inverse of _build)."""
    persona = profile.persona
    spec: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "software": profile.software,
        "hostname": profile.hostname,
        "banner": persona.banner,
        "ehlo_greeting": persona.ehlo_greeting,
        "helo_greeting": persona.helo_greeting,
        "capabilities": list(persona.capability_order),
        "hidden_capabilities": sorted(persona.hidden_capabilities),
        "unadvertised_capabilities": sorted(persona.unadvertised_capabilities),
        "enhanced_status_codes": persona.enhanced_status_codes,
        "auth_mechanisms": list(profile.auth_mechanisms),
        "message_size_limit": profile.message_size_limit or 0,
        "queue_id": profile.queue_id_style,
        "local_users": list(profile.local_users),
        "vrfy_checks_users": profile.vrfy_checks_users,
        "percent_hack": profile.percent_hack,
        "vrfy_answers_users": profile.vrfy_answers_users,
        "literal_senders_refused": profile.literal_senders_refused,
        "restricted_local_parts": list(profile.restricted_local_parts),
        "restricted_remote_local_parts": list(profile.restricted_remote_local_parts),
        "recipient_limit": profile.recipient_limit or 0,
        "auth_failure_limit": profile.auth_failure_limit or 0,
    }
    behaviour = dict(persona.behaviour.as_mapping())
    if behaviour:
        spec["behaviour"] = behaviour
    replies: dict[str, Any] = {}
    for name in sorted(persona.overridden):
        value = persona.replies[name]
        reply = value if isinstance(value, Reply) else persona.reply(name)
        replies[name] = format_reply(reply)
    for name in sorted(SERVER_REPLY_NAMES):
        replies[name] = format_reply(getattr(profile, name))
    spec["replies"] = replies
    spec["help_topics"] = {k: list(v) for k, v in persona.help_topics.items()}
    spec["full_names"] = dict(profile.full_names)
    spec["aliases"] = {k: list(v) for k, v in profile.aliases.items()}
    spec["timing"] = {
        "banner_delay": list(profile.banner_delay),
        "reply_delay": list(profile.reply_delay),
    }
    return spec


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        if not value:
            return "[]"
        if len(value) == 1 or sum(len(str(v)) for v in value) < 60:
            return "[" + ", ".join(_toml_value(v) for v in value) + "]"
        return "[\n" + "".join(f"    {_toml_value(v)},\n" for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_profile(profile: PersonaProfile) -> str:
    """The profile as a complete TOML profile file (``load_profile`` reads it back to an
    equal profile): a starting point for your own."""
    spec = _to_spec(profile)
    lines = [f"# mailgate persona profile: {profile.name}"]
    if profile.description:
        lines.append(f"# {profile.description}")
    lines += [
        "# Complete: it starts from mailgate's own texts (base none) and lists every change.",
        "",
        'base = "none"',
    ]
    tables = ("replies", "behaviour", "timing", "help_topics", "full_names", "aliases")
    for key, value in spec.items():
        if key not in tables:
            lines.append(f"{key} = {_toml_value(value)}")
    if spec.get("behaviour"):
        lines += ["", "[behaviour]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in spec["behaviour"].items()]
    lines += ["", "[timing]"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in spec["timing"].items()]
    for table in ("full_names", "aliases", "help_topics"):
        if spec[table]:
            lines += ["", f"[{table}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in spec[table].items()]
    lines += ["", "[replies]"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in spec["replies"].items()]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    """A table key, quoted unless it is a bare TOML key."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def load_profile(
    path: str | Path | Traversable, base: str | PersonaProfile | None = None
) -> PersonaProfile:
    """Read a TOML profile file (a path, or a package resource such as a built-in). It
    starts from its ``base`` key's built-in persona, else from ``base``, else from
    ``generic``. ProfileError names the file and the key."""
    file = path if isinstance(path, Traversable) else Path(path)
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ProfileError(str(file), "", f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(str(file), "", f"not valid TOML: {exc}") from None
    data.setdefault("name", file.name.removesuffix(".toml"))
    return profile_from_mapping(data, base=base, source=str(file))


# --- the built-in personas ---------------------------------------------------------------------
#
# Each is a profile file shipped as package data (builtin_personas/<name>.toml), read by
# load_profile like a user's own; each starts from "base = none" (mailgate's own texts),
# so none depends on another.

#: ``base = "none"``: mailgate's own texts, no persona (what dump_profile starts from).
_NONE = PersonaProfile(
    name="none",
    persona=Persona(),
    software="mailgate",
    description="mailgate's own texts (no persona)",
    message_size_limit=26_214_400,
)

#: The built-in persona names, in the order listings show them.
_BUILT_IN_NAMES = ("postfix", "exim", "exchange", "sendmail", "generic")
_BUILT_IN_FILES = resources.files("mailgate.honeypot") / "builtin_personas"

#: The built-in personas by name.
PERSONAS: Mapping[str, PersonaProfile] = MappingProxyType(
    {name: load_profile(_BUILT_IN_FILES / f"{name}.toml") for name in _BUILT_IN_NAMES}
)
