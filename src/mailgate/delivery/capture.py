"""Capture mode: every accepted message kept in an indexed store, for a developer's inbox.

``mailgate serve --capture DIR`` (``capture`` in ``[server]``) keeps each accepted message
as ``DIR/messages/<id>.eml`` and indexes its envelope and main header fields in
``DIR/index.sqlite3``, so that the console can list, search, show and delete them (like
Mailpit). The store has a size cap (``capture_max_size``): when the messages kept exceed
it, the oldest are removed first.

A delivery like Maildir's, in two phases: the file is written and synced under a
temporary name by the message hook, and becomes visible (renamed and indexed) only once
every required delivery of the message has accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final

from mailgate.hooks import Envelope, HookError, Message, Session

__all__ = ["CaptureDelivery", "CapturedMessage", "CapturedMessages", "MessageQuery"]

INDEX_NAME: Final = "index.sqlite3"
MESSAGES_DIR: Final = "messages"
#: Header bytes read for the index (the rest of a large message is not parsed at delivery).
_HEAD_BYTES: Final = 64 * 1024

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    received REAL NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    subject TEXT,
    from_header TEXT,
    to_header TEXT,
    date_header TEXT,
    message_id TEXT,
    size INTEGER NOT NULL,
    client TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_received ON messages(received);
"""


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """One message of the index."""

    id: str
    received: float
    sender: str
    recipients: tuple[str, ...]
    subject: str | None
    from_header: str | None
    to_header: str | None
    date_header: str | None
    message_id: str | None
    size: int
    client: str


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """Which messages :meth:`CapturedMessages.search` returns: each given criterion must
    match (text criteria: a case-insensitive substring; ``text`` looks in sender,
    recipients, From, To and Subject), newest first, ``offset`` skipped, ``limit`` at
    most."""

    text: str | None = None
    sender: str | None = None
    recipient: str | None = None
    subject: str | None = None
    since: float | None = None
    before: float | None = None
    limit: int = 50
    offset: int = 0


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class CapturedMessages:
    """The capture store of one directory; its methods block (call them from a thread)."""

    def __init__(self, directory: Path, *, max_bytes: int | None = 1024**3) -> None:
        self.directory = Path(directory)
        self.messages_dir = self.directory / MESSAGES_DIR
        self.max_bytes = max_bytes
        self.messages_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.directory / INDEX_NAME, check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        #: Incremented on every change (new message, deletion): live views poll it.
        self.version = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def path_of(self, message_id: str) -> Path:
        if not message_id or not message_id.isalnum():
            raise KeyError(message_id)
        return self.messages_dir / f"{message_id}.eml"

    # --- writing ----------------------------------------------------------------------

    def stage(self, message_id: str, source: Path) -> Path:
        """Copy ``source`` to a temporary file of the store, synced; its path."""
        staged = self.messages_dir / f".{message_id}.tmp"
        with source.open("rb") as reader, staged.open("wb") as writer:
            while chunk := reader.read(256 * 1024):
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        return staged

    def commit(self, staged: Path, message_id: str, session: Session, envelope: Envelope) -> None:
        """Make a staged message visible: renamed to its place and indexed; then prune
        the oldest messages while the store is over its cap."""
        final = self.path_of(message_id)
        os.replace(staged, final)
        with final.open("rb") as file:
            head = file.read(_HEAD_BYTES)
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)

        def field(name: str) -> str | None:
            try:
                value = parsed.get(name)
            except Exception:  # a malformed header is indexed as absent, never fatal
                return None
            return str(value) if value is not None else None

        row = (
            message_id,
            time.time(),
            envelope.sender,
            json.dumps([str(r) for r in envelope.rcpt_tos]),
            field("Subject"),
            field("From"),
            field("To"),
            field("Date"),
            field("Message-ID"),
            final.stat().st_size,
            session.peer_host,
        )
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            self.version += 1
        self.prune()

    def abort(self, staged: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()

    def prune(self) -> int:
        """Remove the oldest messages while the store is over ``max_bytes``; how many."""
        if self.max_bytes is None:
            return 0
        removed = 0
        with self._lock:
            total = self._db.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()[0]
            if total <= self.max_bytes:
                return 0
            oldest_first = self._db.execute("SELECT id, size FROM messages ORDER BY received, id")
            for row in oldest_first.fetchall():
                if total <= self.max_bytes:
                    break
                self._remove(row["id"])
                total -= row["size"]
                removed += 1
            self.version += 1
        return removed

    def _remove(self, message_id: str) -> None:
        self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        with contextlib.suppress(FileNotFoundError):
            self.path_of(message_id).unlink()

    def delete(self, message_id: str) -> bool:
        with self._lock:
            found = self._db.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,))
            if found.fetchone() is None:
                return False
            self._remove(message_id)
            self.version += 1
        return True

    def delete_all(self) -> int:
        with self._lock:
            ids = [row["id"] for row in self._db.execute("SELECT id FROM messages")]
            for message_id in ids:
                self._remove(message_id)
            self.version += 1
        return len(ids)

    # --- reading ----------------------------------------------------------------------

    def search(self, query: MessageQuery) -> tuple[list[CapturedMessage], int]:
        """The messages ``query`` matches (one page) and how many match in all."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("sender", query.sender),
            ("recipients", query.recipient),
            ("subject", query.subject),
        ):
            if value:
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append(_like(value))
        if query.text:
            where.append(
                "(sender LIKE ?1 ESCAPE '\\' OR recipients LIKE ?1 ESCAPE '\\' OR "
                "subject LIKE ?1 ESCAPE '\\' OR from_header LIKE ?1 ESCAPE '\\' OR "
                "to_header LIKE ?1 ESCAPE '\\')".replace("?1", "?")
            )
            args.extend([_like(query.text)] * 5)
        if query.since is not None:
            where.append("received >= ?")
            args.append(query.since)
        if query.before is not None:
            where.append("received < ?")
            args.append(query.before)
        condition = " AND ".join(where) or "1"
        with self._lock:
            total = self._db.execute(f"SELECT count(*) FROM messages WHERE {condition}", args)
            count = int(total.fetchone()[0])
            rows = self._db.execute(
                f"SELECT * FROM messages WHERE {condition} ORDER BY received DESC, id DESC"
                " LIMIT ? OFFSET ?",
                [*args, query.limit, query.offset],
            ).fetchall()
        return [_captured(row) for row in rows], count

    def get(self, message_id: str) -> CapturedMessage | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return _captured(row) if row is not None else None

    def raw(self, message_id: str) -> bytes:
        """The message as received (with the server's Received header)."""
        return self.path_of(message_id).read_bytes()

    def parsed(self, message_id: str) -> EmailMessage:
        with self.path_of(message_id).open("rb") as file:
            message = email.parser.BytesParser(policy=email.policy.default).parse(file)
        assert isinstance(message, EmailMessage)
        return message

    def stats(self) -> tuple[int, int]:
        """(messages, bytes) in the store."""
        with self._lock:
            row = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM messages")
            count, size = row.fetchone()
        return int(count), int(size)


def _captured(row: sqlite3.Row) -> CapturedMessage:
    return CapturedMessage(
        id=row["id"],
        received=row["received"],
        sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])),
        subject=row["subject"],
        from_header=row["from_header"],
        to_header=row["to_header"],
        date_header=row["date_header"],
        message_id=row["message_id"],
        size=row["size"],
        client=row["client"],
    )


