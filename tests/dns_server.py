"""A real authoritative DNS server on 127.0.0.1 for the policy tests (dnslib, UDP and TCP).

Tests add records in zone-file syntax and point mailgate at it with the setting
``dns_nameservers=[dns.address]``; nothing in mailgate's resolver is mocked.

    dns.add('''
        4.3.2.1.bl.test.       60 IN A   127.0.0.2
        mail.example.test.     60 IN TXT "v=spf1 ip4:127.0.0.1 -all"
    ''')

Records live until the server stops, so each test uses names of its own (``unique()``).
A name added with :meth:`fail` answers SERVFAIL; one added with :meth:`hang` never
answers (for timeouts).

:meth:`DNSTestServer.add_signed` serves a DNSSEC-signed zone (signed by dnspython with a
key made for the test, NSEC for denials): answers carry their RRSIGs, denials their NSEC
proofs, and ``zone.trust_anchor`` is the DS record to configure as mailgate's trust
anchor. ``broken`` names get signatures that do not verify. With ``validating=True`` the
server also plays a validating resolver: AD on good answers, SERVFAIL on broken ones
(unless the question sets CD).
"""

from __future__ import annotations

import base64
import itertools
import socket
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import dns.dnssectypes
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.NSEC3
import dns.rdtypes.util
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

with warnings.catch_warnings():
    # dnspython's DSA support makes cryptography warn on import (as in mailgate.dns.dnssec).
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import dns.dnssec

_counter = itertools.count(1)


def unique(prefix: str = "t") -> str:
    """A label no other test uses, e.g. ``t17``."""
    return f"{prefix}{next(_counter)}"


