"""The local queue store: SQLite (WAL, synchronous=FULL) for the state and the small
bodies (:data:`INLINE_BODY_LIMIT`), one file per larger message body in the queue
directory.

Threads: writes go through one connection, reads through a second one in a reader thread
(WAL lets them see committed data while the writer works). Group commit: the writer takes
every write waiting, runs each in its own savepoint inside one transaction, fsyncs
``bodies/`` once for all enqueues among them and commits once, so under load one WAL
fsync and one directory fsync serve many messages. Each caller is answered after that
commit. What may wait for the disk or another process runs in the database thread
(BEGIN, which may wait for the write lock; COMMIT, which writes and syncs the WAL; the
fsyncs and removals of body files); the statements of the frequent writes (enqueue,
claim, results) run on the event loop between the two, against pages in memory (see
:class:`_Writer` for why). Reads, and operators' writes over the whole queue, never
run on the loop.

Several processes may open the same queue (the server and ``mailgate queue`` commands):
SQLite serializes their writes (``busy_timeout``), ``PRAGMA data_version`` tells one
process that another committed, and the body directory tells live enqueues from dead ones
(see :mod:`mailgate.queue.bodies`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .bodies import BodyDirectory, run_to_end
from .changes import ChangeWaiting
from .model import (
    ClientInfo,
    DeliveryBatch,
    DeliveryResult,
    DsnKind,
    DsnNotice,
    Lease,
    MessageDetails,
    MessageInfo,
    NewMessage,
    QueuedMessage,
    QueueFilter,
    QueueStats,
    RecipientInfo,
    RecipientState,
    RemoteReply,
    age_bucket,
    age_bucket_labels,
    destination_domain,
    format_notify,
)
from .policy import (
    QueuePolicy,
    RecipientUpdate,
    apply_operator_bounce,
    apply_result,
)
from .rows import (
    dsn_kinds,
    history_entry,
    joined,
    message_info,
    recipient_facts,
    recipient_info,
)
from .slots import SlotGate, slot_keys
from .store import BodySource, NoticeSettled, QueueError, QueueStore

__all__ = ["SCHEMA_VERSION", "SQLiteQueueStore", "migrate", "new_message_id", "schema_version"]

log = logging.getLogger("mailgate.queue")

T = TypeVar("T")

_DATABASE_NAME = "queue.db"
#: The DSN producer's lock file (see claim_notice_producer).
_NOTICE_LOCK_NAME = "dsn-producer.lock"
#: The destination slots' lock files (see destination_slot).
_SLOTS_DIRECTORY = "slots"
# Writes gathered into one transaction at most (bounds the latency of the first).
_MAX_GROUP = 512
#: How long a write waits for another process's write lock.
_BUSY_TIMEOUT_MS = 30000
# SQLite's default limit of host parameters is 32766; chunks stay far below.
_IN_CHUNK = 500
_PENDING = ("queued", "deferred")
_FINAL = (RecipientState.DELIVERED, RecipientState.FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    envid TEXT,
    ret TEXT,
    smtputf8 INTEGER NOT NULL,
    body_type TEXT,
    client TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at, id);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    destination TEXT NOT NULL,
    orcpt TEXT,
    notify TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    reply_code INTEGER,
    reply_enhanced TEXT,
    reply_text TEXT,
    remote_mta TEXT,
    status TEXT,
    diagnostic TEXT,
    last_attempt_at REAL,
    final_at REAL,
    held_reason TEXT,
    dsn_pending TEXT,
    dsn_sent TEXT NOT NULL DEFAULT '',
    lease_owner TEXT,
    lease_id INTEGER,
    lease_expires REAL
);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message_id);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (next_attempt)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_dsn ON recipients (message_id)
    WHERE dsn_pending IS NOT NULL;
CREATE INDEX IF NOT EXISTS recipients_leased ON recipients (lease_owner)
    WHERE lease_owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients (domain);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    recipient_id INTEGER,
    recipient TEXT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER,
    reply_code INTEGER,
    reply_enhanced TEXT,
    reply_text TEXT,
    remote_mta TEXT,
    status TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS history_message ON history (message_id);
"""

#: Migration ``n`` (1-based) brings the database from version ``n - 1`` to ``n``
#: (``meta.schema_version``). Version 1 is the first schema (its statements say IF NOT
#: EXISTS: databases made before migrations were versioned already hold it).
MIGRATIONS: tuple[str, ...] = (
    _SCHEMA,
    # 2: RFC 8689 REQUIRETLS and "TLS-Required: No", per message.
    "ALTER TABLE messages ADD COLUMN require_tls INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE messages ADD COLUMN tls_optional INTEGER NOT NULL DEFAULT 0",
    # 3: small bodies in the row (NULL: the body is a file in bodies/).
    "ALTER TABLE messages ADD COLUMN body BLOB",
)
SCHEMA_VERSION = len(MIGRATIONS)


def _database_version(connection: sqlite3.Connection) -> int:
    """The schema version of an open database (0: none yet)."""
    if (
        connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        is None
    ):
        return 0
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 0 if row is None else int(row[0])


def _apply_migrations(connection: sqlite3.Connection, *, migrate: bool, where: Path) -> int:
    """Bring the database (inside the caller's write transaction) to
    :data:`SCHEMA_VERSION`, or with ``migrate=False`` check that it is there; returns
    the version found before."""
    found = _database_version(connection)
    if found == SCHEMA_VERSION:
        return found
    if found > SCHEMA_VERSION or not migrate:
        raise _version_error(where, found)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1].split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(version),),
        )
        connection.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('lease_seq', '0')")
        log.info("queue database %s migrated to schema version %d", where, version)
    return found


def _version_error(where: Path, found: int) -> QueueError:
    if found > SCHEMA_VERSION:
        return QueueError(
            f"queue database {where} is at schema version {found}, newer than this "
            f"mailgate's {SCHEMA_VERSION}: upgrade mailgate"
        )
    return QueueError(
        f"queue database {where} is at schema version {found}, this mailgate needs "
        f"{SCHEMA_VERSION}: run 'mailgate queue migrate'"
    )


def schema_version(directory: str | os.PathLike[str]) -> int:
    """The schema version of the queue database in ``directory`` (0: none yet); reads
    only, creates nothing."""
    path = Path(directory) / _DATABASE_NAME
    if not path.exists():
        return 0
    connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        connection.execute("PRAGMA busy_timeout = 30000")
        return _database_version(connection)
    finally:
        connection.close()


