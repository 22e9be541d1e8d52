"""The capture store's write queue under many short sessions (the RSS growth of issue 15).

Runs a honeypot in this process (``mailgate.honeypot.mode.build_server``, loopback, its
event loop in a thread) and ``--clients`` asyncio attackers in a child process for
``--duration`` seconds: each loops connect from its own 127.0.x.y address, banner,
EHLO, NOOP, QUIT -- short sessions, the kind a scanner makes by the thousand. Every half
second it samples the store's queue (records and estimated bytes waiting for the writer
thread), records dropped, and this process's RSS (the clients run elsewhere).

    python3 bench/honeypot_queue.py                   # 300 clients, 20 s
    python3 bench/honeypot_queue.py --clients 500 --duration 20 --output q.json

Loopback only; bounded in time. Not a test: CI never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the clients (child process) ---------------------------------------------------------------


async def _client(index: int, port: int, stop_at: float, counts: dict[str, int]) -> None:
    ip = f"127.0.{1 + index // 250}.{1 + index % 250}"
    for _ in range(1_000_000):
        if time.monotonic() >= stop_at:
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0)), 10
            )
        except (OSError, TimeoutError):
            counts["errors"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            for line in (None, b"EHLO scan.example\r\n", b"NOOP\r\n", b"QUIT\r\n"):
                if line is not None:
                    writer.write(line)
                while True:
                    reply = await asyncio.wait_for(reader.readline(), 10)
                    if not reply or reply[3:4] != b"-":
                        break
            counts["sessions"] += 1
        except (OSError, TimeoutError):
            counts["errors"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _clients(port: int, clients: int, duration: float) -> dict[str, int]:
    counts = {"sessions": 0, "errors": 0}
    stop_at = time.monotonic() + duration
    await asyncio.gather(*(_client(i, port, stop_at, counts) for i in range(clients)))
    return counts


# --- the honeypot (this process) ---------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--persona", default="postfix")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_port:
        counts = asyncio.run(_clients(args.client_port, args.clients, args.duration))
        print(json.dumps(counts))
        return 0

    from mailgate.honeypot.mode import build_server
    from mailgate.honeypot.settings import HoneypotOptions
    from mailgate.server.options import ListenAddress, ServerOptions

    with tempfile.TemporaryDirectory(prefix="hp-queue-") as tmp:
        options = ServerOptions(
            listen=(ListenAddress("127.0.0.1", 0),),
            max_clients=10_000,
            max_clients_per_ip=100,
        )
        honeypot = HoneypotOptions(
            data_dir=Path(tmp), persona=args.persona, given=frozenset({"listen"})
        )
        server = build_server(options, honeypot)
        store = server.store
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(server.start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.wait(15)
        port = server.address[1]
        idle = rss_mb()
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client-port",
                str(port),
                "--clients",
                str(args.clients),
                "--duration",
                str(args.duration),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        samples: list[dict[str, Any]] = []
        begin = time.monotonic()
        while child.poll() is None and time.monotonic() - begin < args.duration + 30:
            time.sleep(0.5)
            samples.append(
                {
                    "t": round(time.monotonic() - begin, 1),
                    "queued": store.queued,
                    "queued_bytes": store.queued_bytes,
                    "dropped": store.dropped,
                    "rss_mb": round(rss_mb(), 1),
                }
            )
        out, _ = child.communicate(timeout=60)
        counts = json.loads(out.strip().splitlines()[-1])
        drain_start = time.monotonic()
        store.flush(timeout=120)
        drained = time.monotonic() - drain_start
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    result = {
        "clients": args.clients,
        "duration": args.duration,
        "sessions": counts["sessions"],
        "client_errors": counts["errors"],
        "rate": round(counts["sessions"] / args.duration, 1),
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": max(s["rss_mb"] for s in samples),
        "peak_queued": max(s["queued"] for s in samples),
        "peak_queued_bytes": max(s["queued_bytes"] for s in samples),
        "dropped": samples[-1]["dropped"],
        "drain_seconds": round(drained, 2),
        "samples": samples,
    }
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary))
    for sample in samples[:: max(1, len(samples) // 10)]:
        print(sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
