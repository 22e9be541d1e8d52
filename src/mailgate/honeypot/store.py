"""The honeypot's capture store: one SQLite file, written by one background thread.

Everything a honeypot session leaves behind goes to ``DATA_DIR/capture.sqlite3`` (WAL
mode), raw messages to ``DATA_DIR/messages/ab/<sha256>.eml`` (one file per distinct
content), and optionally one JSON object per event to a JSON-lines file or stdout.

The event loop never touches SQLite: every record is put on a queue, and one writer
thread takes it off in batches (up to ``batch_rows`` records or ``batch_seconds``,
whichever comes first) and writes each batch in one transaction with ``executemany``.
A disk that is full or failing costs records, never the server: the writer logs (at
most once a minute) and drops the batch.

The queue is bounded in memory, not only in records: ``max_queue_bytes`` (16 MiB by
default, an estimate of what the queued records hold) and ``max_queue`` records. When
the writer falls behind (a slow disk, a flood of short sessions) and the queue reaches
its bound, the policy is: a session that has a transcript line to record loses the rest
of its transcript (the line and all later ones; the session is marked ``truncated``);
its session row, TLS details, AUTH attempts and messages are still queued, up to twice
the bound -- beyond that they are dropped too. Every dropped record is counted
(``dropped``) and logged at most once a minute. The server never waits for the store.
Transcript lines are written with multi-row INSERTs, so the writer spends few
statements (and GIL hand-overs) per batch and keeps up with thousands of sessions per
second.

Storage is bounded twice: per session (``max_session_bytes`` of transcript lines; past
it lines are no longer recorded and the session is marked ``truncated``;
``max_session_message_bytes`` of raw messages; past it messages are still recorded with
their hash, URLs and attachments, but their raw file is not kept) and in total
(``max_total_bytes`` for the database plus the raw files: every ``check_interval``
seconds the writer deletes the oldest finished sessions, with their rows and the raw
files no other message shares, until the total is below 90 % of the cap).

The total cap also holds while messages are being received: a message in flight is
*reserved* (:meth:`CaptureStore.reserve_incoming`, by the honeypot plugin at DATA, for
its announced SIZE or the message size limit) and counts against the cap with what is
stored (the database files as they are on disk and the raw files, counted as they are
placed). A reservation that does not fit is refused; :meth:`CaptureStore.make_room`
prunes the oldest finished sessions first to make it fit.

Schema (``PRAGMA user_version`` = 1; times are Unix seconds, UTC, as REAL)::

    sessions(id TEXT PRIMARY KEY,     -- the server's session id
             started REAL, ended REAL, -- ended NULL: still open (or the process died)
             peer_ip TEXT, peer_port INTEGER, local_port INTEGER,  -- after PROXY
             helo TEXT,                -- last HELO/EHLO name
             tls_version TEXT, tls_cipher TEXT, sni TEXT,
             user TEXT,                -- the user the session authenticated as
             close_reason TEXT,        -- quit, peer-closed, idle-timeout, refused, ...
             bytes INTEGER,            -- transcript bytes (client lines without their
                                       -- line end, replies with it), also past the cap
             truncated INTEGER)        -- 1: transcript lines past max_session_bytes dropped
    events(id INTEGER PRIMARY KEY,    -- transcript order
           session_id TEXT, ts REAL,
           direction TEXT,             -- 'c' client, 's' server
           line TEXT)                  -- one line, no line end; bytes that are not
                                       -- UTF-8 as \\xNN escapes
    auth_attempts(id INTEGER PRIMARY KEY, session_id TEXT, ts REAL,
                  mechanism TEXT, username TEXT,
                  password TEXT,       -- PLAIN, LOGIN
                  token TEXT,          -- XOAUTH2 bearer token; CRAM-MD5 in hashcat
                                       -- format $cram_md5$b64(challenge)$b64(user digest)
                  outcome TEXT)        -- accepted, refused, dropped
    messages(id TEXT PRIMARY KEY,     -- the server's queue id
             session_id TEXT, ts REAL, mail_from TEXT,
             rcpt_tos TEXT,            -- JSON array of addresses
             size INTEGER, sha256 TEXT,  -- of the bytes the client sent
             path TEXT,                -- raw file relative to DATA_DIR, NULL if not kept
             subject TEXT,
             analysis_truncated TEXT)  -- NULL: subject, URLs and attachments are of the
                                       -- whole message; else the limit that stopped the
                                       -- analysis: parts, depth, budget, size, backlog, error
    urls(message_id TEXT, url TEXT)
    attachments(message_id TEXT, filename TEXT, content_type TEXT, size INTEGER,
                sha256 TEXT)

Indexes: sessions(started), sessions(peer_ip, started), events(session_id, id),
events(ts), auth_attempts(ts), auth_attempts(username), auth_attempts(session_id),
messages(ts), messages(session_id), messages(sha256), urls(message_id), urls(url),
attachments(message_id), attachments(sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from .safetext import json_text

if TYPE_CHECKING:
    from mailgate.hooks import Session

log = logging.getLogger("mailgate.honeypot.store")

__all__ = [
    "DB_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "CaptureError",
    "CaptureStore",
    "RawMessage",
]

DB_NAME: Final = "capture.sqlite3"
MESSAGES_DIR: Final = "messages"
SCHEMA_VERSION: Final = 1
#: Columns added since version 1 was first written, added to older files when opened.
#: Nullable additions keep the version: a mailgate that does not know them still reads
#: and writes the file.
_ADDED_COLUMNS: Final = (("messages", "analysis_truncated", "TEXT"),)
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    ended REAL,
    peer_ip TEXT NOT NULL,
    peer_port INTEGER,
    local_port INTEGER,
    helo TEXT,
    tls_version TEXT,
    tls_cipher TEXT,
    sni TEXT,
    user TEXT,
    close_reason TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started);
CREATE INDEX IF NOT EXISTS sessions_peer_ip ON sessions(peer_ip, started);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    ts REAL NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('c', 's')),
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_session ON events(session_id, id);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE TABLE IF NOT EXISTS auth_attempts (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    ts REAL NOT NULL,
    mechanism TEXT NOT NULL,
    username TEXT,
    password TEXT,
    token TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_attempts_ts ON auth_attempts(ts);
CREATE INDEX IF NOT EXISTS auth_attempts_username ON auth_attempts(username);
CREATE INDEX IF NOT EXISTS auth_attempts_session ON auth_attempts(session_id);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    ts REAL NOT NULL,
    mail_from TEXT,
    rcpt_tos TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT,
    subject TEXT,
    analysis_truncated TEXT
);
CREATE INDEX IF NOT EXISTS messages_ts ON messages(ts);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id);
CREATE INDEX IF NOT EXISTS messages_sha256 ON messages(sha256);
CREATE TABLE IF NOT EXISTS urls (
    message_id TEXT NOT NULL,
    url TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS urls_message ON urls(message_id);
CREATE INDEX IF NOT EXISTS urls_url ON urls(url);
CREATE TABLE IF NOT EXISTS attachments (
    message_id TEXT NOT NULL,
    filename TEXT,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attachments_message ON attachments(message_id);
CREATE INDEX IF NOT EXISTS attachments_sha256 ON attachments(sha256);
"""

