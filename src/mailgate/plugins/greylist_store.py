"""The greylisting store: what the greylist plugin remembers of each (client network,
sender, recipient) triplet and of each client network, behind a small async interface
(:class:`GreylistBackend`), and the built-in backend, :class:`GreylistStore`: one SQLite
file in WAL mode, used from one thread of its own, shared by ``--workers`` processes.

The plugin (:mod:`mailgate.plugins.greylist`) decides; this module only keeps state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

#: How long SQLite waits for another process's write lock.
BUSY_TIMEOUT = 5.0

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


__all__ = [
    "BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "ClientState",
    "GreylistBackend",
    "GreylistStore",
    "Triplet",
    "TripletState",
]
