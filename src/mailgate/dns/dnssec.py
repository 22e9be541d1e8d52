"""DNS answers with their DNSSEC status, for DANE (RFC 7672) and REQUIRETLS (RFC 8689).

DANE may only trust TLSA and MX records that DNSSEC proves, so every answer here comes
with a :class:`Security`: ``SECURE`` (proven, or proven not to exist), ``INSECURE`` (no
proof is possible: an unsigned zone, or a name outside every trust anchor) or ``BOGUS``
(signed, but the proof fails: forged, expired, broken).

Two ways to know, chosen by the ``dnssec`` setting:

``resolver``
    The configured name servers validate, and their AD bit is believed (RFC 6840 5.7:
    the question sets AD to ask for it). A validating resolver answers SERVFAIL for bogus
    data, which is a :class:`~mailgate.dns.DNSTempError` here. Only sensible when the path
    to the resolver is trusted (loopback, or a resolver on the same host).
``local``
    mailgate validates with dnspython (``dns.dnssec.validate``) from its own trust
    anchors (DS or DNSKEY records, the root's by default): the RRSIGs of the answer, the
    zone's DNSKEY set, the DS records in the parent, up to an anchor. Questions carry CD
    so that a validating resolver passes bogus data on instead of hiding it. Denials are
    proven with NSEC (RFC 4035 5.4) or NSEC3 (RFC 5155 8, opt-out included; more than
    ``MAX_NSEC3_ITERATIONS`` hash iterations count as insecure, as RFC 9276 allows).

Answers, keys and proofs are cached for their TTL (capped).
"""

from __future__ import annotations

import base64
import enum
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    # dnspython still supports DSA (a dead DNSSEC algorithm), which cryptography warns
    # about on import: not a message for mailgate's users, who cannot do anything about it.
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import dns.dnssec

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.DS
import dns.rrset

from . import MAX_CACHE_TTL, NEGATIVE_TTL, DNSTempError, NameServer, parse_nameserver

__all__ = [
    "DNSSEC_MODES",
    "ROOT_TRUST_ANCHOR",
    "DNSSECMode",
    "DNSSECResolver",
    "Security",
    "Validated",
    "parse_trust_anchor",
]

DNSSECMode = Literal["off", "resolver", "local"]
DNSSEC_MODES: tuple[str, ...] = ("off", "resolver", "local")

#: The root zone's key-signing key KSK-2017 (tag 20326) as a DS record, as IANA
#: publishes it (https://data.iana.org/root-anchors/root-anchors.xml).
ROOT_TRUST_ANCHOR: Final = (
    ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D"
)

#: NSEC3 records with more hash iterations than this make an answer insecure (RFC 9276 3.2).
MAX_NSEC3_ITERATIONS = 150
#: Delegations and CNAMEs followed for one answer, at most.
_MAX_DEPTH = 16
_CACHE_SIZE = 4096


class Security(enum.Enum):
    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"


@dataclass(frozen=True, slots=True)
class Validated:
    """The answer to one question: ``records`` as text (empty when the name or type
    does not exist), and how far DNSSEC vouches for it. ``reason`` says why an answer is
    not secure. ``nsec_types``: for a proven "no such type", the types the NSEC record
    lists at the name (tells a zone cut without DS from an ordinary name)."""

    name: str
    rdtype: str
    records: tuple[str, ...]
    security: Security
    reason: str = ""
    nsec_types: frozenset[int] = field(default_factory=frozenset)

    @property
    def secure(self) -> bool:
        return self.security is Security.SECURE


@dataclass(frozen=True, slots=True)
class _Anchor:
    name: dns.name.Name
    rdata: dns.rdtypes.ANY.DS.DS | dns.rdtypes.ANY.DNSKEY.DNSKEY


