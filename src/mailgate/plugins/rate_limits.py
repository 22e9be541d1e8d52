"""Rate limits per client IP, per authenticated user and per sender domain.

Each limit is "N per window" (``"100/1h"``), counted with GCRA (a token bucket, see
:mod:`mailgate.plugins.counters`): a burst of N, then one more every window/N. What is
counted, and where it is refused:

* new connections per client IP, at connect: ``421`` and the connection is closed;
* recipients per IP / user / sender domain, at each RCPT: ``450 4.7.1``;
* messages per IP / user / sender domain, when DATA (or the first BDAT) starts:
  ``450 4.7.1`` (a message counts once its data is asked for, whatever becomes of it);
* failed AUTH per IP: counted as they happen (seen through ``session.auth_failures``);
  a client over the limit gets ``421 4.7.0`` for its next AUTH and is disconnected, and
  (``auth_failures_block = "connection"``, the default) is refused at connect as well.

Every refusal names the limit and says when to try again. An authenticated session counts
against the per-user limit of a kind where one is set, else against the per-IP one. IPv6
clients are counted per /64 (``ipv6_prefix``). Allow-listed clients (the lists policy)
are not counted at all. Concurrent connections per IP are the server's own
``max_clients_per_ip``, not this plugin's.

Counters live in this process (:class:`~mailgate.plugins.counters.MemoryCounters`) unless
a shared :class:`~mailgate.plugins.counters.CounterStore` is given: with ``--workers N``
each worker counts on its own. ``[state] backend = "redis"`` counts in Redis instead
(:class:`~mailgate.plugins.redis_state.RedisCounters`), one count for every node; when
Redis does not answer, the limits fail open (nothing is counted, nothing refused) or, with
``on_error = "closed"``, refuse with ``421 4.3.0`` at connect and ``451 4.3.0`` later.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mailgate.hooks import Address, AuthAttempt, Envelope, Reject, Session, TempFail
from mailgate.plugins.counters import CounterStore, MemoryCounters, RateResult
from mailgate.plugins.policy import (
    PolicyEnv,
    RefusalText,
    SectionReader,
    allowlisted,
    client_address,
    decide,
    parse_duration,
    refusal,
)
from mailgate.plugins.state import StateUnavailable
from mailgate.server.options import PolicySection

log = logging.getLogger("mailgate.policy")

POLICY = "rate-limits"
#: Every limit the [limits] table can set, in the order they are checked.
LIMITS = (
    "connections_per_ip",
    "messages_per_ip",
    "recipients_per_ip",
    "messages_per_user",
    "recipients_per_user",
    "messages_per_sender_domain",
    "recipients_per_sender_domain",
    "auth_failures_per_ip",
)
BLOCK_CHOICES = ("connection", "auth")
DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` events per ``window`` seconds; written ``"100/1h"``, ``"5/10m"``,
    ``"30/m"`` (a unit alone is one of it) or ``"2/90"`` (seconds)."""

    limit: int
    window: float

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"the count must be a whole number of at least 1, got {self.limit!r}")
        if not self.window > 0 or not math.isfinite(self.window):
            raise ValueError(f"the window must be longer than 0 seconds, got {self.window!r}")

    @classmethod
    def parse(cls, text: str) -> Rate:
        example = 'expected "COUNT/WINDOW" like "100/1h", "30/1m" or "5/10m"'
        if not isinstance(text, str):
            raise ValueError(f"{example}, got {text!r}")
        count, slash, window = text.partition("/")
        count, window = count.strip(), window.strip()
        if not slash or not count.isdigit() or not window:
            raise ValueError(f"{example}, got {text!r}")
        if window[0].isalpha():
            window = "1" + window  # "30/m": per minute
        try:
            seconds = parse_duration(window)
        except ValueError:
            raise ValueError(f"{example}, got {text!r} (bad window {window!r})") from None
        return cls(int(count), seconds)

    @classmethod
    def of(cls, value: Rate | str | None) -> Rate | None:
        return value if isinstance(value, Rate) or value is None else cls.parse(value)

    def __str__(self) -> str:
        return f"{self.limit}/{_duration(self.window)}"


