"""Markdown tables from the JSON that run.py and memory.py write, for docs/benchmarks.md.

python3 bench/report.py bench/results/run-*.json bench/results/memory-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SERVERS = [
    "mailgate",
    "mailgate-w2",
    "aiosmtpd",
    "smtp-server",
    "smtp-server-nowait",
    "postfix-smtp-sink",
]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_tables(data: dict[str, Any]) -> str:
    results = data["results"]
    present = [s for s in SERVERS if any(s in r["cells"] for r in results)]
    out = []
    for key, title, spec in (
        ("median_msgs_per_s", "messages per second (median)", ".0f"),
        ("median_cpu_ms_per_msg", "server CPU ms per message (median)", ".2f"),
    ):
        out.append(f"**{title}**\n")
        out.append("| scenario | " + " | ".join(present) + " |")
        out.append("| --- |" + " ---: |" * len(present))
        for r in results:
            sc = r["scenario"]
            conn = "reused" if sc["reuse"] else "new"
            label = f"{sc['mode']} {sc['size']} x{sc['sessions']} {conn}"
            cells = []
            for name in present:
                cell = r["cells"].get(name)
                if cell is None:
                    cells.append("")
                elif cell["skipped"]:
                    cells.append("n/r")
                else:
                    cells.append(_num(cell[key], spec))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def memory_table(data: dict[str, Any]) -> str:
    out = [
        "| server | peak RSS growth, 100 MiB message | RSS per idle connection "
        "| connections held | session latency median | p90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in data["results"].items():
        if row["skipped"]:
            out.append(f"| {name} | not runnable: {row['skipped']} | | | | |")
            continue
        big, idle, lat = row["big"] or {}, row["idle"] or {}, row["latency"] or {}
        held = f"{idle['greeted']}/{idle['wanted']}" if idle else "-"
        out.append(
            f"| {name} | {_num(big.get('peak_growth_mb'), '.1f')} MB "
            f"| {_num(idle.get('kb_per_connection'), '.1f')} KB | {held} "
            f"| {_num(lat.get('median_ms'), '.2f')} ms | {_num(lat.get('p90_ms'), '.2f')} ms |"
        )
    return "\n".join(out) + "\n"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(run_tables(data) if "meta" in data else memory_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