def parse_trust_anchor(text: str) -> _Anchor:
    """A trust anchor in zone-file syntax: ``NAME [TTL] [IN] DS ...`` or ``... DNSKEY ...``
    (the name absolute). Raises ValueError with a one-line reason."""
    words = text.split()
    if len(words) < 3:
        raise ValueError(f"trust anchor {text!r} is not 'NAME IN DS ...' or 'NAME IN DNSKEY ...'")
    name_text, rest = words[0], words[1:]
    if rest and rest[0].isdigit():
        rest = rest[1:]  # a TTL means nothing for an anchor
    if rest and rest[0].upper() == "IN":
        rest = rest[1:]
    if not rest or rest[0].upper() not in ("DS", "DNSKEY"):
        raise ValueError(f"trust anchor {text!r} must be a DS or DNSKEY record")
    try:
        name = dns.name.from_text(name_text)
        rdata = dns.rdata.from_text(dns.rdataclass.IN, rest[0].upper(), " ".join(rest[1:]))
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"trust anchor {text!r}: {exc}") from None
    assert isinstance(rdata, dns.rdtypes.ANY.DS.DS | dns.rdtypes.ANY.DNSKEY.DNSKEY)
    return _Anchor(name, rdata)


@dataclass(frozen=True, slots=True)
class _Keys:
    """A zone's DNSKEY set once judged: the set when SECURE, else None."""

    security: Security
    keys: dns.rrset.RRset | None
    reason: str = ""


