"""Reports on a capture store: the summary, the session list and one session's transcript,
in every format, from a store written by the real CaptureStore with a fixed clock."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgate.honeypot.extract import Attachment
from mailgate.honeypot.report import (
    ReportError,
    format_session,
    format_sessions,
    format_summary,
    open_database,
    parse_since,
    session_detail,
    sessions,
    summary,
)
from mailgate.honeypot.store import DB_NAME, SCHEMA_VERSION, CaptureStore
from mailgate.hooks import Session, TLSInfo

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC).timestamp()
DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def session(sid: str, ip: str, port: int = 40000) -> Session:
    return Session(id=sid, peer_host=ip, peer_port=port, local_host="127.0.0.1", local_port=25)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Four sessions: an old one (two days before T0), a brute force with TLS, a spammer
    with two messages, and a scanner sending garbage with terminal escapes."""
    directory = tmp_path / "data"
    clock = Clock(T0 - 2 * DAY)
    store = CaptureStore(directory, clock=clock, batch_seconds=0.01)

    def line(s: Session, direction: str, text: bytes) -> None:
        store.line(s, direction, text)  # type: ignore[arg-type]

    old = session("OLD0000001", "192.0.2.1")
    store.session_opened(old)
    line(old, "s", b"220 mx ESMTP\r\n")
    line(old, "c", b"EHLO old.example")
    store.auth_attempt(
        old, mechanism="PLAIN", username="olduser", password="oldpw", outcome="refused"
    )
    old.helo = "old.example"
    store.session_closed(old, "quit")

    clock.now = T0
    brute = session("BRUTE00001", "198.51.100.7")
    store.session_opened(brute)
    line(brute, "s", b"220 mx ESMTP\r\n")
    line(brute, "c", b"EHLO brute.example")
    line(brute, "s", b"250-mx\r\n250 STARTTLS\r\n")
    line(brute, "c", b"STARTTLS")
    brute.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mx.example.com")
    store.session_tls(brute)
    for index, (user, password) in enumerate(
        [("admin", "admin"), ("admin", "123456"), ("root", "123456")]
    ):
        clock.now = T0 + 1 + index
        line(brute, "c", b"AUTH LOGIN")
        line(brute, "s", b"334 VXNlcm5hbWU6\r\n")
        line(brute, "c", b"YWRtaW4=")  # a SASL response: not a command
        line(brute, "s", b"334 UGFzc3dvcmQ6\r\n")
        line(brute, "c", b"MTIzNDU2")
        clock.now += 0.25
        store.auth_attempt(
            brute, mechanism="LOGIN", username=user, password=password, outcome="refused"
        )
        clock.now += 0.25
        line(brute, "s", b"535 5.7.8 Error: authentication failed\r\n")
    store.auth_attempt(
        brute, mechanism="XOAUTH2", username="bob", token="ya29.token", outcome="accepted"
    )
    brute.helo, brute.user = "brute.example", "bob"
    clock.now = T0 + 10
    store.session_closed(brute, "quit")

    spam = session("SPAM000001", "203.0.113.9")
    store.session_opened(spam)
    line(spam, "c", b"HELO spam.example")
    attachment = Attachment("invoice.pdf.exe", "application/octet-stream", 4096, "ab" * 32)
    for number in range(2):
        clock.now = T0 + 20 + number
        line(spam, "c", b"MAIL FROM:<offers@spam.example>")
        line(spam, "c", b"RCPT TO:<victim@example.org>")
        line(spam, "c", b"DATA")
        raw = store.save_raw(io.BytesIO(f"Subject: offer {number}\r\n\r\nbuy\r\n".encode()))
        store.message(
            spam,
            message_id=f"MSG{number}",
            ts=clock.now,
            mail_from="offers@spam.example",
            rcpt_tos=["victim@example.org", "other@example.org"],
            raw=raw,
            subject=f"offer {number}",
            urls=["http://spam.example/buy", f"http://spam.example/{number}"],
            attachments=[attachment],
        )
    spam.helo = "spam.example"
    store.session_closed(spam, "peer-closed")

    clock.now = T0 + 30
    scanner = session("SCAN000001", "203.0.113.9", 40001)
    store.session_opened(scanner)
    line(scanner, "c", b"GET / HTTP/1.1")
    line(scanner, "c", b"\x1b[2J\x1b]0;pwned\x07 USER")
    line(scanner, "c", b"\xff\xfe binary")
    store.auth_attempt(
        scanner,
        mechanism="PLAIN",
        username="\x1b[31mred",
        password="pw\x1b]0;x\x07",
        outcome="refused",
    )
    clock.now = T0 + 31
    store.session_closed(scanner, "unknown-commands")
    store.close()
    return directory


