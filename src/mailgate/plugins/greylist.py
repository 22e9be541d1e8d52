"""Greylisting: refuse the first attempt of an unknown (client, sender, recipient) triplet
with ``451 4.7.1`` and accept it when the client retries after a delay, as real mail
servers do and most spam software does not.

The triplet is the client's network (its /24 for IPv4, its /64 for IPv6, configurable),
the normalised sender (``<>`` for the null sender) and the recipient, checked at RCPT.
A retry is accepted from ``delay`` after the first attempt until ``retry_window`` after
it; a triplet that passed stays passed until ``expiry`` after its last mail. A client
network that passed ``auto_allow_after`` triplets is passed wholesale. Allow-listed and
authenticated clients and clients in ``relay_networks`` are not greylisted.

The state lives in SQLite (:class:`GreylistStore`, WAL mode), so it survives restarts and
is shared by ``--workers`` processes; any other backend with the same small interface
(:class:`GreylistBackend`) can take its place. A store that fails (a corrupt or unwritable
file, a lock held too long) lets the mail through: greylisting fails open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mailgate.hooks import Address, Envelope, Session, TempFail
from mailgate.plugins.policy import (
    PolicyConfigError,
    PolicyEnv,
    SectionReader,
    decide,
    exempt,
)
from mailgate.server.options import LOOPBACK, Network, PolicySection

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
#: How long SQLite waits for another process's write lock.
BUSY_TIMEOUT = 5.0
#: Failures of the store are logged as warnings at most this often (seconds).
ERROR_LOG_INTERVAL = 60.0

T = TypeVar("T")


# --- the triplet --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Triplet:
    """What greylisting remembers: the client's network (``"192.0.2.0/24"``), the
    normalised sender (``"<>"`` for the null sender) and the recipient (lower case)."""

    client: str
    sender: str
    recipient: str

    def __str__(self) -> str:
        return f"{self.client} {self.sender} -> {self.recipient}"


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


# --- the store ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TripletState:
    """What the store knows of one triplet. ``passed_at`` is None until a retry passed."""

    first_seen: float
    last_seen: float
    passed_at: float | None = None

    @property
    def passed(self) -> bool:
        return self.passed_at is not None


@dataclass(frozen=True, slots=True)
class ClientState:
    """How many triplets of a client network passed, and when one was last seen."""

    passed: int
    last_seen: float


class GreylistBackend(Protocol):
    """What :class:`Greylist` needs from a store; :class:`GreylistStore` (SQLite) is the
    built-in one. Every method may raise: the plugin then lets the mail through."""

    async def lookup(self, triplet: Triplet) -> TripletState | None:
        """The triplet's state, or None when unknown."""
        ...

    async def record(self, triplet: Triplet, now: float) -> None:
        """Start the triplet over: first (and last) seen ``now``, not passed."""
        ...

    async def mark_passed(
        self, triplet: Triplet, now: float, *, client_since: float | None = None
    ) -> bool:
        """Mark the triplet passed (keeping an earlier ``passed_at``) and last seen ``now``.
        Returns True when it passed just now. Then, when ``client_since`` is not None, count
        one more passed triplet for its client network (restarting the count at 1 when the
        client was last seen before ``client_since``)."""
        ...

    async def lookup_client(self, client: str) -> ClientState | None:
        """The passed-triplet count of a client network, or None."""
        ...

    async def touch_client(self, client: str, now: float) -> None:
        """Refresh the client network's last-seen time (it was just passed wholesale)."""
        ...

    async def prune(self, now: float, *, retry_window: float, expiry: float) -> int:
        """Remove triplets not passed whose retry window has closed, and passed triplets
        and clients not seen within ``expiry``. Returns how many rows went."""
        ...

    async def aclose(self) -> None: ...


SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    client TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passed_at REAL,
    PRIMARY KEY (client, sender, recipient)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplets_last_seen ON triplets (last_seen);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY NOT NULL,
    passed INTEGER NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


