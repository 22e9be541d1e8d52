"""``GET /metrics``: a known load sent with smtplib, then the exact counts scraped."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tests.console.http import request
from tests.server.harness import running_server, wait_for

from mailgate.hooks import Hooks, Reject
from mailgate.server import ListenAddress
from mailgate.server.stats import LATENCY_BUCKETS, LatencyHistogram

LOOPBACK_ANY_PORT = ListenAddress("127.0.0.1", 0)
MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
REFUSED = b"From: a@example.com\r\nSubject: refuse me\r\n\r\nbody\r\n"


class CountingSMTP(smtplib.SMTP):
    """smtplib.SMTP that counts the bytes it sends (TLS: before encryption, which is
    what the server counts after decryption)."""

    sent = 0

    def send(self, s: bytes | str) -> None:
        data = s.encode("ascii") if isinstance(s, str) else s
        CountingSMTP.sent += len(data)
        super().send(data)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = request(port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_after_a_known_load(tmp_path: Path) -> None:
    hooks = Hooks()

    def refuse_some(session: object, envelope: object, message: object) -> None:
        head = message.path.read_bytes()[:4096]  # type: ignore[attr-defined]
        if b"Subject: refuse me" in head:
            raise Reject("550 5.7.1 not this one")

    hooks.on("message", refuse_some)

    with running_server(
        tmp_path,
        hooks,
        admin_listen=LOOPBACK_ANY_PORT,
        auth_users=(("alice", "secret"),),
        allow_insecure_auth=True,
        auth_failure_delay=0.0,
        max_size=10_000,
    ) as server:
        port = server.server.console.address[1]  # type: ignore[union-attr]
        before = scrape(port)
        assert value(before, "mailgate_connections_total") == 0
        smtp_port = server.port()
        CountingSMTP.sent = 0

        # 3 sessions, 2 messages each, plain text.
        for _ in range(3):
            with CountingSMTP("127.0.0.1", smtp_port) as client:
                for _ in range(2):
                    client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        # 1 session over STARTTLS: 1 message, then 1 refused by the hook.
        with CountingSMTP("127.0.0.1", smtp_port) as client:
            client.starttls(context=ssl._create_unverified_context())
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            try:
                client.sendmail("a@example.com", ["b@example.com"], REFUSED)
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 550
            else:
                raise AssertionError("the hook's refusal did not arrive")
        # 1 session: AUTH fails once, then succeeds; one message too large (no SIZE
        # parameter given, so it is refused at the end of its data).
        with CountingSMTP("127.0.0.1", smtp_port) as client:
            client.ehlo()
            # One exchange each (login() would try every mechanism in turn).
            client.user, client.password = "alice", "wrong"
            try:
                client.auth("PLAIN", client.auth_plain, initial_response_ok=True)
            except smtplib.SMTPAuthenticationError as exc:
                assert exc.smtp_code == 535
            else:
                raise AssertionError("a wrong password was accepted")
            client.password = "secret"
            code, _ = client.auth("PLAIN", client.auth_plain, initial_response_ok=True)
            assert code == 235
            client.mail("a@example.com")
            client.rcpt("b@example.com")
            code, _ = client.data(MESSAGE + b"x" * 20_000 + b"\r\n")
            assert code == 552
            client.rset()
        # 1 session: connect and QUIT at once.
        with CountingSMTP("127.0.0.1", smtp_port) as client:
            client.noop()

        sessions = 6
        assert wait_for(
            lambda: value(scrape(port), "mailgate_sessions_total", outcome="quit") == sessions
        )
        after = scrape(port)

    assert value(after, "mailgate_connections_total") == sessions
    assert value(after, "mailgate_connections_refused_total") == 0
    assert value(after, "mailgate_connections_open") == 0
    assert value(after, "mailgate_session_tls_total", version="none") == 5
    assert value(after, "mailgate_session_tls_total", version="TLSv1.3") == 1
    assert value(after, "mailgate_messages_accepted_total") == 7
    assert value(after, "mailgate_messages_refused_total", code="550", reason="hook") == 1
    assert value(after, "mailgate_messages_refused_total", code="552", reason="too-big") == 1
    assert value(after, "mailgate_auth_total", result="success") == 1
    assert value(after, "mailgate_auth_total", result="failure") == 1
    assert value(after, "mailgate_received_bytes_total") == CountingSMTP.sent
    # The size of each accepted message as the client sent it (dot-unstuffed).
    assert value(after, "mailgate_message_bytes_total") == 7 * len(MESSAGE)
    # The message stage ran for the 7 accepted and the 1 the hook refused; the too-large
    # one never reached it.
    assert value(after, "mailgate_hook_duration_seconds_count", stage="message") == 8
    assert value(after, "mailgate_hook_duration_seconds_bucket", stage="message", le="+Inf") == 8
    assert value(after, "mailgate_hook_duration_seconds_count", stage="auth") == 2
    # Relay control decided each RCPT (loopback may relay): 9 recipients in all.
    relay = value(after, "mailgate_policy_decisions_total", policy="relay", verdict="accept")
    assert (
        relay - value(before, "mailgate_policy_decisions_total", policy="relay", verdict="accept")
        == 9
    )
    # No queue and no honeypot behind this server: their metrics are absent.
    assert not any(name.startswith(("mailgate_queue", "mailgate_honeypot")) for name, _ in after)


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    histogram = LatencyHistogram()
    for seconds in (0.0005, 0.001, 0.003, 0.003, 400.0):
        histogram.observe(seconds)
    cumulative = dict(histogram.cumulative())
    assert cumulative[0.001] == 2  # le="0.001" holds 0.001 itself
    assert cumulative[0.0025] == 2
    assert cumulative[0.005] == 4
    assert cumulative[LATENCY_BUCKETS[-1]] == 4
    assert cumulative[float("inf")] == 5
    assert histogram.total == 5
