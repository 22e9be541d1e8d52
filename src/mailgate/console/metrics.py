"""``GET /metrics``: the server's counters in the Prometheus text format.

Nothing here runs on the SMTP hot path. The server counts with plain integers
(:class:`mailgate.server.stats.ServerStats`), the policy plugins in their ``DECISIONS``
counter; at scrape time :func:`snapshot` copies them into plain data (a JSON-able dict:
with ``--workers`` the processes' snapshots are summed, see :mod:`.workers`), the queue
and honeypot figures are read from their stores, and :class:`SnapshotCollector` hands it
all to prometheus-client to format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mailgate.server.stats import LATENCY_BUCKETS, LatencyHistogram, ServerStats

from .context import CONSOLE_KEY, ConsoleState

__all__ = ["SnapshotCollector", "add_routes", "merge", "render", "snapshot"]

log = logging.getLogger("mailgate.console")

#: Snapshot = a JSON-able dict: numbers, dicts of numbers, and histograms as
#: ``{"counts": [...], "sum": float}`` (per-bucket counts over LATENCY_BUCKETS + +Inf).
Snapshot = dict[str, Any]

#: Separates policy and verdict in the snapshot's keys (JSON keys are strings).
_SEP: Final = "\x1f"


def _histogram(histogram: LatencyHistogram) -> dict[str, Any]:
    return {"counts": list(histogram.counts), "sum": histogram.sum}


def snapshot(stats: ServerStats, open_connections: int) -> Snapshot:
    """The counters of this process now, as plain data."""
    # Imported here: the policy plugins' module is loaded by every server that has any.
    from mailgate.plugins.policy import DECISIONS
    from mailgate.queue.runner import DELIVERY_LATENCY, DELIVERY_RESULTS

    return {
        "connections_open": open_connections,
        "connections_total": stats.connections_total,
        "connections_refused": stats.connections_refused,
        "sessions": dict(stats.sessions),
        "tls_versions": dict(stats.tls_versions),
        "bytes_received": stats.bytes_received,
        "messages": dict(stats.messages),
        "message_bytes": stats.message_bytes,
        "auth_successes": stats.auth_successes,
        "auth_failures": stats.auth_failures,
        "decisions": {f"{policy}{_SEP}{verdict}": n for (policy, verdict), n in DECISIONS.items()},
        "stage_latency": {
            stage: _histogram(histogram) for stage, histogram in stats.stage_latency.items()
        },
        "background_latency": _histogram(stats.background_latency),
        "delivery_attempts": dict(DELIVERY_RESULTS),
        "delivery_latency": _histogram(DELIVERY_LATENCY),
    }


def merge(total: Snapshot, other: Mapping[str, Any]) -> Snapshot:
    """``total`` with ``other`` added in: numbers summed, dicts merged key by key, lists
    (histogram buckets) summed element by element."""
    for key, value in other.items():
        mine = total.get(key)
        if mine is None:
            total[key] = _copy(value)
        elif isinstance(value, dict) and isinstance(mine, dict):
            merge(mine, value)
        elif isinstance(value, list) and isinstance(mine, list) and len(value) == len(mine):
            total[key] = [a + b for a, b in zip(mine, value, strict=True)]
        elif isinstance(value, int | float) and isinstance(mine, int | float):
            total[key] = mine + value
    return total


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def _message_labels(outcome: str) -> tuple[str, str] | None:
    """(code, reason) of a refused message from its log outcome, None when accepted:
    ``refused 550`` -> ("550", "hook"), ``refused 552 (too-big)`` -> ("552",
    "too-big"), ``failed (spool write)`` -> ("452", "spool-write")."""
    if outcome == "accepted":
        return None
    if outcome.startswith("failed"):
        return ("452", "spool-write")
    rest = outcome.removeprefix("refused ").strip()
    code, _, why = rest.partition(" ")
    return (code, why.strip("()") or "hook")


class SnapshotCollector(Collector):
    """Turns a (possibly summed) snapshot and the store figures into metric families."""

    def __init__(
        self,
        counters: Snapshot,
        *,
        queue: Mapping[str, Any] | None = None,
        honeypot: Mapping[str, int] | None = None,
    ) -> None:
        self.counters = counters
        self.queue = queue
        self.honeypot = honeypot

    def collect(self) -> Iterator[Metric]:
        data = self.counters
        yield GaugeMetricFamily(
            "mailgate_connections_open", "SMTP connections open now", data["connections_open"]
        )
        yield CounterMetricFamily(
            "mailgate_connections",
            "SMTP connections accepted by the listeners (admitted or refused at once)",
            data["connections_total"],
        )
        yield CounterMetricFamily(
            "mailgate_connections_refused",
            "SMTP connections refused at once (max_clients, max_clients_per_ip, PROXY source)",
            data["connections_refused"],
        )
        sessions = CounterMetricFamily(
            "mailgate_sessions", "SMTP sessions ended, by how they ended", labels=["outcome"]
        )
        for outcome, count in sorted(data["sessions"].items()):
            sessions.add_metric([outcome], count)
        yield sessions
        tls = CounterMetricFamily(
            "mailgate_session_tls",
            "SMTP sessions ended, by TLS protocol version (none: plain text)",
            labels=["version"],
        )
        for version, count in sorted(data["tls_versions"].items()):
            tls.add_metric([version], count)
        yield tls
        yield CounterMetricFamily(
            "mailgate_received_bytes",
            "bytes received from SMTP clients in ended sessions",
            data["bytes_received"],
        )
        accepted = sum(n for outcome, n in data["messages"].items() if outcome == "accepted")
        yield CounterMetricFamily(
            "mailgate_messages_accepted", "messages accepted (250 after their data)", accepted
        )
        refused = CounterMetricFamily(
            "mailgate_messages_refused",
            "messages refused at the end of their data, by reply code and reason (hook: a "
            "hook or delivery refused it)",
            labels=["code", "reason"],
        )
        by_reason: dict[tuple[str, str], int] = {}
        for outcome, count in data["messages"].items():
            labels = _message_labels(outcome)
            if labels is not None:
                by_reason[labels] = by_reason.get(labels, 0) + count
        for (code, reason), count in sorted(by_reason.items()):
            refused.add_metric([code, reason], count)
        yield refused
        yield CounterMetricFamily(
            "mailgate_message_bytes", "bytes of the messages accepted", data["message_bytes"]
        )
        auth = CounterMetricFamily(
            "mailgate_auth", "AUTH exchanges completed, by result", labels=["result"]
        )
        auth.add_metric(["success"], data["auth_successes"])
        auth.add_metric(["failure"], data["auth_failures"])
        yield auth
        decisions = CounterMetricFamily(
            "mailgate_policy_decisions",
            "decisions of the policy plugins, by policy and verdict",
            labels=["policy", "verdict"],
        )
        for key, count in sorted(data["decisions"].items()):
            policy, _, verdict = key.partition(_SEP)
            decisions.add_metric([policy, verdict], count)
        yield decisions
        stages = HistogramMetricFamily(
            "mailgate_hook_duration_seconds",
            "time the hooks of a stage took while the reply waited (stage message: the "
            "deliveries; auth: including the failure delay)",
            labels=["stage"],
        )
        for stage, histogram in sorted(data["stage_latency"].items()):
            buckets, total = _buckets(histogram)
            stages.add_metric([stage], buckets, total)
        yield stages
        background = HistogramMetricFamily(
            "mailgate_background_delivery_duration_seconds",
            "time each delivery that runs after the reply (required = False) took",
        )
        buckets, total = _buckets(data["background_latency"])
        background.add_metric([], buckets, total)
        yield background
        yield from self._queue()
        yield from self._honeypot()

    def _queue(self) -> Iterator[Metric]:
        queue = self.queue
        if queue is None:
            return
        yield GaugeMetricFamily(
            "mailgate_queue_messages", "messages in the queue", queue["messages"]
        )
        recipients = GaugeMetricFamily(
            "mailgate_queue_recipients", "queue recipients by state", labels=["state"]
        )
        for state, count in sorted(queue["by_state"].items()):
            recipients.add_metric([state], count)
        yield recipients
        yield GaugeMetricFamily(
            "mailgate_queue_oldest_age_seconds",
            "age of the oldest message in the queue (0: empty)",
            queue["oldest_age"],
        )
        data = self.counters
        attempts = CounterMetricFamily(
            "mailgate_queue_delivery_attempts",
            "delivery attempts of queued recipients by result (delivered, deferred, failed)",
            labels=["result"],
        )
        # Every result is shown from the start, so a rate() over a fresh server works.
        found = data.get("delivery_attempts", {})
        for result in sorted({"delivered", "deferred", "failed", *found}):
            attempts.add_metric([result], found.get(result, 0))
        yield attempts
        duration = HistogramMetricFamily(
            "mailgate_queue_delivery_duration_seconds",
            "time each delivery attempt of the queue took (one batch: a session with the "
            "next hop, or the wait to find none)",
        )
        if "delivery_latency" in data:
            buckets, total = _buckets(data["delivery_latency"])
            duration.add_metric([], buckets, total)
        yield duration

    def _honeypot(self) -> Iterator[Metric]:
        figures = self.honeypot
        if figures is None:
            return
        for name, what in (
            ("sessions", "sessions"),
            ("auth_attempts", "AUTH attempts (credentials)"),
            ("messages", "messages"),
        ):
            yield GaugeMetricFamily(
                f"mailgate_honeypot_captured_{name}",
                f"{what} in the honeypot's capture store (all time)",
                figures[name],
            )


def _buckets(histogram: Mapping[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs and the sum, as HistogramMetricFamily takes them."""
    running = 0
    pairs: list[tuple[str, float]] = []
    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    for bound, count in zip(bounds, histogram["counts"], strict=True):
        running += count
        pairs.append((bound, running))
    return pairs, float(histogram["sum"])


