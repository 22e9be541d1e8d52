"""The shared queue store: PostgreSQL (asyncpg), for several mailgate nodes serving one
queue.

Everything lives in the database, in one schema (``mailgate`` by default): messages,
recipients, history, and bodies as bytea chunks of :data:`BODY_CHUNK` bytes written one
by one (memory stays flat for any size). ``enqueue`` writes the body, the message, its
recipients and its history in one transaction and returns after the commit.

Delivery claims take due recipients with ``SELECT ... FOR UPDATE SKIP LOCKED`` and put
them under a lease: the owner node, an expiry, and a lease id from a sequence (the
fencing token) that every update made on the lease's behalf checks, so a node that lost
its lease (expired and taken over, or returned because the node was declared dead)
cannot overwrite the new owner's result.

Nodes: every open store is a node. It registers in ``nodes`` and holds a session-level
advisory lock (``pg_advisory_lock(<schema key>, <node id>)``) on its listener connection
for as long as it lives. A node whose lock is no longer held is dead (its process
exited or its connection dropped; node ids are never reused, so dead stays dead): its
leases are returned at once by the reaper, which runs when a store opens and every
``reap_interval`` seconds, without waiting for the leases to expire. Expired leases need
no reaper: ``claim_due`` takes recipients whose lease has expired.

The node's connection must be a real session (no transaction-pooling PgBouncer in
between): the advisory lock and LISTEN live in it. If it drops, the node comes back as a
new node; its old leases are the others' to take (fenced: its late results on them are
ignored). A connection that hangs half-open keeps the old lock until the server notices
(TCP keepalive); lease expiry bounds that.

Roles and slots, also session advisory locks, so a node's death frees them: the DSN
producer (one node at a time, on the listener connection: ``claim_notice_producer``),
and the per-destination delivery slots of ``[queue] destination_concurrency`` (bigint
keys on one connection of the node opened for them: ``destination_slot``).

Change notification: every write transaction sends ``NOTIFY`` on the schema's channel;
each store LISTENs on its listener connection, so other nodes notice a commit within
milliseconds.

Times are the stores' clocks (``time.time`` by default), as with SQLite: the nodes'
clocks must agree to well within ``lease_time`` (NTP does this).

The schema is versioned (``schema_version``); :func:`migrate` applies what is missing
(a store refuses to open on an older schema unless opened with ``migrate=True``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

import asyncpg

from mailgate.version import __version__

from .changes import ChangeWaiting
from .model import (
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
from .sqlite import new_message_id
from .store import BodySource, NoticeSettled, QueueError, QueueStore

__all__ = [
    "BODY_CHUNK",
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "PostgresQueueStore",
    "migrate",
    "schema_version",
]

log = logging.getLogger("mailgate.queue")

T = TypeVar("T")
Record = asyncpg.Record
if TYPE_CHECKING:
    # asyncpg's classes are generic in its stubs only. A pool hands out proxies.
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection

DEFAULT_SCHEMA = "mailgate"
#: Bytes per body row: large enough that a 50 MB body is 200 rows, small enough that a
#: reader or writer holds little in memory.
BODY_CHUNK = 256 * 1024
# Transactions that lost a deadlock or a serialization conflict are run again.
_RETRIES = 5
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Second keys of the schema's advisory lock class: node ids count up from 1, key 0 is
# the migrations' lock, negative keys are roles.
_PRODUCER_KEY = -1

_MIGRATION_1 = """
CREATE TABLE schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE node_ids AS integer CYCLE;
CREATE TABLE nodes (
    id integer PRIMARY KEY,
    name text NOT NULL UNIQUE,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);
