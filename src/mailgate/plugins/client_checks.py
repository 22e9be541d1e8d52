"""Client checks: reverse DNS, forward-confirmed reverse DNS, the HELO name and the
sender's domain (Postfix's ``reject_unknown_reverse_client_hostname``,
``reject_unknown_client_hostname``, ``reject_invalid_helo_hostname``,
``reject_non_fqdn_helo_hostname`` and ``reject_unknown_sender_domain``).

Each check has an action: ``off``, ``annotate`` (a header on the message, nothing
refused), ``tempfail`` (4xx) or ``reject`` (5xx). Clients that are allow-listed,
authenticated or in ``relay_networks`` are not checked.

Where things happen:

* the PTR lookup (and the forward lookups of FCrDNS) starts at ``connect`` in a
  background task, so the banner is not delayed; it is awaited at the first RCPT;
* the client-level checks (reverse DNS, FCrDNS, the three HELO checks) refuse at
  **RCPT**, as Postfix does with ``smtpd_delay_reject``: by then the client may have
  authenticated (a laptop's ``EHLO DESKTOP-4`` must not stop its owner from sending),
  and the log line names the sender and the recipient;
* the sender domain is checked at **MAIL**.

A DNS failure that may be temporary (timeout, SERVFAIL) never gives a 5xx: a check whose
action is ``reject`` or ``tempfail`` answers ``451 4.4.3`` instead, one whose action is
``annotate`` lets the mail through with a ``...=temperror`` header.

What was found is left in ``session.notes`` for other plugins (see ``NOTE_*``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mailgate.dns import DNSTempError, Resolver
from mailgate.hooks import Address, Envelope, Message, Reject, Session, TempFail
from mailgate.plugins.policy import (
    ANNOTATIONS,
    IPAddress,
    LazyResolver,
    PolicyEnv,
    SectionReader,
    annotate,
    client_address,
    decide,
    exempt,
    write_annotations,
)
from mailgate.server.options import LOOPBACK, Network, PolicySection

log = logging.getLogger("mailgate.policy")

NAME = "client-checks"
HEADER = "X-Mailgate-Client-Check"

#: What a check may do when it fails.
ACTIONS = ("off", "annotate", "tempfail", "reject")
#: The checks, in the order they are evaluated (and reported).
CHECKS = (
    "reverse_dns",
    "forward_confirmed",
    "helo_syntax",
    "helo_is_us",
    "helo_fqdn",
    "sender_domain",
)
#: The actions when a ``[client_checks]`` table does not name them. A plugin made in code
#: has every check off unless it is named.
TABLE_DEFAULTS: dict[str, str] = {
    "reverse_dns": "tempfail",
    "forward_confirmed": "annotate",
    "helo_syntax": "reject",
    "helo_is_us": "reject",
    "helo_fqdn": "off",
    "sender_domain": "reject",
}
_REVERSE_CHECKS = ("reverse_dns", "forward_confirmed")
_HELO_CHECKS = ("helo_syntax", "helo_is_us", "helo_fqdn")
_CLIENT_CHECKS = _REVERSE_CHECKS + _HELO_CHECKS

#: How many PTR names are tried for FCrDNS (Postfix tries all, most MTAs have one).
MAX_PTR_NAMES = 10

#: session.notes keys this plugin fills in once the PTR lookup is done.
NOTE_PTR = "client.ptr"  # the first PTR name of the client, or None
NOTE_PTR_NAMES = "client.ptr_names"  # every PTR name looked at (at most MAX_PTR_NAMES)
NOTE_PTR_RESULT = "client.ptr_result"  # "pass" | "none" | "temperror"
NOTE_FCRDNS = "client.fcrdns"  # True | False | None (undetermined); FCrDNS checks only
NOTE_HOSTNAME = "client.hostname"  # the forward-confirmed name, or None; FCrDNS checks only

_TEMP_CODE, _TEMP_STATUS = 451, "4.4.3"
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


# --- the HELO name -------------------------------------------------------------------------


def helo_kind(name: str) -> str:
    """What a HELO/EHLO argument is: ``"hostname"`` (a syntactically valid host name),
    ``"literal"`` (``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``), ``"address"`` (a bare IP
    address: not valid in RFC 5321, which wants brackets) or ``"invalid"``.

    Host names are checked as Postfix does: labels of letters, digits, ``-`` and ``_``
    (Windows machines use it), at most 63 octets each, 253 in all, not starting or ending
    with ``-``, a last label that is not all digits; one final dot is tolerated;
    internationalised names are checked in their A-label form."""
    if name.startswith("[") and name.endswith("]"):
        return "literal" if literal_address(name) is not None else "invalid"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return "address"
    return "hostname" if _valid_hostname(name) else "invalid"


def literal_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), or
    None when ``name`` is not one."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:  # a zone index is not part of the RFC 5321 syntax
                return None
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def _valid_hostname(name: str) -> bool:
    text = name[:-1] if name.endswith(".") else name
    if not text:
        return False
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    if len(text) > 253:
        return False
    labels = text.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def _domain_key(name: str) -> str:
    """Lower case, no final dot, A-label form: how names are compared."""
    text = name.strip().rstrip(".").lower()
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text


def _ip(text: str | None) -> IPAddress | None:
    """An address, IPv4-mapped IPv6 addresses as IPv4; None when ``text`` is none."""
    return client_address(text) if text else None


def _printable(text: str, limit: int = 100) -> str:
    """``text`` safe for a reply line, a header or a log: printable ASCII, bounded."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReverseResult:
    """What the reverse lookups of one client address found."""

    ip: str
    #: PTR names (at most MAX_PTR_NAMES, lower case, without the final dot).
    names: tuple[str, ...]
    #: "pass" (has a PTR), "none" (none) or "temperror".
    ptr: str
    #: "pass", "fail", "temperror", or "skipped" (FCrDNS not asked for).
    fcrdns: str
    #: The first PTR name that resolves back to ``ip``.
    hostname: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed check: what the log and the header say, and the reply it gives when its
    action is ``reject`` (``tempfail`` makes that a 450 with the same status detail; a
    ``temperror`` result is always ``451 4.4.3``)."""

    check: str
    result: str  # none, fail, invalid, notfound, nullmx, temperror
    detail: str
    code: int
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return self.result == "temperror"

    def refusal(self, action: str) -> Reject | TempFail | None:
        if action not in ("reject", "tempfail"):
            return None
        if self.temporary:
            return TempFail(_TEMP_CODE, self.text, enhanced=_TEMP_STATUS)
        if action == "reject":
            return Reject(self.code, self.text, enhanced=self.enhanced)
        return TempFail(450, self.text, enhanced="4" + self.enhanced[1:])

    def header_value(self) -> str:
        return _printable(f"{self.check}={self.result}; {self.detail}", 300)


class _State:
    """Per-connection state, in ``session.notes[NAME]``."""

    __slots__ = ("logged", "reverse", "task", "task_ip")

    def __init__(self) -> None:
        self.task: asyncio.Task[ReverseResult] | None = None
        self.task_ip: str | None = None
        self.reverse: ReverseResult | None = None
        self.logged: set[tuple[Any, ...]] = set()


# --- the plugin ----------------------------------------------------------------------------


class ClientChecks(LazyResolver):
    """Reverse DNS, FCrDNS, HELO and sender-domain checks; each check's action is one of
    ``off``, ``annotate``, ``tempfail``, ``reject`` (all ``off`` unless given).

    ``hostname`` and ``local_domains`` are what ``helo_is_us`` compares the HELO name
    with (besides the server address the client connected to); clients in
    ``relay_networks``, authenticated or allow-listed ones are not checked. Without a
    ``resolver`` the plugin makes its own (from /etc/resolv.conf) when it first needs one.
    """

    name = NAME

    def __init__(
        self,
        *,
        reverse_dns: str = "off",
        forward_confirmed: str = "off",
        helo_syntax: str = "off",
        helo_is_us: str = "off",
        helo_fqdn: str = "off",
        sender_domain: str = "off",
        resolver: Resolver | None = None,
        hostname: str | None = None,
        local_domains: Iterable[str] = (),
        relay_networks: Iterable[Network | str] = LOOPBACK,
    ) -> None:
        given = {
            "reverse_dns": reverse_dns,
            "forward_confirmed": forward_confirmed,
            "helo_syntax": helo_syntax,
            "helo_is_us": helo_is_us,
            "helo_fqdn": helo_fqdn,
            "sender_domain": sender_domain,
        }
        self.actions: dict[str, str] = {}
        for check, action in given.items():
            if not isinstance(action, str) or action.strip().lower() not in ACTIONS:
                raise ValueError(f"{check}: {action!r} is not one of {', '.join(ACTIONS)}")
            self.actions[check] = action.strip().lower()
        self._resolver = resolver
        self.hostname = hostname
        self.our_names = frozenset(
            _domain_key(n) for n in (hostname or "", *local_domains) if n and "*" not in n
        )
        self.relay_networks = tuple(
            ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
            for n in relay_networks
        )
        self._tasks: set[asyncio.Task[ReverseResult]] = set()
        # A message step makes the server spool every message: only when a header is due.
        self.stages = frozenset({"connect", "mail", "rcpt", "close"}) | (
            {"message"} if "annotate" in self.actions.values() else set()
        )

    @classmethod
    def from_section(cls, section: PolicySection, env: PolicyEnv) -> ClientChecks:
        """The plugin for a ``[client_checks]`` table (defaults: :data:`TABLE_DEFAULTS`)."""
        reader = SectionReader(section)
        actions = {check: reader.choice(check, ACTIONS, TABLE_DEFAULTS[check]) for check in CHECKS}
        reader.done()
        needs_dns = any(actions[c] != "off" for c in (*_REVERSE_CHECKS, "sender_domain"))
        options = env.options
        return cls(
            reverse_dns=actions["reverse_dns"],
            forward_confirmed=actions["forward_confirmed"],
            helo_syntax=actions["helo_syntax"],
            helo_is_us=actions["helo_is_us"],
            helo_fqdn=actions["helo_fqdn"],
            sender_domain=actions["sender_domain"],
            resolver=env.resolver if needs_dns else None,
            hostname=options.hostname,
            local_domains=options.local_domains,
            relay_networks=options.relay_networks,
        )

    # --- what is switched on ------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return any(action != "off" for action in self.actions.values())

    def _on(self, checks: Iterable[str]) -> bool:
        return any(self.actions[c] != "off" for c in checks)

    # --- stages ------------------------------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        """Start the reverse lookups now, so they run while the client says HELO."""
        if not self._on(_REVERSE_CHECKS) or exempt(session, self.relay_networks):
            return
        ip = _ip(session.peer_host)
        if ip is not None:
            self._start(self._state(session), str(ip))

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        if self.actions["sender_domain"] == "off":
            return
        why = exempt(session, self.relay_networks)
        if why is not None:
            self._skip(session, why)
            return
        domain = address.domain
        failures: list[tuple[str, Failure]] = []
        if not address or not domain:
            passed = "null sender: no domain to check"
        elif domain.startswith("["):
            passed = f"{_printable(domain)}: an address literal, no domain to check"
        else:
            passed = f"{_printable(domain)} resolves"
            failure = await self._check_sender_domain(str(address), domain)
            if failure is not None:
                failures.append((self.actions["sender_domain"], failure))
        self._settle(
            session,
            ("sender_domain",),
            failures,
            key=("sender", _domain_key(domain)),
            passed=passed,
            sender=str(address),
        )

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        if not self._on(_CLIENT_CHECKS):
            return
        why = exempt(session, self.relay_networks)
        if why is not None:
            self._skip(session, why)
            return
        failures: list[tuple[str, Failure]] = []
        if self._on(_REVERSE_CHECKS):
            result = await self._reverse(session)
            if result is not None:
                failures.extend(self._reverse_failures(result))
        helo = session.helo
        if helo and self._on(_HELO_CHECKS):
            failures.extend(self._helo_failures(session, helo))
        self._settle(
            session,
            _CLIENT_CHECKS,
            failures,
            key=("client", session.peer_host, helo),
            passed=f"{session.peer_host} HELO {_printable(helo or '')}: client checks passed",
            sender=envelope.sender,
            rcpt=str(address),
        )

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        await write_annotations(session, message, NAME)

    async def on_close(self, session: Session) -> None:
        state = session.notes.get(NAME)
        if isinstance(state, _State) and state.task is not None:
            state.task.cancel()
            state.task = None

    async def aclose(self) -> None:
        """Cancel lookups still running (connections the server dropped without close)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- reverse DNS ---------------------------------------------------------------------------

    def _state(self, session: Session) -> _State:
        state = session.notes.get(NAME)
        if not isinstance(state, _State):
            state = session.notes[NAME] = _State()
        return state

    def _start(self, state: _State, ip: str) -> asyncio.Task[ReverseResult]:
        if state.task is not None:
            if state.task_ip == ip:
                return state.task
            state.task.cancel()  # the client address changed (XCLIENT)
        task = asyncio.get_running_loop().create_task(self._lookup_reverse(ip))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        state.task, state.task_ip = task, ip
        return task

    def _task_done(self, task: asyncio.Task[ReverseResult]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: _lookup_reverse returns errors as results

    async def _reverse(self, session: Session) -> ReverseResult | None:
        """The reverse lookups for the client's current address (started at connect, or
        now), or None when the client address is not an IP address."""
        ip = _ip(session.peer_host)
        if ip is None:
            return None
        state = self._state(session)
        if state.reverse is not None and state.reverse.ip == str(ip):
            return state.reverse
        task = self._start(state, str(ip))
        # shield: a hook timeout gives up waiting, it does not cancel the lookup.
        result = await asyncio.shield(task)
        state.reverse, state.task = result, None
        self._note(session, result)
        return result

    def _note(self, session: Session, result: ReverseResult) -> None:
        notes = session.notes
        notes[NOTE_PTR] = result.names[0] if result.names else None
        notes[NOTE_PTR_NAMES] = result.names
        notes[NOTE_PTR_RESULT] = result.ptr
        if result.fcrdns != "skipped":
            notes[NOTE_FCRDNS] = {"pass": True, "fail": False}.get(result.fcrdns)
            notes[NOTE_HOSTNAME] = result.hostname

    async def _lookup_reverse(self, ip: str) -> ReverseResult:
        try:
            return await self._reverse_lookups(ip)
        except DNSTempError as exc:
            return ReverseResult(ip, (), "temperror", "temperror", error=str(exc))
        except Exception as exc:  # never let a lookup's bug escape the task
            log.exception("client-checks: reverse lookup of %s failed", ip)
            return ReverseResult(ip, (), "temperror", "temperror", error=repr(exc))

    async def _reverse_lookups(self, ip: str) -> ReverseResult:
        resolver = self.resolver
        names: list[str] = []
        for raw in await resolver.ptr(ip):
            name = raw.strip().rstrip(".").lower()
            if name and name not in names:
                names.append(name)
            if len(names) >= MAX_PTR_NAMES:
                break
        checked = self.actions["forward_confirmed"] != "off"
        if not names:
            return ReverseResult(ip, (), "none", "fail" if checked else "skipped")
        if not checked:
            return ReverseResult(ip, tuple(names), "pass", "skipped")
        address = ipaddress.ip_address(ip)
        rdtype = "A" if address.version == 4 else "AAAA"
        answers = await asyncio.gather(
            *(resolver.query(name, rdtype) for name in names), return_exceptions=True
        )
        errors: list[str] = []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                errors.append(str(answer))
                continue
            if any(_ip(text) == address for text in answer):
                return ReverseResult(ip, tuple(names), "pass", "pass", hostname=name)
        if errors:
            return ReverseResult(ip, tuple(names), "pass", "temperror", error=errors[0])
        return ReverseResult(ip, tuple(names), "pass", "fail")

    def _reverse_failures(self, result: ReverseResult) -> list[tuple[str, Failure]]:
        ip = result.ip
        temp_text = f"Temporary DNS failure looking up your hostname [{ip}], try again later"
        out: list[tuple[str, Failure]] = []
        action = self.actions["reverse_dns"]
        if action != "off" and result.ptr != "pass":
            if result.ptr == "temperror":
                detail = f"PTR lookup for {ip} failed: {_printable(result.error or '', 120)}"
                failure = Failure("reverse_dns", "temperror", detail, 451, "4.4.3", temp_text)
            else:
                text = f"Client host rejected: cannot find your reverse hostname, [{ip}]"
                failure = Failure(
                    "reverse_dns", "none", f"no PTR record for {ip}", 550, "5.7.25", text
                )
            out.append((action, failure))
        action = self.actions["forward_confirmed"]
        if action != "off" and result.fcrdns in ("fail", "temperror"):
            if result.fcrdns == "temperror":
                detail = f"lookups for {ip} failed: {_printable(result.error or '', 120)}"
                failure = Failure("forward_confirmed", "temperror", detail, 451, "4.4.3", temp_text)
            else:
                if result.names:
                    shown = ", ".join(result.names[:3]) + (", ..." if len(result.names) > 3 else "")
                    detail = f"PTR {shown} does not resolve back to {ip}"
                else:
                    detail = f"no PTR record for {ip}"
                text = f"Client host rejected: cannot find your hostname, [{ip}]"
                failure = Failure("forward_confirmed", "fail", detail, 550, "5.7.25", text)
            out.append((action, failure))
        return out

    # --- HELO ----------------------------------------------------------------------------------

    def _helo_failures(self, session: Session, helo: str) -> list[tuple[str, Failure]]:
        kind = helo_kind(helo)
        shown = _printable(helo, 64)
        out: list[tuple[str, Failure]] = []
        action = self.actions["helo_syntax"]
        if action != "off" and kind not in ("hostname", "literal"):
            detail = (
                f"HELO {shown} is a bare IP address (an address literal is [{shown}])"
                if kind == "address"
                else f"HELO {shown} is not a valid hostname or address literal"
            )
            text = f"<{shown}>: Helo command rejected: Invalid name"
            out.append((action, Failure("helo_syntax", "invalid", detail, 501, "5.5.2", text)))
        action = self.actions["helo_is_us"]
        if action != "off":
            what = self._claims_us(session, helo, kind)
            if what is not None:
                detail = f"HELO {shown} is {what}"
                text = f"<{shown}>: Helo command rejected: that is {what}"
                out.append((action, Failure("helo_is_us", "fail", detail, 550, "5.7.1", text)))
        action = self.actions["helo_fqdn"]
        if action != "off" and kind != "literal" and "." not in helo.strip(".").strip():
            detail = f"HELO {shown} is not a fully-qualified hostname"
            text = f"<{shown}>: Helo command rejected: need fully-qualified hostname"
            out.append((action, Failure("helo_fqdn", "fail", detail, 504, "5.5.2", text)))
        return out

    def _claims_us(self, session: Session, helo: str, kind: str) -> str | None:
        """ "my own name" / "my own address" when the HELO names this server, else None."""
        if kind in ("literal", "address"):
            claimed = literal_address(helo) if kind == "literal" else _ip(helo)
            if isinstance(claimed, ipaddress.IPv6Address) and claimed.ipv4_mapped is not None:
                claimed = claimed.ipv4_mapped
            ours = _ip(session.local_host)
            return "my own address" if claimed is not None and claimed == ours else None
        return "my own name" if _domain_key(helo) in self.our_names else None

    # --- sender domain -------------------------------------------------------------------------

    async def _check_sender_domain(self, sender: str, domain: str) -> Failure | None:
        """None when ``domain`` has an MX, A or AAAA record, else why not."""
        shown = _printable(sender, 200)
        name = _domain_key(domain)
        resolver = self.resolver
        errors: list[str] = []
        try:
            mx = await resolver.mx(name)
        except DNSTempError as exc:
            mx, errors = [], [str(exc)]
        if mx:
            if all(host in (".", "") for _, host in mx):  # RFC 7505 null MX
                detail = f"{_printable(domain)} has a null MX (accepts no mail)"
                text = f"<{shown}>: Sender address rejected: Domain does not accept mail"
                return Failure("sender_domain", "nullmx", detail, 550, "5.7.27", text)
            return None
        answers = await asyncio.gather(
            resolver.a(name), resolver.aaaa(name), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                errors.append(str(answer))
            elif answer:
                return None
        if errors:
            detail = f"lookup of {_printable(domain)} failed: {_printable(errors[0], 120)}"
            text = (
                f"<{shown}>: Sender address deferred: temporary DNS failure looking up "
                "its domain, try again later"
            )
            return Failure("sender_domain", "temperror", detail, 451, "4.4.3", text)
        detail = f"{_printable(domain)} has no MX, A or AAAA record"
        text = f"<{shown}>: Sender address rejected: Domain not found"
        return Failure("sender_domain", "notfound", detail, 550, "5.1.8", text)

    # --- deciding ------------------------------------------------------------------------------

    def _settle(
        self,
        session: Session,
        checks: tuple[str, ...],
        failures: list[tuple[str, Failure]],
        *,
        key: tuple[Any, ...],
        passed: str,
        **fields: Any,
    ) -> None:
        """Refuse with the strongest refusal among ``failures``, or else annotate the
        failures whose action is ``annotate`` (replacing what ``checks`` annotated
        before). Refusals are logged every time, the rest once per ``key``."""
        chosen: tuple[Reject | TempFail, Failure] | None = None
        for action, failure in failures:
            refusal = failure.refusal(action)
            if refusal is None:
                continue
            if chosen is None or (isinstance(refusal, Reject) and isinstance(chosen[0], TempFail)):
                chosen = (refusal, failure)
        if chosen is not None:
            refusal, failure = chosen
            verdict = "reject" if isinstance(refusal, Reject) else "tempfail"
            why = f"{failure.check}={failure.result}: {failure.detail}"
            decide(
                session, NAME, verdict, why, check=failure.check, result=failure.result, **fields
            )
            raise refusal
        noted = [failure for action, failure in failures if action == "annotate"]
        self._replace_annotations(session, checks, noted)
        state = self._state(session)
        if not noted:
            if key not in state.logged:
                state.logged.add(key)
                decide(session, NAME, "accept", passed, level=logging.DEBUG, **fields)
            return
        for failure in noted:
            once = (*key, failure.check, failure.result)
            if once in state.logged:
                continue
            state.logged.add(once)
            # "error": a lookup failed and the mail goes on (with a header saying so).
            verdict = "error" if failure.temporary else "annotate"
            why = f"{failure.check}={failure.result}: {failure.detail}"
            decide(
                session, NAME, verdict, why, check=failure.check, result=failure.result, **fields
            )

    def _replace_annotations(
        self, session: Session, checks: Iterable[str], failures: list[Failure]
    ) -> None:
        checks = set(checks)
        mine = session.notes.get(ANNOTATIONS, {}).get(NAME)
        if mine:
            mine[:] = [item for item in mine if item[1].partition("=")[0] not in checks]
        for failure in failures:
            annotate(session, NAME, HEADER, failure.header_value())

    def _skip(self, session: Session, why: str) -> None:
        self._replace_annotations(session, CHECKS, [])
        state = self._state(session)
        if ("skip", why) not in state.logged:
            state.logged.add(("skip", why))
            decide(session, NAME, "skip", why, level=logging.DEBUG)


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    """A ClientChecks for the ``[client_checks]`` table, or nothing without one."""
    section = env.section("client_checks")
    if section is None:
        return []
    plugin = ClientChecks.from_section(section, env)
    if not plugin.enabled:
        log.info("%s: every check is off", section.source)
        return []
    if env.options.lmtp:
        log.warning(
            "%s is ignored by an LMTP server: its clients are MTAs that checked already",
            section.source,
        )
        return []
    return [plugin]


__all__ = [
    "ACTIONS",
    "CHECKS",
    "HEADER",
    "MAX_PTR_NAMES",
    "NOTE_FCRDNS",
    "NOTE_HOSTNAME",
    "NOTE_PTR",
    "NOTE_PTR_NAMES",
    "NOTE_PTR_RESULT",
    "TABLE_DEFAULTS",
    "ClientChecks",
    "Failure",
    "ReverseResult",
    "helo_kind",
    "literal_address",
    "plugins_from_options",
]
