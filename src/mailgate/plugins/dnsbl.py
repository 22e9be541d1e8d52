"""DNS block and allow lists (DNSBL / DNSWL, RFC 5782) for the client's IP address.

Every configured zone is asked at once when a client connects; the answers are ready
(or on their way) by the time they are needed:

* an **allow list** (``type = "allow"``) that lists the client allow-lists it for the
  session: the block lists, client checks and greylisting skip it;
* a **block list** refuses a listed client at connect (``reject_connect``: the banner is
  ``554``), at each RCPT (``reject_rcpt``: every attempt is logged with its sender and
  recipient) or only marks its messages with a header (``header``).

Only answers inside 127.0.0.0/8 count, and of those only the zone's ``codes``. An answer
in 127.255.255.0/24 (Spamhaus: "query refused", "typing error"...), an answer outside
127.0.0.0/8, a timeout and a SERVFAIL are errors: the mail goes through and a warning is
logged. IPv6 clients are looked up in nibble form (``ipv6 = false`` skips them for lists
that only hold IPv4 addresses). Answers are cached by the shared resolver for their TTL.

Clients on an allow list (``[lists]``, a DNSWL), authenticated users and clients in
``relay_networks`` are not looked up at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mailgate.dns import DNSTempError, Resolver, dnsbl_name
from mailgate.hooks import Address, Envelope, Message, Reject, Session
from mailgate.plugins.policy import (
    LazyResolver,
    PolicyConfigError,
    PolicyEnv,
    SectionReader,
    allowlisted,
    annotate,
    decide,
    exempt,
    mark_allowlisted,
    write_annotations,
)
from mailgate.server.options import LOOPBACK, Network, PolicySection

log = logging.getLogger("mailgate.policy")

POLICY: Final = "dnsbl"
#: session.notes key of this plugin's per-connection state (a :class:`Lookups`).
NOTE: Final = "dnsbl"
TYPES: Final = ("block", "allow")
ACTIONS: Final = ("reject_connect", "reject_rcpt", "header")
DEFAULT_MESSAGE: Final = "Service unavailable; client [{ip}] blocked using {zone}{reason}"
#: The placeholders a zone's ``message`` may use.
PLACEHOLDERS: Final = ("ip", "zone", "reason", "txt", "result")
DEFAULT_HEADER: Final = "X-Mailgate-DNSBL"
#: Longest TXT reason put into a reply or a log line.
MAX_REASON = 200

_LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# A return code octet: 2, 2-3, [2-3], [2..3] or *.
_OCTET = r"(\*|\d{1,3}(?:-\d{1,3})?|\[\d{1,3}(?:-|\.\.)\d{1,3}\])"
_OCTETS = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_CODE_FORMS = "e.g. 127.0.0.2, 127.0.0.0/24, 127.0.0.4-127.0.0.7 or 127.0.[0-255].2-3"


class ZoneError(ValueError):
    """A zone that cannot be used; ``key`` names the setting at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# --- return codes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Code:
    """One entry of a zone's ``codes``: four octet ranges (``127.0.[0-255].2-3``) or, for
    an address, a CIDR network or an address range, one range of 32-bit numbers."""

    text: str
    octets: tuple[tuple[int, int], ...] = ()
    span: tuple[int, int] = (0, -1)

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        if self.octets:
            return all(
                lo <= part <= hi for part, (lo, hi) in zip(address.packed, self.octets, strict=True)
            )
        return self.span[0] <= int(address) <= self.span[1]


