"""DANE for SMTP (RFC 7672, RFC 6698/7671): TLSA records of MX hosts, and whether the
certificate chain a server sent matches them.

DANE applies only to what DNSSEC proves (:mod:`mailgate.dns.dnssec`): the MX records
of the domain (RFC 7672 2.2.1) and then the TLSA records ``_25._tcp.<mx host>`` of each
host. What a host's TLSA lookup means for the session (:class:`DaneLevel`):

* usable records (DANE-TA(2) or DANE-EE(3), selector 0/1, matching type 0/1/2) make TLS
  and a certificate that matches one of them mandatory: no match, no delivery (deferred,
  never plain text). PKIX-TA(0)/PKIX-EE(1) are unusable in SMTP (RFC 7672 3.1.3).
* records that are all unusable still make TLS mandatory, unauthenticated (RFC 7672 2.2);
* a proven absence, or an insecure answer (an unsigned zone, a name no trust anchor
  covers, an insecure MX lookup): DANE does not apply, the policy falls back;
* a bogus answer or a failed lookup: that host is deferred (RFC 7672 2.1.1), since an
  attacker could be hiding records that would have made TLS mandatory.

Matching (RFC 7672 3.1, 3.2): DANE-EE compares the server's own certificate (selector 0)
or public key (selector 1) and checks neither names nor dates; DANE-TA finds the trust
anchor among the certificates the server sent and verifies the chain from the leaf to it,
with the MX host name as the reference identifier and the validity dates checked.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Store

from mailgate.dns import DNSTempError
from mailgate.dns.dnssec import DNSSECResolver, Security

from .tlscheck import chain_verifies
from .tlspolicy import (
    CertificateCheck,
    DestinationPolicy,
    TLSRequirement,
    refusing_requirement,
    warn_once,
)

log = logging.getLogger("mailgate.queue.outbound")

__all__ = [
    "DANE",
    "DaneLevel",
    "HostDane",
    "TLSAMatcher",
    "TLSARecord",
    "host_dane",
    "match_chain",
    "mx_security",
    "tlsa_for_certificate",
    "tlsa_name",
]

#: Certificate usages SMTP may use (RFC 7672 3.1.3): DANE-TA(2) and DANE-EE(3).
DANE_TA = 2
DANE_EE = 3


@dataclass(frozen=True, slots=True)
class TLSARecord:
    """One TLSA record (RFC 6698 2.1): usage, selector, matching type, the data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def from_text(cls, text: str) -> TLSARecord:
        """``"3 1 1 ABCD..."`` (the hex may be split by spaces, as DNS tools print it)."""
        words = text.split()
        if len(words) < 4 or not all(w.isdigit() for w in words[:3]):
            raise ValueError(f"TLSA record {text!r} is not 'USAGE SELECTOR MATCHING HEX'")
        try:
            data = bytes.fromhex("".join(words[3:]))
        except ValueError:
            raise ValueError(f"TLSA record {text!r} has no valid hex data") from None
        return cls(int(words[0]), int(words[1]), int(words[2]), data)

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 3.1.3, RFC 7671 and RFC 6698 defined values only)."""
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in (0, 1)
            and self.matching in (0, 1, 2)
            and (self.matching != 1 or len(self.data) == 32)
            and (self.matching != 2 or len(self.data) == 64)
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


class DaneLevel(enum.Enum):
    #: Usable TLSA records: TLS, and a certificate that matches one of them.
    VERIFY = "dane"
    #: TLSA records, none usable: TLS without authentication (RFC 7672 2.2).
    ENCRYPT = "encrypt"
    #: DANE does not apply to this host (no secure TLSA records).
    NONE = "none"
    #: The lookup failed or is bogus: no delivery to this host now.
    DEFER = "defer"


@dataclass(frozen=True, slots=True)
class HostDane:
    """What DANE says for one MX host: the level, the usable records, and why."""

    level: DaneLevel
    records: tuple[TLSARecord, ...] = ()
    reason: str = ""


def tlsa_name(host: str, port: int = 25) -> str:
    """The TLSA base name of an SMTP server: ``_25._tcp.mx.example.org``."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