@pytest.fixture
def db(data_dir: Path) -> sqlite3.Connection:
    connection = open_database(data_dir)
    yield connection  # type: ignore[misc]
    connection.close()


# --- --since ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("all", None),
        ("90", T0 - 90),
        ("30m", T0 - 1800),
        ("24h", T0 - DAY),
        ("7d", T0 - 7 * DAY),
        ("1w", T0 - 7 * DAY),
        ("2026-11-30", T0 - DAY - 10 * 3600),
        ("2026-12-01T09:30", T0 - 1800),
        ("2026-12-01T10:00:00+01:00", T0 - 3600),
        ("2026-12-01T10:00:00Z", T0),
    ],
)
def test_parse_since(text: str | None, expected: float | None) -> None:
    assert parse_since(text, now=T0) == expected


def test_parse_since_refuses_nonsense() -> None:
    with pytest.raises(ReportError, match="--since: 'yesterday' is neither a duration"):
        parse_since("yesterday")


# --- the summary ------------------------------------------------------------------------------


def test_summary(db: sqlite3.Connection) -> None:
    report = summary(db, top=20)
    assert report["sessions"] == 4
    assert report["unique_ips"] == 3
    assert report["tls_sessions"] == 1
    assert report["auth_attempts"] == 6 and report["auth_accepted"] == 1
    assert report["messages"] == 2 and report["distinct_messages"] == 2
    assert report["recipients"] == 4
    assert report["first_session"] == "2026-11-29T10:00:00.000Z"
    top = report["top"]
    assert top["ips"][0] == {"value": "203.0.113.9", "count": 2}
    assert top["usernames"][:2] == [
        {"value": "admin", "count": 2},
        {"value": "\x1b[31mred", "count": 1},
    ]
    assert top["passwords"][0] == {"value": "123456", "count": 2}
    assert {"value": "admin:123456", "count": 1} in top["credentials"]
    commands = {row["value"]: row["count"] for row in top["commands"]}
    # SASL responses after a 334 are not commands; everything else counts by its verb.
    assert commands["AUTH"] == 3 and "YWRTAW4=" not in commands and "MTIZNDU2" not in commands
    assert commands["MAIL"] == 2 and commands["GET"] == 1 and commands["EHLO"] == 2
    assert commands["HELO"] == 1  # a session's first line counts too
    assert top["urls"][0] == {"value": "http://spam.example/buy", "count": 2}
    assert top["attachments"] == [
        {"value": "ab" * 32, "count": 2, "filename": "invoice.pdf.exe", "size": 4096}
    ]
    assert top["senders"] == [{"value": "offers@spam.example", "count": 2}]


def test_summary_since_leaves_older_sessions_out(db: sqlite3.Connection) -> None:
    report = summary(db, since=T0 - DAY)
    assert report["sessions"] == 3 and report["auth_attempts"] == 5
    assert all(row["value"] != "olduser" for row in report["top"]["usernames"])
    assert report["since"] == "2026-11-30T10:00:00.000Z"
    assert summary(db, since=T0 + 3600)["sessions"] == 0


def test_top_is_bounded(db: sqlite3.Connection) -> None:
    report = summary(db, top=1)
    assert all(len(rows) <= 1 for rows in report["top"].values())


