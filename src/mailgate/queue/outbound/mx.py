"""Where a domain's mail goes: its MX hosts and their addresses, in the order to try.

RFC 5321 5.1 with Postfix's refinements: MX sorted by preference, equal preferences in
random order; no MX -> the domain's own A/AAAA ("implicit MX"); the null MX of RFC 7505
(``0 .``) -> a permanent failure at once; no such domain -> permanent; a temporary DNS
failure -> try later. Everything goes through :class:`mailgate.dns.Resolver`, so the
``dns_nameservers`` setting and its cache apply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from itertools import groupby

from mailgate.dns import DNSTempError, Resolver

from .model import Outcome


@dataclass(frozen=True, slots=True)
class MailHost:
    """One host to try: its name (for logs, TLS names and Remote-MTA) and addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """No host to try: a deferral or a permanent failure for every recipient."""

    outcome: Outcome
    status: str
    diagnostic: str


async def mail_hosts(
    resolver: Resolver, domain: str, *, rng: random.Random | None = None
) -> list[MailHost] | RouteFailure:
    """The hosts to try for ``domain``, best first, or why there are none."""
    domain = domain.strip().rstrip(".")
    literal = address_literal(domain)
    if literal is not None:
        return [MailHost(domain, 0, (literal,))]
    try:
        records = await resolver.mx(domain)
    except DNSTempError as exc:
        return RouteFailure(
            Outcome.DEFERRED,
            "4.4.3",
            f"Host or domain name lookup failed temporarily: {domain} MX: {exc}",
        )
    usable = [(preference, host) for preference, host in records if host not in ("", ".")]
    if records and not usable:
        return RouteFailure(
            Outcome.FAILED, "5.1.10", f"Domain {domain} does not accept mail (nullMX)"
        )
    if not records:
        # No MX: the domain itself is the mail host (RFC 5321 5.1). Mailgate's resolver
        # answers "no such domain" and "no MX record" alike, so a missing domain shows as
        # a domain with neither MX nor address records.
        try:
            addresses = await resolver.addresses(domain)
        except DNSTempError as exc:
            return RouteFailure(
                Outcome.DEFERRED,
                "4.4.3",
                f"Host or domain name lookup failed temporarily: {domain} A/AAAA: {exc}",
            )
        if not addresses:
            return RouteFailure(
                Outcome.FAILED,
                "5.1.2",
                f"Host or domain name not found: {domain} has no MX, A or AAAA record",
            )
        return [MailHost(domain, 0, tuple(_unique(addresses)))]
    return await _hosts_of(resolver, domain, usable, rng or random.Random())


async def _hosts_of(
    resolver: Resolver, domain: str, records: list[tuple[int, str]], rng: random.Random
) -> list[MailHost] | RouteFailure:
    ordered: list[tuple[int, str]] = []
    for _, group in groupby(sorted(records), key=lambda record: record[0]):
        same = list(group)
        rng.shuffle(same)  # equal preference: spread the load (RFC 5321 5.1)
        ordered.extend(same)
    lookups = await asyncio.gather(
        *(_addresses(resolver, host) for _, host in ordered), return_exceptions=True
    )
    hosts: list[MailHost] = []
    temporary: list[str] = []
    seen: set[str] = set()
    for (preference, host), found in zip(ordered, lookups, strict=True):
        if isinstance(found, DNSTempError):
            temporary.append(f"{host}: {found}")
            continue
        if isinstance(found, BaseException):
            raise found
        fresh = tuple(address for address in found if address not in seen)
        seen.update(fresh)
        if fresh:
            hosts.append(MailHost(host, preference, fresh))
    if hosts:
        return hosts
    if temporary:
        return RouteFailure(
            Outcome.DEFERRED,
            "4.4.3",
            f"Host or domain name lookup failed temporarily for the MX hosts of {domain}: "
            + "; ".join(temporary),
        )
    names = ", ".join(host for _, host in ordered)
    return RouteFailure(
        Outcome.FAILED,
        "5.4.4",
        f"Host or domain name not found: the MX hosts of {domain} ({names}) have no address",
    )


async def _addresses(resolver: Resolver, host: str) -> list[str]:
    literal = address_literal(host)
    if literal is not None:
        return [literal]
    if host.lower() == "localhost":  # RFC 6761 6.3; no DNS server knows it
        return ["127.0.0.1", "::1"]
    return await resolver.addresses(host)


async def host_addresses(resolver: Resolver, host: str) -> list[str] | RouteFailure:
    """The addresses of a smarthost; an unknown name defers (a configuration error
    should not bounce every message)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [str(ip)]
    try:
        addresses = await _addresses(resolver, host)
    except DNSTempError as exc:
        return RouteFailure(
            Outcome.DEFERRED, "4.4.3", f"Host name lookup failed temporarily: {host}: {exc}"
        )
    if not addresses:
        return RouteFailure(
            Outcome.DEFERRED, "4.4.4", f"Host name not found: {host} has no A or AAAA record"
        )
    return _unique(addresses)


def address_literal(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` -> the address; None for a name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _unique(addresses: list[str]) -> list[str]:
    return list(dict.fromkeys(addresses))
