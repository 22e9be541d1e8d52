"""Routing rule matching: time to build a table of N rules and to match one recipient.

Four tables of ``--rules`` rules (10,000 by default), each timed over ``--matches``
lookups of a recipient whose rule is at the end:

* domains: one ``*@dN.test`` rule per domain, a catch-all at the end;
* addresses: one ``uN@x.test`` rule per address;
* subdomains: one ``*@*.dN.test`` rule per domain, the recipient four labels down;
* conditions: every rule ``*`` with a ``senders`` condition that fails, but the last
  (every rule names the recipient: the sender index has to find the rule);
* clients: the same with a ``clients`` network (a /24) per rule.

Only a table whose rules differ by ``authenticated`` alone is walked rule by rule.

    python3 bench/routing_match.py [--rules 10000] [--matches 20000]

Not a test: prints microseconds per match.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mailgate.plugins.routing import RouteTable


def build(entries: list[dict[str, Any]]) -> tuple[RouteTable, float]:
    started = time.perf_counter()
    table = RouteTable.from_document({"routes": entries}, "bench")
    return table, time.perf_counter() - started


def per_match(table: RouteTable, matches: int, *args: Any) -> float:
    table.match(*args)  # warm caches (client address parsing)
    started = time.perf_counter()
    for _ in range(matches):
        table.match(*args)
    return (time.perf_counter() - started) / matches * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--matches", type=int, default=20_000)
    args = parser.parse_args()
    n = args.rules
    tables = {
        "domains": (
            [{"recipients": [f"*@d{i}.test"], "action": "relay"} for i in range(n)]
            + [{"recipients": ["*"], "action": "reject"}],
            (f"user@d{n - 1}.test", "s@corp.test", "192.0.2.1", False),
        ),
        "addresses": (
            [{"recipients": [f"u{i}@x.test"], "action": "relay"} for i in range(n)],
            (f"u{n - 1}@x.test", "s@corp.test", "192.0.2.1", False),
        ),
        "subdomains": (
            [{"recipients": [f"*@*.d{i}.test"], "action": "relay"} for i in range(n)],
            (f"user@a.b.c.d{n - 1}.test", "s@corp.test", "192.0.2.1", False),
        ),
        "conditions": (
            [
                {"recipients": ["*"], "senders": [f"*@s{i}.test"], "action": "relay"}
                for i in range(n - 1)
            ]
            + [{"recipients": ["*"], "action": "deliver"}],
            ("user@x.test", "s@corp.test", "192.0.2.1", False),
        ),
        "clients": (
            [
                {
                    "recipients": ["*"],
                    "clients": [f"10.{i // 256}.{i % 256}.0/24"],
                    "action": "relay",
                }
                for i in range(n - 1)
            ]
            + [{"recipients": ["*"], "clients": ["192.0.2.0/24"], "action": "deliver"}],
            ("user@x.test", "s@corp.test", "192.0.2.1", False),
        ),
    }
    print(f"{'table':<12} {'rules':>7} {'build ms':>9} {'µs/match':>9}")
    for name, (entries, query) in tables.items():
        table, seconds = build(entries)
        micros = per_match(table, args.matches, *query)
        print(f"{name:<12} {len(entries):>7} {seconds * 1e3:>9.1f} {micros:>9.2f}")


if __name__ == "__main__":
    main()
