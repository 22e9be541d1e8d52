"""Issue 13 in honeypot mode: message analysis that cannot stall other sessions, a
storage cap that holds while mail is received, reports that escape what attackers send."""

from __future__ import annotations

import smtplib
import threading
import time
from pathlib import Path

from mailgate.honeypot.extract import LIMIT_BUDGET, LIMIT_DEPTH, LIMIT_PARTS, extract
from mailgate.honeypot.store import CaptureStore

from .test_plugin import honeypot, query


def many_parts(count: int, tag: str = "") -> bytes:
    """A multipart message of ``count`` tiny text parts, each with a URL."""
    parts = b"".join(
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee http://u%d.test/%s\r\n" % (i, tag.encode())
        for i in range(count)
    )
    head = b"Subject: many parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    return head + parts + b"--b--\r\n"


def nested(levels: int) -> bytes:
    """A message of ``levels`` multipart levels, each the only part of the one above, a
    text part with a URL in the first level and at the bottom."""
    out = [b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=a0\r\n\r\n"]
    out.append(b"--a0\r\nContent-Type: text/plain\r\n\r\nfirst http://top.test/\r\n")
    for level in range(1, levels):
        out.append(
            b"--a%d\r\nContent-Type: multipart/mixed; boundary=a%d\r\n\r\n" % (level - 1, level)
        )
    out.append(b"--a%d\r\nContent-Type: text/plain\r\n\r\nsee http://deep.test/\r\n" % (levels - 1))
    return b"".join(out)


# --- analysis ------------------------------------------------------------------------------------


def test_a_deeply_nested_message_keeps_its_subject_and_what_was_reached() -> None:
    for levels in (990, 5000):  # about 970 levels used to lose everything
        found = extract(nested(levels), max_depth=50)
        assert found.subject == "deep"
        assert found.urls == ("http://top.test/",)
        assert found.truncated == LIMIT_DEPTH
    shallow = extract(nested(10), max_depth=50)
    assert shallow.urls == ("http://top.test/", "http://deep.test/")
    assert shallow.truncated is None


def test_part_limit_and_budget_keep_what_was_found() -> None:
    data = many_parts(20_000)
    started = time.process_time()
    found = extract(data, max_parts=300, max_urls=1000)
    assert time.process_time() - started < 2.0
    assert found.subject == "many parts"
    assert found.truncated == LIMIT_PARTS
    assert 250 <= len(found.urls) < 300  # the parts before the limit
    # No part limit, a small budget: stopped by the clock, with what it had found.
    ticks = iter(range(10**9))
    found = extract(data, max_parts=10**6, max_urls=10**6, budget=200, clock=lambda: next(ticks))
    assert found.truncated == LIMIT_BUDGET
    assert found.subject == "many parts"
    assert 0 < len(found.urls) < 20_000


def send(host: str, port: int, data: bytes, results: list[object]) -> None:
    try:
        with smtplib.SMTP(host, port, timeout=60) as smtp:
            smtp.sendmail("a@x.test", ["b@y.test"], data)
        results.append("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports every failure below
        results.append(exc)


def test_parallel_huge_multipart_messages_do_not_delay_another_sessions_354(
    tmp_path: Path,
) -> None:
    data = many_parts(8000)
    settings = {"max_size": 2 * len(data)}
    with honeypot(tmp_path, settings=settings) as (srv, plugin):
        results: list[object] = []
        senders = [
            threading.Thread(target=send, args=(srv.host, srv.port, data, results))
            for _ in range(8)
        ]
        for thread in senders:
            thread.start()
        time.sleep(0.5)  # the messages are sent; their analyses are running
        with smtplib.SMTP(srv.host, srv.port, timeout=60) as smtp:
            smtp.ehlo("probe.test")
            smtp.mail("p@x.test")
            smtp.rcpt("q@y.test")
            started = time.monotonic()
            code, _ = smtp.docmd("DATA")
            waited = time.monotonic() - started
            assert code == 354
            smtp.send(b"Subject: probe\r\n\r\nhi\r\n.\r\n")
            assert smtp.getreply()[0] == 250
        for thread in senders:
            thread.join(60)
        assert results == ["ok"] * 8
        assert waited < 1.0, f"354 after {waited:.2f} s"
        plugin.store.flush()
    rows = query(tmp_path, "SELECT subject, analysis_truncated FROM messages")
    assert sorted(rows, key=str) == sorted(
        [("many parts", "parts")] * 8 + [("probe", None)], key=str
    )
    print(f"354 after {waited:.3f} s")


def test_a_store_written_before_analysis_truncated_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    from mailgate.honeypot.store import DB_NAME, SCHEMA

    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(SCHEMA.replace(",\n    analysis_truncated TEXT", ""))
    db.execute("PRAGMA user_version = 1")
    db.close()
    assert "analysis_truncated" not in str(query(tmp_path, "PRAGMA table_info(messages)"))
    CaptureStore(tmp_path).close()
    assert "analysis_truncated" in str(query(tmp_path, "PRAGMA table_info(messages)"))