def migrate(directory: str | os.PathLike[str]) -> int:
    """Create or update the queue database in ``directory`` (made if missing) to
    :data:`SCHEMA_VERSION`, in one write transaction (a second migrator waits for it,
    then finds nothing to do); returns the version found before. Blocking."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    connection = _connect(path / _DATABASE_NAME)
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            before = _apply_migrations(connection, migrate=True, where=path / _DATABASE_NAME)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return before
    finally:
        connection.close()


_RECIPIENT_COLUMNS = (
    "id, message_id, address, destination, orcpt, notify, state, attempts, next_attempt, "
    "reply_code, reply_enhanced, reply_text, remote_mta, status, diagnostic, last_attempt_at, "
    "final_at, held_reason, "
    "dsn_pending, dsn_sent, lease_owner, lease_id, lease_expires"
)
_MESSAGE_COLUMNS = (
    "id, sender, size, received_at, expires_at, envid, ret, smtputf8, body_type, client, "
    "require_tls, tls_optional"
)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: A body given as bytes up to this size is kept in its message's row, not in a file:
#: the commit that makes the rows durable (one WAL fsync for a whole group) makes it
#: durable too, where a file costs its own fsync, two links, the fsync of ``bodies/``
#: and a removal (each a trip to a thread, and work for the file system's journal).
#: Deliveries read it with their claim. Larger bodies, and those given as a path (a
#: spool file is linked, not copied) or a stream, are files.
INLINE_BODY_LIMIT = 64 * 1024


#: The last 5 characters of a queue id: a counter that starts at a random point in each
#: process. Ids made in one process never collide (2**25 of them would have to fall in
#: one microsecond); two processes collide only in the same microsecond and only if their
#: counters meet, where 5 random characters would collide within a process too (about
#: 1.5 % for 1,000 ids in one microsecond).
_ID_SEQUENCE = itertools.count(secrets.randbelow(32**5))


def new_message_id(now: float) -> str:
    """A queue id: 11 base-32 characters of microseconds (ids sort by arrival time) and
    5 of a per-process counter that starts at random (80 bits in all; unique across
    processes without coordination)."""
    micros = max(0, int(now * 1_000_000))
    chars: list[str] = []
    for _ in range(11):
        micros, digit = divmod(micros, 32)
        chars.append(_CROCKFORD[digit])
    stamp = "".join(reversed(chars))
    sequence = next(_ID_SEQUENCE) % 32**5
    suffix: list[str] = []
    for _ in range(5):
        sequence, digit = divmod(sequence, 32)
        suffix.append(_CROCKFORD[digit])
    return stamp + "".join(reversed(suffix))


_CLIENT_FIELDS = tuple(field.name for field in fields(ClientInfo))


def _client_json(client: ClientInfo) -> str:
    """The client's facts as the ``client`` column keeps them (``asdict`` without its
    deep copy: the fields are flat)."""
    return json.dumps(
        {name: getattr(client, name) for name in _CLIENT_FIELDS}, separators=(",", ":")
    )


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are begun and ended explicitly.
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    # FULL: the WAL is fsynced at every commit, so a commit survives power loss.
    connection.execute("PRAGMA synchronous = FULL")
    return connection


class _Job:
    """A write for the writer; ``run`` executes inside the group's transaction (on the
    event loop, or in the database thread when ``in_thread``), ``after_commit`` in the
    database thread once it is durable (removing files, dropping staged names)."""

    __slots__ = ("after_commit", "future", "in_thread", "run", "signals", "sync_bodies")

    def __init__(
        self,
        run: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        *,
        sync_bodies: bool = False,
        signals: bool = True,
        after_commit: Callable[[Any], None] | None = None,
        in_thread: bool = False,
    ) -> None:
        self.run = run
        self.future = future
        self.sync_bodies = sync_bodies
        self.signals = signals
        self.after_commit = after_commit
        self.in_thread = in_thread


#: What became of one job: its result, or the exception it raised (``True``).
_Outcome = tuple[Any, bool]


def _run_jobs(connection: sqlite3.Connection, group: Sequence[_Job]) -> list[_Outcome]:
    """Each job in its own savepoint: one that fails is undone alone."""
    outcomes: list[_Outcome] = []
    for job in group:
        connection.execute("SAVEPOINT job")
        try:
            outcome = job.run(connection)
        except Exception as exc:
            connection.execute("ROLLBACK TO job")
            connection.execute("RELEASE job")
            outcomes.append((exc, True))
        else:
            connection.execute("RELEASE job")
            outcomes.append((outcome, False))
    return outcomes


def _begin_now(connection: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE if the write lock is free at once (the usual case: one process
    writes); False when another holds it, with the busy timeout back as it was."""
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    finally:
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    return True


