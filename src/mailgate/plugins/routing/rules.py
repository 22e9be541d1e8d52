"""Routing rules: where each accepted recipient's mail goes.

Rules are the ``[[routes]]`` tables of the configuration, in order; the first rule that
matches a recipient decides. A rule matches when every condition it has holds:

``recipients``
    patterns (``user@domain``, ``*@domain``, ``*@*.domain``, ``*``); required.
``senders``
    the same patterns plus ``<>`` for the null sender; ``*`` matches every sender, ``<>``
    included (as leaving the key out does).
``clients``
    networks (CIDR) the client's address must be in; IPv4-mapped IPv6 addresses and
    networks count as IPv4.
``authenticated``
    true: only for clients that authenticated; false: only for those that did not.

and then its ``action`` says what happens:

``deliver``
    the local deliveries already configured (Maildir, mbox, LMTP, webhook...).
``relay``
    queue, then deliver to the recipient domain's MX. Destination ``relay:<domain>``.
``forward``
    queue, then deliver to the smarthost ``to = "smtp://host:port"`` (``smtps://``
    implicit TLS, ``lmtp://`` LMTP), with ``auth = "user:password"`` if it needs AUTH.
    Destination ``forward:<url>``.
``reject``
    answered at RCPT with ``reply = "550 5.7.1 text"`` (4xx: try later; 5xx: refused).

A relay or forward rule may say ``tls = "verify"`` (or ``none``, ``may``, ``encrypt``,
``dane``, ``mta-sts``): the TLS policy of its mail, over the ``[outbound]`` default and
``[outbound.tls_policies]``. It is part of the destination key (``relay:<domain>?tls=
verify``; for a forward, ``tls=verify`` joins the URL's options), so queued mail keeps
the policy it was routed with.

``name`` and ``description`` are free text, shown by ``mailgate routes test`` and logged.

Without any rule every recipient is delivered locally: mailgate behaves as it did before
routing existed. A recipient without a domain (the bare ``postmaster`` RFC 5321 4.5.1
requires) is always delivered locally: there is no domain to relay it to.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from mailgate.plugins.policy import (
    IPAddress,
    PolicyConfigError,
    SectionReader,
    client_address,
)
from mailgate.plugins.routing.networks import NetworkIndex
from mailgate.plugins.routing.patterns import (
    AddressPattern,
    AddressSet,
    PatternError,
    PatternIndex,
    merged,
    parse_pattern,
    split_address,
)
from mailgate.server.options import Network, PolicySection
from mailgate.smtpclient.target import TLS_LEVELS

#: The name of the array of tables in the configuration file.
TABLE: Final = "routes"


class Action(StrEnum):
    DELIVER = "deliver"
    RELAY = "relay"
    FORWARD = "forward"
    REJECT = "reject"


ACTIONS: Final = tuple(action.value for action in Action)


class RoutesConfigError(PolicyConfigError):
    """A ``[[routes]]`` table that cannot be used: one line naming the file, the table's
    number and the key."""


# --- the parts of a rule ---------------------------------------------------------------------

_REPLY = re.compile(r"([45][0-5][0-9])(?:[ \t]+|$)(?:([245]\.\d{1,3}\.\d{1,3})(?:[ \t]+|$))?(.*)")
_REPLY_TEXT = re.compile(r"[\x20-\x7e]*")
_MAX_REPLY_TEXT = 400  # a reply line is at most 512 octets with code and CRLF (RFC 5321 4.5.3.1.5)
DEFAULT_REJECT_TEXT: Final = "Recipient address rejected"


@dataclass(frozen=True, slots=True)
class RejectReply:
    """The reply of a reject rule: ``code`` 4xx or 5xx, the enhanced status (RFC 3463) if
    one was given, and the text."""

    code: int
    enhanced: str | None
    text: str

    @classmethod
    def parse(cls, raw: str) -> RejectReply:
        """``"550 5.7.1 text"``, ``"450 try later"``, ``"554"``; raises ValueError."""
        match = _REPLY.fullmatch(raw.strip())
        if match is None:
            raise ValueError(
                f"{raw!r} is not a refusal reply: a 4xx or 5xx code, an optional enhanced "
                f'status and a text, e.g. "550 5.7.1 No mail for this address"'
            )
        code = int(match.group(1))
        enhanced = match.group(2)
        if enhanced is not None and enhanced[0] != match.group(1)[0]:
            raise ValueError(f"enhanced status {enhanced} does not go with reply code {code}")
        text = match.group(3).strip() or DEFAULT_REJECT_TEXT
        if not _REPLY_TEXT.fullmatch(text):
            raise ValueError("the reply text must be printable ASCII on one line")
        if len(text) > _MAX_REPLY_TEXT:
            raise ValueError(f"the reply text is longer than {_MAX_REPLY_TEXT} characters")
        return cls(code, enhanced, text)

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


ForwardScheme = Literal["smtp", "smtps", "lmtp"]
StartTLS = Literal["auto", "require", "no"]
# The grammar of mailgate's forward URLs (the forward delivery's and the outbound
# engine's): the same defaults, options and key, so a route's key is the engine's.
_DEFAULT_PORTS: Final[Mapping[str, int]] = {"smtp": 25, "smtps": 465, "lmtp": 24}
_STARTTLS: Final = ("auto", "require", "no")
_URL_EXAMPLE: Final = "e.g. smtp://smarthost.example:587, smtps://host:465 or lmtp://host:24"


def _redacted(url: str) -> str:
    """A URL as errors show it: never a password in it."""
    return re.sub(r"(//[^/@?#]*?:)[^/@?#]*@", r"\1***@", url)


@dataclass(frozen=True, slots=True)
class ForwardTarget:
    """The smarthost of a forward rule. ``smtp`` upgrades with STARTTLS as ``starttls``
    says (``auto``: when offered; ``require``; ``no``); ``smtps`` is TLS from the first
    byte; ``lmtp`` speaks LMTP (RFC 2033). ``cafile``: CAs to check its certificate
    against. ``to`` and ``auth`` are the rule's values as written, for the delivery
    engine (``Forward(url=to, auth=auth)``). Passwords stay out of ``repr`` and of
    :attr:`url`, so logs never show them."""

    scheme: ForwardScheme
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: StartTLS = "auto"
    cafile: str | None = None
    #: ``?tls=LEVEL``: the outbound TLS policy level (wins over ``starttls``).
    tls: str | None = None
    #: The query part as written (``starttls=require``), kept in the key.
    options: str = ""
    to: str = field(default="", repr=False)
    auth: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, raw: str, auth: str | None = None) -> ForwardTarget:
        """``to = "smtp://host:port"`` (``user:password@`` and ``?starttls=``/
        ``?cafile=`` allowed) and ``auth = "user:password"``; raises ValueError."""
        shown = _redacted(raw)
        try:
            parts = urlsplit(raw.strip())
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{shown!r} is not a URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"{shown!r}: the scheme must be smtp, smtps or lmtp ({_URL_EXAMPLE})")
        host = parts.hostname
        if not host:
            raise ValueError(f"{shown!r} names no host ({_URL_EXAMPLE})")
        if parts.path not in ("", "/") or parts.fragment:
            raise ValueError(f"{shown!r}: no path or fragment allowed ({_URL_EXAMPLE})")
        if port == 0:
            raise ValueError(f"{shown!r}: port 0 is not a port")
        options: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in ("starttls", "cafile", "tls"):
                raise ValueError(f"{shown!r}: unknown option {key!r} (starttls, cafile, tls)")
            options[key] = value
        starttls = options.get("starttls", "auto").lower()
        if starttls not in _STARTTLS:
            raise ValueError(f"{shown!r}: starttls must be auto, require or no")
        if scheme == "smtps" and "starttls" in options:
            raise ValueError(f"{shown!r}: smtps:// is TLS already; drop starttls=")
        tls = options.get("tls")
        if tls is not None:
            tls = tls.lower()
            if tls not in TLS_LEVELS:
                raise ValueError(f"{shown!r}: tls must be one of {', '.join(TLS_LEVELS)}")
            if scheme == "smtps" and tls in ("none", "may"):
                raise ValueError(f"{shown!r}: smtps:// is TLS already; tls={tls} cannot be")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password is not None and username is None:
            raise ValueError(f"{shown!r}: a password needs a user name")
        if auth is not None:
            if username is not None:
                raise ValueError(f"{shown!r} has a user already: give credentials once")
            username, colon, password = auth.partition(":")
            if not colon or not username or not password:
                raise ValueError('auth must be "user:password"')
        return cls(
            scheme=scheme,  # type: ignore[arg-type]  # checked against _DEFAULT_PORTS
            host=host,
            port=port if port is not None else _DEFAULT_PORTS[scheme],
            username=username,
            password=password,
            starttls="no" if scheme == "smtps" else starttls,  # type: ignore[arg-type]
            cafile=options.get("cafile") or None,
            tls=tls,
            options=parts.query,
            to=raw.strip(),
            auth=auth,
        )

    @property
    def url(self) -> str:
        """``smtp://host:port``, with ``user@`` when it authenticates (the same host
        with two accounts is two destinations) and the options; never the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        query = f"?{self.options}" if self.options else ""
        return f"{self.scheme}://{user}{host}:{self.port}{query}"