def test_table_escapes_what_the_attacker_sent(db: sqlite3.Connection) -> None:
    text = format_summary(summary(db), "table", source="/srv/honeypot")
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[31mred" in text and "pw\\x1b]0;x\\x07" in text
    assert text.startswith("Honeypot report for /srv/honeypot (everything captured; times in UTC)")
    assert "  sessions        4 (1 with TLS)" in text
    assert "  messages        2 (2 distinct, " in text
    assert "Top passwords (AUTH attempts)\n  2  123456\n" in text
    assert "invoice.pdf.exe, 4.0 KiB" in text


def test_json_and_csv(db: sqlite3.Connection) -> None:
    report = summary(db)
    assert json.loads(format_summary(report, "json")) == report
    rows = list(csv.reader(io.StringIO(format_summary(report, "csv"))))
    assert rows[0] == ["section", "value", "count", "detail"]
    assert ["summary", "sessions", "4", ""] in rows
    assert ["passwords", "123456", "2", ""] in rows
    assert ["attachments", "ab" * 32, "2", "invoice.pdf.exe (4096 bytes)"] in rows


def test_empty_store(tmp_path: Path) -> None:
    CaptureStore(tmp_path).close()
    with open_database(tmp_path) as connection:
        report = summary(connection)
    assert report["sessions"] == 0 and report["first_session"] is None
    text = format_summary(report)
    assert "  first session   -" in text and "(none)" in text
    connection.close()


# --- sessions ---------------------------------------------------------------------------------


def test_sessions_newest_first(db: sqlite3.Connection) -> None:
    rows = sessions(db)
    assert [r["id"] for r in rows] == ["SCAN000001", "SPAM000001", "BRUTE00001", "OLD0000001"]
    brute = rows[2]
    assert brute["tls"] == {
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "sni": "mx.example.com",
    }
    assert brute["auth_attempts"] == 4 and brute["user"] == "bob"
    assert brute["duration"] == 10.0 and brute["close_reason"] == "quit"
    assert rows[1]["messages"] == 2


def test_sessions_filters(db: sqlite3.Connection) -> None:
    assert [r["id"] for r in sessions(db, ip="203.0.113.9")] == ["SCAN000001", "SPAM000001"]
    assert [r["id"] for r in sessions(db, ip="203.0.113.0/24", limit=1)] == ["SCAN000001"]
    assert [r["id"] for r in sessions(db, ip="192.0.2.0/24")] == ["OLD0000001"]
    assert [r["id"] for r in sessions(db, since=T0 + 25)] == ["SCAN000001"]
    assert sessions(db, ip="2001:db8::/32") == []
    with pytest.raises(ReportError, match="--ip: 'nope' is not an IP address"):
        sessions(db, ip="nope")


def test_sessions_formats(db: sqlite3.Connection) -> None:
    rows = sessions(db)
    table = format_sessions(rows).splitlines()
    assert table[0].split() == [
        "session", "started", "secs", "client", "helo", "tls", "user", "cmds", "auth",
        "msgs", "closed",
    ]  # fmt: skip
    assert "BRUTE00001  2026-12-01 10:00:00  10.0" in table[3]
    assert "TLSv1.3" in table[3] and "bob" in table[3]
    assert json.loads(format_sessions(rows, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(format_sessions(rows, "csv"))))
    assert parsed[2]["tls_version"] == "TLSv1.3" and parsed[2]["peer_ip"] == "198.51.100.7"
    assert format_sessions([]) == "no sessions\n"


# --- one session --------------------------------------------------------------------------------


