"""CaptureStore (SQLite, batching, caps, pruning, JSONL) and message extraction, without
sockets."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import sqlite3
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgate.honeypot import store as store_module
from mailgate.honeypot.extract import extract, find_urls
from mailgate.honeypot.store import DB_NAME, SCHEMA_VERSION, CaptureError, CaptureStore
from mailgate.hooks import Session, TLSInfo


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def session(sid: str, ip: str = "192.0.2.1", **fields: Any) -> Session:
    return Session(
        id=sid, peer_host=ip, peer_port=40000, local_host="127.0.0.1", local_port=25, **fields
    )


def query(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / DB_NAME)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def new_store(tmp_path: Path, **kwargs: Any) -> CaptureStore:
    kwargs.setdefault("batch_seconds", 0.01)
    return CaptureStore(tmp_path, **kwargs)


def record_session(
    store: CaptureStore, sid: str, *, ip: str = "192.0.2.1", raw: bytes | None = None
) -> Session:
    s = session(sid, ip)
    store.session_opened(s)
    store.line(s, "s", b"220 mx ESMTP\r\n")
    store.line(s, "c", b"EHLO scanner")
    s.helo = "scanner"
    store.line(s, "s", b"250-mx\r\n250 HELP\r\n")
    if raw is not None:
        assert store.reserve_message_bytes(sid, len(raw))
        saved = store.save_raw(io.BytesIO(raw))
        store.message(
            s,
            message_id=f"M{sid}",
            ts=store.clock(),
            mail_from="a@example.net",
            rcpt_tos=["b@example.com"],
            raw=saved,
            subject="hi",
        )
    store.line(s, "c", b"QUIT")
    store.session_closed(s, "quit")
    return s


# --- schema, transcript, batching -----------------------------------------------------------


def test_schema_wal_and_version(tmp_path: Path) -> None:
    with new_store(tmp_path):
        pass
    tables = {
        row[0] for row in query(tmp_path, "SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert {"sessions", "events", "auth_attempts", "messages", "urls", "attachments"} <= tables
    indexes = {
        row[0] for row in query(tmp_path, "SELECT name FROM sqlite_master WHERE type='index'")
    }
    assert {
        "sessions_started",
        "sessions_peer_ip",
        "auth_attempts_username",
        "messages_ts",
    } <= indexes
    assert query(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(tmp_path, "PRAGMA journal_mode") == [("wal",)]
    columns = [row[1] for row in query(tmp_path, "PRAGMA table_info(sessions)")]
    assert columns[:13] == [
        "id", "started", "ended", "peer_ip", "peer_port", "local_port", "helo", "tls_version",
        "tls_cipher", "sni", "user", "close_reason", "bytes",
    ]  # fmt: skip


def test_transcript_lines_in_order_and_session_row(tmp_path: Path) -> None:
    clock = Clock()
    store = new_store(tmp_path, clock=clock)
    s = session("S1", tls=TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"))
    store.session_opened(s)
    store.line(s, "s", b"220 mx ESMTP\r\n")
    clock.now += 1
    store.line(s, "c", b"EHLO x\xff")
    store.line(s, "s", b"250-mx\r\n250-PIPELINING\r\n250 HELP\r\n")
    store.line(s, "c", b"")
    s.helo, s.user = "x", "bob"
    store.auth_attempt(s, mechanism="PLAIN", username="bob", password="pw", outcome="accepted")
    clock.now += 2
    store.session_closed(s, "quit")
    assert store.flush()
    events = query(tmp_path, "SELECT direction, line FROM events WHERE session_id='S1' ORDER BY id")
    assert events == [
        ("s", "220 mx ESMTP"),
        ("c", "EHLO x\\xff"),
        ("s", "250-mx"),
        ("s", "250-PIPELINING"),
        ("s", "250 HELP"),
        ("c", ""),
    ]
    [row] = query(
        tmp_path,
        "SELECT started, ended, peer_ip, peer_port, local_port, helo, tls_version, tls_cipher,"
        " user, close_reason, bytes, truncated FROM sessions",
    )
    assert row == (
        1_800_000_000.0, 1_800_000_003.0, "192.0.2.1", 40000, 25, "x", "TLSv1.3",
        "TLS_AES_256_GCM_SHA384", "bob", "quit", 14 + 7 + 34 + 0, 0,
    )  # fmt: skip
    assert query(tmp_path, "SELECT mechanism, username, password, outcome FROM auth_attempts") == [
        ("PLAIN", "bob", "pw", "accepted")
    ]
    store.close()


def test_writes_are_batched_in_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original = CaptureStore._write

    def counting(self: CaptureStore, db: Any, batch: list[Any]) -> None:
        batches.append(len(batch))
        original(self, db, batch)

    monkeypatch.setattr(CaptureStore, "_write", counting)
    store = new_store(tmp_path, batch_rows=500, batch_seconds=0.5)
    s = session("S1")
    store.session_opened(s)
    for i in range(1200):
        store.line(s, "c", b"NOOP %d" % i)
    assert store.flush()
    store.close()
    assert sum(batches) == 1201
    assert max(batches) <= 500
    assert len(batches) <= 4  # 1201 records in about three transactions, not 1201
    assert query(tmp_path, "SELECT count(*) FROM events") == [(1200,)]


def test_flush_and_close_are_idempotent_and_later_records_dropped(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    assert store.flush()
    store.close()
    store.close()
    assert store.flush()
    store.session_opened(session("late"))  # after close: dropped, no error
    assert store.dropped == 1
    assert query(tmp_path, "SELECT count(*) FROM sessions") == [(0,)]


# --- caps -------------------------------------------------------------------------------------


def test_session_transcript_cap_marks_truncated(tmp_path: Path) -> None:
    store = new_store(tmp_path, max_session_bytes=30)
    s = session("S1")
    store.session_opened(s)
    store.line(s, "c", b"EHLO 0123456789")  # 15
    store.line(s, "c", b"NOOP 012345678")  # 14: 29
    store.line(s, "c", b"NOOP 2")  # past the cap: not recorded
    store.line(s, "c", b"X")  # nor anything after it
    store.session_closed(s, "quit")
    store.close()
    assert [r[0] for r in query(tmp_path, "SELECT line FROM events ORDER BY id")] == [
        "EHLO 0123456789",
        "NOOP 012345678",
    ]
    assert query(tmp_path, "SELECT bytes, truncated FROM sessions") == [(36, 1)]


def test_session_message_cap(tmp_path: Path) -> None:
    store = new_store(tmp_path, max_session_message_bytes=100)
    store.session_opened(session("S1"))
    assert store.reserve_message_bytes("S1", 60)
    assert not store.reserve_message_bytes("S1", 60)  # 120 > 100: not kept
    assert store.reserve_message_bytes("S1", 40)
    store.close()


def test_raw_messages_are_deduplicated_by_hash(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    content = b"Subject: x\r\n\r\nbody\r\n"
    first = store.save_raw(io.BytesIO(content))
    second = store.save_raw(io.BytesIO(content))
    other = store.save_raw(io.BytesIO(b"Subject: y\r\n\r\nother\r\n"))
    not_kept = store.save_raw(io.BytesIO(content), keep=False)
    sha = hashlib.sha256(content).hexdigest()
    assert first.sha256 == second.sha256 == not_kept.sha256 == sha
    assert first.path == second.path == f"messages/{sha[:2]}/{sha}.eml"
    assert not_kept.path is None and not_kept.size == len(content)
    assert other.path != first.path
    assert (tmp_path / first.path).read_bytes() == content
    stored = sorted(p.name for p in (tmp_path / "messages").rglob("*.eml"))
    assert len(stored) == 2
    assert list((tmp_path / "messages" / "tmp").iterdir()) == []
    store.close()


def test_total_cap_prunes_oldest_sessions_and_their_unshared_files(tmp_path: Path) -> None:
    clock = Clock()
    store = new_store(tmp_path, clock=clock, max_total_bytes=None)
    shared = b"Subject: shared\r\n\r\n" + b"s" * 40_000 + b"\r\n"
    for i in range(10):
        clock.now += 10
        raw = shared if i in (0, 9) else f"Subject: {i}\r\n\r\n".encode() + b"x" * 40_000 + b"\r\n"
        record_session(store, f"S{i}", raw=raw)
    store.close()
    before = CaptureStore(tmp_path, max_total_bytes=None).total_bytes()
    # Reopened with a cap the data does not fit: the oldest go first.
    cap = before - 150_000
    store = new_store(tmp_path, clock=clock, max_total_bytes=cap, check_interval=0)
    assert store.flush()
    total = store.total_bytes()
    store.close()
    assert total <= cap
    kept = sorted(int(r[0][1:]) for r in query(tmp_path, "SELECT id FROM sessions"))
    assert kept and kept[-1] == 9
    assert kept == list(range(kept[0], 10))  # a suffix: oldest first
    assert kept[0] >= 4  # at least 150 kB (four messages) had to go
    pruned = [f"S{i}" for i in range(kept[0])]
    marks = ",".join("?" * len(pruned))
    for table, column in (("events", "session_id"), ("messages", "session_id")):
        assert query(
            tmp_path, f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})", *pruned
        ) == [(0,)]
    files = {p.name for p in (tmp_path / "messages").rglob("*.eml")}
    # The message S0 shared with S9 is still there; the other pruned ones are gone.
    assert hashlib.sha256(shared).hexdigest() + ".eml" in files
    assert len(files) == len(kept)


def test_restart_keeps_data_and_schema(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    record_session(store, "A")
    store.close()
    store = new_store(tmp_path)
    record_session(store, "B")
    store.close()
    assert query(tmp_path, "SELECT id FROM sessions ORDER BY id") == [("A",), ("B",)]
    assert query(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_newer_schema_is_a_clear_error(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CaptureError, match="schema version"):
        CaptureStore(tmp_path)


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptureError, match="cannot open the capture store"):
        CaptureStore(tmp_path / "file" / "sub")


# --- JSON lines -------------------------------------------------------------------------------


def test_jsonl_file(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    target.write_text('{"type": "earlier"}\n')  # appended to, never truncated
    store = new_store(tmp_path / "data", jsonl=target)
    s = session("S1")
    store.session_opened(s)
    store.line(s, "s", b"220 mx\r\n")
    store.line(s, "c", b"EHLO x")
    store.line(s, "s", b"250-mx\r\n250 HELP\r\n")
    store.auth_attempt(s, mechanism="LOGIN", username="u", password="p", outcome="refused")
    raw = store.save_raw(io.BytesIO(b"Subject: s\r\n\r\nb\r\n"))
    store.message(
        s, message_id="M1", ts=1.0, mail_from="", rcpt_tos=["r@x"], raw=raw, subject="s",
        urls=["http://x.test/"],
    )  # fmt: skip
    store.session_closed(s, "quit")
    store.close()
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert lines[0] == {"type": "earlier"}
    assert [obj["type"] for obj in lines[1:]] == [
        "session_open", "reply", "command", "reply", "auth", "message", "session_close",
    ]  # fmt: skip
    assert lines[2]["lines"] == ["220 mx"] and lines[2]["code"] == 220
    assert lines[4]["lines"] == ["250-mx", "250 HELP"]
    assert lines[3]["line"] == "EHLO x" and lines[3]["peer_ip"] == "192.0.2.1"
    assert lines[5]["password"] == "p"
    assert lines[6]["urls"] == ["http://x.test/"] and lines[6]["sha256"] == raw.sha256
    assert lines[7]["reason"] == "quit" and lines[7]["time"].endswith("Z")


def test_jsonl_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    store = new_store(tmp_path, jsonl="-")
    record_session(store, "S1")
    store.close()
    out = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert out[0]["type"] == "session_open" and out[-1]["type"] == "session_close"


# --- failures ---------------------------------------------------------------------------------


class FullDiskStore(CaptureStore):
    """SQLite refuses to grow the database: 'database or disk is full'."""

    def _connect(self) -> sqlite3.Connection | None:
        db = super()._connect()
        assert db is not None
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db


def test_write_errors_drop_records_and_do_not_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CaptureStore(tmp_path).close()  # the schema first, so that it fits
    store = FullDiskStore(tmp_path, batch_seconds=0.01)
    s = session("S1")
    store.session_opened(s)
    for i in range(300):
        store.line(s, "c", b"NOOP " + b"x" * 200 + str(i).encode())
    store.session_closed(s, "quit")
    with caplog.at_level(logging.ERROR, logger="mailgate.honeypot.store"):
        assert store.flush()
    assert store.dropped > 0
    errors = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(errors) == 1  # once a minute, not once a batch
    store.close()


def test_raw_file_write_error_keeps_the_record(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    tmp_dir = tmp_path / "messages" / "tmp"
    tmp_dir.rmdir()
    tmp_dir.write_text("not a directory")
    raw = store.save_raw(io.BytesIO(b"Subject: x\r\n\r\ny\r\n"))
    assert raw.path is None and raw.sha256 == hashlib.sha256(b"Subject: x\r\n\r\ny\r\n").hexdigest()
    store.close()


def test_queue_limit_drops_instead_of_growing(tmp_path: Path) -> None:
    store = new_store(tmp_path, max_queue=1, batch_seconds=0.5)
    s = session("S1")
    for _ in range(2000):  # far faster than the writer takes them one by one
        store.line(s, "c", b"NOOP")
    store.close()
    assert store.dropped > 0


def test_queue_is_bounded_in_bytes_while_the_writer_is_stalled(tmp_path: Path) -> None:
    # A stalled writer (another connection holds the database): transcripts stop at the
    # byte bound and their sessions are marked truncated; session rows and AUTH attempts
    # still get in (up to twice the bound); the queue never grows past that.
    store = new_store(tmp_path, max_queue_bytes=64 * 1024)
    store.flush()
    lock = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    line = b"250-mail.example.com " + b"x" * 200 + b"\r\n"
    peak = 0
    sessions = [session(f"S{i}") for i in range(400)]
    for s in sessions:
        store.session_opened(s)
        for _ in range(5):
            store.line(s, "s", line)
        store.auth_attempt(s, mechanism="PLAIN", username="admin", password="pw", outcome="refused")
        store.session_closed(s, "quit")
        peak = max(peak, store.queued_bytes)
    assert peak <= 2 * 64 * 1024 + 2048
    assert store.dropped > 0
    lock.execute("ROLLBACK")
    lock.close()
    assert store.flush(timeout=60)
    store.close()
    rows = query(tmp_path, "SELECT count(*), sum(truncated) FROM sessions")[0]
    assert rows[0] >= 100 and rows[1] > 0  # cut transcripts are marked
    full = query(tmp_path, "SELECT count(*) FROM sessions WHERE truncated = 0")[0][0]
    assert full > 0  # the first sessions were recorded whole
    assert query(tmp_path, "SELECT count(*) FROM auth_attempts")[0][0] >= rows[0] - 5


def test_many_lines_in_one_batch_keep_their_order(tmp_path: Path) -> None:
    # Transcript lines go in multi-row INSERTs of 200: order and content survive.
    store = new_store(tmp_path, batch_seconds=0.5)
    s = session("S1")
    store.session_opened(s)
    for index in range(1234):
        store.line(s, "c", f"NOOP {index}".encode())
    store.close()
    lines = [r[0] for r in query(tmp_path, "SELECT line FROM events ORDER BY id")]
    assert lines == [f"NOOP {index}" for index in range(1234)]


def test_module_exports() -> None:
    assert set(store_module.__all__) >= {"CaptureStore", "SCHEMA", "CaptureError"}


# --- extraction -------------------------------------------------------------------------------


def test_urls_in_text_trimmed_and_in_order() -> None:
    text = (
        "Visit https://evil.example/login?x=1&y=2. Or (http://a.test/path) or\n"
        "HTTPS://UPPER.test/A, www.plain.test/p; ftp://files.test/f.zip! "
        "and https://en.wikipedia.org/wiki/Foo_(bar) and http:// alone"
    )
    assert find_urls(text) == [
        "https://evil.example/login?x=1&y=2",
        "http://a.test/path",
        "HTTPS://UPPER.test/A",
        "www.plain.test/p",
        "ftp://files.test/f.zip",
        "https://en.wikipedia.org/wiki/Foo_(bar)",
    ]


def test_urls_in_html_with_entities() -> None:
    html = (
        '<a href="https://phish.test/a?b=1&amp;c=2">x</a>'
        "<img src='http://img.test/p.png'>"
        "<p>h&#116;tps://hidden.test/</p>"
    )
    assert find_urls(html, html_text=True) == [
        "https://phish.test/a?b=1&c=2",
        "http://img.test/p.png",
        "https://hidden.test/",
    ]


def build_message() -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = "Ihre Rechnung: bitte prüfen"
    msg["From"] = "a@example.net"
    msg.set_content(
        "Pay at https://pay.test/now\nor http://pay.test/now again: https://pay.test/now\n"
    )
    msg.add_alternative(
        '<html><body><a href="https://html.test/x?a=1&amp;b=2">here</a></body></html>',
        subtype="html",
        cte="base64",
    )
    msg.add_attachment(
        b"%PDF-1.4 fake" * 50, maintype="application", subtype="pdf", filename="rechnung.pdf"
    )
    inner = EmailMessage()
    inner["Subject"] = "inner"
    inner.set_content("inner text http://inner.test/")
    inner.add_attachment(
        b"MZ\x90\x00" * 10, maintype="application", subtype="octet-stream", filename="x.exe"
    )
    msg.add_attachment(inner)
    return msg


def test_extract_urls_attachments_nested_and_encoded() -> None:
    msg = build_message()
    data = msg.as_bytes()
    assert b"https://html.test" not in data  # really base64-encoded
    found = extract(data)
    assert found.subject == "Ihre Rechnung: bitte prüfen"
    assert found.urls == (
        "https://pay.test/now",
        "http://pay.test/now",
        "https://html.test/x?a=1&b=2",
        "http://inner.test/",
    )
    by_name = {a.filename: a for a in found.attachments}
    pdf = by_name["rechnung.pdf"]
    assert pdf.content_type == "application/pdf"
    assert pdf.size == len(b"%PDF-1.4 fake" * 50)
    assert pdf.sha256 == hashlib.sha256(b"%PDF-1.4 fake" * 50).hexdigest()
    exe = by_name["x.exe"]
    assert exe.sha256 == hashlib.sha256(b"MZ\x90\x00" * 10).hexdigest()
    assert [a.content_type for a in found.attachments].count("message/rfc822") == 1


def test_extract_quoted_printable_and_rfc2231_filename() -> None:
    url = "https://very-long-domain-name-for-testing.example/" + "p" * 80
    raw = (
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        f"see {url[:60]}=\r\n{url[60:]} now\r\n"
        "--b\r\nContent-Type: application/zip\r\n"
        "Content-Disposition: attachment; filename*=utf-8''%C3%BCbung.zip\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{base64.b64encode(b'PK' + bytes(100)).decode()}\r\n"
        "--b--\r\n"
    ).encode()
    found = extract(raw)
    assert found.subject == "Grüße"
    assert found.urls == (url,)
    [zip_file] = found.attachments
    assert (zip_file.filename, zip_file.content_type, zip_file.size) == (
        "übung.zip",
        "application/zip",
        102,
    )


def test_extract_limits_and_garbage() -> None:
    text = "\n".join(f"http://u{i}.test/" for i in range(50))
    found = extract(f"Subject: many\r\n\r\n{text}\r\n".encode(), max_urls=10)
    assert len(found.urls) == 10
    for junk in (
        b"",
        b"\x00\xff" * 100,
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" * 50,
    ):
        extract(junk)  # never raises
    deep = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" * 3000
    assert extract(deep, max_parts=20).attachments == ()
