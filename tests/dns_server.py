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
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections import defaultdict

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

_counter = itertools.count(1)


def unique(prefix: str = "t") -> str:
    """A label no other test uses, e.g. ``t17``."""
    return f"{prefix}{next(_counter)}"


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[str, list[RR]] = defaultdict(list)
        self.failing: set[str] = set()
        self.hanging: set[str] = set()
        self.lock = threading.Lock()
        self.questions: list[tuple[str, str]] = []

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
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
                udp = DNSServer(self.resolver, address="127.0.0.1", port=port, logger=_Quiet())
                tcp = DNSServer(
                    self.resolver, address="127.0.0.1", port=port, tcp=True, logger=_Quiet()
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