def test_show_a_session(db: sqlite3.Connection) -> None:
    detail = session_detail(db, "BRUTE")  # a unique prefix
    assert detail["session"]["id"] == "BRUTE00001"
    assert len(detail["events"]) == 5 + 5 * 3 + 3
    assert [a["username"] for a in detail["auth"]] == ["admin", "admin", "root", "bob"]
    text = format_session(detail)
    lines = text.splitlines()
    assert lines[0] == "session BRUTE00001"
    assert "  tls        TLSv1.3 TLS_AES_256_GCM_SHA384 (SNI mx.example.com)" in lines
    assert "  user       bob" in lines and "  closed     quit" in lines
    assert lines[lines.index("10:00:00.000 C: STARTTLS") - 1] == "10:00:00.000 S: 250 STARTTLS"
    # Each AUTH attempt sits between the client's last line and the server's answer.
    first = lines.index("10:00:01.250    [AUTH LOGIN user=admin password=admin -> refused]")
    assert lines[first - 1] == "10:00:01.000 C: MTIzNDU2"
    assert lines[first + 1] == "10:00:01.500 S: 535 5.7.8 Error: authentication failed"
    assert "[AUTH XOAUTH2 user=bob token=ya29.token -> accepted]" in text
    assert json.loads(format_session(detail, "json")) == detail


def test_show_messages_and_escapes(db: sqlite3.Connection) -> None:
    detail = session_detail(db, "SPAM000001")
    [first, _] = detail["messages"]
    assert first["rcpt_tos"] == ["victim@example.org", "other@example.org"]
    assert first["urls"] == ["http://spam.example/buy", "http://spam.example/0"]
    assert first["attachments"][0]["filename"] == "invoice.pdf.exe"
    assert first["path"].startswith("messages/")
    text = format_session(detail)
    assert (
        "[message MSG0] from <offers@spam.example> to <victim@example.org>, <other@example.org>"
        in text
    )
    assert "    url:     http://spam.example/0" in text
    assert "    attachment: invoice.pdf.exe application/octet-stream 4096 bytes" in text

    scanner = format_session(session_detail(db, "SCAN"))
    assert "\x1b" not in scanner and "\x07" not in scanner
    assert "C: \\x1b[2J\\x1b]0;pwned\\x07 USER" in scanner
    assert "C: \\xff\\xfe binary" in scanner  # stored escaped by the store


def test_show_unknown_and_ambiguous(db: sqlite3.Connection) -> None:
    with pytest.raises(ReportError, match="no session 'NOPE'"):
        session_detail(db, "NOPE")
    with pytest.raises(ReportError, match=r"'S' matches several sessions .*SCAN000001"):
        session_detail(db, "S")
    with pytest.raises(ReportError, match="no session '%'"):
        session_detail(db, "%")  # LIKE wildcards are literal


# --- opening ------------------------------------------------------------------------------------


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"data directory .*missing does not exist"):
        open_database(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="is not a directory"):
        open_database(tmp_path / "file")
    with pytest.raises(ReportError, match=r"no capture database in .*capture\.sqlite3 not found"):
        open_database(tmp_path)
    other = sqlite3.connect(tmp_path / DB_NAME)
    other.execute("CREATE TABLE t (x)")
    other.close()
    with pytest.raises(ReportError, match="is not a capture database"):
        open_database(tmp_path)
    (tmp_path / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ReportError, match=r"cannot read .*capture\.sqlite3"):
        open_database(tmp_path)


def test_newer_schema_is_refused(data_dir: Path) -> None:
    db = sqlite3.connect(data_dir / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ReportError, match="schema version 2"):
        open_database(data_dir)


def test_read_only_while_the_store_writes(data_dir: Path) -> None:
    store = CaptureStore(data_dir, batch_seconds=0.01)
    try:
        live = session("LIVE000001", "192.0.2.99")
        store.session_opened(live)
        store.flush()
        db = open_database(data_dir)
        try:
            assert summary(db)["sessions"] == 5
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                db.execute("DELETE FROM sessions")
            # The writer goes on while a reader is open.
            store.line(live, "c", b"EHLO live.example")
            assert store.flush()
            assert session_detail(db, "LIVE")["events"][0]["line"] == "EHLO live.example"
            assert session_detail(db, "LIVE")["session"]["ended"] is None
        finally:
            db.close()
    finally:
        store.close()
