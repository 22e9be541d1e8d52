"""Honeypot load: many concurrent attacker sessions against ``mailgate honeypot``.

Starts ``python -m mailgate honeypot`` on a free loopback port with a fresh data
directory, then runs ``--clients`` asyncio attackers (500 by default) for ``--duration``
seconds (60 by default). Each attacker loops, bounded in count and time: connect from its
own 127.0.x.y address, read the banner, EHLO, AUTH PLAIN (refused: the honeypot's
default), MAIL, RCPT, DATA with a ~1 KiB message (a URL in each, an attachment in every
tenth), QUIT. Meanwhile the server's RSS is sampled from /proc every second.

Afterwards the server is stopped with SIGTERM and the capture store checked: PRAGMA
integrity_check, no session left open, and the rows matching what the clients did
(sessions = connections that got a banner, AUTH attempts = AUTH commands answered,
messages = messages answered 250).

    python3 bench/honeypot_load.py                    # 500 clients, 60 s
    python3 bench/honeypot_load.py --clients 100 --duration 10 --persona exim

Loopback only. Not a test: CI never runs it. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
#: A single client's sessions at most (the time limit normally ends it first).
MAX_SESSIONS_PER_CLIENT = 100_000
#: Seconds one exchange may take before the client gives up on the session.
STEP_TIMEOUT = 30.0


@dataclass
class Counts:
    connected: int = 0  # got a 220 banner
    sessions: int = 0  # reached QUIT's 221
    auth_answered: int = 0
    messages: int = 0  # 250 after the data
    errors: int = 0
    refused: int = 0  # banner was not 220
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class SMTPError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: (code, last line)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        if not line:
            raise SMTPError("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes
) -> tuple[int, bytes]:
    writer.write(line + b"\r\n")
    return await reply(reader)


def message(client: int, number: int) -> bytes:
    lines = [
        f"From: Offers <offers{client}@spam.example>",
        f"To: <user{number}@victim.example>",
        f"Subject: Offer {client}-{number}",
        f"Message-ID: <{client}.{number}@spam.example>",
        "MIME-Version: 1.0",
    ]
    body = f"Cheap watches: http://spam.example/c/{client}/{number} " + "x" * 700
    if number % 10 == 0:
        lines += [
            'Content-Type: multipart/mixed; boundary="b"',
            "",
            "--b",
            "Content-Type: text/plain",
            "",
            body,
            "--b",
            'Content-Type: application/octet-stream; name="invoice.exe"',
            "Content-Transfer-Encoding: base64",
            "",
            b64encode(b"MZ" + bytes([client % 256]) * 300).decode(),
            "--b--",
        ]
    else:
        lines += ["Content-Type: text/plain", "", body]
    return ("\r\n".join(lines) + "\r\n.\r\n").encode()


async def attacker(client: int, port: int, deadline: float, counts: Counts) -> None:
    source = f"127.0.{1 + client // 250}.{1 + client % 250}"
    credentials = b64encode(f"\0user{client}\0pass{client}".encode())
    for number in range(MAX_SESSIONS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, port, local_addr=(source, 0)), STEP_TIMEOUT
            )
            code, _ = await reply(reader)
            if code != 220:
                counts.refused += 1
                continue
            counts.connected += 1
            code, _ = await command(reader, writer, f"EHLO bot{client}.example".encode())
            if code != 250:
                raise SMTPError(f"EHLO {code}")
            code, _ = await command(reader, writer, b"AUTH PLAIN " + credentials)
            counts.auth_answered += 1
            for line in (
                f"MAIL FROM:<offers{client}@spam.example>".encode(),
                f"RCPT TO:<user{number}@victim.example>".encode(),
            ):
                code, _ = await command(reader, writer, line)
                if code != 250:
                    raise SMTPError(f"{line[:4].decode()} {code}")
            code, _ = await command(reader, writer, b"DATA")
            if code != 354:
                raise SMTPError(f"DATA {code}")
            writer.write(message(client, number))
            code, _ = await reply(reader)
            if code != 250:
                raise SMTPError(f"end of data {code}")
            counts.messages += 1
            code, _ = await command(reader, writer, b"QUIT")
            if code == 221:
                counts.sessions += 1
        except (SMTPError, OSError, TimeoutError, ValueError) as exc:
            counts.error(type(exc).__name__ if not isinstance(exc, SMTPError) else str(exc))
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon: the heap; RssFile, RssShmem: mapped files such as
    SQLite's -shm index) from /proc/PID/status."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                found[key] = int(value.split()[0])
    return found


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """The server's memory every second; every 5 seconds also how far the capture store
    is behind the clients (sessions the clients finished minus sessions recorded as
    closed, read through a read-only connection as a report would)."""

    def __init__(self, pid: int, data_dir: Path, counts: Counts) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.data_dir = data_dir
        self.counts = counts
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.lag: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        uri = f"file:{self.data_dir / 'capture.sqlite3'}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            tick = 0
            while not self.stop.is_set():
                now = time.monotonic() - self.start_time
                with contextlib.suppress(OSError):
                    self.samples.append((now, memory_kb(self.pid)))
                if tick % 5 == 0:
                    finished = self.counts.sessions
                    with contextlib.suppress(sqlite3.Error):
                        [(closed,)] = db.execute(
                            "SELECT count(*) FROM sessions WHERE ended IS NOT NULL"
                        ).fetchall()
                        self.lag.append((now, max(0, finished - closed)))
                tick += 1
                self.stop.wait(1.0)
        finally:
            db.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, persona: str, clients: int) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [
        sys.executable, "-m", "mailgate", "honeypot",
        "--persona", persona,
        "--listen", f"{HOST}:{port}",
        "--data-dir", str(data_dir),
        "--auth-failure-delay", "0",
        "--max-storage", "0",  # no pruning: the row counts must match the clients'
        "--max-clients", str(clients * 2),
        "--hostname", "mx.bench.example",
        "-q",
    ]  # fmt: skip
    process = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read() if process.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as s:
            s.recv(512)
            return process, port
        time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not start")


def check_store(data_dir: Path, counts: Counts) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{data_dir / 'capture.sqlite3'}?mode=ro", uri=True)
    try:

        def one(sql: str) -> Any:
            return db.execute(sql).fetchone()[0]

        found = {
            "integrity_check": one("PRAGMA integrity_check"),
            "sessions": one("SELECT count(*) FROM sessions"),
            "sessions_open": one("SELECT count(*) FROM sessions WHERE ended IS NULL"),
            "auth_attempts": one("SELECT count(*) FROM auth_attempts"),
            "messages": one("SELECT count(*) FROM messages"),
            "urls": one("SELECT count(*) FROM urls"),
            "attachments": one("SELECT count(*) FROM attachments"),
            "events": one("SELECT count(*) FROM events"),
            "database_bytes": (data_dir / "capture.sqlite3").stat().st_size,
        }
    finally:
        db.close()
    raw = sum(p.stat().st_size for p in (data_dir / "messages").rglob("*.eml"))
    found["raw_message_bytes"] = raw
    checks = {
        "integrity ok": found["integrity_check"] == "ok",
        "no session left open": found["sessions_open"] == 0,
        # Every connection that got a banner is a session (refused ones too), plus the
        # readiness probe of start_server.
        "sessions == connections": found["sessions"] == counts.connected + counts.refused + 1,
        "auth attempts == AUTH answered": found["auth_attempts"] == counts.auth_answered,
        "messages == messages accepted": found["messages"] == counts.messages,
        "one URL per message": found["urls"] == counts.messages,
    }
    found["checks"] = checks
    return found


async def run_clients(port: int, clients: int, duration: float, counts: Counts) -> Counts:
    deadline = time.monotonic() + duration
    tasks = [asyncio.create_task(attacker(i, port, deadline, counts)) for i in range(clients)]
    await asyncio.gather(*tasks)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--persona", default="postfix")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.clients <= 60_000 or not 0 < args.duration <= 3600:
        parser.error("--clients 1..60000, --duration up to 3600 s")

    directory = Path(tempfile.mkdtemp(prefix="honeypot-load-"))
    data_dir = directory / "data"
    process, port = start_server(data_dir, args.persona, args.clients)
    counts = Counts()
    sampler = Sampler(process.pid, data_dir, counts)
    sampler.start()
    cpu_before = cpu_seconds(process.pid)
    started = time.monotonic()
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(run_clients(port, args.clients, args.duration, counts))
    finally:
        elapsed = time.monotonic() - started
        cpu_used = cpu_seconds(process.pid) - cpu_before
        time.sleep(1.5)  # one more sample after the clients are gone
        sampler.stop.set()
        sampler.join(3)
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            status = -9
    stderr = process.stderr.read() if process.stderr else ""
    store = check_store(data_dir, counts)
    samples = [(t, m["VmRSS"]) for t, m in sampler.samples]
    rss = [kb for _, kb in samples]
    during = [kb for t, kb in samples if t <= elapsed]
    warm = [kb for t, kb in samples if 5 <= t <= elapsed] or during
    anon = [m.get("RssAnon", 0) for _, m in sampler.samples]
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "persona": args.persona,
        "counts": asdict(counts),
        "sessions_per_s": round(counts.sessions / elapsed, 1),
        "server_cpu_s": round(cpu_used, 1),
        "messages_per_s": round(counts.messages / elapsed, 1),
        "rss_kb": {
            "start": rss[0] if rss else None,
            "after_5s": warm[0] if warm else None,
            "peak": max(rss) if rss else None,
            "end_of_load": during[-1] if during else None,
            "after_load": rss[-1] if rss else None,
            "every_10s": [kb for t, kb in samples if int(t) % 10 == 0][:40],
            "anon_every_10s": [m.get("RssAnon") for t, m in sampler.samples if int(t) % 10 == 0][
                :40
            ],
            "file_and_shmem_end": (
                sampler.samples[-1][1].get("RssFile", 0) + sampler.samples[-1][1].get("RssShmem", 0)
                if sampler.samples
                else None
            ),
            "anon_peak": max(anon) if anon else None,
        },
        "store_lag_sessions_every_5s": [lag for _, lag in sampler.lag][:80],
        "server_exit": status,
        "store": store,
        "data_dir": str(data_dir) if args.keep else None,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    ok = status == 0 and all(store["checks"].values()) and "Traceback" not in stderr
    if "Traceback" in stderr:
        print(stderr[-3000:], file=sys.stderr)
    print(
        f"{counts.sessions} sessions ({result['sessions_per_s']}/s), {counts.messages} messages, "
        f"{counts.errors} client errors; RSS start {result['rss_kb']['start']} kB, "
        f"peak {result['rss_kb']['peak']} kB, end {result['rss_kb']['end_of_load']} kB; "
        f"store {'intact' if ok else 'CHECK FAILED'}",
        file=sys.stderr,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
