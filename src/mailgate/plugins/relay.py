"""Relay control: who may send mail to which domains.

Mail for a local domain is accepted from anyone; mail for any other domain is relaying,
accepted only from authenticated users and clients in ``relay_networks`` (Postfix's
``mynetworks``; loopback by default). Everything else gets ``554 5.7.1 Relay access
denied`` at RCPT. There is no way to accept every domain from everyone except saying so
(``open_relay = true``), which is warned about at start.

Options of the relay policy, in its table (``relay``: given in code as a
:class:`~mailgate.server.options.PolicySection`, not read from TOML files):

- ``warn_open_relay`` (default true): with ``open_relay``, warn at start. A mode that runs
  an open relay on purpose (honeypot mode) turns it off and says so in its own words.

Without ``local_domains`` nothing is local: only relay networks and authenticated users may
send at all, which is what the quick start needs (it sends from the same machine) and
safe for a server that someone exposes by accident.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from mailgate.hooks import Address, Envelope, Reject, Session
from mailgate.plugins.decisions import decide
from mailgate.plugins.policy import (
    PolicyEnv,
    SectionReader,
    in_networks,
    normalise_domain,
)
from mailgate.server.options import LOOPBACK, Network

log = logging.getLogger("mailgate.policy")

RELAY_DENIED = "Relay access denied"
#: Client addresses whose relay_networks answer RelayControl keeps.
_KNOWN_CLIENTS = 1024
#: The relay policy's table (see the module documentation).
TABLE = "relay"


class DomainSet:
    """Domain names and ``*.example.com`` patterns (subdomains only, as Postfix's
    ``.example.com``; list ``example.com`` too for the domain itself). Lookups walk up the
    labels, so the cost does not grow with the number of patterns."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.exact: set[str] = set()
        self.parents: set[str] = set()
        for pattern in patterns:
            text = normalise_domain(pattern)
            if text.startswith("*."):
                self.parents.add(text[2:])
            elif text:
                self.exact.add(text)

    def __bool__(self) -> bool:
        return bool(self.exact or self.parents)

    def __contains__(self, domain: object) -> bool:
        exact, parents = self.exact, self.parents
        if not isinstance(domain, str) or not (exact or parents):
            return False
        name = normalise_domain(domain)
        if name in exact:
            return True
        if not parents:
            return False
        labels = name.split(".")
        return any(".".join(labels[i:]) in parents for i in range(1, len(labels)))


class RelayControl:
    """Refuse relaying (mail for domains that are not local) from clients that are neither
    authenticated nor in ``relay_networks``."""

    name = "relay"

    def __init__(
        self,
        local_domains: Iterable[str] = (),
        *,
        relay_networks: Iterable[Network] = LOOPBACK,
        open_relay: bool = False,
    ) -> None:
        self.local_domains = DomainSet(local_domains)
        self.relay_networks = tuple(relay_networks)
        self.open_relay = open_relay
        #: Client address -> in relay_networks, for the networks in _known_networks: asked
        #: at every RCPT for another domain, and an ipaddress lookup is Python code.
        self._known_clients: dict[str, bool] = {}
        self._known_networks = self.relay_networks

    def is_local(self, address: Address) -> bool:
        # RFC 5321 4.5.1: "postmaster" without a domain must be accepted.
        if not address.domain:
            return address.local.lower() == "postmaster"
        return address.domain in self.local_domains

    def may_relay(self, ip: str) -> bool:
        """Whether client ``ip`` is in ``relay_networks`` (remembered for a bounded number
        of addresses; forgotten when ``relay_networks`` is given a new value)."""
        known = self._known_clients
        if self._known_networks is not self.relay_networks:
            known.clear()
            self._known_networks = self.relay_networks
        answer = known.get(ip)
        if answer is None:
            if len(known) >= _KNOWN_CLIENTS:
                known.clear()
            answer = known[ip] = in_networks(ip, self.relay_networks)
        return answer

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        self._rcpt_now(session, envelope, address)

    def _rcpt_now(self, session: Session, envelope: Envelope, address: Address) -> None:
        """on_rcpt's decision, as a plain call (the server's inline path calls this one:
        see hooks.registry._now_method)."""
        if self.open_relay or self.is_local(address):
            return
        if session.user is not None:
            decide(session, "relay", "accept", f"{address}: authenticated as {session.user}")
            return
        if self.may_relay(session.peer_host):
            decide(session, "relay", "accept", f"{address}: client in relay_networks")
            return
        decide(session, "relay", "reject", f"{address}: relay access denied", rcpt=str(address))
        raise Reject(554, f"<{address}>: {RELAY_DENIED}", enhanced="5.7.1")


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    options = env.options
    warn_open_relay = True
    section = env.section(TABLE)
    if section is not None:
        reader = SectionReader(section)
        warn_open_relay = reader.boolean("warn_open_relay", True)
        reader.done()
    if options.lmtp:
        # An LMTP server does final delivery for an MTA that already decided about relaying.
        return []
    if options.open_relay:
        if not warn_open_relay:
            return []
        log.warning(
            "open_relay is on: mail for every domain is accepted from anyone; never run "
            "a public MX like this"
        )
        return []
    if not options.local_domains:
        networks = ", ".join(str(n) for n in options.relay_networks) or "none"
        exposed = [str(a) for a in options.listen if not _is_loopback(a.host)]
        if exposed:
            # Reachable from outside yet refusing every outside recipient: almost always a
            # forgotten setting, and the symptom (554 Relay access denied) hides the cause.
            log.warning(
                "no local_domains while listening on %s: every recipient from outside "
                "relay_networks (%s) and authenticated users is refused with 554 5.7.1; "
                'to receive mail for your domains set local_domains = ["example.com"] '
                "in [server] (or --local-domains example.com)",
                ", ".join(exposed),
                networks,
            )
        else:
            log.info(
                "no local_domains: mail is accepted only from relay_networks (%s) and "
                "authenticated users",
                networks,
            )
    return [RelayControl(options.local_domains, relay_networks=options.relay_networks)]


def _is_loopback(host: str) -> bool:
    """Whether a listen address's host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable from outside


__all__ = ["RELAY_DENIED", "TABLE", "DomainSet", "RelayControl", "plugins_from_options"]
