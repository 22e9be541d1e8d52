"""What one queued message costs the shared PostgreSQL queue, with 1, 2 and 3 nodes.

Not a test. Run from the repository root:

    PYTHONPATH=src python bench/queue_nodes.py [--messages 3000] [--nodes 1,2,3] [--dsn URL]

Each node is a process of its own with a :class:`PostgresQueueStore` (its connections,
its LISTEN, its reaper), doing what a mailgate node does with the queue for every
message: enqueue (1 recipient, a 2 KB body, ``ENQUEUE_CONCURRENCY`` at once, as SMTP
sessions would), claim due batches (up to ``CLAIM_LIMIT`` per claim, as the runner
claims its free delivery slots), and record a 250 for each (the delivery itself is left
out: the SMTP side is measured elsewhere, here only the database's share). The nodes
share one queue: each enqueues its share, all claim from the whole queue, and the run
ends when every message is delivered and purged.

What is measured per message:

* database round trips, counted in each node by wrapping asyncpg's Connection (one
  per simple query -- BEGIN, COMMIT -- and one per extended-protocol execution: fetch,
  fetchval, execute with arguments, executemany), split by the caller: ``accept``
  (enqueue), ``claim`` (claim_due, also when it finds nothing), ``record``
  (record_results), ``idle`` (looking whether the queue is done: the bench's own) and
  ``background`` (the reaper and the heartbeat);
* the PostgreSQL server's CPU time (user + system of the postmaster and its
  backends, from /proc, over the run), and the nodes' own CPU time;
* wall time and messages per second, which on a shared 2-core machine say more about
  the other load than about the queue: the load average is printed with them.

Without ``--dsn`` a private cluster is started (initdb/pg_ctl, as the test suite does)
and removed at the end; its settings are PostgreSQL's defaults (fsync on,
synchronous_commit on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BODY = (b"Subject: benchmark\r\n\r\n" + b"x" * 2100)[:2048]
ENQUEUE_CONCURRENCY = 16
CLAIM_LIMIT = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Which part of the node issues a query: set per task.
_PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("phase", default="background")
_TRIPS: Counter[str] = Counter()


def _instrument() -> None:
    """Count round trips on every asyncpg connection of this process (pool members,
    the listener, the slot connection alike)."""
    from asyncpg.connection import Connection

    original_execute = Connection.execute
    original_execute_extended = Connection._execute
    original_executemany = Connection._executemany

    async def execute(self: Any, query: str, *args: Any, timeout: float | None = None) -> Any:
        if not args:  # the simple query protocol: one round trip, not via _execute
            _TRIPS[_PHASE.get()] += 1
        return await original_execute(self, query, *args, timeout=timeout)

    async def execute_extended(self: Any, *args: Any, **kwargs: Any) -> Any:
        _TRIPS[_PHASE.get()] += 1
        return await original_execute_extended(self, *args, **kwargs)

    async def executemany(self: Any, *args: Any, **kwargs: Any) -> Any:
        _TRIPS[_PHASE.get()] += 1  # asyncpg pipelines the rows: one Sync
        return await original_executemany(self, *args, **kwargs)

    Connection.execute = execute  # type: ignore[method-assign]
    Connection._execute = execute_extended  # type: ignore[method-assign]
    Connection._executemany = executemany  # type: ignore[method-assign]


# --- one node -------------------------------------------------------------------------------


async def _node(
    dsn: str, schema: str, messages: int, total: int, start_at: float
) -> dict[str, Any]:
    from mailgate.queue import DeliveryResult, NewMessage, NewRecipient, RemoteReply
    from mailgate.queue.postgres import PostgresQueueStore

    _instrument()
    store = await PostgresQueueStore.open(dsn, schema=schema)
    ok = RemoteReply(250, "2.0.0", "ok")
    message = NewMessage(
        "sender@example.org", (NewRecipient("rcpt@example.net", "relay:example.net"),)
    )
    # Statements are prepared once per connection: warm this node's up, then count.
    _PHASE.set("warm-up")
    await store.next_due()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    _TRIPS.clear()
    cpu_started = os.times()
    started = time.perf_counter()
    delivered = 0
    enqueued = 0
    done_enqueueing = asyncio.Event()

    async def enqueue(count: int) -> None:
        nonlocal enqueued
        _PHASE.set("accept")
        for _ in range(count):
            await store.enqueue(message, BODY)
            enqueued += 1

    async def deliver() -> None:
        nonlocal delivered
        _PHASE.set("deliver")
        idle_since: float | None = None
        while True:
            _PHASE.set("claim")
            batches = await store.claim_due(limit=CLAIM_LIMIT)
            if batches:
                idle_since = None
                _PHASE.set("record")
                for batch in batches:
                    results = [DeliveryResult.from_reply(r.id, ok) for r in batch.recipients]
                    delivered += await store.record_results(batch, results)
                continue
            if done_enqueueing.is_set():
                # Nothing claimable here: finished when the whole queue is empty.
                _PHASE.set("idle")
                due = await store.next_due()
                if due is None:
                    return
            idle_since = idle_since or time.perf_counter()
            seen = store.change_count
            await store.wait_for_change(0.05, seen)

    shares = [
        messages // ENQUEUE_CONCURRENCY + (1 if i < messages % ENQUEUE_CONCURRENCY else 0)
        for i in range(ENQUEUE_CONCURRENCY)
    ]
    delivery = asyncio.create_task(deliver())
    await asyncio.gather(*(enqueue(share) for share in shares))
    done_enqueueing.set()
    await delivery
    elapsed = time.perf_counter() - started
    cpu = os.times()
    trips = dict(_TRIPS)
    await store.aclose()
    return {
        "enqueued": enqueued,
        "delivered": delivered,
        "seconds": elapsed,
        "cpu_seconds": (cpu.user - cpu_started.user) + (cpu.system - cpu_started.system),
        "trips": trips,
    }


# --- the run --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _tree_cpu(root: int) -> float:
    """User + system CPU of ``root``, its live descendants, and its reaped children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo = 0, [root]
    while todo:
        pid = todo.pop()
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
        todo.extend(children.get(pid, []))
    return ticks / CLK_TCK


