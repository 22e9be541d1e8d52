"""What the server counts for the metrics exporter: plain integers and counters.

The connection driver adds to these on the hot path with one attribute increment or one
dictionary update; nothing here formats, locks or calls a metrics library. The operations
console (``mailgate.console``) reads them at scrape time and turns them into Prometheus
metrics. Counters only grow (a Prometheus counter may not go down); gauges such as open
connections are read from the server itself.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["LATENCY_BUCKETS", "LatencyHistogram", "ServerStats"]

#: Upper bounds (seconds) of the latency buckets: from a quick in-memory hook (1 ms) to a
#: delivery that waits on a slow remote server (the default delivery_timeout is 300 s).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


@dataclass(slots=True)
class LatencyHistogram:
    """A histogram over :data:`LATENCY_BUCKETS`: per-bucket counts (not cumulative; the
    exporter sums them), the observation count and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: int = 0
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal").
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound being +Inf."""
        running = 0
        result = []
        bounds = (*LATENCY_BUCKETS, float("inf"))
        for bound, count in zip(bounds, self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


@dataclass(slots=True)
class ServerStats:
    """Counters of one server process since it started."""

    #: Connections accepted by the listeners (admitted or refused at once).
    connections_total: int = 0
    #: Connections refused at once (max_clients, max_clients_per_ip, PROXY source).
    connections_refused: int = 0
    #: Admitted sessions by how they ended (the close reason: quit, peer-closed,
    #: idle-timeout, ...).
    sessions: Counter[str] = field(default_factory=Counter)
    #: Ended sessions by TLS protocol version ("none" for plain text).
    tls_versions: Counter[str] = field(default_factory=Counter)
    #: Bytes received from clients on ended sessions (TLS: the decrypted bytes).
    bytes_received: int = 0
    #: Message transactions that reached the end of their data, by outcome as the
    #: session log line says it: "accepted", "refused 550", "refused 552 (too-big)",
    #: "failed (spool write)". A bounded set: reply codes and the protocol's reasons.
    messages: Counter[str] = field(default_factory=Counter)
    #: Bytes of messages accepted.
    message_bytes: int = 0
    auth_successes: int = 0
    auth_failures: int = 0
    #: Time the hooks of a stage took (the reply waited for them), by stage; the message
    #: stage is the deliveries.
    stage_latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    #: Time each background delivery (``required = False``) took.
    background_latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def session_ended(self, reason: str, tls_version: str | None, bytes_in: int) -> None:
        self.sessions[reason] += 1
        self.tls_versions[tls_version or "none"] += 1
        self.bytes_received += bytes_in

    def message_done(self, outcome: str, size: int) -> None:
        self.messages[outcome] += 1
        if outcome == "accepted":
            self.message_bytes += size

    def stage_took(self, stage: str, seconds: float) -> None:
        histogram = self.stage_latency.get(stage)
        if histogram is None:
            histogram = self.stage_latency[stage] = LatencyHistogram()
        # LatencyHistogram.observe written out: this runs at every MAIL and RCPT a hook
        # answers, and a call more was a good part of it.
        histogram.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.total += 1
        histogram.sum += seconds