@dataclass(frozen=True, slots=True)
class _Check:
    limit: str  # the limit's name, e.g. "messages_per_ip"
    rate: Rate
    subject: str  # whom it counts: an IP or network, a user, a domain
    who: str  # the same for the reply: "192.0.2.1", "user alice", "sender domain x.org"

    @property
    def key(self) -> str:
        return f"{self.limit}:{self.subject}"


@functools.lru_cache(maxsize=4096)
def _subject(ip: str, ipv6_prefix: int) -> str:
    address = client_address(ip)
    if address is None:
        return ip  # not an IP (a test transport): counted as it is written
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class RateLimits:
    """The ``[limits]`` policy. Every limit is off unless given (as ``"N/window"`` or a
    :class:`Rate`). ``store`` is where counts are kept (a fresh
    :class:`MemoryCounters` on ``clock`` with ``max_keys`` keys by default)."""

    name = POLICY
    #: This plugin looks at AUTH but checks no credentials: it adds no SASL mechanism
    #: (the server offers AUTH only when a real backend is there).
    auth_mechanisms: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        connections_per_ip: Rate | str | None = None,
        messages_per_ip: Rate | str | None = None,
        recipients_per_ip: Rate | str | None = None,
        messages_per_user: Rate | str | None = None,
        recipients_per_user: Rate | str | None = None,
        messages_per_sender_domain: Rate | str | None = None,
        recipients_per_sender_domain: Rate | str | None = None,
        auth_failures_per_ip: Rate | str | None = None,
        auth_failures_block: str = "connection",
        ipv6_prefix: int = 64,
        store: CounterStore | None = None,
        clock: Callable[[], float] = time.time,
        max_keys: int = DEFAULT_MAX_KEYS,
        connect_refusal: RefusalText | None = None,
        close_store: bool | None = None,
    ) -> None:
        #: The reply for a client refused at connect (``connections_per_ip``, or
        #: ``auth_failures_per_ip`` with ``auth_failures_block = "connection"``) instead of
        #: the plugin's own text (a honeypot persona's words); it closes the connection.
        self.connect_refusal = connect_refusal
        self.connections_per_ip = Rate.of(connections_per_ip)
        self.messages_per_ip = Rate.of(messages_per_ip)
        self.recipients_per_ip = Rate.of(recipients_per_ip)
        self.messages_per_user = Rate.of(messages_per_user)
        self.recipients_per_user = Rate.of(recipients_per_user)
        self.messages_per_sender_domain = Rate.of(messages_per_sender_domain)
        self.recipients_per_sender_domain = Rate.of(recipients_per_sender_domain)
        self.auth_failures_per_ip = Rate.of(auth_failures_per_ip)
        if auth_failures_block not in BLOCK_CHOICES:
            raise ValueError(
                f"auth_failures_block must be one of {', '.join(BLOCK_CHOICES)}, "
                f"got {auth_failures_block!r}"
            )
        self.auth_failures_block = auth_failures_block
        if isinstance(ipv6_prefix, bool) or not 16 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be between 16 and 128, got {ipv6_prefix!r}")
        self.ipv6_prefix = ipv6_prefix
        #: Whether aclose closes the store: one made here, or ``close_store`` said so.
        self._owns_store = store is None if close_store is None else close_store
        self.store: CounterStore = (
            store if store is not None else MemoryCounters(clock=clock, max_keys=max_keys)
        )

    @classmethod
    def from_section(
        cls,
        section: PolicySection,
        env: PolicyEnv,
        *,
        connect_refusal: RefusalText | None = None,
    ) -> RateLimits:
        """The plugin for a ``[limits]`` table; ``connect_refusal``: see the constructor."""
        reader = SectionReader(section)

        def rate(key: str) -> Rate | None:
            raw = section.values.get(key)
            try:
                if raw is not None and not isinstance(raw, str):
                    Rate.parse(raw)  # raises, with the example of what is expected
                text = reader.string(key)
                return Rate.parse(text) if text is not None else None
            except ValueError as exc:
                raise reader.error(key, str(exc)) from None

        plugin = cls(
            connections_per_ip=rate("connections_per_ip"),
            messages_per_ip=rate("messages_per_ip"),
            recipients_per_ip=rate("recipients_per_ip"),
            messages_per_user=rate("messages_per_user"),
            recipients_per_user=rate("recipients_per_user"),
            messages_per_sender_domain=rate("messages_per_sender_domain"),
            recipients_per_sender_domain=rate("recipients_per_sender_domain"),
            auth_failures_per_ip=rate("auth_failures_per_ip"),
            auth_failures_block=reader.choice("auth_failures_block", BLOCK_CHOICES, "connection"),
            ipv6_prefix=_prefix(reader),
            clock=env.clock,
            max_keys=reader.count("max_keys", DEFAULT_MAX_KEYS, minimum=100) or DEFAULT_MAX_KEYS,
            connect_refusal=connect_refusal,
        )
        reader.done()
        state = env.shared_state()
        if state is not None and plugin.active:
            from mailgate.plugins.redis_state import RedisCounters

            plugin.store = RedisCounters(state, clock=env.clock)
            plugin._owns_store = True
        return plugin

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(getattr(self, key) is not None for key in LIMITS)

    def describe(self) -> str:
        return ", ".join(f"{key} {rate}" for key in LIMITS if (rate := getattr(self, key)))

    # --- whom a session counts as ---------------------------------------------------------

    def client(self, ip: str) -> str:
        """The subject per-IP limits count ``ip`` as: an IPv4 address (also when written
        IPv4-mapped), or the IPv6 network of ``ipv6_prefix`` bits it is in."""
        return _subject(ip, self.ipv6_prefix)

    def _ip(self, session: Session, limit: str) -> _Check | None:
        rate: Rate | None = getattr(self, limit)
        if rate is None:
            return None
        subject = self.client(session.peer_host)
        return _Check(limit, rate, subject, subject)

    def _sender_checks(self, session: Session, envelope: Envelope, kind: str) -> list[_Check]:
        """The checks for one message or recipient (``kind``): the user's or the client's,
        and the sender domain's."""
        checks: list[_Check] = []
        user_rate: Rate | None = getattr(self, f"{kind}_per_user")
        if session.user is not None and user_rate is not None:
            checks.append(
                _Check(f"{kind}_per_user", user_rate, session.user, "user " + session.user)
            )
        else:
            check = self._ip(session, f"{kind}_per_ip")
            if check is not None:
                checks.append(check)
        domain_rate: Rate | None = getattr(self, f"{kind}_per_sender_domain")
        sender = envelope.mail_from
        if domain_rate is not None and sender and sender.domain:
            domain = sender.domain.rstrip(".").lower()
            checks.append(
                _Check(f"{kind}_per_sender_domain", domain_rate, domain, "sender domain " + domain)
            )
        return checks

    # --- stages ---------------------------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        try:
            await self._connect_checks(session)
        except StateUnavailable as exc:
            self._unavailable(session, exc, "connect")

    async def _connect_checks(self, session: Session) -> None:
        if self._skipped(session):
            return
        failures = self._ip(session, "auth_failures_per_ip")
        if failures is not None and self.auth_failures_block == "connection":
            result = await self.store.peek(failures.key, failures.rate.limit, failures.rate.window)
            if not result.allowed:
                raise self._login_refusal(session, failures, result, "connect")
        check = self._ip(session, "connections_per_ip")
        if check is not None:
            refused = await self._count([check])
            if refused is not None:
                failed, result = refused
                text = f"Too many connections from {failed.who}"
                raise self._refusal(session, failed, result, text, 421, "4.7.0", "connect")

    async def on_auth(self, session: Session, auth: AuthAttempt) -> None:
        if self._skipped(session):
            return
        try:
            check = await self._note_auth_failures(session)
            if check is None:
                return
            result = await self.store.peek(check.key, check.rate.limit, check.rate.window)
        except StateUnavailable as exc:
            self._unavailable(session, exc, "auth")
            return
        if not result.allowed:
            raise self._login_refusal(session, check, result, "auth")

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        if not self._skipped(session):
            try:
                await self._note_auth_failures(session)
            except StateUnavailable as exc:
                self._unavailable(session, exc, "mail", refuse=False)

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        if self._skipped(session):
            return
        try:
            refused = await self._count(self._sender_checks(session, envelope, "recipients"))
        except StateUnavailable as exc:
            self._unavailable(session, exc, "rcpt")
            return
        if refused is not None:
            check, result = refused
            text = f"<{address}>: Too many recipients from {check.who}"
            raise self._refusal(session, check, result, text, 450, "4.7.1", "rcpt")

    async def on_data_start(self, session: Session, envelope: Envelope) -> None:
        if self._skipped(session):
            return
        try:
            refused = await self._count(self._sender_checks(session, envelope, "messages"))
        except StateUnavailable as exc:
            self._unavailable(session, exc, "data_start")
            return
        if refused is not None:
            check, result = refused
            text = f"Too many messages from {check.who}"
            raise self._refusal(session, check, result, text, 450, "4.7.1", "data_start")

    async def on_close(self, session: Session) -> None:
        if not self._skipped(session):
            try:
                await self._note_auth_failures(session)
            except StateUnavailable as exc:
                self._unavailable(session, exc, "close", refuse=False)

    def take_counts(self, old: RateLimits) -> None:
        """Count on from ``old``'s in-memory counts (a reload builds a new plugin from
        new settings; clients keep what they have used). Only when both keep their own
        store in memory: a store given from outside is its owner's, and counts in Redis
        stay there for the new plugin's store."""
        if (
            self._owns_store
            and old._owns_store
            and isinstance(self.store, MemoryCounters)
            and isinstance(old.store, MemoryCounters)
        ):
            self.store = old.store
            old._owns_store = False

    async def aclose(self) -> None:
        if self._owns_store:
            await self.store.aclose()

    # --- the parts ------------------------------------------------------------------------

    def _unavailable(
        self, session: Session, exc: StateUnavailable, stage: str, *, refuse: bool = True
    ) -> None:
        """The shared store did not answer: go on uncounted (fail open), or refuse with a
        4xx (``on_error = "closed"``). The outage itself is logged by the store, once;
        each session's decision goes to DEBUG."""
        closed = exc.fail_closed and refuse
        decide(
            session,
            POLICY,
            "tempfail" if closed else "error",
            f"shared state unavailable at {stage}, {'refused' if closed else 'not counted'}: {exc}",
            logging.DEBUG,
            stage=stage,
        )
        if not closed:
            return
        if stage == "connect":
            raise TempFail(
                421,
                "Service temporarily unavailable, try again later",
                enhanced="4.3.0",
                disconnect=True,
            )
        if stage == "auth":
            raise TempFail(
                454, "Temporary authentication failure, try again later", enhanced="4.7.0"
            )
        raise TempFail(451, "Temporary policy failure, try again later", enhanced="4.3.0")

    def _skipped(self, session: Session) -> bool:
        """Allow-listed clients are not counted; said once per session."""
        why = allowlisted(session)
        if why is None:
            return False
        state = _state(session)
        if not state.get("skip_logged"):
            state["skip_logged"] = True
            decide(session, POLICY, "skip", f"allow-listed: {why}")
        return True

    async def _note_auth_failures(self, session: Session) -> _Check | None:
        """Count the AUTH failures of this session not counted yet (the auth stage runs
        before its outcome, so failures are seen at the next stage). Returns the check of
        the auth failure limit, None when it is off."""
        check = self._ip(session, "auth_failures_per_ip")
        if check is None:
            return None
        state = _state(session)
        new = session.auth_failures - state.get("auth_failures", 0)
        if new > 0:
            state["auth_failures"] = session.auth_failures
            # One at a time, so that failures beyond the room left fill it up; once full,
            # the rest changes nothing (refused hits are not counted).
            for _ in range(min(new, check.rate.limit)):
                result = await self.store.hit(check.key, check.rate.limit, check.rate.window)
                if not result.allowed:
                    break
        return check

    async def _count(self, checks: Iterable[_Check]) -> tuple[_Check, RateResult] | None:
        """Count one event against every check, or against none: when one of them has no
        room, nothing is counted and the check that frees last is returned with its
        result."""
        checks = list(checks)
        if not checks:
            return None
        store = self.store
        if len(checks) == 1:
            check = checks[0]
            result = await store.hit(check.key, check.rate.limit, check.rate.window)
            return None if result.allowed else (check, result)
        refused: list[tuple[_Check, RateResult]] = []
        hit_all = getattr(store, "hit_all", None)
        if hit_all is not None:  # all or none in one step (RedisCounters: one round trip)
            results = await hit_all([(c.key, c.rate.limit, c.rate.window) for c in checks])
            refused = [(c, r) for c, r in zip(checks, results, strict=True) if not r.allowed]
            return max(refused, key=lambda item: item[1].retry_after) if refused else None
        for check in checks:
            result = await store.peek(check.key, check.rate.limit, check.rate.window)
            if not result.allowed:
                refused.append((check, result))
        if not refused:
            for check in checks:
                result = await store.hit(check.key, check.rate.limit, check.rate.window)
                if not result.allowed:  # another node (shared store) took the room meanwhile
                    refused.append((check, result))
        if not refused:
            return None
        return max(refused, key=lambda item: item[1].retry_after)

    def _refusal(
        self,
        session: Session,
        check: _Check,
        result: RateResult,
        text: str,
        code: int,
        enhanced: str,
        stage: str,
    ) -> Reject | TempFail:
        wait = retry_seconds(result.retry_after)
        decide(
            session,
            POLICY,
            "tempfail",
            f"{check.limit} {check.rate} exceeded by {check.who} at {stage}, retry in {wait} s",
            limit=check.limit,
            rate=str(check.rate),
            subject=check.subject,
            stage=stage,
            retry_after=wait,
        )
        if stage == "connect" and self.connect_refusal is not None:
            return refusal(self.connect_refusal(session), disconnect=True)
        return TempFail(
            code,
            f"{text}, try again in {retry_hint(result.retry_after)}",
            enhanced=enhanced,
            disconnect=code == 421,
        )

    def _login_refusal(
        self, session: Session, check: _Check, result: RateResult, stage: str
    ) -> Reject | TempFail:
        text = f"Too many failed logins from {check.who}"
        return self._refusal(session, check, result, text, 421, "4.7.0", stage)