# Statements the writer runs, by record kind (the first item of a queued record).
_OPEN, _EVENT, _TLS, _CLOSE, _AUTH, _MESSAGE, _URL, _ATTACHMENT, _TRUNCATED = range(9)
_SQL: Final = (
    "INSERT OR IGNORE INTO sessions (id, started, peer_ip, peer_port, local_port,"
    " tls_version, tls_cipher, sni) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "INSERT INTO events (session_id, ts, direction, line) VALUES (?, ?, ?, ?)",
    "UPDATE sessions SET tls_version = ?, tls_cipher = ?, sni = ? WHERE id = ?",
    "UPDATE sessions SET ended = ?, helo = ?, user = ?, close_reason = ?, bytes = ?,"
    " truncated = max(truncated, ?) WHERE id = ?",
    "INSERT INTO auth_attempts (session_id, ts, mechanism, username, password, token,"
    " outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
    "INSERT OR REPLACE INTO messages (id, session_id, ts, mail_from, rcpt_tos, size,"
    " sha256, path, subject, analysis_truncated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "INSERT INTO urls (message_id, url) VALUES (?, ?)",
    "INSERT INTO attachments (message_id, filename, content_type, size, sha256)"
    " VALUES (?, ?, ?, ?, ?)",
    "UPDATE sessions SET truncated = 1 WHERE id = ?",
)
# Control records.
_FLUSH, _STOP, _MAKE_ROOM = 100, 101, 102

#: Sessions deleted per pruning transaction at most, and transactions per check.
_PRUNE_CHUNK = 500
_PRUNE_ROUNDS = 200
#: A session nobody closed (its process died) may be pruned after this long.
_STALE_OPEN = 3600.0
#: Leftover temporary raw files (a crash while storing) older than this are removed.
_STALE_TMP = 3600.0
_COPY_CHUNK = 256 * 1024


class CaptureError(Exception):
    """The store cannot be opened (a directory that cannot be written, a newer schema)."""


@dataclass(frozen=True, slots=True)
class RawMessage:
    """What :meth:`CaptureStore.save_raw` read: the SHA-256 and size of the content,
    where it is kept (relative to the data directory; None when not kept), and its first
    ``head`` bytes for parsing."""

    sha256: str
    size: int
    path: str | None
    head: bytes


@dataclass(slots=True)
class _Live:
    """An open session as the store accounts for it (event loop side)."""

    peer_ip: str
    started: float
    recorded: int = 0  # transcript bytes recorded
    seen: int = 0  # transcript bytes seen, also past the cap
    message_bytes: int = 0  # raw message bytes kept
    truncated: bool = False