CREATE SEQUENCE lease_ids AS bigint;
CREATE TABLE messages (
    id text PRIMARY KEY,
    sender text NOT NULL,
    size bigint NOT NULL,
    received_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    envid text,
    ret text,
    smtputf8 boolean NOT NULL,
    body_type text,
    client jsonb NOT NULL
);
CREATE INDEX messages_received ON messages (received_at, id);
-- The body is written before its message row in the same transaction: the foreign key
-- is checked at commit.
CREATE TABLE bodies (
    message_id text NOT NULL
        REFERENCES messages (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);
-- Mail is mostly compressed or base64 already: TOAST compression would cost CPU for
-- little, and uncompressed chunks are read without decompressing.
ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE recipients (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address text NOT NULL,
    domain text NOT NULL,
    destination text NOT NULL,
    orcpt text,
    notify text,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,
    reply_code integer,
    reply_enhanced text,
    reply_text text,
    remote_mta text,
    status text,
    diagnostic text,
    last_attempt_at double precision,
    final_at double precision,
    held_reason text,
    dsn_pending text,
    dsn_sent text[] NOT NULL DEFAULT '{}',
    lease_owner text,
    lease_node integer,
    lease_id bigint,
    lease_expires double precision
);
CREATE INDEX recipients_message ON recipients (message_id, destination);
CREATE INDEX recipients_due ON recipients (next_attempt, id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_dsn ON recipients (message_id) WHERE dsn_pending IS NOT NULL;
CREATE INDEX recipients_leased ON recipients (lease_node) WHERE lease_node IS NOT NULL;
CREATE INDEX recipients_domain ON recipients (domain);
CREATE TABLE history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient_id bigint,
    recipient text,
    at double precision NOT NULL,
    event text NOT NULL,
    attempt integer,
    reply_code integer,
    reply_enhanced text,
    reply_text text,
    remote_mta text,
    status text,
    detail text
);
CREATE INDEX history_message ON history (message_id);
"""

# Which mailgate each node runs: during a rolling upgrade with ``[queue] migrate =
# "manual"`` the operator sees which nodes still run the old version before migrating.
_MIGRATION_2 = """
ALTER TABLE nodes ADD COLUMN software text NOT NULL DEFAULT '';
"""

# RFC 8689: REQUIRETLS and TLS-Required: No, per message.
_MIGRATION_3 = """
ALTER TABLE messages
    ADD COLUMN require_tls boolean NOT NULL DEFAULT false,
    ADD COLUMN tls_optional boolean NOT NULL DEFAULT false;
"""

#: Migration ``n`` (1-based) brings the schema from version ``n - 1`` to ``n``.
MIGRATIONS: tuple[str, ...] = (_MIGRATION_1, _MIGRATION_2, _MIGRATION_3)
SCHEMA_VERSION = len(MIGRATIONS)

_RECIPIENT_COLUMNS = (
    "id, message_id, address, destination, orcpt, notify, state, attempts, next_attempt, "
    "reply_code, reply_enhanced, reply_text, remote_mta, status, diagnostic, last_attempt_at, "
    "final_at, held_reason, dsn_pending, dsn_sent, lease_owner, lease_id, lease_expires"
)
_MESSAGE_COLUMNS = (
    "id, sender, size, received_at, expires_at, envid, ret, smtputf8, body_type, client, "
    "require_tls, tls_optional"
)
_DUE = (
    "state IN ('queued', 'deferred') AND next_attempt <= $1 "
    "AND (lease_expires IS NULL OR lease_expires <= $1)"
)
_HISTORY_COLUMNS = (
    "message_id, recipient_id, recipient, at, event, attempt, "
    "reply_code, reply_enhanced, reply_text, remote_mta, status, detail"
)
_HISTORY_INSERT = (
    f"INSERT INTO history ({_HISTORY_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
# The history lines of a write transaction (one array per column, rows in order: the
# identity follows unnest's order) and its NOTIFY in one statement. A data-modifying
# WITH runs whether or not the query reads it.
_HISTORY_INSERT_AND_NOTIFY = (
    f"WITH written AS (INSERT INTO history ({_HISTORY_COLUMNS}) "
    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::float8[], $5::text[], "
    "$6::integer[], $7::integer[], $8::text[], $9::text[], $10::text[], $11::text[], "
    "$12::text[])) SELECT pg_notify($13, '')"
)


def _checked_schema(schema: str) -> str:
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise QueueError(f"invalid queue schema name {schema!r} (lower-case letters, digits, _)")
    return schema


def _lock_class(schema: str) -> int:
    """The first key of the schema's advisory locks (nodes and migrations): a positive
    int4, so two mailgate schemas in one database do not share node locks."""
    return zlib.crc32(f"mailgate-queue:{schema}".encode()) & 0x7FFFFFFF


def _server_settings(schema: str) -> dict[str, str]:
    return {"search_path": f'"{schema}"', "application_name": "mailgate-queue"}


async def schema_version(target: str | Connection, schema: str = DEFAULT_SCHEMA) -> int:
    """The queue schema's version in the database at ``target`` (a DSN or an open
    connection; 0: none yet). Reads only."""
    _checked_schema(schema)
    if isinstance(target, str):
        own = await asyncpg.connect(target)
        try:
            return await schema_version(own, schema)
        finally:
            await own.close()
    connection = target
    exists = await connection.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f'"{schema}".schema_version'
    )
    if not exists:
        return 0
    version = await connection.fetchval(f'SELECT MAX(version) FROM "{schema}".schema_version')
    return int(version or 0)


async def migrate(
    target: str | Connection, *, schema: str = DEFAULT_SCHEMA, to_version: int = SCHEMA_VERSION
) -> int:
    """Create or update the queue schema in the database at ``target`` (a DSN or an open
    connection) up to ``to_version`` (this mailgate's by default; an older one is for
    tests of upgrades); returns the schema version now in place. Each migration runs in
    one transaction with its ``schema_version`` row; concurrent migrators wait for each
    other (a transaction-level advisory lock: two nodes starting at once never run a
    migration twice), so any node may run it at start-up."""
    _checked_schema(schema)
    if not 1 <= to_version <= SCHEMA_VERSION:
        raise ValueError(f"to_version must be between 1 and {SCHEMA_VERSION}")
    if isinstance(target, str):
        own = await asyncpg.connect(target)
        try:
            return await migrate(own, schema=schema, to_version=to_version)
        finally:
            await own.close()
    connection = target
    # Key 0 of the schema's lock class: node ids start at 1.
    while True:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1, 0)", _lock_class(schema))
            current = await schema_version(connection, schema)
            if current > SCHEMA_VERSION:
                raise QueueError(
                    f"queue schema {schema!r} is at version {current}, newer than this "
                    f"mailgate's {SCHEMA_VERSION}: upgrade mailgate"
                )
            if current >= to_version:
                return current
            version = current + 1
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await connection.execute(f'SET LOCAL search_path TO "{schema}"')
            await connection.execute(MIGRATIONS[version - 1])
            await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
            log.info("queue schema %r migrated to version %d", schema, version)


# The name ``migrate`` is also a keyword of PostgresQueueStore.open.
_migrate_schema = migrate


def _history_row(
    message_id: str,
    at: float,
    event: str,
    *,
    recipient: RecipientInfo | None = None,
    recipient_id: int | None = None,
    address: str | None = None,
    attempt: int | None = None,
    reply: RemoteReply | None = None,
    remote_mta: str | None = None,
    status: str | None = None,
    detail: str | None = None,
) -> tuple[Any, ...]:
    if recipient is not None:
        recipient_id, address = recipient.id, recipient.address
    return (
        message_id,
        recipient_id,
        address,
        at,
        event,
        attempt,
        None if reply is None else reply.code,
        None if reply is None else reply.enhanced,
        None if reply is None else reply.text,
        remote_mta,
        status,
        detail,
    )


class _Changes:
    """History lines a write transaction gathers, inserted together with its NOTIFY
    (one statement) before its commit."""

    __slots__ = ("history", "purged")

    def __init__(self) -> None:
        self.history: list[tuple[Any, ...]] = []
        #: Messages deleted in this transaction: their lines are dropped, not written
        #: (the history of a removed message is removed with it).
        self.purged: set[str] = set()

    async def flush(self, connection: Connection, *, notify: str | None = None) -> None:
        """Insert the history lines; with ``notify`` (a channel) NOTIFY it in the same
        statement: one round trip for both, the last before the commit."""
        if self.purged:
            self.history = [row for row in self.history if row[0] not in self.purged]
        if not self.history:
            if notify is not None:
                await connection.execute("SELECT pg_notify($1, '')", notify)
            return
        if notify is None:
            await connection.executemany(_HISTORY_INSERT, self.history)
        else:
            columns = [list(column) for column in zip(*self.history, strict=True)]
            await connection.execute(_HISTORY_INSERT_AND_NOTIFY, *columns, notify)
        self.history.clear()


class PostgresQueueStore(ChangeWaiting):
    """A :class:`~mailgate.queue.store.QueueStore` in a PostgreSQL database, shared by
    any number of nodes.

    Open with ``await PostgresQueueStore.open(dsn)`` (or ``async with``); close with
    :meth:`aclose`. ``schema``: the PostgreSQL schema holding the queue's tables;
    ``clock``: the time (tests inject theirs); ``pool_size``: connections for queries
    (a streamed enqueue holds one until it commits); ``reap_interval``: how often dead
    nodes' leases are looked for (and this node's heartbeat written).
    """

    policy: QueuePolicy
    dsn: str
    schema: str
    clock: Callable[[], float]
    reap_interval: float
    _loop: asyncio.AbstractEventLoop
    _closed: bool
    _change_count: int
    _change_event: asyncio.Event
    _pool: asyncpg.Pool[asyncpg.Record]
    _listener: Connection
    _settings: dict[str, str]
    _reconnecting: asyncio.Task[None] | None
    _node_id: int
    _node_name: str
    _channel: str
    _lock_class: int
    _background: asyncio.Task[None] | None
    _writes: set[asyncio.Task[Any]]
    _producer_lock: asyncio.Lock
    _producer_connection: Connection | None
    _slots: Connection | None
    _slots_mutex: asyncio.Lock
    _held_slots: set[int]
    _slot_gate: SlotGate[tuple[Connection, int]]

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _OPEN_TOKEN:
            raise TypeError("use 'await PostgresQueueStore.open(dsn)'")

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        policy: QueuePolicy | None = None,
        clock: Callable[[], float] = time.time,
        pool_size: int = 10,
        reap_interval: float = 5.0,
        migrate: bool = False,
    ) -> PostgresQueueStore:
        """Connect, register this node and return the claims of dead nodes. The schema
        must be at :data:`SCHEMA_VERSION` (``migrate=True`` brings it there)."""
        self = cls(_token=_OPEN_TOKEN)
        self.dsn = dsn
        self.schema = _checked_schema(schema)
        self.policy = policy if policy is not None else QueuePolicy()
        self.clock = clock
        self.reap_interval = reap_interval
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._change_count = 0
        self._change_event = asyncio.Event()
        self._background = None
        self._writes = set()
        self._channel = f"mailgate_queue.{schema}"
        self._lock_class = _lock_class(schema)
        self._settings = _server_settings(schema)
        self._reconnecting = None
        self._producer_lock = asyncio.Lock()
        self._producer_connection = None
        self._slots = None
        self._slots_mutex = asyncio.Lock()
        self._held_slots = set()
        self._slot_gate = SlotGate(self._try_slot, self._give_slot)
        listener = await asyncpg.connect(dsn, server_settings=self._settings)
        try:
            if migrate:
                await _migrate_schema(listener, schema=schema)
            version = await schema_version(listener, schema)
            if version != SCHEMA_VERSION:
                raise QueueError(
                    f"queue schema {schema!r} is at version {version}, this mailgate needs "
                    f"{SCHEMA_VERSION}: run 'mailgate queue migrate'"
                )
            await self._listen(listener)
            self._pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=pool_size,
                server_settings=self._settings,
                reset=_keep_session,
            )
        except BaseException:
            self._closed = True  # the connection's end is no loss to recover from
            await listener.close()
            raise
        try:
            await self._reap()
        except BaseException:
            self._closed = True
            await self._pool.close()
            await listener.close()
            raise
        self._background = asyncio.create_task(self._keep_alive(), name="mailgate-queue-reaper")
        return self

    async def __aenter__(self) -> PostgresQueueStore:
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
        """This node's name: the owner of its leases."""
        return self._node_name

    async def _listen(self, listener: Connection) -> None:
        """Make ``listener`` this node's connection: a new node id and its advisory
        lock (held while the connection lives), the ``nodes`` row (a row whose lock is
        not held is a dead node), LISTEN, and a watch for the connection's end."""
        node_id = int(await listener.fetchval("SELECT nextval('node_ids')"))
        await listener.execute("SELECT pg_advisory_lock($1, $2)", self._lock_class, node_id)
        host = socket.gethostname()
        name = f"{host}:{os.getpid()}:{node_id}"
        now = self.clock()
        await listener.execute(
            "INSERT INTO nodes (id, name, host, pid, started_at, heartbeat_at, software) "
            "VALUES ($1, $2, $3, $4, $5, $5, $6)",
            node_id,
            name,
            host,
            os.getpid(),
            now,
            f"mailgate {__version__}",
        )
        await listener.add_listener(self._channel, self._notified)
        listener.add_termination_listener(self._listener_lost)
        self._listener = listener
        self._node_id = node_id
        self._node_name = name

    def _listener_lost(self, connection: object) -> None:
        """The node's connection ended (server restart, network): this node is dead for
        the others from now on (its leases are returned to them and its results on those
        leases fenced off), and notifications stop. Come back as a new node."""
        if self._closed or connection is not self._listener or self._reconnecting is not None:
            return
        log.error("queue: lost the connection of node %s; reconnecting", self._node_name)
        self._reconnecting = asyncio.create_task(self._reconnect(), name="mailgate-queue-listen")

    async def _reconnect(self) -> None:
        delay = 0.1
        try:
            while not self._closed:
                try:
                    listener = await asyncpg.connect(self.dsn, server_settings=self._settings)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("queue: reconnecting failed: %s", exc)
                else:
                    try:
                        await self._listen(listener)
                    except BaseException:
                        await listener.close()
                        raise
                    log.warning("queue: reconnected as node %s", self._node_name)
                    # Changes made while nobody listened would be missed: count one.
                    self._changed()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._reconnecting = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._change_event.set()  # waiters return (False) instead of sleeping on
        for task in (self._background, self._reconnecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        try:
            # Claims of a node that stops are returned at once, for the others to take.
            async with self._pool.acquire() as connection, connection.transaction():
                returned = await connection.fetchval(
                    "WITH returned AS (UPDATE recipients SET lease_owner = NULL, "
                    "lease_node = NULL, lease_id = NULL, lease_expires = NULL "
                    "WHERE lease_node = $1 RETURNING 1) SELECT count(*) FROM returned",
                    self._node_id,
                )
                await connection.execute("DELETE FROM nodes WHERE id = $1", self._node_id)
                if returned:
                    await connection.execute("SELECT pg_notify($1, '')", self._channel)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("queue: could not return this node's claims on close: %s", exc)
        await self._pool.close()
        with contextlib.suppress(OSError, asyncpg.InterfaceError):
            await self._listener.close()
        if self._slots is not None:
            with contextlib.suppress(OSError, asyncpg.InterfaceError):
                await self._slots.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("the queue store is closed")

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    async def _write(
        self,
        work: Callable[[Connection, _Changes], Awaitable[T]],
        *,
        signals: bool = True,
        retry: bool = True,
    ) -> T:
        """Run ``work`` in a transaction (again after a deadlock or serialization
        failure when ``retry``), insert the history it gathered and NOTIFY the other
        nodes in the same transaction. Shielded: a cancelled caller does not undo a
        write already under way."""
        self._check_open()

        async def transaction() -> T:
            attempts = _RETRIES if retry else 1
            for attempt in range(1, attempts + 1):
                changes = _Changes()
                try:
                    async with self._pool.acquire() as connection, connection.transaction():
                        result = await work(connection, changes)
                        await changes.flush(connection, notify=self._channel if signals else None)
                except (
                    asyncpg.DeadlockDetectedError,
                    asyncpg.SerializationError,
                ) as exc:
                    if attempt == attempts:
                        raise
                    log.debug("queue transaction retried (%s)", exc)
                    await asyncio.sleep(0.01 * attempt)
                    continue
                if signals:
                    self._changed()
                return result
            raise AssertionError("unreachable")

        task = asyncio.ensure_future(transaction())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _read(self, query: Callable[[Connection], Awaitable[T]]) -> T:
        """A consistent snapshot for queries that read several tables."""
        self._check_open()
        async with (
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await query(connection)

    # --- nodes and leases --------------------------------------------------------------------

    async def _dead_nodes(self, connection: Connection) -> list[int]:
        """Nodes holding leases whose advisory lock is gone. pg_locks shows the locks
        held now (not a snapshot), and a dead node never comes back, so the answer
        stays true after it is read."""
        rows = await connection.fetch(
            "SELECT DISTINCT r.lease_node FROM recipients r WHERE r.lease_node IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND l.classid = $1::bigint::oid AND l.objid = r.lease_node::bigint::oid "
            "AND l.objsubid = 2 AND l.granted)",
            self._lock_class,
        )
        return [row[0] for row in rows]

    async def _reap(self) -> int:
        """Return the leases of dead nodes and forget dead nodes' rows."""

        async def reap(connection: Connection, changes: _Changes) -> int:
            dead = await self._dead_nodes(connection)
            returned = 0
            if dead:
                returned = int(
                    await connection.fetchval(
                        "WITH returned AS (UPDATE recipients SET lease_owner = NULL, "
                        "lease_node = NULL, lease_id = NULL, lease_expires = NULL "
                        "WHERE lease_node = ANY($1::integer[]) RETURNING 1) "
                        "SELECT count(*) FROM returned",
                        dead,
                    )
                )
            await connection.execute(
                "DELETE FROM nodes n WHERE NOT EXISTS (SELECT 1 FROM pg_locks l "
                "WHERE l.locktype = 'advisory' AND l.database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) AND l.classid = $1::bigint::oid "
                "AND l.objid = n.id::bigint::oid AND l.objsubid = 2 AND l.granted)",
                self._lock_class,
            )
            if returned:
                log.info("queue: %d claims of %d stopped nodes returned", returned, len(dead))
                await connection.execute("SELECT pg_notify($1, '')", self._channel)
            return returned

        returned = await self._write(reap, signals=False)
        if returned:
            self._changed()
        return returned

    async def _keep_alive(self) -> None:
        """The reaper and this node's heartbeat, for as long as the store is open."""
        while not self._closed:
            await asyncio.sleep(self.reap_interval)
            try:
                await self._pool.execute(
                    "UPDATE nodes SET heartbeat_at = $1 WHERE id = $2", self.clock(), self._node_id
                )
                await self._reap()
            except Exception as exc:  # the database is down, say: try again next round
                if not self._closed:
                    log.warning("queue: reaper/heartbeat failed: %s", exc)

    # --- change notification ------------------------------------------------------------------

    def _notified(self, *_: object) -> None:
        self._changed()

    # --- accepting ----------------------------------------------------------------------------

    async def enqueue(
        self,
        message: NewMessage,
        body: BodySource,
        *,
        synced: bool = False,
        settles: Sequence[DsnNotice] = (),
    ) -> str:
        self._check_open()
        if not isinstance(body, bytes | bytearray | memoryview | os.PathLike | AsyncIterable):
            raise TypeError(f"unsupported body type {type(body).__name__}")
        received_at = self._now(message.received_at)
        message_id = new_message_id(received_at)
        expires_at = self.policy.expires_at(received_at, message.sender)

        async def insert(connection: Connection, changes: _Changes) -> str:
            size = await _write_body(connection, message_id, body)
            await connection.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS}) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                message_id,
                message.sender,
                size,
                received_at,
                expires_at,
                message.envid,
                message.ret,
                message.smtputf8,
                message.body_type,
                json.dumps(asdict(message.client), separators=(",", ":")),
                message.require_tls,
                message.tls_optional,
            )
            await connection.executemany(
                "INSERT INTO recipients (message_id, address, domain, destination, orcpt, "
                "notify, state, next_attempt) VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7)",
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
            changes.history.append(
                _history_row(
                    message_id,
                    received_at,
                    "enqueued",
                    detail=f"{len(message.recipients)} recipients",
                )
            )
            if settles:
                await self._settle(connection, changes, settles, received_at, by=message_id)
            return message_id

        # A body stream can be read only once: no retry (nothing but settles can conflict).
        return await self._write(insert, retry=False)

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
        owner = self._node_name
        node = self._node_id
        excluded = sorted(set(exclude_destinations))

        async def claim(connection: Connection, changes: _Changes) -> list[DeliveryBatch]:
            keys: list[tuple[str, str]] = []
            seen: set[tuple[str, str]] = set()
            # Walk due recipients, oldest due first, locking them (and skipping those
            # another node is claiming right now) until enough (message, destination)
            # groups are found; the cursor stops early, so a long queue costs little.
            async for row in connection.cursor(
                f"SELECT message_id, destination FROM recipients WHERE {_DUE} "
                f"AND NOT (destination = ANY($2::text[])) "
                f"ORDER BY next_attempt, id FOR UPDATE SKIP LOCKED",
                at,
                excluded,
                prefetch=max(16, min(2 * limit, 1000)),
            ):
                key = (row[0], row[1])
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                if len(keys) >= limit:
                    break
            if not keys:
                return []
            # Every due recipient of each group (up to max_recipients), locked too.
            rows = await connection.fetch(
                f"SELECT picked.id, k.ordinal FROM unnest($2::text[], $3::text[]) "
                f"WITH ORDINALITY AS k(message_id, destination, ordinal) "
                f"CROSS JOIN LATERAL (SELECT id FROM recipients "
                f"WHERE message_id = k.message_id AND destination = k.destination AND {_DUE} "
                f"ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) picked",
                at,
                [key[0] for key in keys],
                [key[1] for key in keys],
                max_recipients,
            )
            lease_ids = await connection.fetchval(
                "SELECT array_agg(nextval('lease_ids')) FROM generate_series(1, $1)", len(keys)
            )
            ids = [row["id"] for row in rows]
            leases = [lease_ids[row["ordinal"] - 1] for row in rows]
            leased = await connection.fetch(
                f"UPDATE recipients r SET lease_owner = $1, lease_node = $2, "
                f"lease_id = v.lease_id, lease_expires = $3 "
                f"FROM unnest($4::bigint[], $5::bigint[]) AS v(id, lease_id) "
                f"WHERE r.id = v.id RETURNING {', '.join('r.' + c for c in _COLUMNS)}",
                owner,
                node,
                expires,
                ids,
                leases,
            )
            by_key: dict[tuple[str, str], list[RecipientInfo]] = {}
            for row in leased:
                recipient = recipient_info(row, dsn_kinds(row["dsn_sent"]))
                by_key.setdefault((recipient.message_id, recipient.destination), []).append(
                    recipient
                )
            messages = await self._messages(connection, sorted({key[0] for key in keys}))
            batches: list[DeliveryBatch] = []
            for ordinal, key in enumerate(keys):
                recipients = by_key.get(key)
                message = messages.get(key[0])
                if not recipients or message is None:
                    continue
                recipients.sort(key=lambda recipient: recipient.id)
                lease = Lease(owner, int(lease_ids[ordinal]), expires)
                batches.append(DeliveryBatch(message, key[1], tuple(recipients), lease))
            return batches

        return await self._write(claim, signals=False)

    async def renew_lease(self, batch: DeliveryBatch, now: float | None = None) -> Lease | None:
        at = self._now(now)
        lease = batch.lease
        expires = at + self.policy.lease_time
        ids = [recipient.id for recipient in batch.recipients]

        async def renew(connection: Connection, changes: _Changes) -> Lease | None:
            rows = await connection.fetch(
                "UPDATE recipients SET lease_expires = $1 WHERE lease_owner = $2 "
                "AND lease_id = $3 AND id = ANY($4::bigint[]) RETURNING id",
                expires,
                lease.owner,
                lease.id,
                ids,
            )
            return Lease(lease.owner, lease.id, expires) if rows else None

        return await self._write(renew, signals=False)

    async def release_claim(self, batch: DeliveryBatch, now: float | None = None) -> int:
        lease = batch.lease
        ids = [recipient.id for recipient in batch.recipients]

        async def release(connection: Connection, changes: _Changes) -> int:
            rows = await connection.fetch(
                "UPDATE recipients SET lease_owner = NULL, lease_node = NULL, lease_id = NULL, "
                "lease_expires = NULL WHERE lease_owner = $1 AND lease_id = $2 "
                "AND id = ANY($3::bigint[]) RETURNING id",
                lease.owner,
                lease.id,
                ids,
            )
            return len(rows)

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

        async def record(connection: Connection, changes: _Changes) -> int:
            # The fence: only rows still under this very lease, locked until the commit.
            rows = {
                row["id"]: recipient_info(row, dsn_kinds(row["dsn_sent"]))
                for row in await connection.fetch(
                    f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE lease_owner = $1 "
                    f"AND lease_id = $2 AND id = ANY($3::bigint[]) ORDER BY id FOR UPDATE",
                    lease.owner,
                    lease.id,
                    [result.recipient_id for result in wanted],
                )
            }
            # The message's row is not read again: what apply_result needs of it never
            # changes after the enqueue, and the claim read it. Rows still leased mean
            # it is still there (deleting it deletes them).
            message = batch.message
            rows = {key: row for key, row in rows.items() if row.message_id == message.id}
            if not rows:
                return 0
            updates: list[tuple[RecipientInfo, RecipientUpdate]] = []
            cleared: list[int] = []
            for result in wanted:
                current = rows.get(result.recipient_id)
                if current is None:
                    continue
                update = apply_result(recipient_facts(current), message, result, policy, at)
                if update is None:
                    cleared.append(current.id)
                else:
                    updates.append((current, update))
            if cleared:
                await connection.execute(
                    "UPDATE recipients SET lease_owner = NULL, lease_node = NULL, "
                    "lease_id = NULL, lease_expires = NULL WHERE id = ANY($1::bigint[]) "
                    "AND lease_id = $2",
                    cleared,
                    lease.id,
                )
            await self._apply(connection, changes, updates, at, fence=lease.id)
            await self._purge_if_finished(connection, changes, [message.id], at)
            return len(updates)

        return await self._write(record)

    async def next_due(self) -> float | None:
        async def query(connection: Connection) -> float | None:
            value = await connection.fetchval(
                "SELECT MIN(next_attempt) FROM recipients WHERE state IN ('queued', 'deferred')"
            )
            return None if value is None else float(value)

        return await self._read(query)

    # --- DSNs ---------------------------------------------------------------------------------

    async def pending_notices(self, limit: int = 100) -> list[DsnNotice]:
        async def query(connection: Connection) -> list[DsnNotice]:
            keys = await connection.fetch(
                "SELECT DISTINCT message_id, dsn_pending FROM recipients "
                "WHERE dsn_pending IS NOT NULL ORDER BY message_id, dsn_pending LIMIT $1",
                limit,
            )
            if not keys:
                return []
            messages = await self._messages(connection, sorted({row[0] for row in keys}))
            grouped: dict[tuple[str, str], list[RecipientInfo]] = {}
            for row in await connection.fetch(
                f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE dsn_pending IS NOT NULL "
                f"AND message_id = ANY($1::text[]) ORDER BY id",
                list(messages),
            ):
                grouped.setdefault((row["message_id"], row["dsn_pending"]), []).append(
                    recipient_info(row, dsn_kinds(row["dsn_sent"]))
                )
            notices: list[DsnNotice] = []
            for message_id, kind in keys:
                message = messages.get(message_id)
                recipients = grouped.get((message_id, kind))
                if message is None or not recipients:
                    continue
                notices.append(DsnNotice(cast("DsnKind", kind), message, tuple(recipients)))
            return notices

        return await self._read(query)

    async def _settle(
        self,
        connection: Connection,
        changes: _Changes,
        notices: Sequence[DsnNotice],
        now: float,
        *,
        by: str | None = None,
    ) -> None:
        """Mark notices produced (recipients whose pending DSN is still this kind).
        ``by`` (the report's queue id): all or nothing, NoticeSettled when a recipient
        no longer owes the notice. Two nodes settling the same notice at once: the
        second's UPDATE waits for the first's row locks, then finds the rows settled
        (READ COMMITTED re-checks the WHERE clause on the new row versions)."""
        touched: list[str] = []
        for notice in notices:
            settled = await connection.fetch(
                "UPDATE recipients SET dsn_pending = NULL, "
                "dsn_sent = array_append(array_remove(dsn_sent, $2), $2) "
                "WHERE id = ANY($1::bigint[]) AND dsn_pending = $2 RETURNING id, address",
                [recipient.id for recipient in notice.recipients],
                notice.kind,
            )
            if by is not None and len(settled) != len({r.id for r in notice.recipients}):
                raise NoticeSettled(
                    f"the {notice.kind} notice of {notice.message.id} is settled already "
                    "or has changed"
                )
            for row in sorted(settled, key=lambda row: int(row["id"])):
                changes.history.append(
                    _history_row(
                        notice.message.id,
                        now,
                        f"dsn-{notice.kind}",
                        recipient_id=row["id"],
                        address=row["address"],
                        detail=f"DSN queued as {by}" if by else None,
                    )
                )
            touched.append(notice.message.id)
        await self._purge_if_finished(connection, changes, touched, now)

    async def claim_notice_producer(self) -> bool:
        """The role is a session advisory lock (key :data:`_PRODUCER_KEY` of the
        schema's lock class) on this node's listener connection: released by the
        server when the node closes, dies or loses that connection, and then taken
        by the next node that asks. After a reconnection it is asked for again."""
        self._check_open()
        async with self._producer_lock:
            listener = self._listener
            if self._producer_connection is listener:
                return True
            if self._reconnecting is not None or listener.is_closed():
                return False
            try:
                held = bool(
                    await listener.fetchval(
                        "SELECT pg_try_advisory_lock($1, $2)", self._lock_class, _PRODUCER_KEY
                    )
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("queue: cannot ask for the DSN producer's lock: %s", exc)
                return False
            if held:
                self._producer_connection = listener
                log.info("queue: node %s produces the delivery reports", self._node_name)
            return held

    # --- destination slots ------------------------------------------------------------------

    def destination_slot(
        self, destination: str, limit: int
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Slots are session advisory locks on bigint keys (see
        :func:`~mailgate.queue.slots.slot_keys`), held on one connection of this node
        opened for them: a node that dies or loses that connection frees its slots at
        once. Taking one is one query whichever slot is free."""
        self._check_open()
        return self._slot_gate.slot(destination, limit)

    async def _slot_connection(self) -> Connection:
        connection = self._slots
        if connection is None or connection.is_closed():
            connection = await asyncpg.connect(self.dsn, server_settings=self._settings)
            self._slots = connection
            self._held_slots = set()  # a new session holds nothing
        return connection

    async def _try_slot(self, destination: str, limit: int) -> tuple[Connection, int] | None:
        keys = slot_keys(f"{self._lock_class}:{self.schema}", destination, limit)
        async with self._slots_mutex:
            connection = await self._slot_connection()
            # A session takes an advisory lock it holds already once more: the slots
            # this node holds are not asked for.
            free = [key for key in keys if key not in self._held_slots]
            if not free:
                return None
            # The function scan yields the keys one by one and LIMIT stops at the first
            # lock taken: at most one slot per query.
            key = await connection.fetchval(
                "SELECT key FROM unnest($1::bigint[]) AS key "
                "WHERE pg_try_advisory_lock(key) LIMIT 1",
                free,
            )
            if key is None:
                return None
            self._held_slots.add(int(key))
        return connection, int(key)

    async def _give_slot(self, token: tuple[Connection, int]) -> None:
        connection, key = token
        async with self._slots_mutex:
            if connection is not self._slots or connection.is_closed():
                return  # that session ended: the server freed its slots already
            self._held_slots.discard(key)
            try:
                await connection.fetchval("SELECT pg_advisory_unlock($1)", key)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("queue: cannot free a destination slot: %s", exc)
                # Unsure whether it is held: end the session, which frees every slot
                # of this node (the others are still in use, briefly unguarded).
                with contextlib.suppress(Exception):
                    await connection.close(timeout=2)

    async def mark_notified(self, notices: Sequence[DsnNotice]) -> None:
        if not notices:
            return
        at = self.clock()

        async def settle(connection: Connection, changes: _Changes) -> None:
            await self._settle(connection, changes, notices, at)

        await self._write(settle)

    async def read_body(self, message_id: str, chunk_size: int = 65536) -> AsyncIterator[bytes]:
        """The body, one stored chunk (:data:`BODY_CHUNK`) fetched at a time, no
        connection held between chunks (a slow reader ties up nothing)."""
        self._check_open()
        pool = self._pool
        size = await pool.fetchval("SELECT size FROM messages WHERE id = $1", message_id)
        if size is None:
            raise KeyError(message_id)
        read = 0
        seq = 0
        while read < size:
            data = await pool.fetchval(
                "SELECT data FROM bodies WHERE message_id = $1 AND seq = $2", message_id, seq
            )
            if data is None:  # deleted while being read
                raise KeyError(message_id)
            view = memoryview(data)
            for start in range(0, len(view), chunk_size):
                yield bytes(view[start : start + chunk_size])
            read += len(view)
            seq += 1

    # --- operators ------------------------------------------------------------------------------

    async def list_messages(self, filter: QueueFilter | None = None) -> list[QueuedMessage]:
        criteria = filter if filter is not None else QueueFilter()
        if criteria.ids is not None and not criteria.ids:
            return []

        async def query(connection: Connection) -> list[QueuedMessage]:
            conditions: list[str] = []
            params: list[Any] = []

            def param(value: Any) -> str:
                params.append(value)
                return f"${len(params)}"

            if criteria.states is not None:
                states = sorted(str(state) for state in criteria.states)
                conditions.append(f"r.state = ANY({param(states)}::text[])")
            if criteria.domain is not None:
                conditions.append(f"r.domain = {param(criteria.domain.lower())}")
            where: list[str] = []
            if conditions:
                where.append(
                    "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND "
                    + " AND ".join(conditions)
                    + ")"
                )
            if criteria.ids is not None:
                where.append(f"m.id = ANY({param(list(criteria.ids))}::text[])")
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages m"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY m.received_at, m.id"
            if criteria.limit is not None:
                sql += f" LIMIT {param(criteria.limit)}"
            messages = [message_info(row) for row in await connection.fetch(sql, *params)]
            recipients = await self._recipients_of(connection, [m.id for m in messages])
            return [
                QueuedMessage(message, tuple(recipients.get(message.id, ())))
                for message in messages
            ]

        return await self._read(query)

    async def show(self, message_id: str) -> MessageDetails | None:
        async def query(connection: Connection) -> MessageDetails | None:
            message = (await self._messages(connection, [message_id])).get(message_id)
            if message is None:
                return None
            recipients = (await self._recipients_of(connection, [message_id])).get(message_id, [])
            history = tuple(
                history_entry(row)
                for row in await connection.fetch(
                    "SELECT * FROM history WHERE message_id = $1 ORDER BY id", message_id
                )
            )
            return MessageDetails(QueuedMessage(message, tuple(recipients)), history)

        return await self._read(query)

    async def flush(
        self,
        *,
        ids: Collection[str] | None = None,
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        at = self._now(now)
        id_list = None if ids is None else list(ids)

        async def flush(connection: Connection, changes: _Changes) -> int:
            condition = "state IN ('queued', 'deferred') AND next_attempt > $1"
            params: list[Any] = [at]
            if domain is not None:
                params.append(domain.lower())
                condition += f" AND domain = ${len(params)}"
            if id_list is not None:
                params.append(id_list)
                condition += f" AND message_id = ANY(${len(params)}::text[])"
            return await self._update_counted(
                connection, changes, "next_attempt = $1", condition, params, "flushed", at, None
            )

        return await self._write(flush)

    async def _update_counted(
        self,
        connection: Connection,
        changes: _Changes,
        assignment: str,
        condition: str,
        params: list[Any],
        event: str,
        at: float,
        detail: str | None,
    ) -> int:
        """Update recipients, one history line per message touched; returns rows."""
        rows = await connection.fetch(
            f"WITH touched AS (UPDATE recipients SET {assignment} WHERE {condition} "
            f"RETURNING message_id) "
            f"SELECT message_id, count(*) AS n FROM touched GROUP BY message_id "
            f"ORDER BY message_id",
            *params,
        )
        for row in rows:
            changes.history.append(_history_row(row["message_id"], at, event, detail=detail))
        return sum(int(row["n"]) for row in rows)

    async def hold(self, ids: Collection[str], reason: str = "held by the operator") -> int:
        at = self.clock()
        id_list = list(ids)

        async def hold(connection: Connection, changes: _Changes) -> int:
            return await self._update_counted(
                connection,
                changes,
                "state = 'held', held_reason = $2",
                "message_id = ANY($1::text[]) AND state IN ('queued', 'deferred')",
                [id_list, reason],
                "held",
                at,
                reason,
            )

        return await self._write(hold)

    async def release(self, ids: Collection[str], now: float | None = None) -> int:
        at = self._now(now)
        id_list = list(ids)

        async def release(connection: Connection, changes: _Changes) -> int:
            return await self._update_counted(
                connection,
                changes,
                "state = 'queued', held_reason = NULL, next_attempt = $2",
                "message_id = ANY($1::text[]) AND state = 'held'",
                [id_list, at],
                "released",
                at,
                None,
            )

        return await self._write(release)

    async def delete(self, ids: Collection[str]) -> int:
        id_list = list(ids)
        if not id_list:
            self._check_open()
            return 0

        async def delete(connection: Connection, changes: _Changes) -> int:
            # Recipients, history and body rows go with the message (ON DELETE CASCADE).
            rows = await connection.fetch(
                "DELETE FROM messages WHERE id = ANY($1::text[]) RETURNING id", id_list
            )
            return len(rows)

        return await self._write(delete)

    async def bounce(self, ids: Collection[str], reason: str = "", now: float | None = None) -> int:
        at = self._now(now)
        id_list = list(ids)

        async def bounce(connection: Connection, changes: _Changes) -> int:
            messages = await self._messages(connection, id_list)
            recipients = await self._recipients_of(connection, list(messages), lock=True)
            updates: list[tuple[RecipientInfo, RecipientUpdate]] = []
            for message_id, message in messages.items():
                for recipient in recipients.get(message_id, []):
                    update = apply_operator_bounce(recipient_facts(recipient), message, reason, at)
                    if update is not None:
                        updates.append((recipient, update))
            await self._apply(connection, changes, updates, at)
            await self._purge_if_finished(connection, changes, list(messages), at)
            return len(updates)

        return await self._write(bounce)

    async def stats(self, now: float | None = None) -> QueueStats:
        at = self._now(now)
        labels = age_bucket_labels()

        async def query(connection: Connection) -> QueueStats:
            totals = await connection.fetchrow(
                "SELECT COUNT(*) AS messages, MIN(received_at) AS oldest FROM messages"
            )
            assert totals is not None
            by_state = dict.fromkeys(RecipientState, 0)
            for row in await connection.fetch(
                "SELECT state, COUNT(*) AS n FROM recipients GROUP BY state"
            ):
                by_state[RecipientState(row["state"])] = int(row["n"])
            by_domain: dict[str, list[int]] = {}
            for row in await connection.fetch(
                "SELECT r.domain, m.received_at FROM recipients r "
                "JOIN messages m ON m.id = r.message_id "
                "WHERE r.state IN ('queued', 'deferred', 'held')"
            ):
                counts = by_domain.setdefault(row["domain"], [0] * len(labels))
                counts[age_bucket(at - row["received_at"])] += 1
            return QueueStats(
                messages=int(totals["messages"]),
                by_state=by_state,
                by_domain={domain: tuple(counts) for domain, counts in sorted(by_domain.items())},
                bucket_labels=labels,
                oldest=totals["oldest"],
            )

        return await self._read(query)

    async def purge_finished(self, now: float | None = None) -> int:
        at = self._now(now)

        async def purge(connection: Connection, changes: _Changes) -> int:
            candidates = [
                row[0]
                for row in await connection.fetch(
                    "SELECT m.id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r "
                    "WHERE r.message_id = m.id AND (r.state NOT IN ('delivered', 'failed') "
                    "OR r.dsn_pending IS NOT NULL))"
                )
            ]
            return len(await self._purge_if_finished(connection, changes, candidates, at))

        return await self._write(purge)

    # --- row helpers ------------------------------------------------------------------------------

    async def _messages(self, connection: Connection, ids: Sequence[str]) -> dict[str, MessageInfo]:
        if not ids:
            return {}
        rows = await connection.fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ANY($1::text[]) ORDER BY id",
            list(ids),
        )
        return {row["id"]: message_info(row) for row in rows}

    async def _recipients_of(
        self, connection: Connection, ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, list[RecipientInfo]]:
        if not ids:
            return {}
        result: dict[str, list[RecipientInfo]] = {}
        for row in await connection.fetch(
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ANY($1::text[]) "
            f"ORDER BY id{' FOR UPDATE' if lock else ''}",
            list(ids),
        ):
            result.setdefault(row["message_id"], []).append(
                recipient_info(row, dsn_kinds(row["dsn_sent"]))
            )
        return result

    async def _apply(
        self,
        connection: Connection,
        changes: _Changes,
        updates: Sequence[tuple[RecipientInfo, RecipientUpdate]],
        at: float,
        *,
        fence: int | None = None,
    ) -> None:
        """Write the new states (clearing their leases) and their history lines. With
        ``fence``, a row no longer under that lease id is left alone."""
        if not updates:
            return
        rows: list[tuple[Any, ...]] = []
        for current, update in updates:
            reply = update.last_reply
            rows.append(
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
                    fence,
                )
            )
            attempted = update.attempts != current.attempts
            changes.history.append(
                _history_row(
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
            )
        await connection.executemany(
            "UPDATE recipients SET state = $1, attempts = $2, next_attempt = $3, "
            "reply_code = $4, reply_enhanced = $5, reply_text = $6, remote_mta = $7, "
            "status = $8, diagnostic = $9, last_attempt_at = $10, final_at = $11, "
            "held_reason = $12, dsn_pending = $13, lease_owner = NULL, lease_node = NULL, "
            "lease_id = NULL, lease_expires = NULL "
            "WHERE id = $14 AND ($15::bigint IS NULL OR lease_id = $15::bigint)",
            rows,
        )

    async def _purge_if_finished(
        self, connection: Connection, changes: _Changes, ids: Sequence[str], now: float
    ) -> list[str]:
        """Remove messages whose recipients are all final with no DSN owed, finished at
        least ``keep_finished`` ago; returns their ids. Their history goes with them:
        the lines gathered for them are not written at all."""
        if not ids:
            return []
        rows = await connection.fetch(
            "WITH finished AS (SELECT message_id FROM recipients "
            "WHERE message_id = ANY($1::text[]) GROUP BY message_id "
            "HAVING bool_and(state IN ('delivered', 'failed') AND dsn_pending IS NULL) "
            "AND MAX(final_at) <= $2) "
            "DELETE FROM messages WHERE id IN (SELECT message_id FROM finished) RETURNING id",
            sorted(set(ids)),
            now - self.policy.keep_finished,
        )
        purged = [row[0] for row in rows]
        changes.purged.update(purged)
        return purged


_COLUMNS = tuple(column.strip() for column in _RECIPIENT_COLUMNS.split(","))


async def _write_body(connection: Connection, message_id: str, body: BodySource) -> int:
    """Insert the body as chunks of :data:`BODY_CHUNK` bytes; returns its size."""
    seq = 0
    size = 0

    async def put(chunk: bytes | memoryview) -> None:
        nonlocal seq, size
        # execute() keeps the statement prepared in the connection's cache.
        await connection.execute(
            "INSERT INTO bodies (message_id, seq, data) VALUES ($1, $2, $3)",
            message_id,
            seq,
            chunk,
        )
        seq += 1
        size += len(chunk)

    if isinstance(body, bytes | bytearray | memoryview):
        view = memoryview(body).cast("B")
        for start in range(0, len(view), BODY_CHUNK):
            await put(view[start : start + BODY_CHUNK])
    elif isinstance(body, os.PathLike):
        reader = await asyncio.to_thread(open, Path(body), "rb")
        try:
            while chunk := await asyncio.to_thread(reader.read, BODY_CHUNK):
                await put(chunk)
        finally:
            await asyncio.to_thread(reader.close)
    else:
        buffer = bytearray()
        async for piece in body:
            buffer += piece
            while len(buffer) >= BODY_CHUNK:
                await put(bytes(buffer[:BODY_CHUNK]))
                del buffer[:BODY_CHUNK]
        if buffer:
            await put(bytes(buffer))
    return size


async def _keep_session(connection: Connection) -> None:
    """The pool's reset on release: nothing. Pool connections keep no session state
    (no session locks, cursors or LISTEN; every transaction has ended by release), so
    asyncpg's reset query would be one more round trip per operation for nothing."""


_OPEN_TOKEN = object()

if TYPE_CHECKING:

    def _implements_the_interface(store: PostgresQueueStore) -> QueueStore:
        # mypy checks here that the class matches the QueueStore protocol.
        return store