def parse_code(text: str) -> Code:
    """One return code pattern -> :class:`Code`; ValueError with a one-line reason."""
    raw = text
    text = text.strip()
    parts = text.split("-")
    try:
        if "/" in text:
            network = ipaddress.IPv4Network(text, strict=False)
            code = Code(raw, span=(int(network[0]), int(network[-1])))
        elif len(parts) == 2 and parts[1].count(".") == 3:
            first, last = (ipaddress.IPv4Address(p.strip()) for p in parts)
            if first > last:
                raise ValueError(f"{raw!r}: the range ends before it starts")
            code = Code(raw, span=(int(first), int(last)))
        else:
            code = Code(raw, octets=_octet_ranges(raw, text))
    except ipaddress.AddressValueError:
        raise ValueError(f"{raw!r} is not a return code ({_CODE_FORMS})") from None
    except ipaddress.NetmaskValueError:
        raise ValueError(f"{raw!r} is not a return code ({_CODE_FORMS})") from None
    low = code.octets[0] if code.octets else (code.span[0] >> 24, code.span[1] >> 24)
    if low != (127, 127):
        raise ValueError(f"{raw!r}: DNS lists answer inside 127.0.0.0/8 only")
    return code


def _octet_ranges(raw: str, text: str) -> tuple[tuple[int, int], ...]:
    match = _OCTETS.fullmatch(text)
    if match is None:
        raise ValueError(f"{raw!r} is not a return code ({_CODE_FORMS})")
    ranges = []
    for part in match.groups():
        if part == "*":
            lo, hi = 0, 255
        else:
            bounds = re.split(r"-|\.\.", part.strip("[]"))
            lo, hi = int(bounds[0]), int(bounds[-1])
        if hi > 255:
            raise ValueError(f"{raw!r}: {hi} is not an octet (0-255)")
        if lo > hi:
            raise ValueError(f"{raw!r}: the range {lo}-{hi} ends before it starts")
        ranges.append((lo, hi))
    return tuple(ranges)


# Without ``codes``: any answer counts (errors never do). An allow list's default leaves
# out 127.0.0.255 too, dnswl.org's "you sent too many queries", which would otherwise
# allow-list every client.
_ANY = (Code("127.0.0.0/8", span=(int(_LOOPBACK_NET[0]), int(_LOOPBACK_NET[-1]))),)
_ANY_ALLOW = (
    Code("127.0.0.0-127.0.0.254", span=(0x7F000000, 0x7F0000FE)),
    Code("127.0.1.0-127.255.255.255", span=(0x7F000100, 0x7FFFFFFF)),
)


# --- zones ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    """One DNS list. ``Zone("zen.spamhaus.org", codes=["127.0.0.2-127.0.0.11"])``.

    ``type``: "block" (a DNSBL) or "allow" (a DNSWL). ``action`` (block lists):
    "reject_connect", "reject_rcpt" or "header". ``codes``: the answers that count
    (default: any). ``message``: the reply text, with ``{ip}``, ``{zone}``, ``{reason}``
    ("; " and the TXT record, or nothing), ``{txt}`` and ``{result}``. ``use_txt``: look
    up the zone's TXT record for ``{reason}``/``{txt}``. ``ipv6``: look up IPv6 clients.
    Raises :class:`ZoneError` (a ValueError) for values it cannot use."""

    zone: str
    type: str = "block"
    action: str = "reject_rcpt"
    codes: Sequence[str] = ()
    message: str = DEFAULT_MESSAGE
    use_txt: bool = True
    ipv6: bool = True
    _codes: tuple[Code, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", check_zone(self.zone))
        if self.type not in TYPES:
            raise ZoneError("type", f"{self.type!r} is not one of {', '.join(TYPES)}")
        if self.action not in ACTIONS:
            raise ZoneError("action", f"{self.action!r} is not one of {', '.join(ACTIONS)}")
        if isinstance(self.codes, str):
            object.__setattr__(self, "codes", (self.codes,))
        object.__setattr__(self, "codes", tuple(self.codes))
        parsed = []
        for text in self.codes:
            try:
                parsed.append(parse_code(text))
            except ValueError as exc:
                raise ZoneError("codes", str(exc)) from None
        if not parsed:
            parsed = list(_ANY_ALLOW if self.type == "allow" else _ANY)
        object.__setattr__(self, "_codes", tuple(parsed))
        try:
            check_message(self.message)
        except ValueError as exc:
            raise ZoneError("message", str(exc)) from None

    @property
    def allow(self) -> bool:
        return self.type == "allow"

    def counts(self, answer: ipaddress.IPv4Address) -> bool:
        """Whether ``answer`` (a valid listing code) is one of the codes that count."""
        return any(code.matches(answer) for code in self._codes)

    @property
    def wants_txt(self) -> bool:
        """Whether a listing needs the TXT record: a block list whose reply shows it."""
        if self.allow or self.action == "header" or not self.use_txt:
            return False
        fields = {name for _, name, _, _ in string.Formatter().parse(self.message) if name}
        return bool(fields & {"reason", "txt"})


def check_zone(name: object) -> str:
    """A zone name, lower case without the final dot; ZoneError if it is not one."""
    if not isinstance(name, str):
        raise ZoneError("zone", f"expected a DNS zone name, got {name!r}")
    zone = name.strip().lower().rstrip(".")
    if not zone:
        raise ZoneError("zone", "empty zone name")
    if not all(_LABEL.fullmatch(label) for label in zone.split(".")):
        raise ZoneError("zone", f"{name!r} is not a DNS zone name")
    if len(zone) > 189:  # room for an IPv6 address in nibble form (64) in 253
        raise ZoneError("zone", f"{name!r} is too long for IPv6 lookups")
    return zone


def check_message(template: str) -> None:
    """ValueError unless ``template`` is a reply text with known placeholders only."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("expected a non-empty reply text")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template)]
        for name in fields:
            if name is not None and name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                shown = "{" + name + "}"
                raise ValueError(f"unknown placeholder {shown} (known: {known})")
        template.format(**dict.fromkeys(PLACEHOLDERS, "x"))
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"bad reply text {template!r}: {exc}") from None