class SignedZone:
    """A zone signed for the test (ECDSA P-256, one key with the SEP flag), answering
    with RRSIGs and NSEC proofs as a DNSSEC-aware server does."""

    def __init__(
        self,
        origin: str,
        records: str,
        *,
        broken: Iterable[str] = (),
        validating: bool = False,
        stripped: Iterable[str] = (),
        nsec3: bool = False,
        opt_out: bool = False,
    ) -> None:
        self.origin = dns.name.from_text(origin.rstrip(".") + ".")
        #: Names whose records are answered without their RRSIGs (what a stripping
        #: attacker serves); their NSEC records keep theirs.
        self.stripped = {dns.name.from_text(n.rstrip(".") + ".") for n in stripped}
        soa = f"{self.origin} 60 IN SOA ns.{self.origin} hostmaster.{self.origin} 1 60 60 600 60"
        ns = f"{self.origin} 60 IN NS ns.{self.origin}"
        self.zone = dns.zone.from_text(
            "\n".join((soa, ns, *(line.strip() for line in records.splitlines()))),
            origin=self.origin,
            relativize=False,
        )
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(
            self.key.public_key(), dns.dnssectypes.Algorithm.ECDSAP256SHA256, flags=257
        )
        now = time.time()
        dns.dnssec.sign_zone(
            self.zone, keys=[(self.key, self.dnskey)], inception=now - 3600, lifetime=86400
        )
        #: NSEC3 (RFC 5155, SHA-1, no salt, no extra iterations) instead of NSEC: hash ->
        #: owner name. ``opt_out``: unsigned delegations are left out of the chain.
        self.nsec3: dict[bytes, dns.name.Name] = {}
        if nsec3:
            self._use_nsec3(now, opt_out)
        self.validating = validating
        self.broken = {dns.name.from_text(n.rstrip(".") + ".") for n in broken}
        if self.broken:
            self._break_signatures()
        ds = dns.dnssec.make_ds(self.origin, self.dnskey, "SHA256")
        #: What to give mailgate as its trust anchor for this zone.
        self.trust_anchor = f"{self.origin} IN DS {ds}"
        self.dnskey_anchor = f"{self.origin} IN DNSKEY {self.dnskey}"

    def _use_nsec3(self, now: float, opt_out: bool) -> None:
        with self.zone.writer() as txn:
            names: set[dns.name.Name] = set()
            for name in list(txn.iterate_names()):
                node = txn.get_node(name)
                assert node is not None
                for rdataset in list(node.rdatasets):
                    if rdataset.rdtype == dns.rdatatype.NSEC or (
                        rdataset.rdtype == dns.rdatatype.RRSIG
                        and rdataset.covers == dns.rdatatype.NSEC
                    ):
                        txn.delete(name, rdataset.rdtype, rdataset.covers)
                unsigned_cut = (
                    name != self.origin
                    and node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) is not None
                    and node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.DS) is None
                )
                if not (opt_out and unsigned_cut):
                    names.add(name)
                ancestor = name
                while ancestor != self.origin:  # empty non-terminals get NSEC3s too
                    ancestor = ancestor.parent()
                    names.add(ancestor)
            hashes = {_nsec3_digest(name): name for name in names}
            ordered = sorted(hashes)
            for index, digest in enumerate(ordered):
                name = hashes[digest]
                node = txn.get_node(name)
                types = [r.rdtype for r in node.rdatasets] if node is not None else []
                if types:
                    types = sorted({*types, dns.rdatatype.RRSIG})
                rdata = dns.rdtypes.ANY.NSEC3.NSEC3(
                    dns.rdataclass.IN,
                    dns.rdatatype.NSEC3,
                    1,
                    1 if opt_out else 0,
                    0,
                    b"",
                    ordered[(index + 1) % len(ordered)],
                    dns.rdtypes.util.Bitmap.from_rdtypes(types).windows,
                )
                owner = dns.name.Name(
                    (base64.b32hexencode(digest).lower().rstrip(b"="), *self.origin.labels)
                )
                rrset = dns.rrset.from_rdata(owner, 60, rdata)
                txn.add(rrset)
                sig = dns.dnssec.sign(
                    rrset, self.key, self.origin, self.dnskey, inception=now - 3600, lifetime=86400
                )
                txn.add(dns.rrset.from_rdata(owner, 60, sig))
                self.nsec3[digest] = owner

    def _nsec3_proof(self, section: list[Any], qname: dns.name.Name) -> None:
        """NSEC3 records proving ``qname`` has no such type (a match) or does not exist
        (closest encloser, next closer name, wildcard: RFC 5155 7.2)."""
        if _nsec3_digest(qname) in self.nsec3:
            self._add(section, self.nsec3[_nsec3_digest(qname)], dns.rdatatype.NSEC3)
            return
        candidate = qname
        encloser = qname.parent()
        while candidate != self.origin:
            encloser = candidate.parent()
            if _nsec3_digest(encloser) in self.nsec3:
                break
            candidate = encloser
        owners = [
            self.nsec3[_nsec3_digest(encloser)],
            self._nsec3_covering(candidate),
            self._nsec3_covering(dns.name.Name((b"*", *encloser.labels))),
        ]
        for owner in dict.fromkeys(owners):
            self._add(section, owner, dns.rdatatype.NSEC3)

    def _nsec3_covering(self, name: dns.name.Name) -> dns.name.Name:
        digest = _nsec3_digest(name)
        ordered = sorted(self.nsec3)
        before = [h for h in ordered if h < digest]
        return self.nsec3[before[-1] if before else ordered[-1]]

    def _break_signatures(self) -> None:
        with self.zone.writer() as txn:
            for name in self.broken:
                node = txn.get_node(name)
                if node is None:
                    continue
                for rdataset in list(node.rdatasets):
                    if rdataset.rdtype != dns.rdatatype.RRSIG:
                        continue
                    damaged = [
                        sig.replace(signature=bytes([sig.signature[0] ^ 0xFF]) + sig.signature[1:])
                        for sig in rdataset
                    ]
                    txn.replace(name, dns.rdataset.from_rdata_list(rdataset.ttl, damaged))

    def delegates(self, name: dns.name.Name, rdtype: int) -> bool:
        """``name`` is below a zone cut of this zone (a DS question at the cut itself is
        still this zone's to answer): the plain records of the server answer it."""
        for owner, node in self.zone.nodes.items():
            if (
                owner == self.origin
                or node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) is None
            ):
                continue
            if name.is_subdomain(owner) and not (name == owner and rdtype == dns.rdatatype.DS):
                return True
        return False

    def answer(self, query: Any) -> bytes:
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        bogus = False
        node = self.zone.get_node(qname)
        if node is not None:
            found = node.get_rdataset(dns.rdataclass.IN, qtype)
            if found is None:
                found = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
                qtype = dns.rdatatype.CNAME if found is not None else qtype
            if found is not None:
                self._add(response.answer, qname, qtype)
                bogus = qname in self.broken
            else:
                self._add(response.authority, self.origin, dns.rdatatype.SOA)
                if self.nsec3:
                    self._nsec3_proof(response.authority, qname)
                else:
                    self._add(response.authority, qname, dns.rdatatype.NSEC)
        elif any(name != qname and name.is_subdomain(qname) for name in self.zone.nodes):
            # An empty non-terminal (_tcp.mx.example.test): it exists, without data.
            self._add(response.authority, self.origin, dns.rdatatype.SOA)
            if self.nsec3:
                self._nsec3_proof(response.authority, qname)
            else:
                covering = self._covering(qname)
                if covering is not None:
                    self._add(response.authority, covering, dns.rdatatype.NSEC)
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add(response.authority, self.origin, dns.rdatatype.SOA)
            if self.nsec3:
                self._nsec3_proof(response.authority, qname)
            covering = None if self.nsec3 else self._covering(qname)
            if covering is not None:
                self._add(response.authority, covering, dns.rdatatype.NSEC)
                encloser = _common(qname, covering, self._next(covering))
                wildcard = dns.name.Name((b"*", *encloser.labels))
                other = self._covering(wildcard)
                if other is not None and other != covering:
                    self._add(response.authority, other, dns.rdatatype.NSEC)
        if self.validating and not query.flags & dns.flags.CD:
            if bogus:
                failed = dns.message.make_response(query)
                failed.set_rcode(dns.rcode.SERVFAIL)
                return bytes(failed.to_wire())
            response.flags |= dns.flags.AD
        return bytes(response.to_wire())

    def _add(
        self, section: list[Any], name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        rdataset = self.zone.get_rdataset(name, rdtype)
        if rdataset is None:
            return
        section.append(dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset)))
        sigs = self.zone.get_rdataset(name, dns.rdatatype.RRSIG, rdtype)
        if sigs is not None and not (
            name in self.stripped and rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.SOA)
        ):
            rrsig = dns.rrset.from_rdata_list(name, sigs.ttl, list(sigs))
            section.append(rrsig)

    def _next(self, owner: dns.name.Name) -> dns.name.Name:
        nsec = self.zone.get_rdataset(owner, dns.rdatatype.NSEC)
        assert nsec is not None
        return nsec[0].next  # type: ignore[no-any-return]

    def _covering(self, name: dns.name.Name) -> dns.name.Name | None:
        for owner, node in self.zone.nodes.items():
            if node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NSEC) is None:
                continue
            following = self._next(owner)
            if owner < following:
                if owner < name < following:
                    return owner
            elif name > owner or name < following:
                return owner
        return None


