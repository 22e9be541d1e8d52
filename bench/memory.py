"""Memory and latency, side by side: for each server (sink mode)
  - peak RSS growth while it receives one 100 MiB message (streamed by the client),
  - RSS per idle connection with 2,000 connections held open after their greeting,
  - median latency of a whole single session: connect, EHLO, MAIL, RCPT, DATA 1 KiB, QUIT.

RSS is the sum over the server's process tree from /proc; the peak is VmHWM, reset just
before the message (clear_refs), so a spike between two samples is not missed.

    bench/setup.sh                     # once
    python3 bench/memory.py            # all servers, all three measurements
    python3 bench/memory.py --servers aiosmtpd,mailgate --tests latency

Not a test: CI never runs it. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import selectors
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH,
    HOST,
    Limits,
    NotRunnable,
    Running,
    ServerSpec,
    all_servers,
    log_tail,
    peak_rss_kb,
    reset_peak_rss,
    rss_kb,
    running,
)
from smtpclient import Client, SMTPError, body_chunks

Measurement = dict[str, Any]


@dataclass
class Row:
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)
    big: Measurement | None = None
    idle: Measurement | None = None
    latency: Measurement | None = None


DEFAULT_SERVERS = "mailgate,aiosmtpd,smtp-server,smtp-server-nowait,postfix-smtp-sink"
#: Connections per client source address (127.0.0.2, .3, ...): stays under per-IP limits
#: such as mailgate's default, which would otherwise measure the limit, not the memory.
PER_SOURCE_IP = 16
CONNECT_BATCH = 100
#: Give up on the idle test when no greeting arrives for this long: the server has stopped
#: taking connections (a limit), and waiting out the whole timeout would tell nothing more.
STALL_S = 10.0


def warm_up(port: int) -> None:
    """One ordinary session first, so lazy imports and first-use caches are in the baseline."""
    with Client(HOST, port) as c:
        c.expect(220)
        c.command("EHLO bench-client", 250)
        code, text = c.send_message("s@bench.example", "r@bench.example", body_chunks(1024))
        if code != 250:
            raise SMTPError(f"warm-up message refused: {text.strip()[:200]!r}")
        c.command("QUIT", 221)


# --- peak RSS for one big message ---------------------------------------------------------


class Sampler(threading.Thread):
    """Fallback peak: RSS sampled every 10 ms, for kernels that refuse the VmHWM reset."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_kb(self.pid))


def big_message(srv: Running, size: int, timeout: float) -> Measurement:
    warm_up(srv.port)
    pid = srv.proc.pid
    base = rss_kb(pid)
    hwm_ok = reset_peak_rss(pid)
    sampler = Sampler(pid)
    sampler.start()
    t0 = time.perf_counter()
    try:
        with Client(HOST, srv.port, timeout=timeout) as c:
            c.expect(220)
            c.command("EHLO bench-client", 250)
            code, text = c.send_message("s@bench.example", "r@bench.example", body_chunks(size))
            with contextlib.suppress(SMTPError, OSError):
                c.command("QUIT", 221)
    finally:
        sampler.done.set()
        sampler.join()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_kb(pid) if hwm_ok else sampler.peak
    return {
        "reply": text.decode(errors="replace").strip()[:120],
        "accepted": code == 250,
        "baseline_rss_mb": base / 1024,
        "peak_growth_mb": max(0, peak - base) / 1024,
        "peak_method": "VmHWM" if hwm_ok else "sampled 10 ms",
        "seconds": elapsed,
    }


# --- idle connections ---------------------------------------------------------------------


def open_idle(port: int, count: int, deadline: float) -> tuple[list[socket.socket], int, str]:
    """Open `count` connections in batches and read each one's greeting. Returns the sockets
    (to be closed by the caller), how many got a 220, and the first refusal seen."""
    socks: list[socket.socket] = []
    greeted, refusal = 0, ""
    for start in range(0, count, CONNECT_BATCH):
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, bytes] = {}
        for i in range(start, min(count, start + CONNECT_BATCH)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            s.bind((f"127.0.0.{2 + i // PER_SOURCE_IP}", 0))
            s.connect_ex((HOST, port))
            sel.register(s, selectors.EVENT_READ)
            pending[s] = b""
        stall_end = time.monotonic() + STALL_S
        while pending and time.monotonic() < min(deadline, stall_end):
            for key, _ in sel.select(timeout=0.5):
                stall_end = time.monotonic() + STALL_S
                s = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(1024)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, refusal = b"", refusal or str(exc)
                buf = pending[s] + data
                if data and b"\n" not in buf:
                    pending[s] = buf
                    continue
                if buf.startswith(b"220"):
                    greeted += 1
                else:
                    refusal = refusal or buf.decode(errors="replace").strip()[:120] or "closed"
                del pending[s]
                sel.unregister(s)
        sel.close()
        if pending:
            refusal = refusal or f"{len(pending)} connection(s) got no greeting in time"
            break
    return socks, greeted, refusal


def settled_rss(pid: int, limit_s: float = 3.0) -> int:
    """RSS once it stops moving (two samples 100 ms apart within 0.5 %), or after limit_s."""
    last = rss_kb(pid)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.1)
        now = rss_kb(pid)
        if abs(now - last) <= last * 0.005:
            return now
        last = now
    return last