async def mx_security(dnssec: DNSSECResolver, domain: str) -> tuple[Security, str]:
    """Whether the MX records of ``domain`` (or, without MX, its address records:
    the implicit MX) are DNSSEC-secure. A failed lookup counts as bogus (defer)."""
    try:
        answer = await dnssec.lookup(domain, "MX")
        if answer.secure and not answer.records:
            answer = await dnssec.lookup(domain, "A")
    except DNSTempError as exc:
        return Security.BOGUS, f"MX lookup failed: {exc}"
    if answer.secure:
        return Security.SECURE, ""
    what = "MX records" if answer.rdtype == "MX" else "address records"
    return answer.security, f"the {what} of {domain} are {answer.security.value}: {answer.reason}"


async def host_dane(dnssec: DNSSECResolver, host: str, port: int = 25) -> HostDane:
    """The TLSA records of ``host`` and what they mean for a session with it."""
    name = tlsa_name(host, port)
    try:
        answer = await dnssec.lookup(name, "TLSA")
    except DNSTempError as exc:
        return HostDane(DaneLevel.DEFER, reason=f"TLSA lookup failed: {exc}")
    if answer.security is Security.BOGUS:
        return HostDane(
            DaneLevel.DEFER, reason=f"TLSA records of {name} are bogus: {answer.reason}"
        )
    if answer.security is Security.INSECURE:
        return HostDane(DaneLevel.NONE, reason=f"TLSA records of {name} are insecure")
    if not answer.records:
        return HostDane(DaneLevel.NONE, reason=f"{name} has no TLSA records")
    records: list[TLSARecord] = []
    for text in answer.records:
        try:
            records.append(TLSARecord.from_text(text))
        except ValueError:
            continue  # a malformed record is an unusable one
    usable = tuple(r for r in records if r.usable)
    if not usable:
        return HostDane(DaneLevel.ENCRYPT, reason=f"no usable TLSA record at {name}")
    return HostDane(DaneLevel.VERIFY, usable)


def match_chain(
    chain: Sequence[bytes], records: Sequence[TLSARecord], names: Sequence[str]
) -> str | None:
    """Check the certificates a server sent (DER, leaf first) against usable TLSA
    ``records``; ``names`` are the reference identifiers for DANE-TA (the MX host).
    None when one record matches, else why none did (for the log and the DSN)."""
    if not chain:
        return "the server sent no certificate"
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"the server's certificate cannot be read ({exc})"
    leaf = certificates[0]
    for record in records:
        if record.usage == DANE_EE and _matches(leaf, chain[0], record):
            return None
    for record in records:
        if record.usage != DANE_TA:
            continue
        for index, certificate in enumerate(certificates[1:], start=1):
            if not _matches(certificate, chain[index], record):
                continue
            store = Store([certificate])
            if any(chain_verifies(list(chain[: index + 1]), name, store) for name in names):
                return None
            return (
                f"the chain to the DANE-TA trust anchor does not verify for {', '.join(names)} "
                "(name, dates or signatures)"
            )
    kinds = sorted({r.usage for r in records})
    if kinds == [DANE_TA]:
        return "no certificate the server sent matches a DANE-TA record"
    return "the server's certificate matches no TLSA record"


def _matches(certificate: x509.Certificate, der: bytes, record: TLSARecord) -> bool:
    if record.selector == 0:
        selected = der
    else:
        selected = certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
    if record.matching == 1:
        selected = hashlib.sha256(selected).digest()
    elif record.matching == 2:
        selected = hashlib.sha512(selected).digest()
    return selected == record.data


def tlsa_for_certificate(
    der: bytes, usage: int = DANE_EE, selector: int = 1, matching: int = 1
) -> TLSARecord:
    """The TLSA record that matches a certificate (DER): what a server's operator
    publishes (``3 1 1`` by default) and what the tests put in their zones."""
    if selector == 0:
        selected = der
    else:
        selected = (
            x509.load_der_x509_certificate(der)
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        )
    if matching == 1:
        selected = hashlib.sha256(selected).digest()
    elif matching == 2:
        selected = hashlib.sha512(selected).digest()
    return TLSARecord(usage, selector, matching, selected)


# --- the provider of the ``dane`` and ``dane-only`` levels ------------------------------------


@dataclass(frozen=True, slots=True)
class TLSAMatcher:
    """Judges a server's chain against the usable TLSA records of its host (a
    :class:`~.tlspolicy.CertificateMatcher`). ``names``: the reference identifiers for
    DANE-TA (the MX host name; the host connected to when empty)."""

    records: tuple[TLSARecord, ...]
    names: tuple[str, ...] = ()
    tlsa: str = ""

    async def check(self, chain: Sequence[bytes], host: str) -> CertificateCheck:
        problem = match_chain(chain, self.records, self.names or (host,))
        where = f" ({self.tlsa})" if self.tlsa else ""
        if problem is None:
            return CertificateCheck(True, "dane", f"a TLSA record matched{where}")
        return CertificateCheck(False, None, f"DANE: {problem}{where}")