async def _postmaster_pid(dsn: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        backend = int(await connection.fetchval("SELECT pg_backend_pid()"))
        fields = _stat_fields(backend)  # while the backend lives
    finally:
        await connection.close()
    if fields is None:
        raise SystemExit("the PostgreSQL server is not on this machine: its CPU cannot be read")
    return int(fields[1])


async def _prepare(dsn: str, schema: str) -> None:
    from mailgate.queue.postgres import migrate

    await migrate(dsn, schema=schema)


async def _drop(dsn: str, schema: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


def _run(dsn: str, nodes: int, messages: int) -> dict[str, Any]:
    schema = f"bench_{secrets.token_hex(4)}"
    asyncio.run(_prepare(dsn, schema))
    postmaster = asyncio.run(_postmaster_pid(dsn))
    start_at = time.time() + 2.0
    shares = [messages // nodes + (1 if i < messages % nodes else 0) for i in range(nodes)]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    server_cpu = _tree_cpu(postmaster)
    env = dict(
        os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--node",
                "--dsn",
                dsn,
                "--schema",
                schema,
                "--messages",
                str(share),
                "--total",
                str(messages),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            env=env,
        )
        for share in shares
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode:
            raise SystemExit(f"a node failed (exit {proc.returncode})")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    time.sleep(0.5)  # the nodes' backends exit and are reaped: their CPU is counted
    server_cpu = _tree_cpu(postmaster) - server_cpu
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    asyncio.run(_drop(dsn, schema))
    trips: Counter[str] = Counter()
    for result in results:
        trips.update(result["trips"])
    wall = max(result["seconds"] for result in results)
    delivered = sum(result["delivered"] for result in results)
    return {
        "nodes": nodes,
        "messages": messages,
        "delivered": delivered,
        "wall_seconds": round(wall, 2),
        "messages_per_second": round(messages / wall, 1),
        "trips_per_message": {
            key: round(value / messages, 2) for key, value in sorted(trips.items())
        },
        "trips_per_message_total": round(sum(trips.values()) / messages, 2),
        "server_cpu_us_per_message": round(server_cpu / messages * 1e6),
        "node_cpu_us_per_message": round(sum(r["cpu_seconds"] for r in results) / messages * 1e6),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--dsn", help="a database to use (default: a private cluster)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        result = asyncio.run(_node(args.dsn, args.schema, args.messages, args.total, args.start_at))
        print(json.dumps(result))
        return
    cluster = None
    dsn = args.dsn
    if dsn is None:
        sys.path.insert(0, str(ROOT))
        from tests.queue.postgres_cluster import PrivateCluster, find_server_binaries

        binaries = find_server_binaries()
        if binaries is None:
            raise SystemExit("no initdb/pg_ctl: install postgresql or pass --dsn")
        cluster = PrivateCluster.start(binaries)
        dsn = cluster.dsn
    try:
        rows = [_run(dsn, int(n), args.messages) for n in args.nodes.split(",")]
    finally:
        if cluster is not None:
            cluster.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{os.cpu_count()} CPUs; PostgreSQL private cluster (defaults: fsync, synchronous_commit on)"
    )
    for row in rows:
        print(
            f"{row['nodes']} node(s): {row['messages']} messages in {row['wall_seconds']} s "
            f"({row['messages_per_second']}/s, load {' '.join(row['loadavg_before'])} -> "
            f"{' '.join(row['loadavg_after'])}); round trips per message "
            f"{row['trips_per_message_total']} {row['trips_per_message']}; "
            f"server CPU {row['server_cpu_us_per_message']} us/message; "
            f"node CPU {row['node_cpu_us_per_message']} us/message"
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
