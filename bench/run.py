"""Side-by-side throughput: mailgate, aiosmtpd, smtp-server (and postfix's smtp-sink as a C
reference) under the same smtp-source load, on one machine, over loopback.

For every scenario (mode x message size x parallel sessions x connection use) and round, each
server is started on a free port, warmed up, loaded with smtp-source for a timed run, and
stopped again; the start order rotates from round to round so no server always runs first.
The warm-up (5 x sessions messages, then about a second's worth, repeated until it lasted
0.5 s) lets a JIT (Node's) reach full speed: a cold start measures the compiler, not the
engine. The timed run is sized from the first round's warm-up rate to last about --seconds,
and later rounds of that server send the same number (steady state, as ../shared/bench).
Reported per server: median messages/second, median server CPU milliseconds per message
(user + system of its whole process tree, from /proc, during the timed run only), and their
ratios to aiosmtpd and to smtp-server.

    bench/setup.sh                       # once: installs the other servers and smtp-source
    python3 bench/run.py --quick         # every scenario, 3 rounds, fewer messages
    python3 bench/run.py --servers aiosmtpd,mailgate --sizes 1k --sessions 10

Not a test: CI never runs it. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import (
    BENCH,
    HOST,
    SMTP_SOURCE,
    NotRunnable,
    ServerSpec,
    all_servers,
    cpu_seconds,
    log_tail,
    running,
)

SIZES = {"1k": 1024, "100k": 100 * 1024}
RATIO_BASES = ("aiosmtpd", "smtp-server-nowait")


@dataclass(frozen=True)
class Scenario:
    mode: str
    size: str
    sessions: int
    reuse: bool

    @property
    def label(self) -> str:
        conn = "reused conns (-d)" if self.reuse else "conn per msg"
        return f"{self.mode}, {self.size} msgs, {self.sessions} sessions, {conn}"


@dataclass
class Sample:
    messages: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000 * self.cpu_s / self.messages


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    def median_rate(self) -> float | None:
        return statistics.median(s.rate for s in self.samples) if self.samples else None

    def median_cpu(self) -> float | None:
        return statistics.median(s.cpu_ms_per_msg for s in self.samples) if self.samples else None


def count_delivered(maildir: Path) -> int:
    return sum(len(files) for root, _dirs, files in os.walk(maildir) if Path(root).name == "new")


def load(sc: Scenario, port: int, messages: int, timeout: float) -> float:
    """One smtp-source run of ``messages``; its wall time. RuntimeError if it complained."""
    cmd = [str(SMTP_SOURCE), "-s", str(sc.sessions), "-m", str(messages)]
    cmd += ["-l", str(SIZES[sc.size]), "-M", "bench-client"]
    cmd += ["-f", "sender@bench.example", "-t", "rcpt@bench.example"]
    cmd += ["-d"] if sc.reuse else []
    cmd.append(f"{HOST}:{port}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"smtp-source still running after {timeout:.0f} s") from exc
    wall = time.perf_counter() - t0
    complaints = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 0 or complaints:
        first = complaints[0] if complaints else ""
        raise RuntimeError(
            f"smtp-source exit {proc.returncode}, {len(complaints)} complaint(s): {first[:200]}"
        )
    return wall


def one_run(
    spec: ServerSpec,
    sc: Scenario,
    messages: int | None,
    args: argparse.Namespace,
) -> Sample:
    """Start the server, warm it up, time one load of ``messages`` (None: about
    ``args.seconds`` at the warm-up's rate), stop it. Raises RuntimeError/NotRunnable."""
    with running(spec) as srv:
        sent = 0
        # Warm-up: enough sessions to touch every path, then about a second's worth,
        # repeated (at most 3 times) until one lasted 0.5 s.
        batch = 5 * sc.sessions
        wall = load(sc, srv.port, batch, args.run_timeout)
        sent += batch
        for _ in range(3):
            batch = max(sc.sessions, min(args.warmup, int(batch / max(wall, 1e-3))))
            wall = load(sc, srv.port, batch, args.run_timeout)
            sent += batch
            if wall >= 0.5:
                break
        if messages is None:
            messages = max(sc.sessions, int(args.seconds * batch / max(wall, 1e-3)))
        cpu0 = cpu_seconds(srv.proc.pid)
        wall = load(sc, srv.port, messages, args.run_timeout)
        cpu = cpu_seconds(srv.proc.pid) - cpu0
        sent += messages
        if not srv.alive():
            raise RuntimeError(f"server died: {log_tail(srv.log)}")
        if srv.maildir is not None:
            got = count_delivered(srv.maildir)
            if got != sent:
                raise RuntimeError(f"{got} of {sent} messages (warm-up included) in the Maildir")
        return Sample(messages, wall, cpu)


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def print_table(sc: Scenario, specs: list[ServerSpec], cells: dict[str, Cell]) -> None:
    base_rate = {b: cells[b].median_rate() if b in cells else None for b in RATIO_BASES}
    base_cpu = {b: cells[b].median_cpu() if b in cells else None for b in RATIO_BASES}
    print(f"\n## {sc.label}")
    header = (
        f"{'server':<20} {'msgs':>5} {'msg/s':>9} {'vs aiosmtpd':>11} {'vs smtp-srv':>11} "
        f"{'CPU ms/msg':>10} {'vs aiosmtpd':>11} {'vs smtp-srv':>11}  notes"
    )
    print(header)
    print("-" * len(header))
    for spec in specs:
        cell = cells[spec.name]
        if cell.skipped:
            print(f"{spec.name:<20} {'':>5} not runnable ({cell.skipped})")
            continue
        rate, cpu = cell.median_rate(), cell.median_cpu()
        msgs = cell.samples[0].messages if cell.samples else 0
        notes = []
        if cell.errors:
            notes.append(f"{len(cell.errors)} failed round(s): {cell.errors[-1]}")
        if spec.greeting_delay:
            notes.append(f"stock {spec.greeting_delay * 1000:.0f} ms greeting wait")
        if rate is None or cpu is None:
            print(f"{spec.name:<20} {'':>5} {'failed':>9}  {'; '.join(notes)}")
            continue
        print(
            f"{spec.name:<20} {msgs:>5} {rate:>9.0f} "
            f"{ratio(rate, base_rate['aiosmtpd']):>11} "
            f"{ratio(rate, base_rate['smtp-server-nowait']):>11} "
            f"{cpu:>10.3f} {ratio(cpu, base_cpu['aiosmtpd']):>11} "
            f"{ratio(cpu, base_cpu['smtp-server-nowait']):>11}  {'; '.join(notes)}"
        )
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="3 rounds and fewer messages per run")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 5, quick 3)")
    p.add_argument("--servers", help="comma list of server names (default: all); see --list")
    p.add_argument("--modes", default="sink,maildir", help="sink,maildir")
    p.add_argument("--sizes", default="1k,100k", help="1k,100k")
    p.add_argument("--sessions", default="1,10,100", help="parallel sessions, e.g. 1,10,100")
    p.add_argument(
        "--connections", default="new,reuse", help="new (one per message), reuse (-d), or both"
    )
    p.add_argument(
        "--messages", type=int, help="messages per timed run (default: sized by --seconds)"
    )
    p.add_argument(
        "--seconds",
        type=float,
        help="length of a timed run at the warm-up's rate (default 3, quick 1.5)",
    )
    p.add_argument("--warmup", type=int, default=20000, help="most messages in one warm-up batch")
    p.add_argument("--run-timeout", type=float, default=300.0, help="seconds per smtp-source run")
    p.add_argument(
        "--budget", type=float, default=4 * 3600, help="stop starting runs after this many seconds"
    )
    p.add_argument("--json", type=Path, help="write raw results here (default bench/results/)")
    p.add_argument("--list", action="store_true", help="list servers and scenarios, then exit")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (1.5 if args.quick else 3.0)
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be 1..50")
    return args


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for mode in args.modes.split(","):
        for size in args.sizes.split(","):
            if size not in SIZES:
                raise SystemExit(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
            for sessions in (int(s) for s in args.sessions.split(",")):
                for conn in args.connections.split(","):
                    if conn not in ("new", "reuse"):
                        raise SystemExit(f"unknown connection use {conn!r}: new or reuse")
                    out.append(Scenario(mode, size, sessions, conn == "reuse"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = all_servers()
    if args.servers:
        wanted = set(args.servers.split(","))
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise SystemExit(f"unknown server(s) {sorted(unknown)}; known: see --list")
        specs = [s for s in specs if s.name in wanted]
    plan = scenarios(args)
    if args.list:
        for spec in specs:
            print(f"server {spec.name:<20} mode {spec.mode}")
        for sc in plan:
            print(f"scenario {sc.label}")
        return 0
    if not SMTP_SOURCE.exists():
        raise SystemExit("smtp-source missing: run bench/setup.sh first")

    unavailable: dict[str, str] = {}
    for spec in specs:
        try:
            spec.check()
        except NotRunnable as exc:
            unavailable[spec.name] = str(exc)
            print(f"{spec.name}: not runnable ({exc})", file=sys.stderr)
    for note in sorted({n for spec in specs for n in spec.notes}):
        print(f"note: {note}", file=sys.stderr)

    print(
        "msg/s: median over rounds; ratios divide by aiosmtpd's or smtp-server's (without its\n"
        "100 ms greeting wait) median: above 1 is faster for msg/s, costlier for CPU ms/msg."
    )
    started = time.monotonic()
    results: list[dict[str, object]] = []
    out_of_time = False
    for sc in plan:
        group = [s for s in specs if s.mode == sc.mode]
        if not group:
            continue
        cells = {s.name: Cell(skipped=unavailable.get(s.name)) for s in group}
        #: Messages per timed run, by server: from its first round, so all rounds match.
        sized: dict[str, int] = {}
        for rnd in range(args.rounds):
            order = group[rnd % len(group) :] + group[: rnd % len(group)]
            for spec in order:
                cell = cells[spec.name]
                if cell.skipped:
                    continue
                if time.monotonic() - started > args.budget:
                    out_of_time = True
                    break
                n = args.messages or sized.get(spec.name)
                try:
                    sample = one_run(spec, sc, n, args)
                except (NotRunnable, RuntimeError) as exc:
                    cell.errors.append(str(exc))
                    print(f"  {spec.name} round {rnd + 1}: {exc}", file=sys.stderr)
                    # A server that cannot start twice running will not start a third time.
                    if isinstance(exc, NotRunnable) and len(cell.errors) >= 2:
                        cell.skipped = str(exc)
                    continue
                cell.samples.append(sample)
                sized.setdefault(spec.name, sample.messages)
                print(
                    f"  {sc.label} | {spec.name} round {rnd + 1}: "
                    f"{sample.rate:.0f} msg/s, {sample.cpu_ms_per_msg:.3f} CPU ms/msg",
                    file=sys.stderr,
                )
        print_table(sc, group, cells)
        results.append(
            {
                "scenario": asdict(sc),
                "cells": {
                    name: {
                        "samples": [asdict(s) for s in cell.samples],
                        "errors": cell.errors,
                        "skipped": cell.skipped,
                        "median_msgs_per_s": cell.median_rate(),
                        "median_cpu_ms_per_msg": cell.median_cpu(),
                    }
                    for name, cell in cells.items()
                },
            }
        )
        if out_of_time:
            print(f"\nbudget of {args.budget:.0f} s used up: stopped early", file=sys.stderr)
            break

    out = args.json or BENCH / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nraw results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
