"""DNS for policy plugins: one async resolver per server, with a timeout and a cache.

Built on dnspython. ``nameservers`` (the ``dns_nameservers`` setting) points it at given
servers (``HOST`` or ``HOST:PORT``), otherwise it reads /etc/resolv.conf. Answers are
cached for their TTL (capped), negative answers too, so a busy server asks once per
client, not once per connection.

Results are plain values: a list of strings for an answer, ``[]`` for "no such name" and
"no data" (both are final answers), :class:`DNSTempError` for anything that may change on
a retry (timeout, SERVFAIL, no server reachable). Policies must fail open on the latter.

``sync_lookup`` gives the blocking form that pyspf, dkimpy and authheaders expect, bound to
the same servers, for use in worker threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

log = logging.getLogger("mailgate.dns")
R = TypeVar("R", bound=dns.resolver.BaseResolver)

#: Longest an answer stays cached, whatever its TTL says.
MAX_CACHE_TTL = 3600.0
#: How long "no such name" / "no data" is cached when the zone gives no SOA minimum.
NEGATIVE_TTL = 300.0


class DNSTempError(Exception):
    """A lookup that did not give a final answer (timeout, SERVFAIL, no server)."""


@dataclass(frozen=True, slots=True)
class NameServer:
    host: str
    port: int = 53


def parse_nameserver(text: str) -> NameServer:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> NameServer.
    Raises ValueError with a one-line reason."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r} has no valid port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r} has no valid port")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"name server {host!r} must be an IP address") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} of name server {text!r} is out of range")
    return NameServer(host, port)


class Resolver:
    """Async lookups with a timeout and a TTL cache. Make one per server (per loop)."""

    def __init__(
        self,
        nameservers: tuple[str, ...] | list[str] = (),
        *,
        timeout: float = 3.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nameservers = tuple(parse_nameserver(n) for n in nameservers)
        self.timeout = timeout
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, list[str]]] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[tuple[str, str], asyncio.Future[list[str]]] = {}
        self._async = _configure(
            dns.asyncresolver.Resolver(configure=False), self.nameservers, timeout
        )
        self._sync = _configure(dns.resolver.Resolver(configure=False), self.nameservers, timeout)
        self.queries = 0  # sent to a server (not answered from the cache)

    # --- async lookups -----------------------------------------------------------------

    async def query(self, name: str, rdtype: str) -> list[str]:
        """Answers of type ``rdtype`` for ``name`` as text (TXT strings joined, MX as
        "PREF HOST", names without the final dot); ``[]`` when there are none."""
        key = (name.lower().rstrip("."), rdtype.upper())
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            return list(cached[1])
        pending = self._inflight.get(key)
        if pending is not None:  # the same question is on the wire already: share it
            return list(await asyncio.shield(pending))
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answers, ttl = await self._ask(key[0], key[1])
        except BaseException as exc:
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else DNSTempError("cancelled")
                )
                future.exception()  # retrieved: no "never retrieved" warning when unshared
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(answers)
        self._store(key, answers, ttl)
        return list(answers)

    def cached(self, name: str, rdtype: str) -> list[str] | None:
        """The cached answers for ``name``, or None when a lookup would have to ask a server:
        lets a caller skip a task per lookup when everything it needs is known already."""
        key = (name.lower().rstrip("."), rdtype.upper())
        entry = self._cache.get(key)
        if entry is None or entry[0] <= self._clock():
            return None
        return list(entry[1])

    async def a(self, name: str) -> list[str]:
        return await self.query(name, "A")

    async def aaaa(self, name: str) -> list[str]:
        return await self.query(name, "AAAA")

    async def addresses(self, name: str) -> list[str]:
        """A and AAAA together (both asked at once)."""
        v4, v6 = await asyncio.gather(self.a(name), self.aaaa(name))
        return v4 + v6

    async def mx(self, name: str) -> list[tuple[int, str]]:
        out = []
        for record in await self.query(name, "MX"):
            preference, _, host = record.partition(" ")
            out.append((int(preference), host))
        return sorted(out)

    async def txt(self, name: str) -> list[str]:
        return await self.query(name, "TXT")

    async def ptr(self, ip: str) -> list[str]:
        """Reverse names of an IPv4 or IPv6 address."""
        return await self.query(reverse_name(ip), "PTR")

    # --- blocking form for mail-authentication libraries --------------------------------------

    def sync_lookup(self, name: str | bytes, rdtype: str) -> list[str]:
        """The same lookup, blocking (for worker threads); answers are not shared with the
        async cache. Raises DNSTempError like :meth:`query`."""
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        try:
            answer = self._sync.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as exc:
            raise DNSTempError(f"{name} {rdtype}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name} {rdtype}: {exc}") from None
        return [_text(rdata) for rdata in answer] if answer.rrset is not None else []

    # --- internals ------------------------------------------------------------------------------

    async def _ask(self, name: str, rdtype: str) -> tuple[list[str], float]:
        self.queries += 1
        try:
            answer = await self._async.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            return [], _negative_ttl(exc)
        except dns.resolver.NoAnswer:
            return [], NEGATIVE_TTL
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DNSTempError(f"{name} {rdtype}: {_short(exc)}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name} {rdtype}: {_short(exc)}") from None
        if answer.rrset is None:
            return [], NEGATIVE_TTL
        return [_text(rdata) for rdata in answer], float(answer.rrset.ttl)

    def _store(self, key: tuple[str, str], answers: list[str], ttl: float) -> None:
        ttl = min(ttl, MAX_CACHE_TTL)
        if ttl <= 0:
            return
        self._cache[key] = (self._clock() + ttl, answers)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def reverse_name(ip: str) -> str:
    """1.2.0.192.in-addr.arpa / nibble form for IPv6 (without the final dot)."""
    return dns.reversename.from_address(ip).to_text(omit_final_dot=True)


def dnsbl_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in a DNS list: reversed octets (IPv4) or nibbles
    (IPv6, RFC 5782 2.4) prepended to ``zone``."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        reversed_part = ".".join(reversed(str(address).split(".")))
    else:
        reversed_part = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_part}.{zone.strip('.')}"


def _configure(resolver: R, servers: tuple[NameServer, ...], timeout: float) -> R:
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers]
    else:
        resolver.read_resolv_conf("/etc/resolv.conf")
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None  # ours caches, also negative answers, with our own limits
    return resolver


def _text(rdata: object) -> str:
    rdtype = getattr(rdata, "rdtype", None)
    if rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        exchange = rdata.exchange.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
        return f"{rdata.preference} {exchange}"  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return str(rdata.target.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
    return str(rdata.to_text())  # type: ignore[attr-defined]


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    # The SOA minimum would be exact; dnspython keeps it only in the raw responses.
    return NEGATIVE_TTL


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


__all__ = [
    "DNSTempError",
    "NameServer",
    "Resolver",
    "dnsbl_name",
    "parse_nameserver",
    "reverse_name",
]