class CaptureStore:
    """The capture store of one data directory (see the module docstring).

    The recording methods (:meth:`session_opened`, :meth:`line`, :meth:`session_tls`,
    :meth:`session_closed`, :meth:`auth_attempt`, :meth:`message`) only queue records and
    never raise; call them from the event loop (:meth:`message` and :meth:`save_raw` also
    from worker threads). :meth:`flush` waits until everything queued so far is written;
    :meth:`close` writes what is left and stops the writer.

    ``jsonl``: a path to append JSON lines to, ``"-"`` for stdout, None for none.
    ``max_total_bytes``: the cap on database plus raw files (None: no cap).
    ``check_interval``: seconds between checks of that cap (0: after every batch).
    ``max_queue``/``max_queue_bytes``: the bound of the write queue (see the module
    docstring for what happens when it is reached).
    ``clock``: the time source for every timestamp.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        jsonl: str | os.PathLike[str] | None = None,
        max_total_bytes: int | None = 1024**3,
        max_session_bytes: int = 1024**2,
        max_session_message_bytes: int = 50 * 1024**2,
        clock: Callable[[], float] = time.time,
        batch_rows: int = 2000,
        batch_seconds: float = 0.2,
        check_interval: float = 10.0,
        max_queue: int = 50_000,
        max_queue_bytes: int = 16 * 1024**2,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.messages_dir = self.data_dir / MESSAGES_DIR
        self.max_total_bytes = max_total_bytes
        self.max_session_bytes = max_session_bytes
        self.max_session_message_bytes = max_session_message_bytes
        self.clock = clock
        self.batch_rows = max(1, batch_rows)
        self.batch_seconds = max(0.0, batch_seconds)
        self.check_interval = max(0.0, check_interval)
        self.max_queue = max(1, max_queue)
        self.max_queue_bytes = max(1, max_queue_bytes)
        #: Records dropped (queue full, write errors, after close): for tests and stats.
        self.dropped = 0
        #: The total cap is reached and pruning could not help: raw files and transcript
        #: lines are not kept until it can.
        self.full = False
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        #: Estimated bytes of the records ever queued (under _put_lock: records come from
        #: the event loop and worker threads) and ever taken by the writer (its own).
        self._put_bytes = 0
        self._taken_bytes = 0
        self._put_lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        #: Raw files stored whose message row is not committed yet: never pruned.
        self._pending_raw: dict[str, int] = {}
        #: Bytes reserved for messages being received, by key (the plugin's session id).
        self._reserved: dict[str, int] = {}
        #: The raw files on disk (each distinct file once), kept up to date as files are
        #: placed and pruned.
        self._raw_bytes = 0
        #: The database files (main, WAL, shared memory) as last measured by the writer.
        self._db_bytes = 0
        self._closed = False
        self._last_warning = 0.0
        self._suppressed = 0
        self._jsonl_target = jsonl
        self._jsonl_fd: int | None = None
        self.jsonl = jsonl is not None
        self._prepare()
        self._thread = threading.Thread(
            target=self._run, name=f"capture-store:{self.data_dir.name}", daemon=True
        )
        self._thread.start()

    # --- opening --------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the directories, the schema and the JSONL file now, so that a data
        directory that cannot be used stops the server at start with a clear error."""
        try:
            (self.messages_dir / "tmp").mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise CaptureError(f"cannot open the capture store {self.path}: {exc}") from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CaptureError(
                    f"{self.path} has schema version {version}; this mailgate knows "
                    f"{SCHEMA_VERSION} (use a newer mailgate or another --data-dir)"
                )
            # Only takes effect on a new database: freed pages go back to the file system.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise CaptureError(f"cannot open the capture store {self.path}: {exc}") from None
        else:
            with contextlib.suppress(sqlite3.Error):
                self._raw_bytes = _raw_total(db)
        finally:
            db.close()
        self._db_bytes = self._db_files_size()
        if self._jsonl_target is not None and self._jsonl_target != "-":
            try:
                self._jsonl_fd = os.open(
                    self._jsonl_target,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                raise CaptureError(
                    f"cannot open the JSON lines file {self._jsonl_target}: {exc.strerror or exc}"
                ) from None
        self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.messages_dir / "tmp"):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    # --- recording (event loop) ------------------------------------------------------------------

    def session_opened(self, session: Session) -> None:
        now = self.clock()
        live = _Live(session.peer_host, now)
        with self._lock:
            self._live[session.id] = live
        tls = session.tls
        self._put(
            _OPEN,
            (
                session.id,
                now,
                session.peer_host,
                session.peer_port,
                session.local_port,
                tls.version if tls is not None else None,
                tls.cipher if tls is not None else None,
                tls.server_name if tls is not None else None,
            ),
            {
                "type": "session_open",
                "ts": now,
                "session": session.id,
                "peer_ip": session.peer_host,
                "peer_port": session.peer_port,
                "local_port": session.local_port,
                "tls": _tls_json(session),
            }
            if self.jsonl
            else None,
        )

    def line(self, session: Session, direction: Literal["c", "s"], data: bytes) -> None:
        """Record what crossed the wire: ``c`` a client line (or bytes with line ends),
        ``s`` one or more replies; split into lines here."""
        live = self._live.get(session.id)
        if live is None:  # a recorder that missed opened(): start the session now
            self.session_opened(session)
            live = self._live[session.id]
        now = self.clock()
        lines = data.split(b"\n")
        if len(lines) > 1 and not lines[-1]:
            lines.pop()
        size = len(data)
        live.seen += size
        if live.truncated:
            return
        if live.recorded + size > self.max_session_bytes or self.full:
            live.truncated = True
            self._put(_TRUNCATED, (session.id,), None)
            return
        if self._backlogged():
            # The writer falls behind: this session's transcript stops here, marked.
            live.truncated = True
            self.dropped += len(lines)
            self._warn("capture store: the writer falls behind; transcripts cut short")
            self._put(_TRUNCATED, (session.id,), None)
            return
        live.recorded += size
        texts = [_text(raw) for raw in lines]
        for text in texts:
            self._put(_EVENT, (session.id, now, direction, text), None)
        if self.jsonl:
            peer = live.peer_ip
            if direction == "c":
                for text in texts:
                    self._put_json(
                        {
                            "type": "command",
                            "ts": now,
                            "session": session.id,
                            "peer_ip": peer,
                            "line": text,
                        }
                    )
            else:
                for reply in _replies(texts):
                    self._put_json(
                        {
                            "type": "reply",
                            "ts": now,
                            "session": session.id,
                            "peer_ip": peer,
                            "code": _code(reply[0]),
                            "lines": reply,
                        }
                    )

    def session_tls(self, session: Session) -> None:
        tls = session.tls
        if tls is None:
            return
        now = self.clock()
        self._put(
            _TLS,
            (tls.version, tls.cipher, tls.server_name, session.id),
            {
                "type": "tls",
                "ts": now,
                "session": session.id,
                "peer_ip": session.peer_host,
                "tls": _tls_json(session),
            }
            if self.jsonl
            else None,
        )

    def session_closed(self, session: Session, reason: str) -> None:
        now = self.clock()
        with self._lock:
            live = self._live.pop(session.id, None)
        seen = live.seen if live is not None else 0
        truncated = live.truncated if live is not None else False
        self._put(
            _CLOSE,
            (now, session.helo, session.user, reason, seen, int(truncated), session.id),
            {
                "type": "session_close",
                "ts": now,
                "session": session.id,
                "peer_ip": session.peer_host,
                "reason": reason,
                "helo": session.helo,
                "user": session.user,
                "duration": round(now - live.started, 3) if live is not None else None,
                "bytes": seen,
                "truncated": truncated,
                "messages": session.messages,
            }
            if self.jsonl
            else None,
        )

    def auth_attempt(
        self,
        session: Session,
        *,
        mechanism: str,
        username: str | None,
        password: str | None = None,
        token: str | None = None,
        outcome: str,
    ) -> None:
        now = self.clock()
        self._put(
            _AUTH,
            (session.id, now, mechanism, username, password, token, outcome),
            {
                "type": "auth",
                "ts": now,
                "session": session.id,
                "peer_ip": session.peer_host,
                "mechanism": mechanism,
                "username": username,
                "password": password,
                "token": token,
                "outcome": outcome,
            }
            if self.jsonl
            else None,
        )

    # --- messages --------------------------------------------------------------------------------

    def reserve_message_bytes(self, session_id: str, size: int) -> bool:
        """Whether a raw message of ``size`` bytes may be kept for this session (and count
        it if so): within ``max_session_message_bytes`` and the total cap not reached."""
        if self.full:
            return False
        live = self._live.get(session_id)
        if live is None:
            return size <= self.max_session_message_bytes
        if live.message_bytes + size > self.max_session_message_bytes:
            return False
        live.message_bytes += size
        return True

    def save_raw(
        self,
        source: IO[bytes],
        *,
        keep: bool = True,
        head: int = 10 * 1024**2,
        link_from: str | os.PathLike[str] | None = None,
        reserved: str | None = None,
    ) -> RawMessage:
        """Read ``source`` to its end (blocking: call it in a worker thread): hash it, keep
        its first ``head`` bytes, and with ``keep`` store it as
        ``messages/<first two hex digits>/<sha256>.eml`` unless that file exists already.
        ``link_from``: a file holding exactly what ``source`` reads, hard-linked into place
        instead of copied where it can be (no second copy on disk, not even for a moment).
        ``reserved``: the key of the message's reservation (:meth:`reserve_incoming`),
        released as the raw file starts to count (never both, never neither). A file that cannot be written is logged and not kept (``path`` None)."""
        digest = hashlib.sha256()
        size = 0
        first = bytearray()
        tmp: IO[bytes] | None = None
        linked: str | None = None
        if keep and not self.full and link_from is not None:
            linked = self._link_tmp(link_from)
        if keep and not self.full and linked is None:
            try:
                tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below
                    dir=self.messages_dir / "tmp", prefix=f"{os.getpid()}-", delete=False
                )
            except OSError as exc:
                self._warn("cannot store a raw message: %s", exc)
        try:
            while chunk := source.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if len(first) < head:
                    first += chunk[: head - len(first)]
                if tmp is not None:
                    try:
                        tmp.write(chunk)
                    except OSError as exc:
                        self._warn("cannot store a raw message: %s", exc)
                        _discard(tmp)
                        tmp = None
            sha256 = digest.hexdigest()
            path = None
            if tmp is not None:
                try:
                    tmp.close()  # flushes: a full disk shows here
                except OSError as exc:
                    self._warn("cannot store a raw message: %s", exc)
                else:
                    name, tmp = tmp.name, None
                    path = self._place(name, sha256, reserved)
            elif linked is not None:
                name, linked = linked, None
                path = self._place(name, sha256, reserved)
        finally:
            if tmp is not None:
                _discard(tmp)
            if linked is not None:
                with contextlib.suppress(OSError):
                    os.unlink(linked)
        return RawMessage(sha256, size, path, bytes(first))

    def _link_tmp(self, original: str | os.PathLike[str]) -> str | None:
        """A temporary name for ``original`` (a hard link), None when it cannot have one
        (another file system, a file system without links)."""
        name = os.path.join(self.messages_dir, "tmp", f"{os.getpid()}-{secrets.token_hex(8)}.link")
        try:
            os.link(original, name)
        except OSError:
            return None
        return name

    def _place(self, name: str, sha256: str, reserved: str | None = None) -> str | None:
        """Move a complete temporary file (closed) to its place by hash (or drop it: a
        copy is there already). The message row that will refer to it is pending until
        written."""
        relative = f"{MESSAGES_DIR}/{sha256[:2]}/{sha256}.eml"
        target = self.data_dir / relative
        try:
            target.parent.mkdir(exist_ok=True)
            with self._lock:
                if target.exists():
                    os.unlink(name)
                else:
                    os.replace(name, target)
                    self._raw_bytes += target.stat().st_size
                if reserved is not None:
                    self._reserved.pop(reserved, None)
                self._pending_raw[sha256] = self._pending_raw.get(sha256, 0) + 1
        except OSError as exc:
            self._warn("cannot store a raw message: %s", exc)
            with contextlib.suppress(OSError):
                os.unlink(name)
            return None
        return relative

    def message(
        self,
        session: Session,
        *,
        message_id: str,
        ts: float,
        mail_from: str,
        rcpt_tos: Sequence[str],
        raw: RawMessage,
        subject: str | None,
        urls: Iterable[str] = (),
        attachments: Iterable[Any] = (),
        analysis_truncated: str | None = None,
    ) -> None:
        """Record a message (``attachments``: objects with ``filename``, ``content_type``,
        ``size`` and ``sha256``, such as :class:`mailgate.honeypot.extract.Attachment`;
        ``analysis_truncated``: the limit that cut the analysis short, None if none did)."""
        rcpts = [str(r) for r in rcpt_tos]
        urls = list(urls)
        attachments = list(attachments)
        self._put(
            _MESSAGE,
            (
                message_id,
                session.id,
                ts,
                str(mail_from),
                json.dumps(rcpts),
                raw.size,
                raw.sha256,
                raw.path,
                subject,
                analysis_truncated,
            ),
            None,
        )
        for url in urls:
            self._put(_URL, (message_id, url), None)
        for item in attachments:
            self._put(
                _ATTACHMENT,
                (message_id, item.filename, item.content_type, item.size, item.sha256),
                None,
            )
        if self.jsonl:
            self._put_json(
                {
                    "type": "message",
                    "ts": ts,
                    "session": session.id,
                    "peer_ip": session.peer_host,
                    "id": message_id,
                    "mail_from": str(mail_from),
                    "rcpt_tos": rcpts,
                    "size": raw.size,
                    "sha256": raw.sha256,
                    "path": raw.path,
                    "subject": subject,
                    "analysis_truncated": analysis_truncated,
                    "urls": urls,
                    "attachments": [
                        {
                            "filename": a.filename,
                            "content_type": a.content_type,
                            "size": a.size,
                            "sha256": a.sha256,
                        }
                        for a in attachments
                    ],
                }
            )

    # --- the total cap while receiving ---------------------------------------------------------------

    @property
    def stored_bytes(self) -> int:
        """The database files and the raw files on disk now (as last measured)."""
        return self._db_bytes + self._raw_bytes

    def reserved_bytes(self) -> int:
        """Bytes reserved for messages in flight."""
        with self._lock:
            return sum(self._reserved.values())

    def reserve_incoming(self, key: str, size: int) -> bool:
        """Reserve ``size`` bytes for a message about to be received (``key``: one per
        message in flight, replacing an earlier reservation under it): False when that
        would take the store over its total cap. Always True without a cap."""
        cap = self.max_total_bytes
        if cap is not None:
            self._db_bytes = self._db_files_size()  # three stat calls: cheap, and current
        with self._lock:
            self._reserved.pop(key, None)
            if cap is not None:
                used = self._db_bytes + self._raw_bytes + sum(self._reserved.values())
                # Room is left for the database to grow (rows, the WAL) meanwhile.
                if used + size > cap - self.journal_limit():
                    return False
            self._reserved[key] = size
            return True

    def release_incoming(self, key: str) -> None:
        """The message reserved under ``key`` is stored (its raw file counts now) or gone."""
        with self._lock:
            self._reserved.pop(key, None)

    def make_room(self, size: int, timeout: float = 5.0) -> None:
        """Prune the oldest finished sessions until ``size`` more bytes fit under the cap
        with what is stored and reserved, as far as pruning can (blocking: call it in a
        worker thread). Returns when the writer has done it, or after ``timeout``."""
        if self.max_total_bytes is None or self._closed or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put((_MAKE_ROOM, done, size))
        done.wait(timeout)

    def journal_limit(self) -> int:
        """Bytes the database's WAL is kept to: 1/16 of the cap (64 KiB to 8 MiB)."""
        cap = self.max_total_bytes
        return 8 * 1024**2 if cap is None else max(64 * 1024, min(8 * 1024**2, cap // 16))

    def _db_files_size(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    # --- control -----------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record queued so far is written (and, with
        ``check_interval=0``, the caps enforced). False on timeout."""
        if self._closed or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the writer thread and close the files. Idempotent;
        records after this are dropped."""
        if self._closed:
            return
        self._closed = True
        self._queue.put((_STOP,))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("capture store: the writer did not finish within %.0f s", timeout)

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- queueing ----------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Records waiting for the writer thread."""
        return self._queue.qsize()

    @property
    def queued_bytes(self) -> int:
        """Estimated memory the records waiting for the writer take."""
        return self._put_bytes - self._taken_bytes

    def _backlogged(self) -> bool:
        """The queue is at its bound: new transcript lines are not taken."""
        return (
            self._put_bytes - self._taken_bytes >= self.max_queue_bytes
            or self._queue.qsize() >= self.max_queue
        )

    def _put(self, kind: int, params: tuple[Any, ...], obj: dict[str, Any] | None) -> None:
        # Transcript lines were admitted by line(); everything else may use up to twice
        # the bound, so that sessions, credentials and messages outlast the transcripts.
        if (
            self._closed
            or self._queue.qsize() >= 2 * self.max_queue
            or self._put_bytes - self._taken_bytes >= 2 * self.max_queue_bytes
        ):
            self.dropped += 1
            if not self._closed:
                self._warn("capture store: the writer falls behind; records dropped")
            return
        size = _record_size(params, obj)
        with self._put_lock:
            self._put_bytes += size
        self._queue.put((kind, params, obj, size))

    def _put_json(self, obj: dict[str, Any]) -> None:
        self._put(-1, (), obj)

    def _warn(self, message: str, *args: Any) -> None:
        """Log a storage problem at most once a minute (a full disk fails every batch)."""
        now = time.monotonic()
        if now - self._last_warning < 60.0:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last_warning = now
        more = f" ({suppressed} more since the last message)" if suppressed else ""
        log.error(message + more, *args)

    # --- the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        db = self._connect()
        next_check = time.monotonic()  # the first check right away: the cap may be new
        stopping = False
        try:
            while not stopping:
                batch, controls = self._take_batch()
                if batch:
                    db = db or self._connect()
                    self._write(db, batch)
                    self._write_jsonl(batch)
                if any(c[0] == _STOP for c in controls):
                    stopping = True
                if self.max_total_bytes is not None and batch:
                    self._db_bytes = self._db_files_size()
                need = max((c[2] for c in controls if c[0] == _MAKE_ROOM), default=None)
                if need is not None and self.max_total_bytes is not None and db is not None:
                    self._enforce_cap(db, need)
                now = time.monotonic()
                if self.max_total_bytes is not None and (
                    now >= next_check or (self.check_interval == 0 and (batch or controls))
                ):
                    next_check = now + self.check_interval
                    if db is not None:
                        self._enforce_cap(db)
                for control in controls:
                    if control[0] in (_FLUSH, _MAKE_ROOM):
                        control[1].set()
        except Exception:  # pragma: no cover - a bug here must not take the server down
            log.exception("capture store: the writer thread failed; recording stops")
            self._closed = True
        finally:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            if self._jsonl_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._jsonl_fd)
                self._jsonl_fd = None
            # Anyone still waiting on a flush is let go.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] in (_FLUSH, _MAKE_ROOM):
                    item[1].set()

    def _connect(self) -> sqlite3.Connection | None:
        try:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            # The WAL counts against a cap as any file: checkpoint it well before it could
            # matter (SQLite's default lets it grow to 4 MiB between checkpoints).
            limit = self.journal_limit()
            db.execute(f"PRAGMA journal_size_limit = {limit}")
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA wal_autocheckpoint = {max(16, min(1000, limit // page_size))}")
            return db
        except sqlite3.Error as exc:
            self._warn("capture store: cannot open %s: %s", self.path, exc)
            return None

    def _take_batch(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Up to batch_rows records, waiting at most batch_seconds after the first; a
        control record (flush, stop) ends the batch at once."""
        batch: list[tuple[Any, ...]] = []
        controls: list[tuple[Any, ...]] = []
        try:
            item = self._queue.get(timeout=0.5)
        except queue.Empty:
            return batch, controls
        deadline = time.monotonic() + self.batch_seconds
        while True:
            if item[0] >= _FLUSH:
                controls.append(item)
                break
            self._taken_bytes += item[3]
            batch.append(item)
            if len(batch) >= self.batch_rows:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
        return batch, controls

    def _write(self, db: sqlite3.Connection | None, batch: list[tuple[Any, ...]]) -> None:
        rows = [item for item in batch if item[0] >= 0]
        if not rows:
            return
        pending = [item[1][6] for item in rows if item[0] == _MESSAGE and item[1][7] is not None]
        try:
            if db is None:
                raise sqlite3.OperationalError("the database is not open")
            db.execute("BEGIN IMMEDIATE")
            try:
                start = 0
                while start < len(rows):
                    kind = rows[start][0]
                    end = start + 1
                    while end < len(rows) and rows[end][0] == kind:
                        end += 1
                    params = [row[1] for row in rows[start:end]]
                    if kind == _EVENT and len(params) > 1:
                        _insert_events(db, params)
                    else:
                        db.executemany(_SQL[kind], params)
                    start = end
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self.dropped += len(rows)
            self._warn(
                "capture store: cannot write %d records to %s: %s", len(rows), self.path, exc
            )
            self._release(pending, failed=True, db=db)
            return
        self._release(pending, failed=False, db=db)

    def _release(self, hashes: list[str], *, failed: bool, db: sqlite3.Connection | None) -> None:
        """The message rows of these raw files are written (or lost): they may be pruned
        now; a lost row's raw file that nothing else refers to is removed."""
        if not hashes:
            return
        with self._lock:
            for sha256 in hashes:
                count = self._pending_raw.get(sha256, 0) - 1
                if count > 0:
                    self._pending_raw[sha256] = count
                    continue
                self._pending_raw.pop(sha256, None)
                if failed and db is not None:
                    with contextlib.suppress(sqlite3.Error, OSError):
                        if not _referenced(db, sha256):
                            self._unlink_raw(sha256)

    def _write_jsonl(self, batch: list[tuple[Any, ...]]) -> None:
        if not self.jsonl:
            return
        lines = []
        for item in batch:
            obj = item[2]
            if obj is not None:
                obj["time"] = _iso(obj["ts"])
                # Escaped like the reports: a SIEM or a terminal tailing the file must not
                # act on the attacker's control or bidi characters.
                lines.append(json_text(obj, separators=(",", ":")))
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        try:
            if self._jsonl_fd is None:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._jsonl_fd, view) :]
        except (OSError, ValueError, AttributeError) as exc:  # AttributeError: no .buffer
            self.dropped += len(lines)
            self._warn("capture store: cannot write JSON lines: %s", exc)

    # --- the total cap -------------------------------------------------------------------------------

    def total_bytes(self, db: sqlite3.Connection | None = None) -> int:
        """Database pages in use plus the raw files the messages refer to."""
        own = db is None
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0)
        try:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            return int((pages - free) * page_size + _raw_total(db))
        finally:
            if own:
                db.close()

    def _enforce_cap(self, db: sqlite3.Connection, need: int = 0) -> None:
        """Prune the oldest finished sessions while the database (its live pages) and the
        raw files, with what is reserved for messages in flight and ``need`` bytes more,
        are over the cap: down to 90 % of it."""
        cap = self.max_total_bytes
        assert cap is not None
        try:
            total = self.total_bytes(db)
            with self._lock:
                reserved = sum(self._reserved.values())
            # On disk the database may be larger than its live pages (the WAL, free pages).
            on_disk = max(total, self._db_bytes + self._raw_bytes)
            if total <= cap and on_disk + reserved + need <= cap:
                self.full = False
                return
            target = cap * 0.9 - reserved - need - (on_disk - total)
            pruned = 0
            for _ in range(_PRUNE_ROUNDS):
                removed = self._prune_oldest(db, total - target)
                if not removed:
                    break
                pruned += removed
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA incremental_vacuum")
                total = self.total_bytes(db)
                if total <= target:
                    break
            if pruned:
                # Give the deleted pages back to the file system: the WAL holds them too.
                with contextlib.suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db_bytes = self._db_files_size()
            was_full, self.full = self.full, total > cap
            if pruned:
                log.info(
                    "capture store: pruned the %d oldest sessions; %d bytes in use (cap %d)",
                    pruned,
                    total,
                    cap,
                )
            if self.full and not was_full:
                log.warning(
                    "capture store: %d bytes in use, over the cap of %d with nothing left to"
                    " prune: raw messages and transcript lines are not kept for now",
                    total,
                    cap,
                )
        except (sqlite3.Error, OSError) as exc:
            self._warn("capture store: cannot enforce the size cap: %s", exc)

    def _prune_oldest(self, db: sqlite3.Connection, excess: float) -> int:
        """Delete the oldest finished sessions that (by their transcript and raw message
        bytes) make up ``excess``, at least one and at most a chunk, with everything they
        own; returns how many were deleted."""
        with self._lock:
            live = set(self._live)
        stale = self.clock() - _STALE_OPEN
        ids: list[str] = []
        freed = 0
        for sid, size in db.execute(
            "SELECT id, bytes + coalesce((SELECT sum(size) FROM messages"
            " WHERE session_id = sessions.id AND path IS NOT NULL), 0) FROM sessions"
            " WHERE ended IS NOT NULL OR started < ? ORDER BY started LIMIT ?",
            (stale, _PRUNE_CHUNK + len(live)),
        ):
            if sid in live:
                continue
            ids.append(sid)
            freed += size
            if freed >= excess or len(ids) >= _PRUNE_CHUNK:
                break
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        db.execute("BEGIN IMMEDIATE")
        try:
            hashes = [
                row[0]
                for row in db.execute(
                    f"SELECT DISTINCT sha256 FROM messages WHERE session_id IN ({marks})"
                    " AND path IS NOT NULL",
                    ids,
                )
            ]
            messages = f"SELECT id FROM messages WHERE session_id IN ({marks})"
            db.execute(f"DELETE FROM urls WHERE message_id IN ({messages})", ids)
            db.execute(f"DELETE FROM attachments WHERE message_id IN ({messages})", ids)
            db.execute(f"DELETE FROM messages WHERE session_id IN ({marks})", ids)
            db.execute(f"DELETE FROM events WHERE session_id IN ({marks})", ids)
            db.execute(f"DELETE FROM auth_attempts WHERE session_id IN ({marks})", ids)
            db.execute(f"DELETE FROM sessions WHERE id IN ({marks})", ids)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        with self._lock:
            for sha256 in hashes:
                if sha256 in self._pending_raw or _referenced(db, sha256):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self._unlink_raw(sha256)
        return len(ids)

    def _unlink_raw(self, sha256: str) -> None:
        """Remove a raw file (the lock held) and take it off the count."""
        path = self.data_dir / MESSAGES_DIR / sha256[:2] / f"{sha256}.eml"
        size = path.stat().st_size
        os.unlink(path)
        self._raw_bytes = max(0, self._raw_bytes - size)


