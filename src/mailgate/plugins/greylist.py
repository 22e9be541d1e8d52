"""Greylisting: refuse the first attempt of an unknown (client, sender, recipient) triplet
with ``451 4.7.1`` and accept it when the client retries after a delay, as real mail
servers do and most spam software does not.

The triplet is the client's network (its /24 for IPv4, its /64 for IPv6, configurable),
the normalised sender (``<>`` for the null sender) and the recipient, checked at RCPT.
A retry is accepted from ``delay`` after the first attempt until ``retry_window`` after
it; a triplet that passed stays passed until ``expiry`` after its last mail. A client
network that passed ``auto_allow_after`` triplets is passed wholesale. Allow-listed and
authenticated clients and clients in ``relay_networks`` are not greylisted.

The state lives in SQLite (:class:`~mailgate.plugins.greylist_store.GreylistStore`, WAL
mode, in :mod:`mailgate.plugins.greylist_store`), so it survives restarts and
is shared by ``--workers`` processes; any other backend with the same small interface
(:class:`GreylistBackend`) can take its place. A store that fails (a corrupt or unwritable
file, a lock held too long) lets the mail through: greylisting fails open.

With ``[state] backend = "redis"`` the triplets live in Redis instead
(:class:`~mailgate.plugins.redis_state.RedisGreylistStore`), shared by every node: a
retry that reaches another node passes there. When Redis does not answer, greylisting
fails open, or with ``on_error = "closed"`` answers ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mailgate.hooks import Address, Envelope, Session, TempFail
from mailgate.plugins.greylist_store import (
    ClientState,
    GreylistBackend,
    GreylistStore,
    Triplet,
    TripletState,
)
from mailgate.plugins.policy import (
    PolicyConfigError,
    PolicyEnv,
    SectionReader,
    decide,
    exempt,
)
from mailgate.plugins.state import StateUnavailable
from mailgate.server.options import LOOPBACK, Network, PolicySection
from mailgate.settings import user_state_dir

log = logging.getLogger("mailgate.policy")

POLICY = "greylist"
TABLE = "greylisting"

DEFAULT_DELAY = 300.0  # postgrey's default
DEFAULT_RETRY_WINDOW = 2 * 86400.0
DEFAULT_EXPIRY = 36 * 86400.0
DEFAULT_IPV4_PREFIX = 24
DEFAULT_IPV6_PREFIX = 64
DEFAULT_AUTO_ALLOW_AFTER = 5  # postgrey --auto-whitelist-clients
DEFAULT_DATABASE = "greylist.sqlite3"
#: Prune expired rows at most this often (seconds of the plugin's clock), on a request.
PRUNE_INTERVAL = 3600.0
#: How long a store operation may take before the mail is let through.
DEFAULT_TIMEOUT = 10.0
#: Failures of the store are logged as warnings at most this often (seconds).
ERROR_LOG_INTERVAL = 60.0


def client_network(ip: str, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str | None:
    """The network ``ip`` is greylisted as (``"192.0.2.0/24"``, ``"2001:db8::/64"``), or
    None when ``ip`` is not an IP address. IPv4-mapped IPv6 addresses count as IPv4."""
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


_BATV = re.compile(r"^(?:prvs|msprvs\d*)=[^=]+=(.+)$")
_SRS0 = re.compile(r"^srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)$")
_SRS1 = re.compile(r"^srs1[=+-].*?==[^=]*=[^=]*=([^=]+)=(.+)$")
_NUMBER = re.compile(r"\b\d+\b")


def normalize_sender(sender: str) -> str:
    """The sender as greylisting keys it, so that a retry of the same mail matches even
    when its sender address changes per attempt:

    - lower case; the null sender becomes ``"<>"``;
    - BATV tags are removed (``prvs=0123abcdef=user@example.com`` -> ``user@example.com``);
    - SRS addresses become the original sender (``SRS0=HHH=TT=example.org=user@fwd.test``
      -> ``user@example.org``);
    - a ``+extension`` is removed and numbers in the local part become ``#``, as postgrey
      does for VERP addresses (``list+bounce-1234@x`` -> ``list@x``,
      ``bounce-1234-5@x`` -> ``bounce-#-#@x``).
    """
    text = sender.strip().lower()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        return "<>"
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    match = _BATV.match(local)
    if match:
        local = match.group(1)
    match = _SRS1.match(local) or _SRS0.match(local)
    if match:
        domain, local = match.group(1), match.group(2)
    if "+" in local[1:]:
        local = local[: local.index("+", 1)]
    local = _NUMBER.sub("#", local)
    return f"{local}@{domain}"


def normalize_recipient(recipient: str) -> str:
    return recipient.strip().strip("<>").lower()


# --- the plugin ---------------------------------------------------------------------------


class Greylist:
    """The greylisting policy plugin (name ``"greylist"``), checked at RCPT.

    From code::

        server.add_plugin(Greylist(delay=300, database=Path("/var/lib/mailgate/grey.db")))

    ``database`` defaults to ``greylist.sqlite3`` in the embedded server's state directory
    (:func:`mailgate.settings.user_state_dir`); ``store`` replaces the SQLite store with any
    :class:`GreylistBackend`. ``clock`` (default ``time.time``) is used for every time.
    """

    name = POLICY

    def __init__(
        self,
        *,
        delay: float = DEFAULT_DELAY,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        expiry: float = DEFAULT_EXPIRY,
        ipv4_prefix: int = DEFAULT_IPV4_PREFIX,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        auto_allow_after: int = DEFAULT_AUTO_ALLOW_AFTER,
        database: Path | str | None = None,
        store: GreylistBackend | None = None,
        relay_networks: Iterable[Network] = LOOPBACK,
        clock: Callable[[], float] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        for key, value in (("delay", delay), ("retry_window", retry_window), ("expiry", expiry)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a duration of 0 seconds or more, got {value}")
        if retry_window <= delay:
            raise ValueError(
                f"retry_window ({retry_window:g} s) must be longer than delay ({delay:g} s):"
                " no retry could ever pass"
            )
        if expiry <= 0:
            raise ValueError("expiry must be longer than 0 seconds")
        if not 0 <= ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be 0 to 32, got {ipv4_prefix}")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0 to 128, got {ipv6_prefix}")
        if auto_allow_after < 0:
            raise ValueError(f"auto_allow_after must be 0 (off) or more, got {auto_allow_after}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.delay = float(delay)
        self.retry_window = float(retry_window)
        self.expiry = float(expiry)
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.auto_allow_after = auto_allow_after
        self.relay_networks = tuple(relay_networks)
        self.clock: Callable[[], float] = clock or time.time
        self.timeout = timeout
        if store is None:
            if database is None:
                database = user_state_dir() / DEFAULT_DATABASE
            store = GreylistStore(Path(database).expanduser())
        self.store: GreylistBackend = store
        self._last_prune: float | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._last_error_log = -math.inf

    def __repr__(self) -> str:
        return (
            f"Greylist(delay={self.delay:g}, retry_window={self.retry_window:g},"
            f" expiry={self.expiry:g}, store={self.store!r})"
        )

    @classmethod
    def from_section(cls, section: PolicySection | None, env: PolicyEnv) -> Greylist:
        """The plugin for a ``[greylisting]`` table (None: ``greylist = true`` alone, all
        defaults). A relative ``database`` is in the server's ``state_dir``."""
        kwargs: dict[str, Any] = {}
        reader = SectionReader(section) if section is not None else None
        if reader is not None:
            kwargs = {
                "delay": reader.seconds("delay", DEFAULT_DELAY),
                "retry_window": reader.seconds("retry_window", DEFAULT_RETRY_WINDOW),
                "expiry": reader.seconds("expiry", DEFAULT_EXPIRY),
                "ipv4_prefix": reader.count("ipv4_prefix", DEFAULT_IPV4_PREFIX, minimum=0),
                "ipv6_prefix": reader.count("ipv6_prefix", DEFAULT_IPV6_PREFIX, minimum=0),
                "auto_allow_after": reader.count(
                    "auto_allow_after", DEFAULT_AUTO_ALLOW_AFTER, minimum=0
                ),
            }
            for key, top in (("ipv4_prefix", 32), ("ipv6_prefix", 128)):
                if kwargs[key] > top:
                    raise reader.error(key, f"must be 0 to {top}, got {kwargs[key]}")
            name = reader.string("database", DEFAULT_DATABASE) or ""
            if not name.strip():
                raise reader.error("database", "empty path")
            reader.done()
        else:
            name = DEFAULT_DATABASE
        database = Path(name.strip()).expanduser()
        if not database.is_absolute():
            database = env.options.state_dir / database
        # Give up on the store (and let the mail through) well before the hook times out.
        hook_timeout = env.options.hook_timeout
        timeout = min(DEFAULT_TIMEOUT, hook_timeout / 2) if hook_timeout > 0 else DEFAULT_TIMEOUT
        try:
            plugin = cls(
                **kwargs,
                database=database,
                relay_networks=env.options.relay_networks,
                clock=env.clock,
                timeout=timeout,
            )
        except ValueError as exc:
            where = section.source if section is not None else "setting greylist"
            raise PolicyConfigError(f"{where}: {exc}") from None
        state = env.shared_state()
        if state is not None:
            # The SQLite store made above was never opened: nothing to close.
            from mailgate.plugins.redis_state import RedisGreylistStore

            plugin.store = RedisGreylistStore(
                state, retry_window=plugin.retry_window, expiry=plugin.expiry
            )
        return plugin

    # -- the stage -------------------------------------------------------------------------

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        why = exempt(session, self.relay_networks)
        if why is not None:
            self._skip(session, why)
            return
        client = client_network(session.peer_host, self.ipv4_prefix, self.ipv6_prefix)
        if client is None:
            self._skip(session, f"client address {session.peer_host!r} is not an IP address")
            return
        triplet = Triplet(client, normalize_sender(envelope.sender), normalize_recipient(address))
        now = self.clock()
        try:
            refusal = await asyncio.wait_for(self._check(session, triplet, now), self.timeout)
        except StateUnavailable as exc:
            # The outage is logged once by the shared store; each decision at DEBUG.
            closed = exc.fail_closed
            why = f"shared state unavailable, {'refused' if closed else 'let through'}: {exc}"
            decide(
                session,
                POLICY,
                "tempfail" if closed else "error",
                why,
                logging.DEBUG,
                **_fields(triplet),
            )
            if closed:
                raise TempFail(
                    451, "Greylisting unavailable, please try again later", enhanced="4.3.0"
                ) from None
            return
        except Exception as exc:
            problem = (
                f"no answer within {self.timeout:g} s" if isinstance(exc, TimeoutError) else exc
            )
            self._failed(session, triplet, f"greylisting store failed, let through: {problem}")
            return
        self._maybe_prune(now)
        if refusal is not None:
            raise refusal

    async def _check(self, session: Session, triplet: Triplet, now: float) -> TempFail | None:
        """Decide about one triplet: None to let it through, or the refusal."""
        fields = _fields(triplet)
        if self.auto_allow_after:
            client = await self.store.lookup_client(triplet.client)
            if (
                client is not None
                and client.passed >= self.auto_allow_after
                and now - client.last_seen <= self.expiry
            ):
                await self.store.touch_client(triplet.client, now)
                decide(
                    session,
                    POLICY,
                    "accept",
                    f"client network {triplet.client} passed {client.passed} triplets",
                    level=logging.DEBUG,
                    **fields,
                )
                return None
        state = await self.store.lookup(triplet)
        if state is not None and state.passed and now - state.last_seen <= self.expiry:
            await self.store.mark_passed(triplet, now)
            decide(session, POLICY, "accept", f"{triplet} passed before", logging.DEBUG, **fields)
            return None
        if state is None or state.passed or now - state.first_seen > self.retry_window:
            # Unknown, expired, or the first retry came too late: (re)start the clock.
            if state is None:
                why = "first attempt"
            elif state.passed:
                why = f"passed, but no mail for {now - state.last_seen:.0f} s: starting over"
            else:
                why = f"retry {now - state.first_seen:.0f} s after the first: starting over"
            await self.store.record(triplet, now)
            return self._refuse(session, triplet, self.delay, why, fields)
        waited = now - state.first_seen
        if waited < self.delay:
            remaining = min(self.delay - waited, self.delay)
            return self._refuse(
                session, triplet, remaining, f"retry after {max(waited, 0):.0f} s", fields
            )
        client_since = now - self.expiry if self.auto_allow_after else None
        await self.store.mark_passed(triplet, now, client_since=client_since)
        decide(
            session,
            POLICY,
            "accept",
            f"{triplet} retried after {waited:.0f} s: passed",
            waited=round(waited, 3),
            **fields,
        )
        return None

    def _refuse(
        self, session: Session, triplet: Triplet, wait: float, why: str, fields: dict[str, Any]
    ) -> TempFail:
        seconds = max(1, math.ceil(wait))
        decide(session, POLICY, "tempfail", f"{triplet}: {why}, wait {seconds} s", **fields)
        unit = "second" if seconds == 1 else "seconds"
        return TempFail(451, f"Greylisted, please try again in {seconds} {unit}", enhanced="4.7.1")

    def _skip(self, session: Session, why: str) -> None:
        # Once per session and reason at INFO; every later RCPT of it at DEBUG.
        seen = session.notes.setdefault(POLICY, {}).setdefault("skipped", set())
        level = logging.DEBUG if why in seen else logging.INFO
        seen.add(why)
        decide(session, POLICY, "skip", why, level)

    def _failed(self, session: Session, triplet: Triplet, why: str) -> None:
        # A broken database fails every request: warn once a minute, the rest at DEBUG.
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            level = logging.WARNING
        decide(session, POLICY, "error", why, level, **_fields(triplet))

    # -- housekeeping ----------------------------------------------------------------------

    def _maybe_prune(self, now: float) -> None:
        """Start a prune in the background when the last is PRUNE_INTERVAL ago (on the
        first request, too: a restarted server cleans up)."""
        if self._last_prune is not None and now - self._last_prune < PRUNE_INTERVAL:
            return
        if self._prune_task is not None and not self._prune_task.done():
            return
        self._last_prune = now
        self._prune_task = asyncio.get_running_loop().create_task(self._prune(now))

    async def _prune(self, now: float) -> None:
        try:
            removed = await asyncio.wait_for(
                self.store.prune(now, retry_window=self.retry_window, expiry=self.expiry),
                self.timeout * 6,
            )
        except Exception as exc:
            log.warning("policy %s: pruning the greylisting store failed: %s", POLICY, exc)
        else:
            if removed:
                log.info("policy %s: pruned %d expired greylisting entries", POLICY, removed)

    async def aclose(self) -> None:
        """Wait for a prune in progress, then close the store."""
        task, self._prune_task = self._prune_task, None
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, self.timeout)
        await self.store.aclose()


def _fields(triplet: Triplet) -> dict[str, Any]:
    """The log fields of a decision about ``triplet``."""
    return {"network": triplet.client, "sender": triplet.sender, "recipient": triplet.recipient}


def plugins_from_options(env: PolicyEnv) -> list[Any]:
    """[Greylist] when the configuration has a ``[greylisting]`` table or ``greylist =
    true`` (``--greylist``); else nothing."""
    section = env.section(TABLE)
    if section is None and not env.options.greylist:
        return []
    return [Greylist.from_section(section, env)]


__all__ = [
    "ClientState",
    "Greylist",
    "GreylistBackend",
    "GreylistStore",
    "Triplet",
    "TripletState",
    "client_network",
    "normalize_recipient",
    "normalize_sender",
    "plugins_from_options",
]