def _prefix(reader: SectionReader) -> int:
    prefix = reader.count("ipv6_prefix", 64, minimum=16) or 64
    if prefix > 128:
        raise reader.error("ipv6_prefix", f"must be at most 128, got {prefix}")
    return prefix


def _state(session: Session) -> dict[str, Any]:
    state: dict[str, Any] = session.notes.setdefault(POLICY, {})
    return state


def retry_seconds(seconds: float) -> int:
    """Whole seconds to wait, at least 1."""
    return max(1, math.ceil(seconds - 1e-6))


def retry_hint(seconds: float) -> str:
    """``seconds`` for a reply: "1 second", "40 seconds", "3 minutes", "2 hours" (rounded
    up, so a client that waits that long finds room)."""
    whole = retry_seconds(seconds)
    if whole < 120:
        return f"{whole} second{'s' if whole != 1 else ''}"
    minutes = math.ceil(whole / 60)
    if minutes < 120:
        return f"{minutes} minutes"
    return f"{math.ceil(whole / 3600)} hours"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    section = env.section("limits")
    if section is None:
        return []
    plugin = RateLimits.from_section(section, env)
    if not plugin.active:
        log.info("%s sets no limit: no rate limits", section.source)
        return []
    state = env.shared_state()
    if state is not None:
        log.info("rate limits: %s, counted in %s", plugin.describe(), state.where)
    else:
        log.info("rate limits: %s", plugin.describe())
    if env.options.workers > 1 and state is None:
        log.info(
            "rate limits are counted in each of the %d worker processes on its own: a client "
            "may get up to %d times a limit",
            env.options.workers,
            env.options.workers,
        )
    return [plugin]


__all__ = [
    "LIMITS",
    "Rate",
    "RateLimits",
    "plugins_from_options",
    "retry_hint",
]
