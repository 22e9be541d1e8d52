"""Message submission (RFC 6409, RFC 8314): what a submission listener asks of a client.

A listener declared with ``submission_listen`` (port 587, STARTTLS offered) or
``submissions_listen`` (port 465, implicit TLS) is where applications and people hand in
mail, as opposed to where other servers deliver it. The core marks its sessions
(``session.submission``); this policy does the rest, at MAIL:

* the client must have authenticated (AUTH, or XCLIENT LOGIN from a trusted peer), else
  ``530 5.7.0 Authentication required`` - whatever the recipient, local domains included.
  RFC 6409 4.3 leaves the MSA's authentication to local policy; mailgate's policy is that
  a submission port never takes unauthenticated mail, so that it cannot become a way
  around the checks of the MX port (port 25 is for that);
* the sender must be one of the user's own: the ``[senders]`` table maps each user to
  address patterns, ``user@domain``, ``*@domain``, ``*@*.domain``, ``*`` (any) and ``<>``
  (the null sender, which is allowed only when listed)::

      [senders]
      alice = ["alice@example.com", "*@alice.example.com"]
      "app@example.com" = ["noreply@example.com", "<>"]

  and/or a callable given in code (``Server(sender_map=...)``), called with the user
  name and returning patterns (or None for a user it does not know); it may be a
  coroutine function. When both are given, an address is the user's when either says
  so. Anything else gets ``553 5.7.1 <addr>: Sender address rejected: not owned by user
  alice``. Without a table and a callable, an authenticated user may use any sender
  (logged at start).

Mail accepted there then goes through the chain like any other: relay control lets
authenticated users relay, and routing decides where each recipient goes. Plain listeners
are not affected. The table is read at start; changing it needs a restart.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from mailgate.hooks import Address, Envelope, Reject, Session, TempFail
from mailgate.plugins.policy import (
    PolicyConfigError,
    PolicyEnv,
    SectionReader,
    decide,
)
from mailgate.plugins.routing.patterns import (
    AddressSet,
    PatternError,
    parse_pattern,
    split_address,
)
from mailgate.server.options import PolicySection, SenderMap
from mailgate.settings import did_you_mean

log = logging.getLogger("mailgate.policy")

__all__ = [
    "AUTH_REQUIRED",
    "POLICY",
    "TABLE",
    "SenderTable",
    "Submission",
    "plugins_from_options",
    "sender_table",
]

POLICY = "submission"
#: The configuration table that maps users to their sender addresses.
TABLE = "senders"
AUTH_REQUIRED = "Authentication required"


def _address_set(texts: Iterable[str]) -> AddressSet:
    """Patterns as a set; a PatternError names the first bad one."""
    return AddressSet(parse_pattern(text, allow_null=True) for text in texts)


class SenderTable:
    """User -> the sender address patterns it may use (the ``[senders]`` table)."""

    def __init__(self, users: Mapping[str, Iterable[str]] | None = None) -> None:
        self.users: dict[str, AddressSet] = {
            user: _address_set(patterns) for user, patterns in (users or {}).items()
        }

    @classmethod
    def from_section(cls, section: PolicySection) -> SenderTable:
        """Read a ``[senders]`` table; errors name the file, the table and the user."""
        reader = SectionReader(section)
        table = cls()
        for user in section.values:
            patterns = reader.strings(user)
            if not patterns:
                raise reader.error(user, "no sender address; list at least one pattern")
            try:
                table.users[user] = _address_set(patterns)
            except PatternError as exc:
                raise reader.error(user, str(exc)) from None
        reader.done()
        return table

    def owns(self, user: str, local: str, domain: str) -> bool | None:
        """Whether ``user`` may use the (normalised) address; None: the user is not in the
        table."""
        patterns = self.users.get(user)
        return None if patterns is None else patterns.contains(local, domain)


class Submission:
    """On submission listeners: AUTH before MAIL, and only the user's own senders.

    ``senders``: the ``[senders]`` table; ``sender_map``: the callable of
    ``Server(sender_map=...)``. With neither, any sender is allowed once authenticated."""

    name = "submission"

    def __init__(
        self, senders: SenderTable | None = None, *, sender_map: SenderMap | None = None
    ) -> None:
        self.senders = senders
        self.sender_map = sender_map

    @property
    def checks_senders(self) -> bool:
        return self.senders is not None or self.sender_map is not None

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        if not session.submission:
            return
        user = session.user
        if user is None:
            decide(session, POLICY, "reject", "MAIL before AUTH on a submission listener")
            raise Reject(530, AUTH_REQUIRED, enhanced="5.7.0")
        if not self.checks_senders:
            return
        local, domain = split_address(address)  # ("", "") for the null sender
        if await self._owns(user, local, domain):
            decide(session, POLICY, "accept", f"<{address}> belongs to user {user}")
            return
        decide(
            session,
            POLICY,
            "reject",
            f"<{address}> is not a sender of user {user}",
            sender=str(address),
            user=user,
        )
        raise Reject(
            553,
            f"<{address}>: Sender address rejected: not owned by user {user}",
            enhanced="5.7.1",
        )

    async def _owns(self, user: str, local: str, domain: str) -> bool:
        if self.senders is not None and self.senders.owns(user, local, domain):
            return True
        if self.sender_map is None:
            return False
        patterns = self.sender_map(user)
        if inspect.isawaitable(patterns):
            patterns = await patterns
        if patterns is None:
            return False
        if isinstance(patterns, str):
            patterns = [patterns]  # one pattern rather than its characters
        try:
            return _address_set(patterns).contains(local, domain)
        except PatternError as exc:
            # A bug of the application's callback, not the client's fault: try later.
            log.error("sender_map for user %r: %s", user, exc)
            raise TempFail(451, "Sender check failed, try again later", enhanced="4.3.0") from None


def sender_table(sections: Iterable[PolicySection]) -> SenderTable | None:
    """The ``[senders]`` table of the configuration, read (None when there is none)."""
    found = [section for section in sections if section.name == TABLE]
    return SenderTable.from_section(found[0]) if found else None


def _warn_unknown_users(table: SenderTable, known: tuple[str, ...]) -> None:
    """A user of [senders] no auth backend of the settings knows is probably misspelt.
    Only a warning: an application may check AUTH in its own hooks, unseen here."""
    for user in table.users:
        if user not in known:
            log.warning(
                "[%s] %s: no such user among auth_users%s", TABLE, user, did_you_mean(user, known)
            )


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    options = env.options
    table = sender_table(options.policy)
    submission = any(address.submission for address in options.listen)
    if not submission:
        if table is not None or options.sender_map is not None:
            log.warning(
                "a sender map ([senders] or sender_map) is given but no submission listener "
                "(submission_listen, submissions_listen): it is not used"
            )
        return []
    if options.lmtp:
        raise PolicyConfigError(
            "submission listeners speak SMTP, not LMTP: remove lmtp or the submission listeners"
        )
    if table is not None and options.auth_users and options.users_file is None:
        _warn_unknown_users(table, tuple(user for user, _ in options.auth_users))
    plugin = Submission(table, sender_map=options.sender_map)
    if not plugin.checks_senders:
        log.info(
            "submission listeners: no [senders] table or sender_map, so an authenticated "
            "user may use any sender address"
        )
    return [plugin]