def _raw_total(db: sqlite3.Connection) -> int:
    """Bytes of the raw files the messages refer to (each file once)."""
    row = db.execute(
        "SELECT coalesce(sum(size), 0) FROM (SELECT max(size) AS size FROM messages"
        " WHERE path IS NOT NULL GROUP BY path)"
    ).fetchone()
    return int(row[0])


def _referenced(db: sqlite3.Connection, sha256: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM messages WHERE sha256 = ? AND path IS NOT NULL LIMIT 1", (sha256,)
    ).fetchone()
    return row is not None


def _discard(tmp: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        tmp.close()
    with contextlib.suppress(OSError):
        os.unlink(tmp.name)


def _text(raw: bytes) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", "backslashreplace")


def _replies(lines: list[str]) -> list[list[str]]:
    """Reply lines grouped into replies: a reply ends with a line whose fourth character
    is not ``-``."""
    replies: list[list[str]] = []
    current: list[str] = []
    for text in lines:
        current.append(text)
        if len(text) < 4 or text[3] != "-":
            replies.append(current)
            current = []
    if current:
        replies.append(current)
    return replies


def _code(line: str) -> int | None:
    head = line[:3]
    return int(head) if len(head) == 3 and head.isdigit() else None


def _tls_json(session: Session) -> dict[str, Any] | None:
    tls = session.tls
    if tls is None:
        return None
    return {"version": tls.version, "cipher": tls.cipher, "sni": tls.server_name}


#: Transcript lines per INSERT statement (4 parameters each; SQLite allows 32766).
_EVENTS_PER_INSERT = 200
_EVENT_VALUES: dict[int, str] = {}


def _insert_events(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Transcript lines in multi-row INSERTs: one statement step per 200 lines instead of
    one per line (each step hands the GIL over and back, which a busy event loop makes
    slow)."""
    for start in range(0, len(rows), _EVENTS_PER_INSERT):
        chunk = rows[start : start + _EVENTS_PER_INSERT]
        sql = _EVENT_VALUES.get(len(chunk))
        if sql is None:
            sql = _EVENT_VALUES[len(chunk)] = (
                "INSERT INTO events (session_id, ts, direction, line) VALUES "
                + ",".join(["(?, ?, ?, ?)"] * len(chunk))
            )
        db.execute(sql, [value for row in chunk for value in row])


#: What one queued record costs beyond its strings (the tuples, a float, the str headers),
#: and a JSON-lines dict beyond its values: measured with the writer stalled, 200,000
#: records of 50-character lines (half of them JSON) took 76 MB.
_RECORD_OVERHEAD = 200
_JSON_OVERHEAD = 400


def _record_size(params: tuple[Any, ...], obj: dict[str, Any] | None) -> int:
    """An estimate of the memory one queued record holds: fixed overheads plus the
    lengths of its strings (what varies with what attackers send)."""
    size = _RECORD_OVERHEAD
    for value in params:
        if isinstance(value, str | bytes):
            size += len(value)
    if obj is not None:
        size += _JSON_OVERHEAD
        for value in obj.values():
            if isinstance(value, str):
                size += len(value)
            elif isinstance(value, list):
                size += sum(len(v) for v in value if isinstance(v, str))
    return size


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
