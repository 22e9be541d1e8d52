"""The TLS policy of a delivery: what each host's TLS must be, decided per destination.

A *level* is what the configuration says, with Postfix's meanings
(``smtp_tls_security_level``):

``none``     never STARTTLS.
``may``      STARTTLS when offered; plain text when it is not, or when the handshake
             fails (that host then gets plain text for ``tls_fallback_time``). MTA-STS
             applies when the domain publishes a policy (unless ``mta_sts`` is off).
``encrypt``  TLS or no delivery; the certificate is not checked (Postfix's ``encrypt``).
``verify``   TLS with a certificate that chains to a trusted CA (``tls_cafile`` or the
             system's) and names the host connected to (the MX host name, or the
             smarthost's); otherwise the host is skipped and the mail deferred, never sent
             in plain text.
``dane``     DANE (RFC 7672) where the destination has usable TLSA records; filled in
             by a :class:`DANEProvider`. Without one (or without usable records) it is
             ``may`` (MTA-STS included), as Postfix's ``dane`` is without DNSSEC.
``dane-only`` DANE or no delivery: a destination without usable TLSA records (or
             without DNSSEC) is deferred, as with Postfix's ``dane-only``.
``mta-sts``  MTA-STS (RFC 8461) even when ``mta_sts`` is off; ``may`` where the
             domain publishes no policy.

The level of a destination comes from, first to last: the route (``tls`` on a
``[[routes]]`` table, or ``?tls=``/``?starttls=`` in a forward URL), the domain
(``[outbound.tls_policies]``), the default (``[outbound] tls_policy``). It then
*resolves* to a :class:`DestinationPolicy`: one :class:`TLSRequirement` per MX host
(what the session enforces: a *mode* none/may/encrypt/verify and a
:class:`CertificateMatcher` that judges the server's certificate after the handshake)
and, for MTA-STS, the MX host names allowed. DANE and MTA-STS produce the same values,
so the session knows nothing of where a requirement came from except for the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from mailgate.smtpclient.target import TLS_LEVELS as _URL_TLS_LEVELS

from .tlscheck import chain_problem, trust_store_for

log = logging.getLogger("mailgate.queue.outbound")

#: A policy warning about one thing (a host, a domain) is logged once in this long: a
#: busy destination in MTA-STS ``testing`` mode would otherwise log on every delivery.
WARNING_INTERVAL = 3600.0
_warned: dict[str, float] = {}


def warn_once(key: str, message: str, *args: object) -> None:
    """``log.warning(message, *args)`` unless the same ``key`` was warned of within
    :data:`WARNING_INTERVAL` (at most 10,000 keys are remembered)."""
    now = time.monotonic()
    last = _warned.get(key)
    if last is not None and now - last < WARNING_INTERVAL:
        return
    if len(_warned) >= 10_000:
        _warned.clear()
    _warned[key] = now
    log.warning(message, *args)


#: What a configuration may say.
TLSLevel = Literal["none", "may", "encrypt", "verify", "dane", "dane-only", "mta-sts"]
TLS_LEVELS: tuple[str, ...] = get_args(TLSLevel)
assert TLS_LEVELS == _URL_TLS_LEVELS, "the URL grammar and the policy know the same levels"
#: What a session enforces.
TLSMode = Literal["none", "may", "encrypt", "verify"]
#: Where the level or the requirement came from (logged with every attempt).
PolicySource = Literal["default", "domain", "route", "url", "mta-sts", "dane"]
#: How a certificate was found good.
VerifyMethod = Literal["ca", "dane", "mta-sts"]


@dataclass(frozen=True, slots=True)
class CertificateCheck:
    """The verdict on a server's certificate: ``method`` says how it was verified
    (None when it was not), ``detail`` why it was not (or what matched)."""

    verified: bool
    method: VerifyMethod | None
    detail: str = ""


class CertificateMatcher(Protocol):
    """Judges the certificate chain a server sent (DER, leaf first) for ``host`` (the
    name connected to), after the handshake. Implementations are frozen dataclasses,
    so two requirements compare equal when they check the same way (a cached session
    is reused only under an equal requirement)."""

    async def check(self, chain: Sequence[bytes], host: str) -> CertificateCheck: ...


@dataclass(frozen=True, slots=True)
class CAMatcher:
    """The chain leads to a CA of ``cafile`` (PEM; None: the system's) and the leaf
    names ``host`` (subjectAltName, a wildcard covering one label included).
    ``method`` is what a success is reported as: ``ca``, or ``mta-sts`` when an
    MTA-STS policy is why it is checked."""

    cafile: str | None = None
    method: VerifyMethod = "ca"

    async def check(self, chain: Sequence[bytes], host: str) -> CertificateCheck:
        store = await trust_store_for(self.cafile)
        problem = chain_problem(list(chain), host, store)
        if problem is None:
            return CertificateCheck(True, self.method, f"trusted certificate for {host}")
        return CertificateCheck(False, None, problem)


@dataclass(frozen=True, slots=True)
class TLSRequirement:
    """What one host's session must have.

    ``mode``: ``none`` (no STARTTLS), ``may`` (TLS when it works), ``encrypt`` (TLS or
    nothing), ``verify`` (TLS and ``matcher`` says yes, or nothing). ``matcher`` judges
    the certificate in every mode (for the log when it is not required). ``level`` and
    ``source`` are the policy that applied and where it came from, for the log;
    ``reason`` says more (``MTA-STS policy 2024a of example.com (enforce)``).
    ``report_only``: a failed check is logged as a policy failure but the mail still
    goes (MTA-STS ``testing``)."""

    mode: TLSMode
    level: TLSLevel
    source: PolicySource
    matcher: CertificateMatcher = field(default_factory=CAMatcher)
    reason: str = ""
    report_only: bool = False

    @property
    def encryption_required(self) -> bool:
        return self.mode in ("encrypt", "verify")

    @property
    def verification_required(self) -> bool:
        return self.mode == "verify"

    @property
    def label(self) -> str:
        """``verify (route)``, ``mta-sts enforce (mta-sts)``: how logs name it."""
        return f"{self.level} ({self.source})"


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """The requirements for the hosts of one destination.

    ``default`` applies to every host not in ``hosts`` (lower-case names; DANE has a
    requirement per MX host). ``mx_patterns`` (MTA-STS): the MX host names allowed
    (``mail.example.com`` or ``*.example.com``, one label); None: all. With
    ``enforce_mx`` off (MTA-STS ``testing``) a host outside the patterns is still
    used, and the mismatch logged."""

    default: TLSRequirement
    hosts: Mapping[str, TLSRequirement] = field(default_factory=dict)
    mx_patterns: tuple[str, ...] | None = None
    enforce_mx: bool = True

    def for_host(self, name: str) -> TLSRequirement | None:
        """The requirement for MX host ``name``; None: the policy rules it out."""
        key = name.lower().rstrip(".")
        if self.mx_patterns is not None and not any(
            mx_matches(pattern, key) for pattern in self.mx_patterns
        ):
            if self.enforce_mx:
                return None
            warn_once(
                f"mx:{key}:{self.default.reason}",
                "MX host %s is not in the %s (%s); used anyway",
                name,
                self.default.reason or "TLS policy",
                ", ".join(self.mx_patterns),
            )
        return self.hosts.get(key, self.default)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``mx.example.com`` matches itself; ``*.example.com`` matches one
    more label (``a.example.com``, not ``example.com`` nor ``a.b.example.com``)."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def base_requirement(
    level: TLSLevel, source: PolicySource, cafile: str | None, reason: str = ""
) -> TLSRequirement:
    """The requirement of a level without DANE or MTA-STS (``dane`` and ``mta-sts``
    without a usable policy are ``may``, keeping their name for the log)."""
    mode: TLSMode = "may"
    if level in ("none", "may", "encrypt", "verify"):
        mode = level
    return TLSRequirement(mode, level, source, CAMatcher(cafile), reason)


@dataclass(frozen=True, slots=True)
class RefusingMatcher:
    """Finds no certificate good: for a host that must not get the mail now (its TLSA
    lookup was bogus, ``dane-only`` without DANE). ``reason`` is the verdict."""

    reason: str

    async def check(self, chain: Sequence[bytes], host: str) -> CertificateCheck:
        return CertificateCheck(False, None, self.reason)


def refusing_requirement(fallback: TLSRequirement, reason: str) -> TLSRequirement:
    """A ``verify`` requirement no server meets (a smarthost that must not be used)."""
    return TLSRequirement(
        "verify", fallback.level, fallback.source, RefusingMatcher(reason), reason
    )


def _refused(fallback: TLSRequirement, reason: str) -> DestinationPolicy:
    """A policy that rules out every MX host (none is even connected to)."""
    return DestinationPolicy(refusing_requirement(fallback, reason), mx_patterns=())


class DANEProvider(Protocol):
    """What the ``dane`` level asks (implemented by the DANE module). Each method
    answers None when DANE does not apply (no DNSSEC-validated answer, no usable TLSA
    records): the caller then goes on to MTA-STS and ``may``."""

    async def destination_policy(
        self, domain: str, hosts: Sequence[str], port: int, fallback: TLSRequirement
    ) -> DestinationPolicy | None:
        """The policy for the MX hosts ``hosts`` (names, best first) of ``domain``:
        typically ``hosts`` maps each host with usable TLSA records to a ``verify``
        requirement whose matcher checks them (``source`` ``dane``, method ``dane``),
        and ``default`` is ``fallback`` (or a ``verify``/``encrypt`` requirement when
        RFC 7672 says hosts without TLSA must not get plain text)."""
        ...

    async def host_requirement(
        self, host: str, port: int, fallback: TLSRequirement
    ) -> TLSRequirement | None:
        """The requirement for a smarthost ``host`` (a forward route with ``tls = "dane"``)."""
        ...


class MTASTSProvider(Protocol):
    """What resolving a level asks of MTA-STS (implemented by :mod:`.mtasts`)."""

    async def destination_policy(
        self, domain: str, fallback: TLSRequirement
    ) -> DestinationPolicy | None:
        """The policy of ``domain`` (cached, fetched when needed); None: it has none in
        force (or ``none`` mode), ``fallback`` applies."""
        ...


class PolicyResolver:
    """Turns a destination's configured level into its :class:`DestinationPolicy`.

    ``domains``: ``[outbound.tls_policies]``, domain -> level (``.example.com``: every
    subdomain of it). ``mta_sts``: consulted under ``may`` when ``mta_sts_default`` is
    on, under ``mta-sts`` and ``dane`` (after DANE) always. ``dane``: consulted under
    ``dane``; without one, ``dane`` is ``may`` and says so in the log (once per domain).
    """

    def __init__(
        self,
        *,
        default: TLSLevel,
        domains: Mapping[str, TLSLevel],
        cafile: str | None,
        mta_sts: MTASTSProvider | None = None,
        mta_sts_default: bool = True,
        dane: DANEProvider | None = None,
    ) -> None:
        self.default = default
        self.domains = {name.lower().rstrip("."): level for name, level in domains.items()}
        self.cafile = cafile
        self.mta_sts = mta_sts
        self.mta_sts_default = mta_sts_default
        self.dane = dane

    def level_for(
        self, domain: str | None, route: TLSLevel | None
    ) -> tuple[TLSLevel, PolicySource]:
        """The level for a destination and where it came from: the route's, else the
        domain's (``domain`` itself, then ``.parent`` entries nearest first), else the
        default."""
        if route is not None:
            return route, "route"
        if domain:
            name = domain.lower().rstrip(".")
            if name in self.domains:
                return self.domains[name], "domain"
            labels = name.split(".")
            for start in range(1, len(labels)):
                parent = "." + ".".join(labels[start:])
                if parent in self.domains:
                    return self.domains[parent], "domain"
        return self.default, "default"

    async def relay_policy(
        self, domain: str, hosts: Sequence[str], port: int, level: TLSLevel, source: PolicySource
    ) -> DestinationPolicy:
        """The policy for the MX hosts ``hosts`` of ``domain`` (an address literal
        ``[192.0.2.1]`` gets the base requirement: neither DANE nor MTA-STS has a name
        to look up)."""
        fallback = base_requirement(level, source, self.cafile)
        if domain.startswith("["):
            return DestinationPolicy(fallback)
        if level in ("dane", "dane-only"):
            if self.dane is not None:
                found = await self.dane.destination_policy(domain, hosts, port, fallback)
                if found is not None:
                    return found
            else:
                self._say_no_dane(domain)
            if level == "dane-only":  # DANE or nothing: every host is ruled out
                return _refused(fallback, f"dane-only: no DANE for {domain}")
        if self.mta_sts is not None and (
            level in ("mta-sts", "dane") or (level == "may" and self.mta_sts_default)
        ):
            found = await self.mta_sts.destination_policy(domain, fallback)
            if found is not None:
                return found
        return DestinationPolicy(fallback)

    async def host_requirement(
        self, host: str, port: int, level: TLSLevel, source: PolicySource, cafile: str | None
    ) -> TLSRequirement:
        """The requirement for a smarthost (MTA-STS is about MX hosts: ``mta-sts`` is
        ``may`` here)."""
        fallback = base_requirement(level, source, cafile)
        if level in ("dane", "dane-only"):
            if self.dane is not None:
                found = await self.dane.host_requirement(host, port, fallback)
                if found is not None:
                    return found
            else:
                self._say_no_dane(host)
            if level == "dane-only":
                return refusing_requirement(fallback, f"dane-only: no DANE for {host}")
        return fallback

    def _say_no_dane(self, name: str) -> None:
        warn_once(
            f"no-dane:{name}",
            "TLS policy dane for %s: DANE is not available (no DNSSEC-validating "
            "resolver configured); using may, as Postfix does without DNSSEC",
            name,
        )


__all__ = [
    "TLS_LEVELS",
    "CAMatcher",
    "CertificateCheck",
    "CertificateMatcher",
    "DANEProvider",
    "DestinationPolicy",
    "MTASTSProvider",
    "PolicyResolver",
    "PolicySource",
    "RefusingMatcher",
    "TLSLevel",
    "TLSMode",
    "TLSRequirement",
    "VerifyMethod",
    "base_requirement",
    "mx_matches",
    "refusing_requirement",
]