# --- rules and decisions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One ``[[routes]]`` table, checked. ``index`` counts from 1, as error messages and
    ``mailgate routes test`` do. ``None`` conditions are absent (they match anything)."""

    index: int
    action: Action
    recipients: tuple[AddressPattern, ...]
    senders: tuple[AddressPattern, ...] | None = None
    clients: tuple[Network, ...] | None = None
    authenticated: bool | None = None
    name: str | None = None
    description: str | None = None
    forward: ForwardTarget | None = None
    reply: RejectReply | None = None
    #: ``tls = "verify"``: the TLS policy level of a relay rule's mail (a forward
    #: rule's is in its URL's ``tls=`` option).
    tls: str | None = None
    #: Where it came from: "mailgate.toml [[routes]] #2".
    source: str = ""
    # Compiled from the above for matching.
    _recipients: AddressSet = field(init=False, repr=False)
    _senders: AddressSet | None = field(init=False, repr=False)
    _decision: RouteDecision | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_recipients", AddressSet(self.recipients))
        senders = AddressSet(self.senders) if self.senders is not None else None
        object.__setattr__(self, "_senders", senders)
        # Every match of a rule other than relay gives the same decision: made once.
        decision = None
        if self.action is not Action.RELAY:
            decision = RouteDecision(self.action, self.key(""), self)
        object.__setattr__(self, "_decision", decision)

    @property
    def label(self) -> str:
        """``#2`` or ``#2 "partners"``."""
        return f"#{self.index}" + (f' "{self.name}"' if self.name else "")

    def key(self, domain: str) -> str:
        """The destination key of this rule for a recipient in ``domain``."""
        if self.action is Action.RELAY:
            return f"relay:{domain}?tls={self.tls}" if self.tls else f"relay:{domain}"
        if self.action is Action.FORWARD:
            assert self.forward is not None
            return f"forward:{self.forward.url}"
        if self.action is Action.REJECT:
            assert self.reply is not None
            return str(self.reply)
        return "deliver"

    def decision(self, domain: str) -> RouteDecision:
        if self._decision is not None:
            return self._decision
        return RouteDecision(self.action, self.key(domain), self)

    def mismatch(
        self,
        sender: tuple[str, str] | None,
        client: IPAddress | None,
        authenticated: bool,
    ) -> str | None:
        """Why the conditions other than ``recipients`` fail, or None when they hold.
        ``sender`` is a normalised ``(local, domain)``, ("", "") for ``<>``; None when not
        known (then a rule with ``senders`` does not match)."""
        if self.authenticated is not None and self.authenticated != authenticated:
            return (
                "only for authenticated clients"
                if self.authenticated
                else ("only for clients that did not authenticate")
            )
        if self._senders is not None:
            if sender is None:
                return "has senders and no sender was given"
            if not self._senders.contains(*sender):
                return "the sender is not in senders"
        if self.clients is not None:
            if client is None:
                return "has clients and no client address was given"
            if not any(client in network for network in self.clients):
                return "the client is not in clients"
        return None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one recipient's mail goes: the action, the destination key (``deliver``,
    ``relay:<domain>``, ``forward:<url>`` or, for reject, the reply ``550 5.7.1 text``)
    and the rule that decided (None: no rule matched, or there are no rules)."""

    action: Action
    destination: str
    route: Route | None = None

    @property
    def index(self) -> int | None:
        return self.route.index if self.route is not None else None

    @property
    def name(self) -> str | None:
        return self.route.name if self.route is not None else None

    @property
    def description(self) -> str | None:
        return self.route.description if self.route is not None else None

    @property
    def reply(self) -> RejectReply | None:
        return self.route.reply if self.route is not None else None

    @property
    def forward(self) -> ForwardTarget | None:
        return self.route.forward if self.route is not None else None

    @property
    def domain(self) -> str | None:
        """The recipient domain (A-labels) a relay decision delivers to the MX of."""
        if self.action is Action.RELAY:
            return self.destination.partition(":")[2].partition("?")[0]
        return None

    @property
    def tls(self) -> str | None:
        """The TLS policy level the rule gives its mail (None: the [outbound] one)."""
        if self.route is None:
            return None
        if self.route.forward is not None:
            return self.route.forward.tls
        return self.route.tls


#: What happens without rules, or when none matches.
DEFAULT_DECISION: Final = RouteDecision(Action.DELIVER, "deliver")


class RouteTable:
    """The rules in order; :meth:`match` finds the first that matches a recipient.

    The conditions of all rules are indexed: recipient and sender patterns (by address,
    domain and parent domain) and client networks (by prefix). A match takes, of the
    three, the shortest list of rules that may match (those naming the recipient, those
    the sender may use, those for the client's network), walks it in rule order checking
    each candidate's other conditions, and stops at the first that holds. Only a table
    whose rules differ by ``authenticated`` alone is walked rule by rule."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)
        self._recipients = PatternIndex()
        self._senders = PatternIndex()
        self._clients = NetworkIndex()
        for position, route in enumerate(self.routes):
            self._recipients.add(position, route.recipients)
            self._senders.add(position, route.senders)
            self._clients.add(position, route.clients)
        self._any_senders = any(route.senders is not None for route in self.routes)
        self._any_clients = any(route.clients is not None for route in self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def __bool__(self) -> bool:
        return bool(self.routes)

    def forward_targets(self) -> dict[str, ForwardTarget]:
        """Destination key -> smarthost, for the delivery workers: a queued recipient
        keeps only its key (``forward:<url>``, no password), so the credentials come
        from here."""
        return {route.key(""): route.forward for route in self.routes if route.forward is not None}

    @classmethod
    def from_sections(cls, sections: Iterable[PolicySection]) -> RouteTable:
        """The table from the configuration's ``routes`` sections (others are skipped)."""
        routes = [s for s in sections if s.name == TABLE]
        return cls(route_from_section(s, number) for number, s in enumerate(routes, 1))

    @classmethod
    def from_document(
        cls, document: Mapping[str, Any], where: str, base: Path | None = None
    ) -> RouteTable:
        """The table from a parsed TOML document's ``[[routes]]`` array (``where`` names
        the file in errors)."""
        return cls.from_sections(route_sections(document, where, base))

    def match(
        self,
        recipient: str,
        sender: str | None = None,
        client_ip: str | IPAddress | None = None,
        authenticated: bool = False,
    ) -> RouteDecision:
        """Where mail for ``recipient`` goes. ``sender`` is the reverse-path ("" or
        "<>" for the null sender; None when not known: rules with ``senders`` then do
        not match); ``client_ip`` the client's address (None: rules with ``clients`` do
        not match)."""
        if not self.routes:
            return DEFAULT_DECISION
        local, domain = split_address(recipient)
        if not domain:
            return DEFAULT_DECISION
        routes = self.routes
        parsed_sender = _sender(sender) if self._any_senders else None
        client = _client(client_ip) if self._any_clients else None
        by_recipient = self._recipients.lists(local, domain)
        walks = [(_total(by_recipient), "recipients", by_recipient)]
        if self._any_senders:
            lists = self._senders.lists(
                parsed_sender[0] if parsed_sender is not None else None,
                parsed_sender[1] if parsed_sender is not None else "",
            )
            walks.append((_total(lists), "senders", lists))
        if self._any_clients:
            lists = self._clients.lists(client)
            walks.append((_total(lists), "clients", lists))
        # The condition whose candidates are fewest is met by construction of the walk.
        _, walked, candidates = min(walks, key=lambda walk: walk[0])
        for position in merged(candidates):
            route = routes[position]
            if route.authenticated is not None and route.authenticated != authenticated:
                continue
            if walked != "recipients" and not route._recipients.contains(local, domain):
                continue
            if (
                walked != "senders"
                and route._senders is not None
                and (parsed_sender is None or not route._senders.contains(*parsed_sender))
            ):
                continue
            if (
                walked != "clients"
                and route.clients is not None
                and (client is None or not any(client in network for network in route.clients))
            ):
                continue
            return route.decision(domain)
        return DEFAULT_DECISION


def _total(lists: list[list[int]]) -> int:
    return sum(len(positions) for positions in lists)


def _sender(sender: str | None) -> tuple[str, str] | None:
    if sender is None:
        return None
    if sender.strip() in ("", "<>"):
        return ("", "")
    return split_address(sender)


def _client(client_ip: str | IPAddress | None) -> IPAddress | None:
    if client_ip is None:
        return None
    if not isinstance(client_ip, str):
        client_ip = str(client_ip)
    return client_address(client_ip)


# --- reading the tables ----------------------------------------------------------------------


def route_sections(
    document: Mapping[str, Any], where: str, base: Path | None = None
) -> list[PolicySection]:
    """The ``[[routes]]`` tables of a parsed TOML document, as the configuration reader
    makes policy sections (source ``"<where> [[routes]] #N"``)."""
    item = document.get(TABLE)
    if item is None:
        return []
    if not isinstance(item, list):
        raise RoutesConfigError(f"{where}: routes must be an array of tables ([[routes]])")
    sections = []
    for number, entry in enumerate(item, 1):
        label = f"{where} [[{TABLE}]] #{number}"
        if not isinstance(entry, dict):
            raise RoutesConfigError(f"{label}: must be a table, got {type(entry).__name__}")
        sections.append(PolicySection(TABLE, dict(entry), base, label))
    return sections


def route_from_section(section: PolicySection, index: int) -> Route:
    """One rule from its table; raises RoutesConfigError naming the table and key."""
    reader = SectionReader(section)

    def error(key: str | None, problem: str) -> RoutesConfigError:
        return RoutesConfigError(str(reader.error(key, problem)))

    try:
        # Every key is read before any is judged, so that a misspelt key is reported as
        # such ("did you mean 'recipients'?") rather than as the key it should have been.
        name = reader.string("name")
        description = reader.string("description")
        action_name = reader.choice("action", ACTIONS, "")
        recipients = reader.strings("recipients")
        senders = reader.strings("senders")
        clients = reader.networks("clients")
        authenticated = reader.boolean("authenticated", False)
        to = reader.string("to")
        auth = reader.string("auth")
        reply = reader.string("reply")
        tls = reader.choice("tls", TLS_LEVELS, "")
        reader.done()
    except PolicyConfigError as exc:
        raise RoutesConfigError(str(exc)) from None
    values = section.values

    if not action_name:
        raise error(None, f"missing key 'action' (one of {', '.join(ACTIONS)})")
    action = Action(action_name)
    if "recipients" not in values:
        raise error(None, "missing key 'recipients' (patterns; '*' for every recipient)")
    for key, given in (("recipients", recipients), ("senders", senders), ("clients", clients)):
        if key in values and not given:
            raise error(key, "an empty list matches nothing; leave the key out to match all")

    def patterns(key: str, texts: Sequence[str], allow_null: bool) -> tuple[AddressPattern, ...]:
        try:
            return tuple(parse_pattern(text, allow_null=allow_null) for text in texts)
        except PatternError as exc:
            raise error(key, str(exc)) from None

    recipient_patterns = patterns("recipients", recipients, False)
    sender_patterns = patterns("senders", senders, True) if "senders" in values else None

    if to is not None and action is not Action.FORWARD:
        raise error("to", f"only a forward route takes 'to' (this one is {action})")
    if auth is not None and action is not Action.FORWARD:
        raise error("auth", f"only a forward route takes 'auth' (this one is {action})")
    if reply is not None and action is not Action.REJECT:
        raise error("reply", f"only a reject route takes 'reply' (this one is {action})")
    if tls and action not in (Action.RELAY, Action.FORWARD):
        raise error("tls", f"only a relay or forward route takes 'tls' (this one is {action})")
    forward = None
    if action is Action.FORWARD:
        if to is None:
            raise error(None, "missing key 'to' (a forward route needs to = \"smtp://host:port\")")
        if tls:
            # The route's tls joins the URL's options, so that the destination key (and
            # the queued mail) carries it like a ?tls= written in the URL.
            try:
                query = urlsplit(to.strip()).query
            except ValueError:
                query = ""  # ForwardTarget.parse says what is wrong with the URL
            if any(key == "tls" for key, _ in parse_qsl(query, keep_blank_values=True)):
                raise error("tls", "the URL in 'to' has a tls= option already: give it once")
            to = f"{to.strip()}{'&' if '?' in to else '?'}tls={tls}"
        try:
            forward = ForwardTarget.parse(to, auth)
        except ValueError as exc:
            raise error("auth" if str(exc).startswith("auth") else "to", str(exc)) from None
    reject_reply = None
    if action is Action.REJECT:
        try:
            reject_reply = RejectReply.parse(reply if reply is not None else "550 5.7.1")
        except ValueError as exc:
            raise error("reply", str(exc)) from None

    return Route(
        index=index,
        action=action,
        recipients=recipient_patterns,
        senders=sender_patterns,
        clients=tuple(_as_ipv4(n) for n in clients) if "clients" in values else None,
        authenticated=authenticated if "authenticated" in values else None,
        name=name,
        description=description,
        forward=forward,
        reply=reject_reply,
        tls=tls if tls and action is Action.RELAY else None,
        source=section.source,
    )


def _as_ipv4(network: Network) -> Network:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: client addresses are compared as IPv4
    when they are IPv4-mapped, so the networks must be too."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


__all__ = [
    "ACTIONS",
    "DEFAULT_DECISION",
    "DEFAULT_REJECT_TEXT",
    "TABLE",
    "Action",
    "ForwardTarget",
    "RejectReply",
    "Route",
    "RouteDecision",
    "RouteTable",
    "RoutesConfigError",
    "route_from_section",
    "route_sections",
]