def message_parts(message: EmailMessage) -> dict[str, Any]:
    """The readable parts of a message: its headers, plain text, HTML and attachments
    (numbered in walk order, for :func:`attachment`)."""
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    return {
        "headers": [[name, value] for name, value in _headers(message)],
        "text": _content(text),
        "html": _content(html),
        "attachments": [
            {
                "index": index,
                "filename": part.get_filename(),
                "content_type": part.get_content_type(),
                "size": _payload_size(part),
            }
            for index, part in enumerate(_attachments(message))
        ],
    }


def attachment(message: EmailMessage, index: int) -> tuple[str | None, str, bytes] | None:
    """(filename, content type, bytes) of attachment ``index``, or None."""
    for number, part in enumerate(_attachments(message)):
        if number == index:
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            return part.get_filename(), part.get_content_type(), data
    return None


def _payload_size(part: EmailMessage) -> int:
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def _headers(message: EmailMessage) -> Iterator[tuple[str, str]]:
    """Every header field in order, encoded words decoded (a malformed one as sent)."""
    for name, raw in message.raw_items():
        try:
            value = str(message.policy.header_fetch_parse(name, raw))
        except Exception:
            value = str(raw)
        yield name, value


def _attachments(message: EmailMessage) -> Iterator[EmailMessage]:
    for part in message.iter_attachments():
        assert isinstance(part, EmailMessage)
        yield part


def _content(part: Any) -> str | None:
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset, a broken transfer encoding
        payload = part.get_payload(decode=True) or b""
        return bytes(payload).decode("utf-8", "replace")
    return content if isinstance(content, str) else None


class CaptureDelivery:
    """The message hook of capture mode: every accepted message into a
    :class:`CapturedMessages` store."""

    name = "capture"

    def __init__(self, directory: Path, *, max_bytes: int | None = 1024**3) -> None:
        self.store = CapturedMessages(directory, max_bytes=max_bytes)

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError("capture needs spooled message bytes")
        loop = asyncio.get_running_loop()
        store, source, message_id = self.store, message.path, message.id
        staged = await loop.run_in_executor(None, store.stage, message_id, source)
        message.stage(
            lambda: store.commit(staged, message_id, session, envelope),
            lambda: store.abort(staged),
            name=self.name,
        )

    async def aclose(self) -> None:
        self.store.close()