class _Writer:
    """The one connection that writes, committing waiting writes together.

    A cycle: BEGIN IMMEDIATE (on the loop when the write lock is free; in the database
    thread when it must wait for another process's), then every write waiting runs,
    each in its own savepoint, then in the thread one fsync of ``bodies/`` for the
    enqueues among them, COMMIT (the WAL's fsync) and the jobs' file work: one trip to
    the thread per cycle.

    The jobs' statements run on the event loop: inside the open transaction they only
    touch pages already in memory (the WAL is written and synced at COMMIT, in the
    thread), microseconds each; run in the thread, each statement had to take the GIL
    back from the busy loop, which cost far more than the statement and made this
    writer the queue's bottleneck. Jobs that may touch many rows (an operator's command
    on the whole queue) set ``in_thread``; a group holding one runs in the thread.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        bodies: BodyDirectory,
        on_change: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._connection = connection
        self._bodies = bodies
        self._on_change = on_change
        self._loop = loop
        self._jobs: collections.deque[_Job] = collections.deque()
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mailgate-queue-db"
        )
        self._task: asyncio.Task[None] | None = None

    def submit(self, job: _Job) -> None:
        self._jobs.append(job)
        if self._task is None:
            self._task = self._loop.create_task(self._drain(), name="mailgate-queue-writer")

    async def stop(self) -> None:
        """Finish the writes handed over, then close the connection."""
        while (task := self._task) is not None:
            await asyncio.wait({task})
        connection = self._connection

        await self._loop.run_in_executor(self._thread, connection.close)
        self._thread.shutdown(wait=True)

    async def _drain(self) -> None:
        try:
            while self._jobs:
                await self._cycle()
        finally:
            self._task = None

    def _take(self) -> list[_Job]:
        jobs = self._jobs
        return [jobs.popleft() for _ in range(min(len(jobs), _MAX_GROUP))]

    async def _cycle(self) -> None:
        loop = self._loop
        connection = self._connection
        if not _begin_now(connection):
            try:
                # Another process (a ``mailgate queue`` command) holds the write lock:
                # wait for it in the thread, up to the busy timeout.
                await loop.run_in_executor(self._thread, connection.execute, "BEGIN IMMEDIATE")
            except Exception as exc:
                log.error("queue database write failed: %s", exc)
                group = self._take()
                self._finish(group, [(exc, True)] * len(group))
                return
        # Taken now, not before BEGIN: the writes that came meanwhile join this commit.
        group = self._take()
        outcomes: list[_Outcome] | None = None
        if not any(job.in_thread for job in group):
            try:
                outcomes = _run_jobs(connection, group)
            except BaseException as exc:
                # A statement of the savepoint handling failed: the transaction is lost.
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                log.error("queue database write failed: %s", exc)
                self._finish(group, [(exc, True)] * len(group))
                if not isinstance(exc, Exception):
                    raise
                return
        sync = any(job.sync_bodies for job in group)
        committed = await loop.run_in_executor(self._thread, self._commit, group, outcomes, sync)
        self._finish(group, committed)

    def _commit(
        self, group: list[_Job], outcomes: list[_Outcome] | None, sync: bool
    ) -> list[_Outcome]:
        """In the thread: the jobs (when not run on the loop), then bodies/ fsync and
        COMMIT, then each job's after-commit work."""
        connection = self._connection
        try:
            try:
                if outcomes is None:
                    outcomes = _run_jobs(connection, group)
                if sync:
                    # Bodies linked by these enqueues become durable before their rows.
                    self._bodies.sync()
                connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                raise
        except Exception as exc:
            log.error("queue database write failed: %s", exc)
            outcomes = [(exc, True)] * len(group)
        for job, (outcome, failed) in zip(group, outcomes, strict=True):
            if job.after_commit is not None:
                try:
                    job.after_commit(None if failed else outcome)
                except Exception:
                    log.exception("queue clean-up after a commit failed")
        return outcomes

    def _finish(self, group: list[_Job], outcomes: list[_Outcome]) -> None:
        changed = False
        for job, (outcome, failed) in zip(group, outcomes, strict=True):
            changed = changed or (job.signals and not failed)
            future = job.future
            if future.done():  # the caller was cancelled; the write happened anyway
                continue
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if changed:
            self._on_change()