def _nsec3_digest(name: dns.name.Name) -> bytes:
    return base64.b32hexdecode(dns.dnssec.nsec3_hash(name, b"", 0, 1))


def _common(name: dns.name.Name, *others: dns.name.Name) -> dns.name.Name:
    best = dns.name.root
    for other in others:
        _, _, common = name.fullcompare(other)
        if common > len(best):
            best = dns.name.Name(name.labels[-common:])
    return best


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[str, list[RR]] = defaultdict(list)
        self.failing: set[str] = set()
        self.hanging: set[str] = set()
        self.lock = threading.Lock()
        self.questions: list[tuple[str, str]] = []
        self.signed: list[SignedZone] = []

    def signed_reply(self, data: bytes) -> bytes | None:
        """The answer from a signed zone, or None when no signed zone holds the name."""
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return None
        if not query.question:
            return None
        qname = query.question[0].name
        with self.lock:
            zones = [z for z in self.signed if qname.is_subdomain(z.origin)]
            if not zones:
                return None
            self.questions.append(
                (
                    qname.to_text(omit_final_dot=True).lower(),
                    dns.rdatatype.to_text(query.question[0].rdtype),
                )
            )
        zone = max(zones, key=lambda z: len(z.origin))
        if zone.delegates(qname, query.question[0].rdtype):
            return None
        return zone.answer(query)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        reply.header.ad = 0  # dnslib copies the question's flags; this server validates nothing
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.questions.append((qname, qtype))
            hanging = qname in self.hanging
            if qname in self.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = list(self.records.get(qname, ()))
        if hanging:  # answer far too late (each request has its own thread)
            time.sleep(5)
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if not records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        reply.header.aa = 1
        for rr in records:
            if QTYPE[rr.rtype] == qtype or (qtype == "ANY") or QTYPE[rr.rtype] == "CNAME":
                reply.add_answer(rr)
        return reply