class GreylistStore:
    """Greylisting state in one SQLite file, created with its schema on first use.

    Every SQLite call runs in one dedicated thread per store (a single-thread executor),
    which opens the connection and is the only thread to use it: sqlite3 connections are
    bound to the thread that made them, one connection avoids reopening the file and
    re-running the PRAGMAs on every request, and SQLite takes one writer at a time
    anyway. The event loop only awaits. Other processes (``--workers``) open the same
    file: the journal is in WAL mode (readers do not block the writer) and a write waits
    up to ``busy_timeout`` seconds for another process's lock. After an error the
    connection is closed and the next call opens the file again.

    The file is created readable by its owner only (it holds mail addresses).
    """

    def __init__(self, path: Path | str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # used only in the executor's thread
        self._closed = False

    def __repr__(self) -> str:
        return f"GreylistStore({str(self.path)!r})"

    # -- the async interface (GreylistBackend) ---------------------------------------------

    async def lookup(self, triplet: Triplet) -> TripletState | None:
        return await self._run(self._lookup, triplet)

    async def record(self, triplet: Triplet, now: float) -> None:
        await self._run(self._record, triplet, now)

    async def mark_passed(
        self, triplet: Triplet, now: float, *, client_since: float | None = None
    ) -> bool:
        return await self._run(self._mark_passed, triplet, now, client_since)

    async def lookup_client(self, client: str) -> ClientState | None:
        return await self._run(self._lookup_client, client)

    async def touch_client(self, client: str, now: float) -> None:
        await self._run(self._touch_client, client, now)

    async def prune(self, now: float, *, retry_window: float, expiry: float) -> int:
        return await self._run(self._prune, now, retry_window, expiry)

    async def aclose(self) -> None:
        """Close the database and stop the thread; later calls raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._disconnect)
        finally:
            executor.shutdown(wait=False)

    # -- in the store's thread -------------------------------------------------------------

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._executor is None:  # made on first use: after a --workers fork
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greylist-db")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, func, args)

    def _call(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return func(self._connect(), *args)
        except sqlite3.Error:
            self._disconnect()
            raise

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Owner-only from the start; SQLite gives the -wal/-shm files the same mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # Switching a new file to WAL can fail with "database is locked" at once (without
        # the busy handler) while another process does the same: retry for busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                self._db = self._open()
                return self._db
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
                busy = code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, with explicit BEGIN IMMEDIATE where needed.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            (mode,) = db.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # durable enough for greylisting
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self.path}: schema version {version} is newer than this mailgate's"
                )
            if version < SCHEMA_VERSION:
                db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        except BaseException:
            db.close()
            raise
        return db

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _lookup(db: sqlite3.Connection, t: Triplet) -> TripletState | None:
        row = db.execute(
            "SELECT first_seen, last_seen, passed_at FROM triplets"
            " WHERE client = ? AND sender = ? AND recipient = ?",
            (t.client, t.sender, t.recipient),
        ).fetchone()
        return None if row is None else TripletState(row[0], row[1], row[2])

    @staticmethod
    def _record(db: sqlite3.Connection, t: Triplet, now: float) -> None:
        db.execute(
            "INSERT INTO triplets (client, sender, recipient, first_seen, last_seen, passed_at)"
            " VALUES (?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (client, sender, recipient) DO UPDATE SET"
            " first_seen = excluded.first_seen, last_seen = excluded.last_seen,"
            " passed_at = NULL",
            (t.client, t.sender, t.recipient, now, now),
        )

    @classmethod
    def _mark_passed(
        cls, db: sqlite3.Connection, t: Triplet, now: float, client_since: float | None
    ) -> bool:
        key = (t.client, t.sender, t.recipient)
        with cls._transaction(db):
            newly = (
                db.execute(
                    "UPDATE triplets SET passed_at = ?, last_seen = ?"
                    " WHERE client = ? AND sender = ? AND recipient = ? AND passed_at IS NULL",
                    (now, now, *key),
                ).rowcount
                > 0
            )
            if not newly:  # passed before (or pruned meanwhile): refresh, or put it back
                db.execute(
                    "INSERT INTO triplets"
                    " (client, sender, recipient, first_seen, last_seen, passed_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (client, sender, recipient) DO UPDATE SET"
                    " last_seen = excluded.last_seen",
                    (*key, now, now, now),
                )
            elif client_since is not None:
                db.execute(
                    "INSERT INTO clients (client, passed, last_seen) VALUES (?, 1, ?)"
                    " ON CONFLICT (client) DO UPDATE SET"
                    " passed = CASE WHEN clients.last_seen < ? THEN 1 ELSE clients.passed + 1 END,"
                    " last_seen = excluded.last_seen",
                    (t.client, now, client_since),
                )
        return newly

    @staticmethod
    def _lookup_client(db: sqlite3.Connection, client: str) -> ClientState | None:
        row = db.execute(
            "SELECT passed, last_seen FROM clients WHERE client = ?", (client,)
        ).fetchone()
        return None if row is None else ClientState(row[0], row[1])

    @staticmethod
    def _touch_client(db: sqlite3.Connection, client: str, now: float) -> None:
        db.execute("UPDATE clients SET last_seen = ? WHERE client = ?", (now, client))

    @classmethod
    def _prune(cls, db: sqlite3.Connection, now: float, retry_window: float, expiry: float) -> int:
        stale, expired = now - retry_window, now - expiry
        with cls._transaction(db):
            # An unpassed triplet's last_seen is its first_seen.
            removed = db.execute(
                "DELETE FROM triplets WHERE last_seen < ?"
                " AND ((passed_at IS NULL AND last_seen < ?) OR last_seen < ?)",
                (max(stale, expired), stale, expired),
            ).rowcount
            removed += db.execute("DELETE FROM clients WHERE last_seen < ?", (expired,)).rowcount
        return removed


# --- the plugin ---------------------------------------------------------------------------


class Greylist:
    """The greylisting policy plugin (name ``"greylist"``), checked at RCPT.

    From code::

        server.add_plugin(Greylist(delay=300, database=Path("/var/lib/mailgate/grey.db")))

    ``database`` defaults to ``greylist.sqlite3`` in the embedded server's state directory
    (:func:`mailgate.config.user_state_dir`); ``store`` replaces the SQLite store with any
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
                from mailgate.config import user_state_dir

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
            return cls(
                **kwargs,
                database=database,
                relay_networks=env.options.relay_networks,
                clock=env.clock,
                timeout=timeout,
            )
        except ValueError as exc:
            where = section.source if section is not None else "setting greylist"
            raise PolicyConfigError(f"{where}: {exc}") from None

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
