"""Queue store throughput: enqueues per second of 1 KB messages, durable (fsync of body,
directory and WAL) before each enqueue returns, at several concurrency levels; then the
delivery side (claim + record a 250) per recipient.

Not a test. Run from the repository root:

    PYTHONPATH=src python bench/queue_store.py [--messages 2000] [--dir /path/on/the/disk]

The queue directory must be on the disk being measured (not tmpfs: fsync is free there).
As a yardstick, the disk's own rate of "write 1 KB, fsync file, fsync directory" is
measured first: an enqueue needs at least that much I/O plus one WAL fsync, so without
group commit one writer could not beat about half of that rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailgate.queue import (
    DeliveryResult,
    NewMessage,
    NewRecipient,
    QueuePolicy,
    RemoteReply,
    SQLiteQueueStore,
)

BODY = (b"Subject: benchmark\r\n\r\n" + b"x" * 1000 + b"\r\n")[:1024]
MESSAGE = NewMessage(
    "sender@example.org",
    (
        NewRecipient("one@a.example", "relay:a.example"),
        NewRecipient("two@b.example", "relay:b.example"),
    ),
)
OK = RemoteReply(250, "2.0.0", "ok")


def raw_fsync_rate(directory: Path, seconds: float = 2.0) -> float:
    """Write 1 KB to a new file, fsync it and its directory, in a loop."""
    directory.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    try:
        while time.perf_counter() < deadline:
            path = directory / f"raw-{count}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, BODY)
            os.fsync(fd)
            os.close(fd)
            os.fsync(dir_fd)
            count += 1
    finally:
        os.close(dir_fd)
    elapsed = time.perf_counter() - started
    for index in range(count):
        os.unlink(directory / f"raw-{index}")
    return count / elapsed


async def enqueue_rate(
    store: SQLiteQueueStore, total: int, concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await store.enqueue(MESSAGE, BODY)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started), latencies


async def delivery_rate(store: SQLiteQueueStore) -> tuple[float, int]:
    """Claim everything due and record a 250 for each recipient, 50 batches at a time
    (each batch is one message and one destination: here one recipient)."""
    recipients = 0
    started = time.perf_counter()
    while True:
        batches = await store.claim_due(limit=50)
        if not batches:
            break
        # As concurrent workers do: their results are committed together.
        await asyncio.gather(
            *(
                store.record_results(
                    batch, [DeliveryResult.from_reply(r.id, OK) for r in batch.recipients]
                )
                for batch in batches
            )
        )
        recipients += sum(len(batch.recipients) for batch in batches)
    return recipients / (time.perf_counter() - started), recipients


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--dir", type=Path, default=None, help="parent of the queue directory")
    parser.add_argument("--keep", action="store_true", help="keep the queue directories")
    arguments = parser.parse_args()
    parent = Path(tempfile.mkdtemp(prefix="mailgate-queue-bench-", dir=arguments.dir))
    print(f"queue directory: {parent} ({os.uname().sysname} {os.uname().release})")
    print(f"Python {sys.version.split()[0]}, SQLite {__import__('sqlite3').sqlite_version}")
    raw = raw_fsync_rate(parent / "raw")
    print(f"disk: write 1 KB + fsync file + fsync dir: {raw:,.0f}/s (one writer)\n")
    print(
        f"{'in flight':>9}  {'enqueue/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}  {'deliver rcpt/s':>14}"
    )
    for concurrency in arguments.concurrency:
        store = await SQLiteQueueStore.open(parent / f"queue-{concurrency}", policy=QueuePolicy())
        try:
            rate, latencies = await enqueue_rate(store, arguments.messages, concurrency)
            delivered, count = await delivery_rate(store)
            assert count == 2 * arguments.messages, count
        finally:
            await store.aclose()
        print(
            f"{concurrency:>9}  {rate:>10,.0f}  {1000 * statistics.median(latencies):>7.2f}"
            f"  {1000 * percentile(latencies, 0.99):>7.2f}  {delivered:>14,.0f}"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npeak RSS of this process: {peak / 1024:.0f} MiB")
    if not arguments.keep:
        shutil.rmtree(parent)


if __name__ == "__main__":
    asyncio.run(main())