async def queue_figures(console: ConsoleState) -> dict[str, Any] | None:
    """The queue's gauges, or None without a queue (or when it cannot be read)."""
    store = console.sources.queue
    if store is None:
        return None
    now = time.time()
    try:
        stats = await store.stats(now)
    except Exception as exc:  # a scrape must not fail for the queue: say it, leave it out
        log.warning("metrics: cannot read the queue: %s", exc)
        return None
    return {
        "messages": stats.messages,
        "by_state": {str(state): count for state, count in stats.by_state.items()},
        "oldest_age": max(0.0, now - stats.oldest) if stats.oldest is not None else 0.0,
    }


async def honeypot_figures(console: ConsoleState) -> dict[str, int] | None:
    """The honeypot store's totals (read in a thread: SQLite), or None."""
    data_dir = console.sources.honeypot_dir
    if data_dir is None:
        return None
    from mailgate.honeypot import report

    def read() -> dict[str, int]:
        db = report.open_database(data_dir)
        try:
            return report.totals(db)
        finally:
            db.close()

    try:
        return await asyncio.to_thread(read)
    except Exception as exc:
        log.warning("metrics: cannot read the honeypot store: %s", exc)
        return None


async def render(console: ConsoleState) -> bytes:
    """The metrics text of ``console``'s server (summed over the workers when several)."""
    counters = await console.counters()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        SnapshotCollector(
            counters,
            queue=await queue_figures(console),
            honeypot=await honeypot_figures(console),
        )
    )
    return generate_latest(registry)


async def _metrics(request: web.Request) -> web.Response:
    body = await render(request.app[CONSOLE_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", _metrics)