def idle_connections(srv: Running, count: int, timeout: float) -> Measurement:
    warm_up(srv.port)
    pid = srv.proc.pid
    base = settled_rss(pid)
    socks, greeted, refusal = open_idle(srv.port, count, time.monotonic() + timeout)
    try:
        held = settled_rss(pid)
        alive = srv.alive()
    finally:
        for s in socks:
            s.close()
    return {
        "wanted": count,
        "greeted": greeted,
        "refusal": refusal,
        "baseline_rss_mb": base / 1024,
        "held_rss_mb": held / 1024,
        "kb_per_connection": (held - base) / greeted if greeted else None,
        "server_alive": alive,
    }


# --- latency ------------------------------------------------------------------------------


def one_session(port: int) -> float:
    t0 = time.perf_counter()
    with Client(HOST, port, timeout=10) as c:
        c.expect(220)
        c.command("EHLO bench-client", 250)
        code, text = c.send_message("s@bench.example", "r@bench.example", body_chunks(1024))
        if code != 250:
            raise SMTPError(f"message refused: {text.strip()[:200]!r}")
        c.command("QUIT", 221)
    return time.perf_counter() - t0


def latency(srv: Running, sessions: int, timeout: float) -> Measurement:
    warm_up(srv.port)
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while len(times) < sessions and time.monotonic() < deadline:
        times.append(one_session(srv.port))
    ms = sorted(t * 1000 for t in times)
    return {
        "sessions": len(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1],
        "min_ms": ms[0],
    }


# --- driver -------------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by the servers we start); return the usable count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 256
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return min(wanted, soft - 256)


def fmt(value: object, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: dict[str, Row], big_mib: int) -> None:
    header = (
        f"{'server':<20} {f'peak RSS +{big_mib}MiB msg':>22} {'time':>6} "
        f"{'KB/idle conn':>12} {'held':>9} {'latency med':>11} {'p90':>7}  notes"
    )
    print("\n" + header)
    print("-" * len(header))
    for name, row in rows.items():
        if row.skipped:
            print(f"{name:<20} not runnable ({row.skipped})")
            continue
        notes = list(row.errors)
        big, idle, lat = row.big or {}, row.idle or {}, row.latency or {}
        if big and not big["accepted"]:
            notes.append(f"{big_mib} MiB message not accepted: {big['reply']}")
        if idle and idle["greeted"] != idle["wanted"]:
            notes.append(f"idle: {idle['refusal']}")
        held = f"{idle['greeted']}/{idle['wanted']}" if idle else None
        print(
            f"{name:<20} {fmt(big.get('peak_growth_mb'), '.1f'):>19} MB "
            f"{fmt(big.get('seconds'), '.1f'):>5}s "
            f"{fmt(idle.get('kb_per_connection'), '.1f'):>12} {fmt(held, 's'):>9} "
            f"{fmt(lat.get('median_ms'), '.2f'):>8} ms {fmt(lat.get('p90_ms'), '.2f'):>7}"
            f"  {'; '.join(notes)}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--servers", default=DEFAULT_SERVERS, help=f"default {DEFAULT_SERVERS}")
    p.add_argument("--tests", default="big,idle,latency", help="big,idle,latency")
    p.add_argument("--big-mib", type=int, default=100, help="size of the big message in MiB")
    p.add_argument("--idle", type=int, default=2000, help="idle connections to hold open")
    p.add_argument("--sessions", type=int, default=200, help="sessions for the latency median")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    p.add_argument("--json", type=Path, help="write raw results here (default bench/results/)")
    args = p.parse_args(argv)
    tests = set(args.tests.split(","))
    if not tests <= {"big", "idle", "latency"}:
        p.error("--tests takes big, idle, latency")
    if not (1 <= args.big_mib <= 2048 and 1 <= args.idle <= 10000 and 1 <= args.sessions <= 5000):
        p.error("sizes out of range (big-mib 1..2048, idle 1..10000, sessions 1..5000)")

    idle_count = raise_fd_limit(args.idle) if "idle" in tests else 0
    if "idle" in tests and idle_count < args.idle:
        print(f"note: file descriptor limit allows only {idle_count} connections", file=sys.stderr)
    limits = Limits(max_size=(args.big_mib + 16) * 1024 * 1024, max_clients=idle_count + 100)

    by_name = {s.name: s for s in all_servers() if s.mode == "sink"}
    wanted = args.servers.split(",")
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        p.error(f"unknown server(s) {unknown}; choose from {', '.join(by_name)}")
    for note in sorted({n for name in wanted for n in by_name[name].notes}):
        print(f"note: {note}", file=sys.stderr)

    rows: dict[str, Row] = {}
    for name in wanted:
        spec: ServerSpec = by_name[name]
        row = rows[name] = Row()
        # A fresh server per measurement: one test's leftovers must not be the next one's
        # baseline.
        for test in ("big", "idle", "latency"):
            if test not in tests:
                continue
            print(f"  {name}: {test} ...", file=sys.stderr)
            try:
                with running(spec, limits) as srv:
                    if test == "big":
                        row.big = big_message(srv, args.big_mib * 1024 * 1024, args.timeout)
                    elif test == "idle":
                        row.idle = idle_connections(srv, idle_count, args.timeout)
                    else:
                        row.latency = latency(srv, args.sessions, args.timeout)
                    if not srv.alive():
                        row.errors.append(f"{test}: server died: {log_tail(srv.log)}")
            except NotRunnable as exc:
                row.skipped = str(exc)
                print(f"  {name}: not runnable ({exc})", file=sys.stderr)
                break
            except (OSError, SMTPError) as exc:
                row.errors.append(f"{test}: {exc}")
                print(f"  {name}: {test} failed: {exc}", file=sys.stderr)

    print_table(rows, args.big_mib)
    out = args.json or BENCH / "results" / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"argv": sys.argv[1:], "results": {n: asdict(r) for n, r in rows.items()}}, indent=1
        )
    )
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