def zone_from_section(section: PolicySection) -> Zone:
    """One ``[[dnsbl]]`` table -> :class:`Zone` (PolicyConfigError naming the key)."""
    reader = SectionReader(section)
    name = reader.string("zone")
    kind = reader.choice("type", TYPES, "block")
    codes = reader.strings("codes")
    ipv6 = reader.boolean("ipv6", True)
    extra: dict[str, Any] = {}
    if kind == "block":
        extra["action"] = reader.choice("action", ACTIONS, "reject_rcpt")
        extra["message"] = reader.string("message", DEFAULT_MESSAGE)
        extra["use_txt"] = reader.boolean("use_txt", True)
    else:
        for key in ("action", "message", "use_txt"):
            if key in section.values:
                raise reader.error(
                    key,
                    'is for block lists; an allow list (type = "allow") '
                    "only allow-lists the clients it lists",
                )
    reader.done()
    if name is None:
        raise reader.error(
            None, 'missing key "zone" (the list\'s DNS zone, e.g. "zen.spamhaus.org")'
        )
    try:
        return Zone(name, type=kind, codes=codes, ipv6=ipv6, **extra)
    except ZoneError as exc:
        raise reader.error(exc.key, exc.problem) from None


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listing:
    """What one zone said about the client. ``status``: "listed" (an answer that counts),
    "clear" (no answer, or only codes that do not count), "error" (no usable answer: the
    mail goes through) or "skipped" (an IPv6 client and ``ipv6 = false``)."""

    zone: Zone
    status: str
    answers: tuple[str, ...] = ()
    #: The TXT record of a listing (when asked for), or what went wrong.
    reason: str = ""

    @property
    def listed(self) -> bool:
        return self.status == "listed"


@dataclass(eq=False)
class Lookups:
    """This plugin's state for one connection, in ``session.notes["dnsbl"]``. Once
    :attr:`done`, :attr:`listings` has one :class:`Listing` per zone, in zone order."""

    #: The session's peer_host the lookups are for.
    ip: str
    #: The address looked up (an IPv4-mapped IPv6 address as IPv4), for replies and logs.
    address: str = ""
    task: asyncio.Future[list[Listing]] | None = None
    listings: list[Listing] = field(default_factory=list)
    done: bool = False
    allow_checked: bool = False
    annotated: bool = False
    skip_logged: bool = False