class SQLiteQueueStore(ChangeWaiting):
    """A :class:`~mailgate.queue.store.QueueStore` in a local directory.

    Open with ``await SQLiteQueueStore.open(directory)`` (or ``async with``); close with
    :meth:`aclose`. ``clock`` gives the time (``time.time``; tests inject theirs);
    ``poll_interval`` is how often other processes' changes are looked for while someone
    waits in :meth:`wait_for_change`.
    """

    policy: QueuePolicy
    directory: Path
    clock: Callable[[], float]
    poll_interval: float
    bodies: BodyDirectory
    _loop: asyncio.AbstractEventLoop
    _closed: bool
    _change_count: int
    _change_event: asyncio.Event
    _poller: asyncio.Task[None] | None
    _reader: concurrent.futures.ThreadPoolExecutor
    _files: concurrent.futures.ThreadPoolExecutor
    _reader_connection: sqlite3.Connection
    _writer: _Writer
    _migrate: bool
    _notice_lock_fd: int | None
    _slot_gate: SlotGate[int]

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _OPEN_TOKEN:
            raise TypeError("use 'await SQLiteQueueStore.open(directory)'")

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        policy: QueuePolicy | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.25,
        file_threads: int = 32,
        migrate: bool = True,
    ) -> SQLiteQueueStore:
        """Open (with ``migrate``, create or update) the queue in ``directory``. Without
        ``migrate`` the database must exist at :data:`SCHEMA_VERSION`: nothing is
        created, and an older database is an error saying to run ``mailgate queue
        migrate``."""
        self = cls(_token=_OPEN_TOKEN)
        self.directory = Path(directory)
        self._migrate = migrate
        self._notice_lock_fd = None
        self._slot_gate = SlotGate(self._try_slot, self._give_slot)
        if not migrate:
            # Checked before anything is made in the directory (a read-only command).
            found = await asyncio.to_thread(schema_version, self.directory)
            if found != SCHEMA_VERSION:
                raise _version_error(self.directory / _DATABASE_NAME, found)
        self.policy = policy if policy is not None else QueuePolicy()
        self.clock = clock
        self.poll_interval = poll_interval
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._change_count = 0
        self._change_event = asyncio.Event()
        self._poller = None
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mailgate-queue-read"
        )
        # Body writes and their fsyncs run side by side: concurrent fsyncs share the file
        # system's journal commits, so more threads than cores pay off here.
        self._files = concurrent.futures.ThreadPoolExecutor(
            max_workers=file_threads, thread_name_prefix="mailgate-queue-body"
        )
        try:
            self.bodies = await asyncio.to_thread(BodyDirectory, self.directory)
        except BaseException:
            self._reader.shutdown(wait=False)
            self._files.shutdown(wait=False)
            raise
        try:
            writer = await asyncio.to_thread(self._open_database)
            self._reader_connection = await self._read(
                lambda: _connect(self.directory / _DATABASE_NAME)
            )
        except BaseException:
            self._reader.shutdown(wait=False)
            self._files.shutdown(wait=False)
            await asyncio.to_thread(self.bodies.close)
            raise
        self._writer = _Writer(writer, self.bodies, self._changed, self._loop)
        self._poller = asyncio.create_task(self._poll(), name="mailgate-queue-poll")
        return self

    async def __aenter__(self) -> SQLiteQueueStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def instance(self) -> str:
        """This store instance's name: the owner of its leases."""
        return self.bodies.instance

    def body_path(self, message_id: str) -> Path:
        """Where the body of a queued message is when it is a file (for senders that
        stream a file); a small one given as bytes is in the database instead
        (:data:`INLINE_BODY_LIMIT`: there is no file, read it with :meth:`read_body`, or
        take ``DeliveryBatch.body``)."""
        return self.bodies.path(message_id)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._change_event.set()  # waiters return (False) instead of sleeping on
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._notice_lock_fd is not None:
            os.close(self._notice_lock_fd)  # closing drops the flock
            self._notice_lock_fd = None
        await self._writer.stop()
        await self._read(self._reader_connection.close)
        self._reader.shutdown(wait=True)
        await asyncio.to_thread(self._files.shutdown, True)
        await asyncio.to_thread(self.bodies.close)

    # --- plumbing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("the queue store is closed")

    async def _write(
        self,
        run: Callable[[sqlite3.Connection], T],
        *,
        sync_bodies: bool = False,
        signals: bool = True,
        after_commit: Callable[[Any], None] | None = None,
        in_thread: bool = False,
    ) -> T:
        self._check_open()
        job = _Job(
            run,
            self._loop.create_future(),
            sync_bodies=sync_bodies,
            signals=signals,
            after_commit=after_commit,
            in_thread=in_thread,
        )
        self._writer.submit(job)
        # Shielded: a cancelled caller does not undo a write already handed over.
        return cast(T, await asyncio.shield(job.future))

    async def _read(self, run: Callable[[], T]) -> T:
        return await self._loop.run_in_executor(self._reader, run)

    async def _read_transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """A consistent snapshot for queries that read several tables."""
        self._check_open()

        def transaction() -> T:
            connection = self._reader_connection
            connection.execute("BEGIN")
            try:
                return run(connection)
            finally:
                connection.execute("COMMIT")

        return await self._read(transaction)

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    # --- opening and recovery -------------------------------------------------------------

    def _open_database(self) -> sqlite3.Connection:
        connection = _connect(self.directory / _DATABASE_NAME)
        try:
            connection.execute("BEGIN IMMEDIATE")
            _apply_migrations(
                connection, migrate=self._migrate, where=self.directory / _DATABASE_NAME
            )
            self._recover(connection)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            connection.close()
            raise
        return connection

    def _recover(self, connection: sqlite3.Connection) -> None:
        """Undo what a crash left: leases of dead processes, bodies of enqueues that never
        committed, and rows whose body is missing (held for the operator)."""
        dead, live = self.bodies.reap_dead_instances()
        now = self.clock()
        cursor = connection.execute(
            f"UPDATE recipients SET lease_owner = NULL, lease_id = NULL, lease_expires = NULL "
            f"WHERE lease_owner IS NOT NULL AND (lease_expires <= ? "
            f"OR lease_owner NOT IN ({_marks(len(live))}))",
            (now, *live),
        )
        if cursor.rowcount:
            log.info("queue recovery: %d claims of stopped workers returned", cursor.rowcount)
        if dead:
            log.info("queue recovery: interrupted enqueues of %d stopped processes", len(dead))
        # Order matters (see mailgate.queue.bodies): bodies, then live staging names,
        # then rows; this transaction holds the write lock, so no enqueue commits meanwhile.
        bodies = self.bodies.all_bodies()
        in_flight = self.bodies.staged_names(live)
        candidates = sorted(bodies - in_flight)
        orphans: list[str] = []
        for chunk in _chunks(candidates):
            present = {
                row[0]
                for row in connection.execute(
                    f"SELECT id FROM messages WHERE id IN ({_marks(len(chunk))})", tuple(chunk)
                )
            }
            orphans.extend(name for name in chunk if name not in present)
        for name in orphans:
            self.bodies.remove(name)
            bodies.discard(name)
        if orphans:
            log.info("queue recovery: %d bodies of unfinished enqueues removed", len(orphans))
        missing = [
            row[0]
            for row in connection.execute("SELECT id FROM messages WHERE body IS NULL")
            if row[0] not in bodies
        ]
        for chunk in _chunks(missing):
            connection.execute(
                f"UPDATE recipients SET state = 'held', held_reason = 'body file missing' "
                f"WHERE message_id IN ({_marks(len(chunk))}) "
                f"AND state IN ('queued', 'deferred')",
                tuple(chunk),
            )
        for message_id in missing:
            log.error("queue recovery: message %s has no body file; held", message_id)

    # --- change notification ----------------------------------------------------------------

    def _read_data_version(self) -> int:
        row = self._reader_connection.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    async def _poll(self) -> None:
        """Look for commits by other connections (other processes, and this store's own
        writer) for as long as the store is open. Always running, so ``change_count`` is
        never more than one interval behind and a caller's ``seen`` cannot predate a
        change that the next reading would miss (a PRAGMA a few times a second costs
        nothing measurable)."""
        version = await self._read(self._read_data_version)
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            try:
                current = await self._read(self._read_data_version)
            except sqlite3.Error as exc:  # e.g. busy during a checkpoint: try again
                log.debug("queue change poll failed: %s", exc)
                continue
            if current != version:
                version = current
                self._changed()

    # --- accepting --------------------------------------------------------------------------

    async def enqueue(
        self,
        message: NewMessage,
        body: BodySource,
        *,
        synced: bool = False,
        settles: Sequence[DsnNotice] = (),
    ) -> str:
        self._check_open()
        received_at = self._now(message.received_at)
        message_id = new_message_id(received_at)
        bodies = self.bodies
        inline: bytes | None = None
        if isinstance(body, bytes | bytearray | memoryview) and len(body) <= INLINE_BODY_LIMIT:
            inline = bytes(body)
        try:
            files = self._files
            if inline is not None:
                size = len(inline)
            elif isinstance(body, bytes | bytearray | memoryview):
                size = await run_to_end(files, bodies.stage_bytes, message_id, body)
            elif isinstance(body, os.PathLike):
                size = await run_to_end(
                    files,
                    functools.partial(bodies.stage_path, synced=synced),
                    message_id,
                    Path(body),
                )
            elif isinstance(body, AsyncIterable):
                size = await bodies.stage_stream(message_id, body, files)
            else:
                raise TypeError(f"unsupported body type {type(body).__name__}")
        except BaseException:
            await asyncio.shield(asyncio.to_thread(bodies.discard, message_id))
            raise
        expires_at = self.policy.expires_at(received_at, message.sender)

        def insert(connection: sqlite3.Connection) -> str:
            connection.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}, body) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    message_id,
                    message.sender,
                    size,
                    received_at,
                    expires_at,
                    message.envid,
                    message.ret,
                    int(message.smtputf8),
                    message.body_type,
                    _client_json(message.client),
                    int(message.require_tls),
                    int(message.tls_optional),
                    inline,
                ),
            )
            connection.executemany(
                "INSERT INTO recipients (message_id, address, domain, destination, orcpt, "
                "notify, state, next_attempt) VALUES (?,?,?,?,?,?,'queued',?)",
                [
                    (
                        message_id,
                        recipient.address,
                        destination_domain(recipient.address),
                        recipient.destination,
                        recipient.orcpt,
                        format_notify(recipient.notify),
                        received_at,
                    )
                    for recipient in message.recipients
                ],
            )
            connection.execute(
                "INSERT INTO history (message_id, at, event, detail) VALUES (?,?,?,?)",
                (message_id, received_at, "enqueued", f"{len(message.recipients)} recipients"),
            )
            if settles:
                self._settle(connection, settles, received_at, by=message_id)
            return message_id

        def after_commit(result: Any) -> None:
            if result is None:  # the transaction failed: nothing refers to the body
                bodies.discard(message_id)
            else:
                bodies.unstage(message_id)

        if inline is not None:
            return await self._write(insert)
        return await self._write(insert, sync_bodies=True, after_commit=after_commit)

    # --- delivery workers ---------------------------------------------------------------------

    async def claim_due(
        self,
        now: float | None = None,
        limit: int = 100,
        *,
        max_recipients: int = 100,
        exclude_destinations: Collection[str] = (),
    ) -> list[DeliveryBatch]:
        if limit < 1 or max_recipients < 1:
            raise ValueError("limit and max_recipients must be >= 1")
        at = self._now(now)
        expires = at + self.policy.lease_time
        owner = self.instance
        excluded = frozenset(exclude_destinations)

        def claim(connection: sqlite3.Connection) -> list[DeliveryBatch]:
            due = (
                "state IN ('queued', 'deferred') AND next_attempt <= ? "
                "AND (lease_expires IS NULL OR lease_expires <= ?)"
            )
            keys: list[tuple[str, str]] = []
            seen: set[tuple[str, str]] = set()
            # Walk due recipients, oldest due first, until enough (message, destination)
            # groups are found; the cursor stops early, so a long queue costs little.
            for row in connection.execute(
                f"SELECT message_id, destination FROM recipients "
                f"WHERE {due} ORDER BY next_attempt, id",
                (at, at),
            ):
                key = (row[0], row[1])
                if key in seen or key[1] in excluded:
                    continue
                seen.add(key)
                keys.append(key)
                if len(keys) >= limit:
                    break
            if not keys:
                return []
            message_ids = sorted({key[0] for key in keys})
            messages = self._messages(connection, message_ids)
            inline = self._inline_bodies(connection, message_ids)
            sequence = connection.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'lease_seq' "
                "RETURNING CAST(value AS INTEGER)",
                (len(keys),),
            ).fetchone()[0]
            batches: list[DeliveryBatch] = []
            for offset, (message_id, destination) in enumerate(keys):
                message = messages.get(message_id)
                if message is None:
                    continue
                lease = Lease(owner, sequence - len(keys) + offset + 1, expires)
                rows = connection.execute(
                    f"SELECT {_RECIPIENT_COLUMNS} FROM recipients "
                    f"WHERE message_id = ? AND destination = ? AND {due} ORDER BY id LIMIT ?",
                    (message_id, destination, at, at, max_recipients),
                ).fetchall()
                ids = [row["id"] for row in rows]
                connection.execute(
                    f"UPDATE recipients SET lease_owner = ?, lease_id = ?, lease_expires = ? "
                    f"WHERE id IN ({_marks(len(ids))})",
                    (owner, lease.id, expires, *ids),
                )
                recipients = tuple(
                    recipient_info(row, dsn_kinds(row["dsn_sent"].split(",")))
                    for row in connection.execute(
                        f"SELECT {_RECIPIENT_COLUMNS} FROM recipients "
                        f"WHERE id IN ({_marks(len(ids))}) ORDER BY id",
                        tuple(ids),
                    )
                )
                batches.append(
                    DeliveryBatch(message, destination, recipients, lease, inline.get(message_id))
                )
            return batches

        return await self._write(claim, signals=False)

    async def renew_lease(self, batch: DeliveryBatch, now: float | None = None) -> Lease | None:
        at = self._now(now)
        lease = batch.lease
        expires = at + self.policy.lease_time
        ids = [recipient.id for recipient in batch.recipients]

        def renew(connection: sqlite3.Connection) -> Lease | None:
            cursor = connection.execute(
                f"UPDATE recipients SET lease_expires = ? WHERE lease_owner = ? "
                f"AND lease_id = ? AND id IN ({_marks(len(ids))})",
                (expires, lease.owner, lease.id, *ids),
            )
            return Lease(lease.owner, lease.id, expires) if cursor.rowcount else None

        return await self._write(renew, signals=False)

    async def release_claim(self, batch: DeliveryBatch, now: float | None = None) -> int:
        lease = batch.lease
        ids = [recipient.id for recipient in batch.recipients]

        def release(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                f"UPDATE recipients SET lease_owner = NULL, lease_id = NULL, "
                f"lease_expires = NULL WHERE lease_owner = ? AND lease_id = ? "
                f"AND id IN ({_marks(len(ids))})",
                (lease.owner, lease.id, *ids),
            )
            return cursor.rowcount

        return await self._write(release)

    async def record_results(
        self,
        batch: DeliveryBatch,
        results: Sequence[DeliveryResult],
        now: float | None = None,
    ) -> int:
        at = self._now(now)
        lease = batch.lease
        in_batch = {recipient.id for recipient in batch.recipients}
        # One result per recipient (the last one given wins): an attempt counts once.
        wanted = list(
            {
                result.recipient_id: result for result in results if result.recipient_id in in_batch
            }.values()
        )
        if not wanted:
            return 0
        policy = self.policy
        removed: list[str] = []

        def record(connection: sqlite3.Connection) -> int:
            # Every recipient of the message: those under this lease get the results;
            # the others tell whether the message is finished after them.
            held: dict[int, RecipientInfo] = {}
            others: list[RecipientInfo] = []
            for row in connection.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ?",
                (batch.message.id,),
            ):
                info = recipient_info(row, dsn_kinds(row["dsn_sent"].split(",")))
                if row["lease_owner"] == lease.owner and row["lease_id"] == lease.id:
                    held[info.id] = info
                else:
                    others.append(info)
            if not held:
                return 0  # the lease was lost, or the message deleted meanwhile
            # The message's row does not change once queued: the claim's copy will do.
            message = batch.message
            updates: list[tuple[RecipientInfo, RecipientUpdate | None]] = [
                (current, apply_result(recipient_facts(current), message, result, policy, at))
                for result in wanted
                if (current := held.get(result.recipient_id)) is not None
            ]
            if self._finished_by(updates, others, at):
                # Removed at once (keep_finished): its rows, with the history they would
                # have got, go now; nothing is written only to be deleted.
                removed.extend(self._delete_rows(connection, [message.id]))
                return sum(update is not None for _, update in updates)
            applied = 0
            for current, update in updates:
                if update is None:
                    self._clear_lease(connection, current.id)
                    continue
                self._apply(connection, current, update, at)
                applied += 1
            removed.extend(self._purge_if_finished(connection, [message.id], at))
            return applied

        def after_commit(result: Any) -> None:
            # A body that came with the claim was in the row: there is no file to remove.
            if result is not None and batch.body is None:
                for message_id in removed:
                    self.bodies.remove(message_id)

        return await self._write(record, after_commit=after_commit)

    async def next_due(self) -> float | None:
        def query(connection: sqlite3.Connection) -> float | None:
            row = connection.execute(
                "SELECT MIN(next_attempt) FROM recipients WHERE state IN ('queued', 'deferred')"
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._read_transaction(query)

    # --- DSNs ----------------------------------------------------------------------------------

    async def pending_notices(self, limit: int = 100) -> list[DsnNotice]:
        def query(connection: sqlite3.Connection) -> list[DsnNotice]:
            keys = connection.execute(
                "SELECT DISTINCT message_id, dsn_pending FROM recipients "
                "WHERE dsn_pending IS NOT NULL ORDER BY message_id, dsn_pending LIMIT ?",
                (limit,),
            ).fetchall()
            messages = self._messages(connection, sorted({row[0] for row in keys}))
            notices: list[DsnNotice] = []
            for message_id, kind in keys:
                message = messages.get(message_id)
                if message is None:
                    continue
                recipients = tuple(
                    recipient_info(row, dsn_kinds(row["dsn_sent"].split(",")))
                    for row in connection.execute(
                        f"SELECT {_RECIPIENT_COLUMNS} FROM recipients "
                        f"WHERE message_id = ? AND dsn_pending = ? ORDER BY id",
                        (message_id, kind),
                    )
                )
                notices.append(DsnNotice(cast("DsnKind", kind), message, recipients))
            return notices

        return await self._read_transaction(query)

    def _settle(
        self,
        connection: sqlite3.Connection,
        notices: Sequence[DsnNotice],
        now: float,
        *,
        by: str | None = None,
    ) -> list[str]:
        """Mark notices produced; returns ids of messages that became finished. ``by``
        (the report's queue id): all or nothing, NoticeSettled when a recipient no
        longer owes the notice (the caller's transaction is then rolled back)."""
        touched: list[str] = []
        for notice in notices:
            for recipient in notice.recipients:
                row = connection.execute(
                    "SELECT dsn_sent FROM recipients WHERE id = ? AND dsn_pending = ?",
                    (recipient.id, notice.kind),
                ).fetchone()
                if row is None:
                    if by is not None:
                        raise NoticeSettled(
                            f"the {notice.kind} notice of {notice.message.id} for "
                            f"<{recipient.address}> is settled already or has changed"
                        )
                    continue  # settled already, or superseded by a later event
                sent = dsn_kinds(row[0].split(",")) | {notice.kind}
                connection.execute(
                    "UPDATE recipients SET dsn_pending = NULL, dsn_sent = ? WHERE id = ?",
                    (",".join(sorted(sent)), recipient.id),
                )
                self._history(
                    connection,
                    notice.message.id,
                    now,
                    f"dsn-{notice.kind}",
                    recipient=recipient,
                    detail=f"DSN queued as {by}" if by else None,
                )
            touched.append(notice.message.id)
        return self._purge_if_finished(connection, touched, now)

    async def claim_notice_producer(self) -> bool:
        """The role is a lock file in the queue directory (flock: released when this
        store closes or its process dies)."""
        self._check_open()
        if self._notice_lock_fd is not None:
            return True
        path = self.directory / _NOTICE_LOCK_NAME

        def take() -> int | None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None
                raise
            return fd

        self._notice_lock_fd = await asyncio.to_thread(take)
        return self._notice_lock_fd is not None

    # --- destination slots ------------------------------------------------------------------

    def destination_slot(
        self, destination: str, limit: int
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Slots are flocks on files in ``slots/`` of the queue directory (one file per
        destination and slot, kept for reuse: removing one could let two processes
        lock different files of the same name), shared by every process on this
        queue and freed when the holder exits."""
        self._check_open()
        return self._slot_gate.slot(destination, limit)

    async def _try_slot(self, destination: str, limit: int) -> int | None:
        keys = slot_keys(str(self.directory), destination, limit)
        directory = self.directory / _SLOTS_DIRECTORY

        def take() -> int | None:
            directory.mkdir(exist_ok=True)
            for key in keys:
                fd = os.open(
                    directory / f"{key & 0xFFFFFFFFFFFFFFFF:016x}",
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                    0o600,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        continue
                    raise
                return fd
            return None

        return await asyncio.to_thread(take)

    async def _give_slot(self, fd: int) -> None:
        os.close(fd)  # closing drops the flock

    async def mark_notified(self, notices: Sequence[DsnNotice]) -> None:
        if not notices:
            return
        at = self.clock()
        removed: list[str] = []

        def settle(connection: sqlite3.Connection) -> None:
            removed.extend(self._settle(connection, notices, at))

        def after_commit(result: Any) -> None:
            for message_id in removed:
                self.bodies.remove(message_id)

        await self._write(settle, after_commit=after_commit)

    async def read_body(self, message_id: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        self._check_open()

        def query(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(
                "SELECT body FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        inline = await self._read_transaction(query)
        if inline is not None:
            for start in range(0, len(inline), chunk_size):
                yield inline[start : start + chunk_size]
            return
        path = self.bodies.path(message_id)
        try:
            reader = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise KeyError(message_id) from None
        try:
            while chunk := await asyncio.to_thread(reader.read, chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(reader.close)

    # --- operators -----------------------------------------------------------------------------

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessage]:
        criteria = filter if filter is not None else QueueFilter()

        def query(connection: sqlite3.Connection) -> list[QueuedMessage]:
            conditions: list[str] = []
            params: list[Any] = []
            if criteria.states is not None:
                states = sorted(str(state) for state in criteria.states)
                conditions.append(f"r.state IN ({_marks(len(states))})")
                params.extend(states)
            if criteria.domain is not None:
                conditions.append("r.domain = ?")
                params.append(criteria.domain.lower())
            where: list[str] = []
            if conditions:
                where.append(
                    "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND "
                    + " AND ".join(conditions)
                    + ")"
                )
            if criteria.ids is not None:
                if not criteria.ids:
                    return []
                where.append(f"m.id IN ({_marks(len(criteria.ids))})")
                params.extend(criteria.ids)
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY m.received_at, m.id"
            if criteria.limit is not None:
                sql += " LIMIT ?"
                params.append(criteria.limit)
            messages = [message_info(row) for row in connection.execute(sql, params)]
            recipients = self._recipients_of(connection, [message.id for message in messages])
            return [
                QueuedMessage(message, tuple(recipients.get(message.id, ())))
                for message in messages
            ]

        return await self._read_transaction(query)

    async def show(self, message_id: str) -> MessageDetails | None:
        def query(connection: sqlite3.Connection) -> MessageDetails | None:
            message = self._messages(connection, [message_id]).get(message_id)
            if message is None:
                return None
            recipients = self._recipients_of(connection, [message_id]).get(message_id, [])
            history = tuple(
                history_entry(row)
                for row in connection.execute(
                    "SELECT * FROM history WHERE message_id = ? ORDER BY id", (message_id,)
                )
            )
            return MessageDetails(QueuedMessage(message, tuple(recipients)), history)

        return await self._read_transaction(query)

    async def flush(
        self,
        *,
        ids: Collection[str] | None = None,
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        at = self._now(now)
        id_list = None if ids is None else list(ids)

        def flush(connection: sqlite3.Connection) -> int:
            condition = "state IN ('queued', 'deferred') AND next_attempt > ?"
            params: list[Any] = [at]
            if domain is not None:
                condition += " AND domain = ?"
                params.append(domain.lower())
            total = 0
            for chunk in _chunks(id_list) if id_list is not None else [None]:
                sql_condition = condition
                chunk_params = list(params)
                if chunk is not None:
                    sql_condition += f" AND message_id IN ({_marks(len(chunk))})"
                    chunk_params.extend(chunk)
                flushed = connection.execute(
                    f"SELECT DISTINCT message_id FROM recipients WHERE {sql_condition}",
                    chunk_params,
                ).fetchall()
                cursor = connection.execute(
                    f"UPDATE recipients SET next_attempt = ? WHERE {sql_condition}",
                    [at, *chunk_params],
                )
                total += cursor.rowcount
                for row in flushed:
                    self._history(connection, row[0], at, "flushed")
            return total

        return await self._write(flush, in_thread=True)

    async def hold(self, ids: Collection[str], reason: str = "held by the operator") -> int:
        at = self.clock()
        return await self._set_state(
            list(ids),
            "state IN ('queued', 'deferred')",
            "state = 'held', held_reason = ?",
            (reason,),
            "held",
            at,
            reason,
        )

    async def release(self, ids: Collection[str], now: float | None = None) -> int:
        at = self._now(now)
        return await self._set_state(
            list(ids),
            "state = 'held'",
            "state = 'queued', held_reason = NULL, next_attempt = ?",
            (at,),
            "released",
            at,
            None,
        )

    async def _set_state(
        self,
        ids: list[str],
        condition: str,
        assignment: str,
        values: tuple[Any, ...],
        event: str,
        at: float,
        detail: str | None,
    ) -> int:
        def change(connection: sqlite3.Connection) -> int:
            total = 0
            for chunk in _chunks(ids):
                touched = connection.execute(
                    f"SELECT DISTINCT message_id FROM recipients "
                    f"WHERE message_id IN ({_marks(len(chunk))}) AND {condition}",
                    tuple(chunk),
                ).fetchall()
                cursor = connection.execute(
                    f"UPDATE recipients SET {assignment} "
                    f"WHERE message_id IN ({_marks(len(chunk))}) AND {condition}",
                    (*values, *chunk),
                )
                total += cursor.rowcount
                for row in touched:
                    self._history(connection, row[0], at, event, detail=detail)
            return total

        return await self._write(change, in_thread=True)

    async def delete(self, ids: Collection[str]) -> int:
        id_list = list(ids)
        removed: list[str] = []

        def delete(connection: sqlite3.Connection) -> int:
            for chunk in _chunks(id_list):
                removed.extend(self._delete_rows(connection, chunk))
            return len(removed)

        def after_commit(result: Any) -> None:
            if result is not None:
                for message_id in removed:
                    self.bodies.remove(message_id)

        return await self._write(delete, after_commit=after_commit, in_thread=True)

    async def bounce(self, ids: Collection[str], reason: str = "", now: float | None = None) -> int:
        at = self._now(now)
        id_list = list(ids)
        removed: list[str] = []

        def bounce(connection: sqlite3.Connection) -> int:
            total = 0
            for chunk in _chunks(id_list):
                messages = self._messages(connection, chunk)
                recipients = self._recipients_of(connection, list(messages))
                for message_id, message in messages.items():
                    for recipient in recipients.get(message_id, []):
                        update = apply_operator_bounce(
                            recipient_facts(recipient), message, reason, at
                        )
                        if update is not None:
                            self._apply(connection, recipient, update, at)
                            total += 1
                removed.extend(self._purge_if_finished(connection, list(messages), at))
            return total

        def after_commit(result: Any) -> None:
            if result is not None:
                for message_id in removed:
                    self.bodies.remove(message_id)

        return await self._write(bounce, after_commit=after_commit, in_thread=True)

    async def stats(self, now: float | None = None) -> QueueStats:
        at = self._now(now)
        labels = age_bucket_labels()

        def query(connection: sqlite3.Connection) -> QueueStats:
            messages, oldest = connection.execute(
                "SELECT COUNT(*), MIN(received_at) FROM messages"
            ).fetchone()
            by_state = dict.fromkeys(RecipientState, 0)
            for state, count in connection.execute(
                "SELECT state, COUNT(*) FROM recipients GROUP BY state"
            ):
                by_state[RecipientState(state)] = count
            by_domain: dict[str, list[int]] = {}
            for domain, received_at in connection.execute(
                "SELECT r.domain, m.received_at FROM recipients r "
                "JOIN messages m ON m.id = r.message_id "
                "WHERE r.state IN ('queued', 'deferred', 'held')"
            ):
                counts = by_domain.setdefault(domain, [0] * len(labels))
                counts[age_bucket(at - received_at)] += 1
            return QueueStats(
                messages=messages,
                by_state=by_state,
                by_domain={domain: tuple(counts) for domain, counts in sorted(by_domain.items())},
                bucket_labels=labels,
                oldest=oldest,
            )

        return await self._read_transaction(query)

    async def purge_finished(self, now: float | None = None) -> int:
        at = self._now(now)
        removed: list[str] = []

        def purge(connection: sqlite3.Connection) -> int:
            candidates = [
                row[0]
                for row in connection.execute(
                    "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r "
                    "WHERE r.message_id = m.id AND (r.state NOT IN ('delivered', 'failed') "
                    "OR r.dsn_pending IS NOT NULL))"
                )
            ]
            for chunk in _chunks(candidates):
                removed.extend(self._purge_if_finished(connection, list(chunk), at))
            return len(removed)

        def after_commit(result: Any) -> None:
            if result is not None:
                for message_id in removed:
                    self.bodies.remove(message_id)

        return await self._write(purge, after_commit=after_commit, in_thread=True)

    # --- row helpers (database thread or reader thread) ------------------------------------------

    def _messages(
        self, connection: sqlite3.Connection, ids: Sequence[str]
    ) -> dict[str, MessageInfo]:
        result: dict[str, MessageInfo] = {}
        for chunk in _chunks(ids):
            for row in connection.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({_marks(len(chunk))})",
                tuple(chunk),
            ):
                result[row["id"]] = message_info(row)
        return result

    @staticmethod
    def _inline_bodies(connection: sqlite3.Connection, ids: Sequence[str]) -> dict[str, bytes]:
        """The bodies of these messages that are kept in their rows."""
        result: dict[str, bytes] = {}
        for chunk in _chunks(ids):
            for row in connection.execute(
                f"SELECT id, body FROM messages WHERE id IN ({_marks(len(chunk))}) "
                "AND body IS NOT NULL",
                tuple(chunk),
            ):
                result[row[0]] = bytes(row[1])
        return result

    def _recipients_of(
        self, connection: sqlite3.Connection, ids: Sequence[str]
    ) -> dict[str, list[RecipientInfo]]:
        result: dict[str, list[RecipientInfo]] = {}
        for chunk in _chunks(ids):
            for row in connection.execute(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients "
                f"WHERE message_id IN ({_marks(len(chunk))}) ORDER BY id",
                tuple(chunk),
            ):
                result.setdefault(row["message_id"], []).append(
                    recipient_info(row, dsn_kinds(row["dsn_sent"].split(",")))
                )
        return result

    def _apply(
        self,
        connection: sqlite3.Connection,
        current: RecipientInfo,
        update: RecipientUpdate,
        at: float,
    ) -> None:
        reply = update.last_reply
        attempted = update.attempts != current.attempts
        connection.execute(
            "UPDATE recipients SET state = ?, attempts = ?, next_attempt = ?, reply_code = ?, "
            "reply_enhanced = ?, reply_text = ?, remote_mta = ?, status = ?, diagnostic = ?, "
            "last_attempt_at = ?, final_at = ?, held_reason = ?, dsn_pending = ?, "
            "lease_owner = NULL, lease_id = NULL, lease_expires = NULL WHERE id = ?",
            (
                str(update.state),
                update.attempts,
                update.next_attempt,
                None if reply is None else reply.code,
                None if reply is None else reply.enhanced,
                None if reply is None else reply.text,
                update.remote_mta,
                update.last_status,
                update.last_diagnostic,
                update.last_attempt_at,
                update.final_at,
                update.held_reason,
                update.dsn_pending,
                current.id,
            ),
        )
        self._history(
            connection,
            current.message_id,
            at,
            update.event,
            recipient=current,
            attempt=update.attempts if attempted else None,
            # An operator's action has no reply of its own.
            reply=reply if attempted else None,
            remote_mta=update.remote_mta if attempted else None,
            status=update.last_status,
            detail=joined(update.last_diagnostic, update.detail),
        )

    @staticmethod
    def _clear_lease(connection: sqlite3.Connection, recipient_id: int) -> None:
        connection.execute(
            "UPDATE recipients SET lease_owner = NULL, lease_id = NULL, lease_expires = NULL "
            "WHERE id = ?",
            (recipient_id,),
        )

    @staticmethod
    def _history(
        connection: sqlite3.Connection,
        message_id: str,
        at: float,
        event: str,
        *,
        recipient: RecipientInfo | None = None,
        attempt: int | None = None,
        reply: RemoteReply | None = None,
        remote_mta: str | None = None,
        status: str | None = None,
        detail: str | None = None,
    ) -> None:
        connection.execute(
            "INSERT INTO history (message_id, recipient_id, recipient, at, event, attempt, "
            "reply_code, reply_enhanced, reply_text, remote_mta, status, detail) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                message_id,
                None if recipient is None else recipient.id,
                None if recipient is None else recipient.address,
                at,
                event,
                attempt,
                None if reply is None else reply.code,
                None if reply is None else reply.enhanced,
                None if reply is None else reply.text,
                remote_mta,
                status,
                detail,
            ),
        )

    def _finished_by(
        self,
        updates: Sequence[tuple[RecipientInfo, RecipientUpdate | None]],
        others: Sequence[RecipientInfo],
        now: float,
    ) -> bool:
        """Whether these updates leave the message finished for long enough to be
        removed now (what :meth:`_purge_if_finished` would find after applying them)."""
        cutoff = now - self.policy.keep_finished
        last_final: float | None = None
        for _, update in updates:
            if update is None:
                return False  # a result not applied: the recipient stays as it was
            if update.state not in _FINAL or update.dsn_pending is not None:
                return False
            if update.final_at is not None:
                last_final = max(last_final or update.final_at, update.final_at)
        for recipient in others:
            if recipient.state not in _FINAL or recipient.dsn_pending is not None:
                return False
            if recipient.final_at is not None:
                last_final = max(last_final or recipient.final_at, recipient.final_at)
        return last_final is not None and last_final <= cutoff

    def _purge_if_finished(
        self, connection: sqlite3.Connection, ids: Sequence[str], now: float
    ) -> list[str]:
        """Remove the rows of these messages that are finished (all recipients final, no
        DSN owed) for at least ``keep_finished``; returns their ids (bodies are removed
        by the caller after the commit)."""
        finished: list[str] = []
        cutoff = now - self.policy.keep_finished
        for message_id in dict.fromkeys(ids):
            row = connection.execute(
                "SELECT SUM(state NOT IN ('delivered', 'failed') OR dsn_pending IS NOT NULL), "
                "MAX(final_at) FROM recipients WHERE message_id = ?",
                (message_id,),
            ).fetchone()
            open_count, last_final = row
            if open_count == 0 and last_final is not None and last_final <= cutoff:
                finished.append(message_id)
        deleted: list[str] = []
        for chunk in _chunks(finished):
            deleted.extend(self._delete_rows(connection, chunk))
        return deleted

    @staticmethod
    def _delete_rows(connection: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
        marks = _marks(len(ids))
        present = [
            row[0]
            for row in connection.execute(
                f"SELECT id FROM messages WHERE id IN ({marks})", tuple(ids)
            )
        ]
        if not present:
            return []
        marks = _marks(len(present))
        for table, column in (("history", "message_id"), ("recipients", "message_id")):
            connection.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", tuple(present))
        connection.execute(f"DELETE FROM messages WHERE id IN ({marks})", tuple(present))
        return present


_OPEN_TOKEN = object()

if TYPE_CHECKING:

    def _implements_the_interface(store: SQLiteQueueStore) -> QueueStore:
        # mypy checks here that the class matches the QueueStore protocol.
        return store