class DANE:
    """DANE for the ``dane`` and ``dane-only`` TLS levels (a
    :class:`~.tlspolicy.DANEProvider`), over a :class:`DNSSECResolver`.

    For a relay: the MX records must be secure, then each MX host gets what its TLSA
    records say (:func:`host_dane`): a ``verify`` requirement with a :class:`TLSAMatcher`,
    ``encrypt`` when none is usable, the fallback (``may``) without records, and no
    session at all when the lookup is bogus or fails. ``None`` (DANE does not apply; MTA-STS
    or ``may`` follow) when the MX records are insecure or no host has TLSA records;
    under ``dane-only`` that is a refusal instead."""

    def __init__(self, dnssec: DNSSECResolver) -> None:
        self.dnssec = dnssec

    async def destination_policy(
        self, domain: str, hosts: Sequence[str], port: int, fallback: TLSRequirement
    ) -> DestinationPolicy | None:
        only = fallback.level == "dane-only"
        security, why = await mx_security(self.dnssec, domain)
        if security is Security.BOGUS:
            return _no_hosts(fallback, f"DANE: {why}")
        if security is Security.INSECURE:
            if only:
                return _no_hosts(fallback, f"dane-only: {why}")
            log.debug("%s: DANE does not apply: %s", domain, why)
            return None
        names = [host.lower().rstrip(".") for host in hosts]
        found = await asyncio.gather(*(host_dane(self.dnssec, name, port) for name in names))
        requirements: dict[str, TLSRequirement] = {}
        allowed: list[str] = []
        refused: list[str] = []
        for name, dane in zip(names, found, strict=True):
            requirement = _requirement(name, port, dane, fallback)
            if requirement is None:
                refused.append(f"{name}: {dane.reason}")
                continue
            if only and dane.level is DaneLevel.NONE:
                refused.append(f"{name}: dane-only, and {dane.reason}")
                continue
            allowed.append(name)
            if dane.level is not DaneLevel.NONE:
                requirements[name] = requirement
        if not requirements and not refused:
            log.debug("%s: DANE does not apply: no MX host has TLSA records", domain)
            return None  # secure MX, no TLSA anywhere: MTA-STS or may
        if refused:
            warn_once(
                f"dane-left-out:{domain}:{';'.join(refused)}",
                "%s: MX hosts left out by DANE: %s",
                domain,
                "; ".join(refused),
            )
        default = fallback
        if refused:
            default = TLSRequirement(
                fallback.mode,
                fallback.level,
                fallback.source,
                fallback.matcher,
                "DANE: " + "; ".join(refused),
            )
        return DestinationPolicy(default, requirements, mx_patterns=tuple(allowed))

    async def host_requirement(
        self, host: str, port: int, fallback: TLSRequirement
    ) -> TLSRequirement | None:
        """A smarthost (``tls = "dane"`` on a forward route): its own TLSA records."""
        name = host.lower().rstrip(".")
        dane = await host_dane(self.dnssec, name, port)
        requirement = _requirement(name, port, dane, fallback)
        if requirement is None:
            return refusing_requirement(fallback, f"DANE: {dane.reason}")
        if dane.level is DaneLevel.NONE:
            if fallback.level == "dane-only":
                return refusing_requirement(fallback, f"dane-only: {dane.reason}")
            return None
        return requirement


def _requirement(
    host: str, port: int, dane: HostDane, fallback: TLSRequirement
) -> TLSRequirement | None:
    """What ``dane`` makes of one host's session (None: no session with it)."""
    tlsa = tlsa_name(host, port)
    if dane.level is DaneLevel.VERIFY:
        return TLSRequirement(
            "verify",
            fallback.level,
            "dane",
            TLSAMatcher(dane.records, (host,), tlsa),
            f"DANE TLSA {tlsa}",
        )
    if dane.level is DaneLevel.ENCRYPT:
        return TLSRequirement("encrypt", fallback.level, "dane", fallback.matcher, dane.reason)
    if dane.level is DaneLevel.DEFER:
        return None
    return fallback


def _no_hosts(fallback: TLSRequirement, reason: str) -> DestinationPolicy:
    """Every MX host ruled out (deferred without connecting)."""
    return DestinationPolicy(refusing_requirement(fallback, reason), mx_patterns=())