class DNSSECResolver:
    """Questions with their DNSSEC status; see the module docstring. One per event loop."""

    def __init__(
        self,
        nameservers: Sequence[str] | Sequence[NameServer] = (),
        *,
        mode: Literal["resolver", "local"] = "resolver",
        trust_anchors: Iterable[str] = (ROOT_TRUST_ANCHOR,),
        timeout: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        servers = [s if isinstance(s, NameServer) else parse_nameserver(s) for s in nameservers]
        if not servers:
            servers = _system_nameservers()
        self.nameservers = tuple(servers)
        self.mode = mode
        self.timeout = timeout
        self._clock = clock
        self._anchors: dict[dns.name.Name, list[_Anchor]] = {}
        for text in trust_anchors:
            anchor = parse_trust_anchor(text)
            self._anchors.setdefault(anchor.name, []).append(anchor)
        if mode == "local" and not self._anchors:
            raise ValueError("local DNSSEC validation needs at least one trust anchor")
        self._responses: OrderedDict[tuple[dns.name.Name, int], tuple[float, Any]] = OrderedDict()
        self._keys: dict[dns.name.Name, tuple[float, _Keys]] = {}
        self._results: OrderedDict[tuple[dns.name.Name, int], tuple[float, Validated]] = (
            OrderedDict()
        )
        self.queries = 0

    # --- the public question --------------------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> Validated:
        """``rdtype`` records of ``name`` with their DNSSEC status. Raises
        :class:`~mailgate.dns.DNSTempError` when no final answer came (timeout,
        SERVFAIL: for a validating resolver also what it found bogus)."""
        qname = dns.name.from_text(name.rstrip(".") + ".")
        qtype = dns.rdatatype.from_text(rdtype)
        key = (qname, qtype)
        now = time.monotonic()
        cached = self._results.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.mode == "resolver":
            result = await self._by_ad_bit(qname, qtype)
        else:
            result = await self._validated(qname, qtype, 0)
        # A verdict lasts as long as the answer it was made from (and the signatures were
        # checked as valid now; a TTL far shorter than their lifetime keeps that true).
        expires = self._responses.get(key, (now, None))[0]
        if expires > now:
            self._results[key] = (expires, result)
            while len(self._results) > _CACHE_SIZE:
                self._results.popitem(last=False)
        return result

    # --- resolver mode --------------------------------------------------------------------

    async def _by_ad_bit(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Validated:
        response = await self._fetch(qname, qtype)
        records, _ = _answer_records(response, qname, qtype)
        secure = bool(response.flags & dns.flags.AD)
        return Validated(
            _text_name(qname),
            dns.rdatatype.to_text(qtype),
            tuple(r.to_text() for r in records),
            Security.SECURE if secure else Security.INSECURE,
            "" if secure else "the resolver did not set the AD bit",
        )

    # --- local validation -----------------------------------------------------------------

    async def _validated(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, depth: int
    ) -> Validated:
        tname, ttype = _text_name(qname), dns.rdatatype.to_text(qtype)
        if depth > _MAX_DEPTH:
            return Validated(tname, ttype, (), Security.BOGUS, "too many delegations or CNAMEs")
        response = await self._fetch(qname, qtype)
        if self._anchor_above(qname) is None:
            records, _ = _answer_records(response, qname, qtype)
            return Validated(
                tname,
                ttype,
                tuple(r.to_text() for r in records),
                Security.INSECURE,
                "no trust anchor covers the name",
            )
        answer = response.get_rrset(response.answer, qname, dns.rdataclass.IN, qtype)
        if answer is not None:
            security, reason = await self._verify(answer, response, depth)
            return Validated(tname, ttype, tuple(r.to_text() for r in answer), security, reason)
        cname = response.get_rrset(response.answer, qname, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is not None and qtype != dns.rdatatype.CNAME:
            security, reason = await self._verify(cname, response, depth)
            target = await self._validated(cname[0].target, qtype, depth + 1)
            if security is Security.SECURE:
                return Validated(
                    tname, ttype, target.records, target.security, target.reason, target.nsec_types
                )
            worst = security if security is Security.BOGUS else target.security
            if target.security is Security.BOGUS:
                worst = Security.BOGUS
            return Validated(tname, ttype, target.records, worst, reason or target.reason)
        return await self._denial(qname, qtype, response, depth)

    async def _verify(
        self, rrset: dns.rrset.RRset, response: Any, depth: int
    ) -> tuple[Security, str]:
        """The status of ``rrset`` from the RRSIGs next to it in ``response``."""
        section = response.answer if rrset in response.answer else response.authority
        sigs = response.get_rrset(
            section, rrset.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype
        )
        if sigs is None or len(sigs) == 0:
            return await self._unsigned(rrset.name, depth)
        signer = sigs[0].signer
        if not rrset.name.is_subdomain(signer):
            return Security.BOGUS, f"{_text_name(rrset.name)} is signed by {signer}, not a parent"
        keys = await self._zone_keys(signer, depth + 1)
        if keys.security is not Security.SECURE or keys.keys is None:
            return keys.security, keys.reason
        try:
            dns.dnssec.validate(rrset, sigs, {signer: keys.keys}, now=self._clock())
        except dns.exception.ValidationFailure as exc:
            name, kind = _text_name(rrset.name), dns.rdatatype.to_text(rrset.rdtype)
            return Security.BOGUS, f"the signature of {name} {kind} does not verify ({exc})"
        return Security.SECURE, ""

    async def _zone_keys(self, zone: dns.name.Name, depth: int) -> _Keys:
        """The DNSKEY set of ``zone``, proven from an anchor or the parent's DS."""
        cached = self._keys.get(zone)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        keys, ttl = await self._judge_keys(zone, depth)
        self._keys[zone] = (now + min(ttl, MAX_CACHE_TTL), keys)
        return keys

    async def _judge_keys(self, zone: dns.name.Name, depth: int) -> tuple[_Keys, float]:
        zname = _text_name(zone) or "."
        if depth > _MAX_DEPTH:
            return _Keys(Security.BOGUS, None, "too many delegations"), NEGATIVE_TTL
        anchors = self._anchors.get(zone)
        parent_ds: list[dns.rdtypes.ANY.DS.DS] = []
        if anchors is None:
            if self._anchor_above(zone) is None:
                return _Keys(Security.INSECURE, None, "no trust anchor"), NEGATIVE_TTL
            ds = await self._validated(zone, dns.rdatatype.DS, depth + 1)
            if ds.security is not Security.SECURE:
                return _Keys(ds.security, None, ds.reason), NEGATIVE_TTL
            if not ds.records:
                return _Keys(Security.INSECURE, None, f"{zname} has no DS (unsigned)"), NEGATIVE_TTL
            for text in ds.records:
                rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DS, text)
                assert isinstance(rdata, dns.rdtypes.ANY.DS.DS)
                parent_ds.append(rdata)
        response = await self._fetch(zone, dns.rdatatype.DNSKEY)
        dnskeys = response.get_rrset(response.answer, zone, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
        sigs = response.get_rrset(
            response.answer, zone, dns.rdataclass.IN, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY
        )
        if dnskeys is None or sigs is None:
            return _Keys(Security.BOGUS, None, f"{zname} has no signed DNSKEY set"), NEGATIVE_TTL
        wanted_ds = parent_ds + [a.rdata for a in anchors or () if _is_ds(a.rdata)]
        wanted_keys = [a.rdata for a in anchors or () if not _is_ds(a.rdata)]
        trusted = [
            key
            for key in dnskeys
            if key in wanted_keys or any(_ds_matches(zone, key, ds) for ds in wanted_ds)
        ]
        if not trusted:
            return _Keys(Security.BOGUS, None, f"no DNSKEY of {zname} matches its DS"), NEGATIVE_TTL
        anchor_set = dns.rrset.from_rdata_list(zone, dnskeys.ttl, trusted)
        try:
            dns.dnssec.validate(dnskeys, sigs, {zone: anchor_set}, now=self._clock())
        except dns.exception.ValidationFailure as exc:
            reason = f"the DNSKEY set of {zname} does not verify ({exc})"
            return _Keys(Security.BOGUS, None, reason), NEGATIVE_TTL
        return _Keys(Security.SECURE, dnskeys), float(dnskeys.ttl)

    async def _unsigned(self, name: dns.name.Name, depth: int) -> tuple[Security, str]:
        """An answer without signatures below a trust anchor: insecure only when a zone
        cut on the way down is proven to have no DS (RFC 4035 5.2); otherwise bogus."""
        anchor = self._anchor_above(name)
        if anchor is None:
            return Security.INSECURE, "no trust anchor covers the name"
        labels = name.relativize(anchor).labels if name != anchor else ()
        candidate = anchor
        for label in reversed(labels):
            candidate = dns.name.Name((label, *candidate.labels))
            ds = await self._validated(candidate, dns.rdatatype.DS, depth + 1)
            if ds.security is not Security.SECURE:
                return ds.security, ds.reason
            if not ds.records and dns.rdatatype.NS in ds.nsec_types:
                return Security.INSECURE, f"{_text_name(candidate)} is an unsigned delegation"
        return Security.BOGUS, f"no signature for {_text_name(name)} in a signed zone"

    async def _denial(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, response: Any, depth: int
    ) -> Validated:
        """No records: proven by NSEC (secure), provably unsigned (insecure), or bogus."""
        tname, ttype = _text_name(qname), dns.rdatatype.to_text(qtype)
        nsecs = [r for r in response.authority if r.rdtype == dns.rdatatype.NSEC]
        nsec3s = [r for r in response.authority if r.rdtype == dns.rdatatype.NSEC3]
        if nsec3s and not nsecs:
            for nsec3 in nsec3s:
                security, reason = await self._verify(nsec3, response, depth)
                if security is not Security.SECURE:
                    return Validated(tname, ttype, (), security, reason)
            security, reason, types = _nsec3_denial(qname, qtype, response.rcode(), nsec3s)
            return Validated(tname, ttype, (), security, reason, types)
        if not nsecs:
            security, reason = await self._unsigned(qname, depth)
            if security is Security.SECURE:  # pragma: no cover - _unsigned never says so
                security = Security.BOGUS
            return Validated(tname, ttype, (), security, reason or "no NSEC proof")
        for nsec in nsecs:
            security, reason = await self._verify(nsec, response, depth)
            if security is not Security.SECURE:
                return Validated(tname, ttype, (), security, reason)
        if response.rcode() == dns.rcode.NOERROR:
            for nsec in nsecs:
                if nsec.name == qname:
                    types = _nsec_types(nsec[0])
                    if qtype in types or dns.rdatatype.CNAME in types:
                        break
                    return Validated(tname, ttype, (), Security.SECURE, nsec_types=types)
            # An empty non-terminal: an NSEC covers the name and leads to a name below it.
            if any(_covers(n, qname) and n[0].next.is_subdomain(qname) for n in nsecs):
                return Validated(tname, ttype, (), Security.SECURE)
            return Validated(
                tname, ttype, (), Security.BOGUS, "the NSEC records do not prove no data"
            )
        covering = [n for n in nsecs if _covers(n, qname)]
        if covering:
            encloser = _closest_encloser(qname, covering[0])
            wildcard = dns.name.Name((b"*", *encloser.labels))
            if any(_covers(n, wildcard) for n in nsecs):
                return Validated(tname, ttype, (), Security.SECURE)
        return Validated(tname, ttype, (), Security.BOGUS, "the NSEC records do not prove no name")

    def _anchor_above(self, name: dns.name.Name) -> dns.name.Name | None:
        """The closest trust anchor at or above ``name``."""
        best: dns.name.Name | None = None
        for anchor in self._anchors:
            if name.is_subdomain(anchor) and (best is None or len(anchor) > len(best)):
                best = anchor
        return best

    # --- asking ---------------------------------------------------------------------------

    async def _fetch(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Any:
        key = (qname, qtype)
        cached = self._responses.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            self._responses.move_to_end(key)
            return cached[1]
        query = dns.message.make_query(qname, qtype, want_dnssec=True, payload=4096)
        if self.mode == "local":
            query.flags |= dns.flags.CD  # bogus data is ours to see, not the resolver's to hide
        else:
            query.flags |= dns.flags.AD
        response = await self._ask(query, qname, qtype)
        ttl = _response_ttl(response)
        if ttl > 0:
            self._responses[key] = (now + ttl, response)
            while len(self._responses) > _CACHE_SIZE:
                self._responses.popitem(last=False)
        return response

    async def _ask(self, query: Any, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Any:
        what = f"{_text_name(qname)} {dns.rdatatype.to_text(qtype)}"
        problem = "no name server"
        for server in self.nameservers:
            self.queries += 1
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    query, server.host, timeout=self.timeout, port=server.port
                )
            except (dns.exception.DNSException, OSError) as exc:
                problem = str(exc) or type(exc).__name__
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            problem = f"{server.host} answered {dns.rcode.to_text(rcode)}"
        raise DNSTempError(f"{what}: {problem}")


# --- helpers ------------------------------------------------------------------------------


def _system_nameservers() -> list[NameServer]:
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.read_resolv_conf("/etc/resolv.conf")
    return [parse_nameserver(str(s)) for s in resolver.nameservers]


def _text_name(name: dns.name.Name) -> str:
    return str(name.to_text(omit_final_dot=True))


def _answer_records(
    response: Any, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
) -> tuple[list[Any], int]:
    """The ``qtype`` records for ``qname`` in the answer, following CNAMEs in it."""
    name = qname
    for _ in range(_MAX_DEPTH):
        rrset = response.get_rrset(response.answer, name, dns.rdataclass.IN, qtype)
        if rrset is not None:
            return list(rrset), rrset.ttl
        cname = response.get_rrset(response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        name = cname[0].target
    return [], 0


def _response_ttl(response: Any) -> float:
    ttls = [rrset.ttl for section in (response.answer, response.authority) for rrset in section]
    if not ttls:
        return NEGATIVE_TTL if response.rcode() == dns.rcode.NXDOMAIN else 0.0
    return float(min(min(ttls), MAX_CACHE_TTL))


def _is_ds(rdata: Any) -> bool:
    return bool(rdata.rdtype == dns.rdatatype.DS)


def _ds_matches(zone: dns.name.Name, key: Any, ds: Any) -> bool:
    try:
        made = dns.dnssec.make_ds(zone, key, ds.digest_type)
    except (dns.exception.UnsupportedAlgorithm, ValueError):
        return False
    return bool(made.key_tag == ds.key_tag and made.digest == ds.digest)


def _nsec_types(nsec: Any) -> frozenset[int]:
    types: set[int] = set()
    for window, bitmap in nsec.windows:
        for index, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    types.add(window * 256 + index * 8 + bit)
    return frozenset(types)


def _covers(nsec: dns.rrset.RRset, name: dns.name.Name) -> bool:
    """``name`` falls strictly between the NSEC's owner and its next name (canonical
    order, RFC 4034 6.1; the last NSEC of a zone wraps around to the apex)."""
    owner, following = nsec.name, nsec[0].next
    if owner < following:
        return bool(owner < name < following)
    return bool(name > owner or name < following)


def _nsec3_denial(
    qname: dns.name.Name,
    qtype: dns.rdatatype.RdataType,
    rcode: int,
    nsec3s: list[dns.rrset.RRset],
) -> tuple[Security, str, frozenset[int]]:
    """RFC 5155 8.4-8.7 with NSEC3 records already verified: a proven absence (SECURE,
    with the types at the name for "no data"), an opt-out span that may hold an unsigned
    delegation (INSECURE), or no proof (BOGUS)."""
    first = nsec3s[0][0]
    params = (first.algorithm, first.salt, first.iterations)
    if any((r[0].algorithm, r[0].salt, r[0].iterations) != params for r in nsec3s):
        return Security.BOGUS, "NSEC3 records with different parameters", frozenset()
    if first.algorithm != 1:
        return Security.INSECURE, "an NSEC3 hash algorithm mailgate does not know", frozenset()
    if first.iterations > MAX_NSEC3_ITERATIONS:
        return Security.INSECURE, f"NSEC3 with {first.iterations} iterations", frozenset()
    zone = nsec3s[0].name.parent()
    spans = []
    for rrset in nsec3s:
        try:
            owner = base64.b32hexdecode(rrset.name.labels[0].upper())
        except ValueError:
            return Security.BOGUS, "an NSEC3 owner that is not a hash", frozenset()
        spans.append((owner, rrset[0]))

    def hashed(name: dns.name.Name) -> bytes:
        return base64.b32hexdecode(dns.dnssec.nsec3_hash(name, first.salt, first.iterations, 1))

    def matching(name: dns.name.Name) -> Any:
        digest = hashed(name)
        return next((rdata for owner, rdata in spans if owner == digest), None)

    def covering(name: dns.name.Name) -> Any:
        digest = hashed(name)
        for owner, rdata in spans:
            following = rdata.next
            inside = (
                owner < digest < following
                if owner < following
                else (digest > owner or digest < following)
            )
            if inside:
                return rdata
        return None

    if rcode == dns.rcode.NOERROR:
        exact = matching(qname)
        if exact is not None:
            types = _nsec_types(exact)
            if qtype in types or dns.rdatatype.CNAME in types:
                return Security.BOGUS, "the NSEC3 record lists the type asked for", frozenset()
            return Security.SECURE, "", types
    # The closest encloser proof: the longest existing ancestor, and a cover of the name
    # one label below it (the "next closer" name).
    if not qname.is_subdomain(zone):
        return Security.BOGUS, "NSEC3 records of another zone", frozenset()
    encloser, next_closer = None, qname
    candidate = qname
    while candidate != zone and len(candidate) > 1:
        parent = candidate.parent()
        if matching(parent) is not None:
            encloser, next_closer = parent, candidate
            break
        candidate = parent
    if encloser is None:
        return Security.BOGUS, "no NSEC3 closest encloser proof", frozenset()
    cover = covering(next_closer)
    if cover is None:
        return Security.BOGUS, "no NSEC3 record covers the next closer name", frozenset()
    if cover.flags & 1:  # opt-out: an unsigned delegation may lie in the span
        return Security.INSECURE, "in an NSEC3 opt-out span (an unsigned delegation)", frozenset()
    if rcode == dns.rcode.NOERROR:
        return Security.BOGUS, "the NSEC3 records do not prove no data", frozenset()
    if covering(dns.name.Name((b"*", *encloser.labels))) is None:
        return Security.BOGUS, "no NSEC3 record denies the wildcard", frozenset()
    return Security.SECURE, "", frozenset()


def _closest_encloser(qname: dns.name.Name, nsec: dns.rrset.RRset) -> dns.name.Name:
    """The longest ancestor of ``qname`` that exists, as an NSEC covering it shows."""
    best = dns.name.root
    for known in (nsec.name, nsec[0].next):
        _, _, common = qname.fullcompare(known)
        if common > len(best):
            best = dns.name.Name(qname.labels[-common:])
    return best
