"""Which recipients a honeypot persona takes, and how it refuses the others, as the
product does with its default configuration.

- A recipient at one of the persona's own domains (the host name, its parent domain,
  ``localhost``; or the ``domains`` setting), an unqualified ``<user>``, or an address
  literal naming the address the client connected to, is *local*: it is accepted when
  its user is one of the local users (``local_users``; ``user+tag`` is ``user``, case
  does not matter), else refused with the persona's ``unknown_user`` text (Postfix:
  ``550 5.1.1 <x@host>: Recipient address rejected: User unknown in local recipient
  table``).
- Before either, a local part matching one of the persona's restricted patterns (at its own
  domains, or at others) is refused with its ``restricted_characters`` text, as Debian's
  Exim ACL refuses ``user%other@here`` ("550 restricted characters in address").
- Any other recipient is relaying: refused with the persona's ``relay_denied`` text
  (Postfix: ``454 4.7.1 <x@other>: Relay access denied``), unless ``relay = "pretend"``
  -- then it is accepted and the message captured like any other. A client that
  authenticated (with ``auth_outcome`` accepting it) may relay too, as the products
  allow their SASL users to. Nothing is ever relayed: the honeypot delivers nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mailgate.hooks import Address, Session
from mailgate.protocol import Reply

__all__ = ["RecipientPolicy", "default_domains"]

#: Reply for one refused recipient: (session, the address; a hooks Address carries the path
#: as the client wrote it in ``written``).
RecipientReply = Callable[[Session, str], Reply]


def default_domains(hostname: str) -> tuple[str, ...]:
    """The domains a product installed as ``hostname`` receives mail for by default
    (Debian's Postfix: ``$myhostname, $mydomain-ish, localhost.localdomain, localhost``)."""
    name = hostname.lower().rstrip(".")
    domains = [name]
    parent = name.partition(".")[2]
    if "." in parent:  # mail.example.com -> example.com, never a bare TLD
        domains.append(parent)
    domains += ["localhost", "localhost.localdomain"]
    return tuple(dict.fromkeys(domains))


@dataclass(frozen=True)
class RecipientPolicy:
    """See the module docstring. ``domains`` and ``users`` are compared lower-case."""

    domains: frozenset[str]
    users: frozenset[str]
    relay: str
    unknown_user: RecipientReply
    relay_denied: RecipientReply
    #: Postfix's recipient_delimiter (Debian sets "+"): ``root+tag`` is ``root``.
    delimiter: str = "+"
    #: ``user%other@here`` is ``user@other`` (Postfix's allow_percent_hack).
    percent_hack: bool = False
    #: Local parts refused before anything else: at the persona's domains, at others.
    restricted: tuple[re.Pattern[str], ...] = ()
    restricted_remote: tuple[re.Pattern[str], ...] = ()
    restricted_characters: RecipientReply | None = None

    @classmethod
    def build(
        cls,
        *,
        domains: Iterable[str],
        users: Iterable[str],
        relay: str,
        unknown_user: RecipientReply,
        relay_denied: RecipientReply,
        percent_hack: bool = False,
        restricted: Iterable[str] = (),
        restricted_remote: Iterable[str] = (),
        restricted_characters: RecipientReply | None = None,
    ) -> RecipientPolicy:
        if relay not in ("refuse", "pretend"):
            raise ValueError(f"relay must be refuse or pretend, not {relay!r}")
        return cls(
            frozenset(d.lower().rstrip(".") for d in domains),
            frozenset(u.lower() for u in users),
            relay,
            unknown_user,
            relay_denied,
            percent_hack=percent_hack,
            restricted=tuple(re.compile(p) for p in restricted),
            restricted_remote=tuple(re.compile(p) for p in restricted_remote),
            restricted_characters=restricted_characters,
        )

    def is_local(self, session: Session, domain: str) -> bool:
        """Whether ``domain`` (of a recipient) is one the persona receives mail for."""
        if not domain:
            return True  # <user>: the product qualifies it with its own domain
        if domain.startswith("["):
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            try:
                return ipaddress.ip_address(literal) == ipaddress.ip_address(session.local_host)
            except ValueError:
                return False
        return domain.lower().rstrip(".") in self.domains

    def user_exists(self, local: str) -> bool:
        user = local.lower()
        if user.startswith('"') and user.endswith('"') and len(user) > 1:
            user = user[1:-1]
        if self.delimiter and self.delimiter in user:
            user = user.split(self.delimiter, 1)[0]
        return user in self.users

    def judge_vrfy(self, session: Session, argument: str) -> Reply | None:
        """VRFY checked like RCPT (Postfix): the refusal for ``argument`` (a user or an
        address, brackets allowed), or None for the persona's usual answer."""
        text = argument.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if not text or " " in text:
            return None
        return self.judge(session, Address(text, written=argument.strip()))

    def judge(self, session: Session, address: Address) -> Reply | None:
        """The refusal for this recipient, or None to accept it."""
        local = address.local
        if self.restricted_characters is not None and (self.restricted or self.restricted_remote):
            local_domain = self.is_local(session, address.domain)
            patterns = self.restricted if local_domain else self.restricted_remote
            if any(pattern.search(local) for pattern in patterns):
                return self.restricted_characters(session, address)
        if self.percent_hack and "%" in local and self.is_local(session, address.domain):
            # The percent hack (Postfix allow_percent_hack): user%other@here is user@other.
            user, _, domain = local.rpartition("%")
            if not self.is_local(session, domain):
                if self.relay == "pretend" or session.authenticated:
                    return None
                return self.relay_denied(session, address)
            local = user
        if self.is_local(session, address.domain):
            if self.user_exists(local):
                return None
            return self.unknown_user(session, address)
        if self.relay == "pretend" or session.authenticated:
            return None
        return self.relay_denied(session, address)
