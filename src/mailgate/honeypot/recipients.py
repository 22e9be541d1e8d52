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
- With ``literal_senders_refused`` (Sendmail, whose sender-domain check cannot resolve
  an address literal) a known local user, or a relay attempt, is refused with
  ``sender_domain_unknown`` when the sender's domain is an address literal.
- VRFY and EXPN may be answered from the users' full names and the aliases
  (:meth:`RecipientPolicy.answer_verify`, Sendmail's answers from the password file and
  /etc/aliases): a user with its full name, an alias verified (VRFY) or expanded (EXPN)
  to its users, an unknown name refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mailgate.hooks import Address, Session
from mailgate.protocol import Reply
from mailgate.protocol.persona import echo

__all__ = ["RecipientPolicy", "RecipientReply", "SenderReply", "VerifyLine", "default_domains"]

#: Reply for one refused recipient: (session, the address; a hooks Address carries the path
#: as the client wrote it in ``written``).
RecipientReply = Callable[[Session, str], Reply]
#: Reply for a recipient refused because of its sender: (session, recipient, sender).
SenderReply = Callable[[Session, str, str], Reply]
#: One line of a VRFY/EXPN answer: (session, user or address, full name or "").
VerifyLine = Callable[[Session, str, str], Reply]
#: Aliases expanded at most this deep (a loop in the table ends there).
MAX_ALIAS_DEPTH = 10
#: Lines of one EXPN answer at most.
MAX_EXPANSION = 100


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
    #: User -> full name (the password file's GECOS), for VRFY/EXPN answers.
    full_names: Mapping[str, str] = field(default_factory=dict)
    #: Alias -> what it stands for (users, aliases, addresses), /etc/aliases.
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Refuse recipients of a sender whose domain is an address literal.
    literal_senders_refused: bool = False
    sender_domain_unknown: SenderReply | None = None
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
        full_names: Mapping[str, str] | None = None,
        aliases: Mapping[str, Iterable[str]] | None = None,
        literal_senders_refused: bool = False,
        sender_domain_unknown: SenderReply | None = None,
        restricted: Iterable[str] = (),
        restricted_remote: Iterable[str] = (),
        restricted_characters: RecipientReply | None = None,
    ) -> RecipientPolicy:
        if relay not in ("refuse", "pretend"):
            raise ValueError(f"relay must be refuse or pretend, not {relay!r}")
        if literal_senders_refused and sender_domain_unknown is None:
            raise ValueError("literal_senders_refused needs the sender_domain_unknown reply")
        return cls(
            frozenset(d.lower().rstrip(".") for d in domains),
            frozenset(u.lower() for u in users),
            relay,
            unknown_user,
            relay_denied,
            percent_hack=percent_hack,
            full_names=MappingProxyType({k.lower(): v for k, v in (full_names or {}).items()}),
            aliases=MappingProxyType({k.lower(): tuple(v) for k, v in (aliases or {}).items()}),
            literal_senders_refused=literal_senders_refused,
            sender_domain_unknown=sender_domain_unknown,
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

    def _user(self, local: str) -> str:
        """The user name a local part stands for (unquoted, without ``+detail``)."""
        user = local.lower()
        if user.startswith('"') and user.endswith('"') and len(user) > 1:
            user = user[1:-1]
        if self.delimiter and self.delimiter in user:
            user = user.split(self.delimiter, 1)[0]
        return user

    def user_exists(self, local: str) -> bool:
        user = self._user(local)
        return user in self.users or user in self.aliases

    def answer_verify(
        self,
        session: Session,
        argument: str,
        expand: bool,
        *,
        user_line: VerifyLine,
        unknown: RecipientReply,
    ) -> Reply | None:
        """VRFY/EXPN answered from the users and aliases, as Sendmail does: a local user
        is ``user_line(user, full name)``; an alias is verified as itself (VRFY) or
        expanded (EXPN) to one line per user or address it stands for; an unknown name
        is ``unknown(argument as written)``. None (the persona's usual answer) for
        anything that is not a local name."""
        text = argument.strip()
        bare = text[1:-1] if text.startswith("<") and text.endswith(">") else text
        if not bare or " " in bare:
            return None
        local, at, domain = bare.rpartition("@")
        if not at:
            local, domain = bare, ""
        if not self.is_local(session, domain) or domain.startswith("["):
            return None
        user = self._user(local)
        if user in self.aliases:
            if not expand:
                return user_line(session, user, "")
            targets = self._expand(user, 0, set())
            if not targets:
                return unknown(session, echo(text))
            lines = [user_line(session, name, self.full_names.get(name, "")) for name in targets]
            first = lines[0]
            return Reply(first.code, first.status, tuple(r.lines[0] for r in lines))
        if user in self.users:
            return user_line(session, user, self.full_names.get(user, ""))
        # The client's words: printable ASCII and bounded, as every echo (persona.echo).
        return unknown(session, echo(text))

    def _expand(self, alias: str, depth: int, seen: set[str]) -> list[str]:
        """The users and addresses ``alias`` stands for, aliases resolved (bounded)."""
        out: list[str] = []
        seen.add(alias)
        for target in self.aliases.get(alias, ()):
            name = target.lower() if "@" not in target else target
            if name in self.aliases and depth < MAX_ALIAS_DEPTH:
                if name not in seen:
                    out += self._expand(name, depth + 1, seen)
            elif "@" in name or name in self.users:
                out.append(name)
            if len(out) >= MAX_EXPANSION:
                return out[:MAX_EXPANSION]
        return list(dict.fromkeys(out))

    def judge_vrfy(self, session: Session, argument: str) -> Reply | None:
        """VRFY checked like RCPT (Postfix): the refusal for ``argument`` (a user or an
        address, brackets allowed), or None for the persona's usual answer."""
        text = argument.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        if not text or " " in text:
            return None
        return self.judge(session, Address(text, written=argument.strip()))

    def judge(
        self, session: Session, address: Address, sender: Address | None = None
    ) -> Reply | None:
        """The refusal for this recipient (of ``sender``'s transaction), or None to
        accept it."""
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
                return self._sender_refusal(session, address, sender) or self.relay_denied(
                    session, address
                )
            local = user
        if self.is_local(session, address.domain):
            if self.user_exists(local):
                return self._sender_refusal(session, address, sender)
            return self.unknown_user(session, address)
        if self.relay == "pretend" or session.authenticated:
            return None
        return self._sender_refusal(session, address, sender) or self.relay_denied(session, address)

    def _sender_refusal(
        self, session: Session, address: Address, sender: Address | None
    ) -> Reply | None:
        """Sendmail's sender-domain check (delayed to RCPT): an address literal as the
        sender's domain does not resolve, so its recipients are refused."""
        if (
            not self.literal_senders_refused
            or sender is None
            or not sender.domain.startswith("[")
            or self.sender_domain_unknown is None
        ):
            return None
        return self.sender_domain_unknown(session, address, str(sender))