# --- the plugin ------------------------------------------------------------------------------


class DNSBL(LazyResolver):
    """DNS block and allow lists: ``server.add_plugin(DNSBL([Zone("bl.example")]))``.

    ``zones``: :class:`Zone` objects or zone names (block lists with the defaults: refused
    at RCPT). ``resolver``: a :class:`mailgate.dns.Resolver` (default: one of its own, from
    /etc/resolv.conf). ``relay_networks``: clients never looked up (default loopback, as
    the server's setting). ``header``: the header field name of the ``header`` action."""

    name = "dnsbl"

    def __init__(
        self,
        zones: Iterable[Zone | str],
        *,
        resolver: Resolver | None = None,
        relay_networks: Iterable[Network | str] = LOOPBACK,
        header: str = DEFAULT_HEADER,
    ) -> None:
        self.zones = tuple(z if isinstance(z, Zone) else Zone(z) for z in zones)
        if not self.zones:
            raise ValueError("DNSBL needs at least one zone")
        if not header or any(c in header for c in ": \r\n\t") or not header.isascii():
            raise ValueError(f"bad header field name {header!r}")
        self.header = header
        self.relay_networks = tuple(
            n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False)
            for n in relay_networks
        )
        self._resolver = resolver
        self._tasks: set[asyncio.Task[list[Listing]]] = set()
        # Allow lists and reject_connect lists must be known before the banner; the
        # others may still be on their way while the client says EHLO and MAIL.
        self._at_connect = any(z.allow or z.action == "reject_connect" for z in self.zones)
        # A message step makes the server spool every message: only when a header is due.
        self.stages = frozenset({"connect", "rcpt", "close"}) | (
            {"message"} if any(z.action == "header" for z in self.zones) else set()
        )

    @classmethod
    def from_sections(cls, sections: Iterable[PolicySection], env: PolicyEnv) -> DNSBL | None:
        """The plugin for the ``[[dnsbl]]`` tables and the ``dnsbl_zones`` setting (each
        of those a block list with the defaults, unless a table names the same zone);
        None when neither names a zone."""
        zones = [zone_from_section(section) for section in sections]
        named = {zone.zone for zone in zones}
        for name in env.options.dnsbl_zones:
            try:
                zone = Zone(name)
            except ZoneError as exc:
                raise PolicyConfigError(f"setting dnsbl_zones: {exc.problem}") from None
            if zone.zone not in named:
                named.add(zone.zone)
                zones.append(zone)
        if not zones:
            return None
        return cls(zones, resolver=env.resolver, relay_networks=env.options.relay_networks)

    # --- stages ------------------------------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        state = self._current(session)
        if state is None or not self._at_connect:
            return
        await self._wait(state)
        if self._check_allow(session, state):
            return
        for listing in state.listings:
            if (
                listing.listed
                and not listing.zone.allow
                and listing.zone.action == "reject_connect"
            ):
                raise self._refuse(session, state, listing, "connect")

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        state = self._current(session)
        if state is None:
            return
        await self._wait(state)
        if self._check_allow(session, state):  # a new client address (XCLIENT)
            return
        for listing in state.listings:
            # reject_connect lists land here only when the address changed after connect
            if listing.listed and not listing.zone.allow and listing.zone.action != "header":
                raise self._refuse(
                    session,
                    state,
                    listing,
                    "rcpt",
                    sender=str(envelope.mail_from) if envelope.mail_from is not None else "",
                    recipient=str(address),
                )

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        state = self._current(session)
        if state is None:
            return
        await self._wait(state)
        if self._check_allow(session, state):
            return
        if not state.annotated:
            state.annotated = True
            for listing in state.listings:
                if listing.listed and not listing.zone.allow and listing.zone.action == "header":
                    result = ",".join(listing.answers)
                    annotate(
                        session,
                        self.name,
                        self.header,
                        f"zone={listing.zone.zone}; ip={state.address}; result={result}",
                    )
                    decide(
                        session,
                        POLICY,
                        "annotate",
                        f"{state.address} in {listing.zone.zone} ({result}): header {self.header}",
                        zone=listing.zone.zone,
                        answers=listing.answers,
                    )
        await write_annotations(session, message, self.name)

    async def on_close(self, session: Session) -> None:
        state = session.notes.get(NOTE)
        if isinstance(state, Lookups) and state.task is not None and not state.task.done():
            state.task.cancel()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    # --- lookups -------------------------------------------------------------------------------

    def _current(self, session: Session) -> Lookups | None:
        """This connection's lookups, started now if need be; None when the client is
        exempt (allow-listed, authenticated, ours) or has no IP address."""
        state = session.notes.get(NOTE)
        if not isinstance(state, Lookups) or state.ip != session.peer_host:
            if isinstance(state, Lookups) and state.task is not None:
                state.task.cancel()  # the address changed (XCLIENT): ask again
            state = Lookups(session.peer_host)
            session.notes[NOTE] = state
        why = exempt(session, self.relay_networks)
        if why is None and state.task is None:
            address = _client_address(session.peer_host)
            if address is None:
                why = "the client address is not an IP address"
            else:
                state.address = str(address)
                known = self._known_clear(address)
                if known is not None:  # all answered from the cache: no task to run
                    state.task = _done_task(self._finish(session, state, address, known))
                else:
                    state.task = asyncio.get_running_loop().create_task(
                        self._lookup_all(session, state, address)
                    )
                    self._tasks.add(state.task)
                    state.task.add_done_callback(self._tasks.discard)
        if why is not None:
            if not state.skip_logged:
                state.skip_logged = True
                decide(session, POLICY, "skip", why, level=logging.DEBUG)
            return None
        return state

    async def _wait(self, state: Lookups) -> None:
        assert state.task is not None
        if not state.done:
            # shield: a stage that times out must not cancel lookups the next one needs
            await asyncio.shield(state.task)

    async def _lookup_all(
        self,
        session: Session,
        state: Lookups,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ) -> list[Listing]:
        listings = list(await asyncio.gather(*(self._lookup(z, address) for z in self.zones)))
        return self._finish(session, state, address, listings)

    def _known_clear(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> list[Listing] | None:
        """Every zone's verdict when the resolver's cache says the client is in none of
        them (the common case for a busy server); None when any zone must be asked."""
        listings = []
        for zone in self.zones:
            if address.version == 6 and not zone.ipv6:
                listings.append(Listing(zone, "skipped"))
                continue
            if self.resolver.cached(dnsbl_name(str(address), zone.zone), "A") != []:
                return None
            listings.append(Listing(zone, "clear"))
        return listings

    def _finish(
        self,
        session: Session,
        state: Lookups,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        listings: list[Listing],
    ) -> list[Listing]:
        for listing in listings:
            if listing.status == "error":
                decide(
                    session,
                    POLICY,
                    "error",
                    f"{address} in {listing.zone.zone}: {listing.reason}; not used",
                    level=logging.WARNING,
                    zone=listing.zone.zone,
                    answers=listing.answers,
                )
        if not any(listing.listed or listing.status == "error" for listing in listings):
            ignored = [f"{x.zone.zone} ({','.join(x.answers)})" for x in listings if x.answers]
            why = f"{address} not listed in {', '.join(z.zone for z in self.zones)}"
            if ignored:
                why += f"; codes that do not count from {', '.join(ignored)}"
            decide(session, POLICY, "accept", why, level=logging.DEBUG)
        state.listings = listings
        state.done = True
        return listings

    async def _lookup(
        self, zone: Zone, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> Listing:
        """One zone's verdict; never raises (a failed lookup is an "error" listing)."""
        if address.version == 6 and not zone.ipv6:
            return Listing(zone, "skipped")
        name = dnsbl_name(str(address), zone.zone)
        try:
            answers = tuple(await self.resolver.a(name))
        except DNSTempError as exc:
            return Listing(zone, "error", reason=f"lookup failed: {exc}")
        except Exception as exc:  # fail open on anything: a DNS list never blocks mail by mistake
            log.debug("dnsbl lookup of %s failed", name, exc_info=True)
            return Listing(zone, "error", reason=f"lookup failed: {type(exc).__name__}: {exc}")
        if not answers:
            return Listing(zone, "clear")
        codes = []
        for answer in answers:
            code = _listing_code(answer)
            if code is None:
                return Listing(zone, "error", answers, reason=f"answer {answer} is not a listing")
            codes.append(code)
        if not any(zone.counts(code) for code in codes):
            return Listing(zone, "clear", answers)
        reason = ""
        if zone.wants_txt:
            try:
                reason = _clean_reason(" ".join(await self.resolver.txt(name)))
            except Exception as exc:  # the reason is a nicety: refuse without it
                log.debug("dnsbl TXT lookup of %s failed: %s", name, exc)
        return Listing(zone, "listed", answers, reason)

    # --- decisions ---------------------------------------------------------------------------

    def _check_allow(self, session: Session, state: Lookups) -> bool:
        """Apply the allow lists (once per client address); True when the client is
        allow-listed now (by one of them or by anyone else)."""
        if not state.allow_checked:
            state.allow_checked = True
            for listing in state.listings:
                if listing.listed and listing.zone.allow:
                    why = f"dnswl {listing.zone.zone}"
                    mark_allowlisted(session, why)
                    decide(
                        session,
                        POLICY,
                        "accept",
                        f"{state.address} in allow list {listing.zone.zone} "
                        f"({','.join(listing.answers)}): allow-listed",
                        zone=listing.zone.zone,
                        answers=listing.answers,
                    )
                    break
        return allowlisted(session) is not None

    def _refuse(
        self, session: Session, state: Lookups, listing: Listing, stage: str, **fields: Any
    ) -> Reject:
        zone = listing.zone
        result = ",".join(listing.answers)
        txt = listing.reason if zone.use_txt else ""
        text = zone.message.format(
            ip=state.address,
            zone=zone.zone,
            reason=f"; {txt}" if txt else "",
            txt=txt,
            result=result,
        )
        where = f" for {fields['recipient']}" if "recipient" in fields else " at connect"
        decide(
            session,
            POLICY,
            "reject",
            f"{state.address} in {zone.zone} ({result}){where}",
            zone=zone.zone,
            answers=listing.answers,
            **fields,
        )
        if stage == "connect":
            return Reject(554, text)  # the banner: the client may only QUIT
        return Reject(554, text, enhanced="5.7.1")


def _done_task(result: list[Listing]) -> asyncio.Future[list[Listing]]:
    """A finished future holding ``result``, where the plugin keeps a lookup task."""
    future: asyncio.Future[list[Listing]] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _client_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _listing_code(answer: str) -> ipaddress.IPv4Address | None:
    """The answer as an address when it is a listing (inside 127.0.0.0/8, outside the
    127.255.255.0/24 error range), else None."""
    try:
        code = ipaddress.IPv4Address(answer.strip())
    except ValueError:
        return None
    if code not in _LOOPBACK_NET or code in _ERROR_NET:
        return None
    return code


def _clean_reason(text: str) -> str:
    """A TXT record fit for one reply line: printable ASCII, spaces collapsed, capped."""
    printable = "".join(c if " " <= c <= "~" else " " for c in text)
    cleaned = " ".join(printable.split())
    return cleaned if len(cleaned) <= MAX_REASON else cleaned[: MAX_REASON - 3] + "..."


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    """[DNSBL] when the configuration has ``[[dnsbl]]`` tables or ``dnsbl_zones``."""
    plugin = DNSBL.from_sections(env.sections("dnsbl"), env)
    return [plugin] if plugin is not None else []


__all__ = [
    "ACTIONS",
    "DEFAULT_HEADER",
    "DEFAULT_MESSAGE",
    "DNSBL",
    "Code",
    "Listing",
    "Lookups",
    "Zone",
    "ZoneError",
    "check_message",
    "parse_code",
    "plugins_from_options",
    "zone_from_section",
]