class _Handler(DNSHandler):  # type: ignore[misc]
    def get_reply(self, data: bytes) -> bytes:
        resolver: _ZoneResolver = self.server.resolver
        wire = resolver.signed_reply(data)
        if wire is not None:
            return wire
        return bytes(super().get_reply(data))


class DNSTestServer:
    def __init__(self) -> None:
        self.resolver = _ZoneResolver()
        self.port = 0
        self._servers: list[DNSServer] = []

    @property
    def address(self) -> str:
        """What to put in ``dns_nameservers``: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DNSTestServer:
        for _ in range(20):
            port = _free_port()
            try:
                udp = DNSServer(
                    self.resolver,
                    address="127.0.0.1",
                    port=port,
                    logger=_Quiet(),
                    handler=_Handler,
                )
                tcp = DNSServer(
                    self.resolver,
                    address="127.0.0.1",
                    port=port,
                    tcp=True,
                    logger=_Quiet(),
                    handler=_Handler,
                )
            except OSError:
                continue
            self.port = port
            self._servers = [udp, tcp]
            for server in self._servers:
                server.start_thread()
            return self
        raise RuntimeError("no free port for the test DNS server")

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()

    def add(self, zone: str) -> None:
        """Add records given in zone-file syntax (absolute names, with TTLs)."""
        for rr in RR.fromZone(zone):
            name = str(rr.rname).lower().rstrip(".")
            with self.resolver.lock:
                self.resolver.records[name].append(rr)

    def add_signed(
        self,
        origin: str,
        records: str,
        *,
        broken: Iterable[str] = (),
        validating: bool = False,
        stripped: Iterable[str] = (),
        nsec3: bool = False,
        opt_out: bool = False,
    ) -> SignedZone:
        """Serve ``records`` (zone-file syntax, absolute names) as the signed zone
        ``origin``; see the module docstring. Returns the zone (its ``trust_anchor``)."""
        zone = SignedZone(
            origin,
            records,
            broken=broken,
            validating=validating,
            stripped=stripped,
            nsec3=nsec3,
            opt_out=opt_out,
        )
        with self.resolver.lock:
            self.resolver.signed.append(zone)
        return zone

    def fail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        with self.resolver.lock:
            self.resolver.failing.add(name.lower().rstrip("."))

    def hang(self, name: str) -> None:
        """Never answer for ``name``."""
        with self.resolver.lock:
            self.resolver.hanging.add(name.lower().rstrip("."))

    def asked(self, name: str) -> int:
        """How many questions for ``name`` the server got (to check caching)."""
        name = name.lower().rstrip(".")
        with self.resolver.lock:
            return sum(1 for qname, _ in self.resolver.questions if qname == name)


class _Quiet:
    """dnslib's logger interface, silent."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
