"""Reports on a honeypot's capture store: a summary, the sessions, one session's transcript.

Everything here reads ``DATA_DIR/capture.sqlite3`` through a read-only connection
(``file:...?mode=ro``), so it works while the honeypot runs and writes (the store is in
WAL mode: readers see the last committed batch and never block the writer).

Three functions gather plain data (dicts and lists, the JSON output as it is) and three
format it as a table for people, JSON or CSV:

- :func:`summary` / :func:`format_summary`: sessions, unique IPs, AUTH attempts,
  messages, and the top IPs, user names, passwords, commands, HELO names, senders, URLs
  and attachments;
- :func:`sessions` / :func:`format_sessions`: one line per session, newest first;
- :func:`session_detail` / :func:`format_session`: one session's transcript with its
  AUTH attempts and messages in time order.

Captured text is the attacker's: every format escapes control characters and the
Unicode characters that reorder text (:mod:`mailgate.honeypot.safetext`). Table, text and
CSV output show them as ``\\xNN``/``\\uNNNN`` (table and text also cut long values);
JSON writes them as ``\\uNNNN`` escapes, which decode to the captured value. CSV keeps
everything else as captured (beware of spreadsheet formulas).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .safetext import escape_controls, json_text
from .store import DB_NAME, SCHEMA_VERSION

__all__ = [
    "FORMATS",
    "ReportError",
    "format_session",
    "format_sessions",
    "format_summary",
    "message_file",
    "messages",
    "open_database",
    "parse_since",
    "session_detail",
    "sessions",
    "summary",
    "timeline",
]

FORMATS: Final = ("table", "json", "csv")
#: The top lists of the summary: name -> heading.
TOP_LISTS: Final = {
    "ips": "Top IP addresses (sessions)",
    "usernames": "Top user names (AUTH attempts)",
    "passwords": "Top passwords (AUTH attempts)",
    "credentials": "Top user name and password pairs",
    "commands": "Top commands (client lines by verb)",
    "helos": "Top HELO/EHLO names (sessions)",
    "senders": "Top senders (messages)",
    "urls": "Top URLs (messages)",
    "attachments": "Top attachments by SHA-256 (messages)",
}
_WIDTH: Final = 100  # longest value shown in a table cell
#: Most buckets a timeline gives.
_TIMELINE_POINTS: Final = 2000


class ReportError(Exception):
    """A problem to report in one line (no data directory, no database...)."""


# --- opening ------------------------------------------------------------------------------------


def open_database(data_dir: str | Path) -> sqlite3.Connection:
    """A read-only connection to the capture store in ``data_dir``."""
    directory = Path(data_dir)
    if not directory.exists():
        raise ReportError(f"data directory {directory} does not exist")
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory")
    path = directory / DB_NAME
    if not path.is_file():
        raise ReportError(
            f"no capture database in {directory} ({DB_NAME} not found); give the "
            "--data-dir of a honeypot that has run"
        )
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=10.0)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if version > SCHEMA_VERSION or not {"sessions", "events", "messages"} <= tables:
        db.close()
        raise ReportError(
            f"{path} is not a capture database this mailgate can read "
            f"(schema version {version}, this mailgate knows {SCHEMA_VERSION})"
        )
    db.row_factory = sqlite3.Row
    return db


_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``; plain seconds) or a
    date or time in ISO 8601 (``2026-12-01``, ``2026-12-01T10:00``; UTC unless it says
    otherwise) -> Unix time; None or ``all`` -> None (everything)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    moment = time.time() if now is None else now
    match = _DURATION.fullmatch(text.strip())
    if match:
        return moment - float(match[1]) * _UNITS[match[2].lower()]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(
            f"--since: {text!r} is neither a duration (30m, 24h, 7d) nor a date "
            "(2026-12-01, 2026-12-01T10:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# --- the summary ---------------------------------------------------------------------------------


def summary(db: sqlite3.Connection, *, since: float | None = None, top: int = 10) -> dict[str, Any]:
    """Counts and top lists of what was captured since ``since`` (None: ever). Each top
    list is a list of ``{"value", "count"}`` dicts (attachments also ``filename``,
    ``size``), biggest first, ``top`` at most."""
    start = since if since is not None else float("-inf")
    one = _one(db)
    result: dict[str, Any] = {
        "generated": _iso(time.time()),
        "since": _iso(since) if since is not None else None,
        "sessions": one("SELECT count(*) FROM sessions WHERE started >= ?", start),
        "unique_ips": one("SELECT count(DISTINCT peer_ip) FROM sessions WHERE started >= ?", start),
        "first_session": _iso(one("SELECT min(started) FROM sessions WHERE started >= ?", start)),
        "last_session": _iso(one("SELECT max(started) FROM sessions WHERE started >= ?", start)),
        "tls_sessions": one(
            "SELECT count(*) FROM sessions WHERE started >= ? AND tls_version IS NOT NULL", start
        ),
        "auth_attempts": one("SELECT count(*) FROM auth_attempts WHERE ts >= ?", start),
        "auth_accepted": one(
            "SELECT count(*) FROM auth_attempts WHERE ts >= ? AND outcome = 'accepted'", start
        ),
        "messages": one("SELECT count(*) FROM messages WHERE ts >= ?", start),
        "distinct_messages": one(
            "SELECT count(DISTINCT sha256) FROM messages WHERE ts >= ?", start
        ),
        "message_bytes": one("SELECT coalesce(sum(size), 0) FROM messages WHERE ts >= ?", start),
        "recipients": one(
            "SELECT coalesce(sum(json_array_length(rcpt_tos)), 0) FROM messages WHERE ts >= ?",
            start,
        ),
    }

    def counted(value: str, table: str, where: str) -> list[dict[str, Any]]:
        sql = (
            f"SELECT {value} AS value, count(*) AS n FROM {table} WHERE {where}"
            " GROUP BY value ORDER BY n DESC, value LIMIT ?"
        )
        return _top(db, sql, start, top)

    tops: dict[str, list[dict[str, Any]]] = {
        "ips": counted("peer_ip", "sessions", "started >= ?"),
        "usernames": counted("username", "auth_attempts", "ts >= ? AND username IS NOT NULL"),
        "passwords": counted("password", "auth_attempts", "ts >= ? AND password IS NOT NULL"),
        "credentials": counted(
            "username || ':' || password",
            "auth_attempts",
            "ts >= ? AND username IS NOT NULL AND password IS NOT NULL",
        ),
        "commands": _top_commands(db, start, top),
        "helos": counted("helo", "sessions", "started >= ? AND helo IS NOT NULL"),
        "senders": counted("mail_from", "messages", "ts >= ?"),
        "urls": counted("u.url", "urls u JOIN messages m ON m.id = u.message_id", "m.ts >= ?"),
        "attachments": [
            {
                "value": row["sha256"],
                "count": row["n"],
                "filename": row["filename"],
                "size": row["size"],
            }
            for row in db.execute(
                "SELECT a.sha256, count(*) AS n, max(a.filename) AS filename,"
                " max(a.size) AS size FROM attachments a"
                " JOIN messages m ON m.id = a.message_id WHERE m.ts >= ?"
                " GROUP BY a.sha256 ORDER BY n DESC, a.sha256 LIMIT ?",
                (start, top),
            )
        ],
    }
    result["top"] = tops
    return result


def totals(db: sqlite3.Connection) -> dict[str, int]:
    """All-time counts of the store (cheap: no top lists), for the metrics exporter."""
    one = _one(db)
    return {
        "sessions": one("SELECT count(*) FROM sessions"),
        "auth_attempts": one("SELECT count(*) FROM auth_attempts"),
        "messages": one("SELECT count(*) FROM messages"),
    }


def _one(db: sqlite3.Connection) -> Any:
    def query(sql: str, *args: Any) -> Any:
        return db.execute(sql, args).fetchone()[0]

    return query


def _top(db: sqlite3.Connection, sql: str, start: float, top: int) -> list[dict[str, Any]]:
    return [{"value": row[0], "count": row[1]} for row in db.execute(sql, (start, top))]


def _top_commands(db: sqlite3.Connection, start: float, top: int) -> list[dict[str, Any]]:
    """Client lines counted by their first word, upper-cased. Lines that answer a 334
    challenge (SASL responses: base64 credentials) are not commands and are left out."""
    sql = """
        SELECT upper(substr(line, 1, instr(line || ' ', ' ') - 1)) AS value, count(*) AS n
          FROM (SELECT direction, line,
                       lag(direction) OVER w AS prev_direction,
                       lag(line) OVER w AS prev_line
                  FROM events WHERE ts >= ?
                WINDOW w AS (PARTITION BY session_id ORDER BY id))
         WHERE direction = 'c'
           AND NOT (coalesce(prev_direction, '') = 's' AND coalesce(prev_line, '') LIKE '334%')
         GROUP BY value ORDER BY n DESC, value LIMIT ?
    """
    rows = []
    for row in db.execute(sql, (start, top)):
        value = row[0][:32] if row[0] else "(empty line)"
        rows.append({"value": value, "count": row[1]})
    return rows


def format_summary(report: Mapping[str, Any], fmt: str = "table", *, source: str = "") -> str:
    """The summary as ``table``, ``json`` or ``csv`` text (ending with a newline)."""
    if fmt == "json":
        return json_text(report, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = _SafeWriter(csv.writer(out, lineterminator="\n"))
        writer.writerow(["section", "value", "count", "detail"])
        for key, value in report.items():
            if key != "top":
                writer.writerow(["summary", key, "" if value is None else value, ""])
        for name, rows in report["top"].items():
            for row in rows:
                detail = ""
                if name == "attachments":
                    detail = f"{row['filename'] or ''} ({row['size']} bytes)"
                writer.writerow([name, row["value"], row["count"], detail])
        return out.getvalue()
    lines = [
        f"Honeypot report{' for ' + _clean(source) if source else ''} "
        f"({'since ' + report['since'] if report['since'] else 'everything captured'}; "
        "times in UTC)",
        "",
    ]
    facts = [
        ("sessions", f"{report['sessions']} ({report['tls_sessions']} with TLS)"),
        ("unique IPs", report["unique_ips"]),
        ("first session", report["first_session"] or "-"),
        ("last session", report["last_session"] or "-"),
        ("AUTH attempts", f"{report['auth_attempts']} ({report['auth_accepted']} accepted)"),
        (
            "messages",
            f"{report['messages']} ({report['distinct_messages']} distinct, "
            f"{_size(report['message_bytes'])}, {report['recipients']} recipients)",
        ),
    ]
    lines += [f"  {name:<15} {value}" for name, value in facts]
    for name, heading in TOP_LISTS.items():
        rows = report["top"].get(name, [])
        lines += ["", heading]
        if not rows:
            lines.append("  (none)")
            continue
        width = max(len(str(row["count"])) for row in rows)
        for row in rows:
            value = _clean(row["value"])
            if name == "attachments":
                value += f"  {_clean(row['filename'] or '(no name)')}, {_size(row['size'])}"
            lines.append(f"  {row['count']:>{width}}  {value}")
    return "\n".join(lines) + "\n"


# --- sessions ------------------------------------------------------------------------------------


def sessions(
    db: sqlite3.Connection,
    *,
    since: float | None = None,
    ip: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Sessions started since ``since``, newest first, at most ``limit``; ``ip`` an address
    or a network (CIDR) the client must be in."""
    network = _network(ip) if ip is not None else None
    where = ["started >= ?"]
    args: list[Any] = [since if since is not None else float("-inf")]
    if network is not None and network.num_addresses == 1:
        where.append("peer_ip = ?")
        args.append(str(network.network_address))
        network = None
    sql = (
        "SELECT s.*,"
        " (SELECT count(*) FROM auth_attempts a WHERE a.session_id = s.id) AS auth_attempts,"
        " (SELECT count(*) FROM messages m WHERE m.session_id = s.id) AS messages,"
        " (SELECT count(*) FROM events e WHERE e.session_id = s.id AND e.direction = 'c')"
        " AS commands"
        f" FROM sessions s WHERE {' AND '.join(where)} ORDER BY started DESC, id DESC"
    )
    found: list[dict[str, Any]] = []
    for row in db.execute(sql, args):
        if len(found) >= limit:
            break
        if network is not None and not _in(row["peer_ip"], network):
            continue
        found.append(_session_dict(row))
    return found


def credentials(
    db: sqlite3.Connection, *, since: float | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """AUTH attempts since ``since``, newest first, at most ``limit``: mechanism, user
    name, password (token for XOAUTH2/OAUTHBEARER), the answer given, the session and the
    client's address."""
    rows = db.execute(
        "SELECT a.*, s.peer_ip FROM auth_attempts a LEFT JOIN sessions s ON s.id = a.session_id"
        " WHERE a.ts >= ? ORDER BY a.ts DESC, a.id DESC LIMIT ?",
        (since if since is not None else float("-inf"), limit),
    )
    return [
        {
            "time": _iso(row["ts"]),
            "session": row["session_id"],
            "peer_ip": row["peer_ip"],
            "mechanism": row["mechanism"],
            "username": row["username"],
            "password": row["password"],
            "token": row["token"],
            "outcome": row["outcome"],
        }
        for row in rows
    ]


def messages(
    db: sqlite3.Connection, *, since: float | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Messages captured since ``since``, newest first, at most ``limit``: envelope,
    size, digest, subject, the session and client, counts of URLs and attachments, and
    whether the source was kept (``kept``: the raw file is in the data directory)."""
    rows = db.execute(
        "SELECT m.*, s.peer_ip,"
        " (SELECT count(*) FROM urls u WHERE u.message_id = m.id) AS urls,"
        " (SELECT count(*) FROM attachments a WHERE a.message_id = m.id) AS attachments"
        " FROM messages m LEFT JOIN sessions s ON s.id = m.session_id"
        " WHERE m.ts >= ? ORDER BY m.ts DESC, m.id DESC LIMIT ?",
        (since if since is not None else float("-inf"), limit),
    )
    return [
        {
            "id": row["id"],
            "time": _iso(row["ts"]),
            "session": row["session_id"],
            "peer_ip": row["peer_ip"],
            "mail_from": row["mail_from"],
            "rcpt_tos": json.loads(row["rcpt_tos"]),
            "size": row["size"],
            "sha256": row["sha256"],
            "subject": row["subject"],
            "urls": row["urls"],
            "attachments": row["attachments"],
            "kept": row["path"] is not None,
        }
        for row in rows
    ]


def message_file(db: sqlite3.Connection, message_id: str) -> str | None:
    """Where the source of message ``message_id`` is kept, relative to the data
    directory; None when it was not kept (or there is no such message). Only a path the
    store wrote (inside its messages directory) is given."""
    row = db.execute("SELECT path FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None or row["path"] is None:
        return None
    path = Path(row["path"])
    if path.is_absolute() or ".." in path.parts:
        return None
    return str(path)


def timeline(
    db: sqlite3.Connection, *, since: float | None = None, bucket: int = 3600
) -> dict[str, Any]:
    """Sessions, distinct client addresses, AUTH attempts and messages per ``bucket``
    seconds since ``since`` (default: the last 24 buckets), oldest first, every bucket
    present (zeros included) so a chart needs no gap filling."""
    now = time.time()
    start = since if since is not None else now - 24 * bucket
    last = int(now // bucket) * bucket
    # At most _TIMELINE_POINTS buckets: the most recent ones when ``since`` is far back.
    first = max(int(start // bucket) * bucket, last - (_TIMELINE_POINTS - 1) * bucket)
    start = max(start, first)
    count = (last - first) // bucket + 1

    def per_bucket(sql: str) -> dict[int, int]:
        return {int(b): n for b, n in db.execute(sql, (bucket, bucket, start))}

    sessions_at = per_bucket(
        "SELECT CAST(started / ? AS INTEGER) * ?, count(*) FROM sessions"
        " WHERE started >= ? GROUP BY 1"
    )
    ips_at = per_bucket(
        "SELECT CAST(started / ? AS INTEGER) * ?, count(DISTINCT peer_ip) FROM sessions"
        " WHERE started >= ? GROUP BY 1"
    )
    auth_at = per_bucket(
        "SELECT CAST(ts / ? AS INTEGER) * ?, count(*) FROM auth_attempts WHERE ts >= ? GROUP BY 1"
    )
    messages_at = per_bucket(
        "SELECT CAST(ts / ? AS INTEGER) * ?, count(*) FROM messages WHERE ts >= ? GROUP BY 1"
    )
    points = []
    for index in range(count):
        at = first + index * bucket
        points.append(
            {
                "start": _iso(at),
                "sessions": sessions_at.get(at, 0),
                "unique_ips": ips_at.get(at, 0),
                "auth_attempts": auth_at.get(at, 0),
                "messages": messages_at.get(at, 0),
            }
        )
    return {"bucket": bucket, "since": _iso(start), "points": points}


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ReportError(f"--ip: {text!r} is not an IP address or network (CIDR)") from None


def _in(ip: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(ip) in network
    except ValueError:
        return False


def _session_dict(row: sqlite3.Row) -> dict[str, Any]:
    keys = row.keys()
    started, ended = row["started"], row["ended"]
    data: dict[str, Any] = {
        "id": row["id"],
        "started": _iso(started),
        "ended": _iso(ended),
        "duration": round(ended - started, 3) if ended is not None else None,
        "peer_ip": row["peer_ip"],
        "peer_port": row["peer_port"],
        "local_port": row["local_port"],
        "helo": row["helo"],
        "tls": (
            {"version": row["tls_version"], "cipher": row["tls_cipher"], "sni": row["sni"]}
            if row["tls_version"]
            else None
        ),
        "user": row["user"],
        "close_reason": row["close_reason"],
        "bytes": row["bytes"],
        "truncated": bool(row["truncated"]),
    }
    for extra in ("commands", "auth_attempts", "messages"):
        if extra in keys:
            data[extra] = row[extra]
    return data


_SESSION_COLUMNS: Final = (
    ("id", "session"),
    ("started", "started"),
    ("duration", "secs"),
    ("peer", "client"),
    ("helo", "helo"),
    ("tls", "tls"),
    ("user", "user"),
    ("commands", "cmds"),
    ("auth_attempts", "auth"),
    ("messages", "msgs"),
    ("close_reason", "closed"),
)


def format_sessions(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """Sessions (from :func:`sessions`) as ``table``, ``json`` or ``csv`` text."""
    if fmt == "json":
        return json_text(list(rows), indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        fields = [
            "id", "started", "ended", "duration", "peer_ip", "peer_port", "local_port",
            "helo", "tls_version", "tls_cipher", "sni", "user", "commands", "auth_attempts",
            "messages", "close_reason", "bytes", "truncated",
        ]  # fmt: skip
        writer = csv.DictWriter(out, fields, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            tls = row.get("tls") or {}
            cells = {
                **row,
                "tls_version": tls.get("version"),
                "tls_cipher": tls.get("cipher"),
                "sni": tls.get("sni"),
            }
            writer.writerow({key: _csv_cell(value) for key, value in cells.items()})
        return out.getvalue()
    if not rows:
        return "no sessions\n"
    table: list[list[str]] = [[title for _, title in _SESSION_COLUMNS]]
    for row in rows:
        cells = {
            "id": row["id"],
            "started": (row["started"] or "")[:19].replace("T", " "),
            "duration": f"{row['duration']:.1f}" if row["duration"] is not None else "open",
            "peer": f"{row['peer_ip']}:{row['peer_port']}",
            "helo": _clean(row["helo"] or "-", 30),
            "tls": (row["tls"] or {}).get("version") or "-",
            "user": _clean(row["user"] or "-", 20),
            "commands": str(row.get("commands", "")),
            "auth_attempts": str(row.get("auth_attempts", "")),
            "messages": str(row.get("messages", "")),
            "close_reason": row["close_reason"] or "-",
        }
        table.append([cells[key] for key, _ in _SESSION_COLUMNS])
    return _render_table(table)


def _render_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in table
    )


# --- one session ----------------------------------------------------------------------------------


def session_detail(db: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """One session: its row, transcript (``events``), AUTH attempts and messages (with
    URLs and attachments). ``session_id`` may be a unique prefix of the id."""
    row = db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        pattern = session_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        matches = db.execute(
            "SELECT * FROM sessions WHERE id LIKE ? ESCAPE '\\' ORDER BY started LIMIT 6",
            (pattern,),
        ).fetchall()
        if not matches:
            raise ReportError(f"no session {session_id!r} in the capture database")
        if len(matches) > 1:
            shown = ", ".join(m["id"] for m in matches[:5])
            raise ReportError(f"{session_id!r} matches several sessions ({shown}...); give more")
        row = matches[0]
    sid = row["id"]
    events = [
        {"ts": r["ts"], "time": _iso(r["ts"]), "direction": r["direction"], "line": r["line"]}
        for r in db.execute(
            "SELECT ts, direction, line FROM events WHERE session_id = ? ORDER BY id", (sid,)
        )
    ]
    auth = [
        {
            "ts": r["ts"],
            "time": _iso(r["ts"]),
            "mechanism": r["mechanism"],
            "username": r["username"],
            "password": r["password"],
            "token": r["token"],
            "outcome": r["outcome"],
        }
        for r in db.execute("SELECT * FROM auth_attempts WHERE session_id = ? ORDER BY id", (sid,))
    ]
    messages = []
    for r in db.execute("SELECT * FROM messages WHERE session_id = ? ORDER BY ts", (sid,)):
        messages.append(
            {
                "ts": r["ts"],
                "time": _iso(r["ts"]),
                "id": r["id"],
                "mail_from": r["mail_from"],
                "rcpt_tos": json.loads(r["rcpt_tos"]),
                "size": r["size"],
                "sha256": r["sha256"],
                "path": r["path"],
                "subject": r["subject"],
                # A database of schema version 1 (not yet opened by a newer honeypot).
                "analysis_truncated": (
                    r["analysis_truncated"] if "analysis_truncated" in r.keys() else None  # noqa: SIM118 - a Row
                ),
                "urls": [
                    u[0]
                    for u in db.execute(
                        "SELECT url FROM urls WHERE message_id = ? ORDER BY rowid", (r["id"],)
                    )
                ],
                "attachments": [
                    dict(a)
                    for a in db.execute(
                        "SELECT filename, content_type, size, sha256 FROM attachments"
                        " WHERE message_id = ? ORDER BY rowid",
                        (r["id"],),
                    )
                ],
            }
        )
    return {"session": _session_dict(row), "events": events, "auth": auth, "messages": messages}


def format_session(detail: Mapping[str, Any], fmt: str = "text") -> str:
    """A session (from :func:`session_detail`) as a ``text`` transcript or ``json``."""
    if fmt == "json":
        return json_text(detail, indent=2) + "\n"
    s = detail["session"]
    tls = s["tls"]
    header = [
        f"session {s['id']}",
        f"  client     {s['peer_ip']} port {s['peer_port']} (to local port {s['local_port']})",
        f"  started    {s['started']}",
        f"  ended      {s['ended'] or '(still open, or the honeypot stopped abruptly)'}"
        + (f" after {s['duration']:.1f} s" if s["duration"] is not None else ""),
        f"  closed     {s['close_reason'] or '-'}",
        f"  helo       {_clean(s['helo'] or '-')}",
        "  tls        "
        + (
            f"{tls['version']} {tls['cipher']}" + (f" (SNI {_clean(tls['sni'])})" if tls["sni"] else "")
            if tls
            else "-"
        ),
        f"  user       {_clean(s['user'] or '-')}",
        f"  transcript {s['bytes']} bytes" + (" (cut at the per-session cap)" if s["truncated"] else ""),
        "",
    ]  # fmt: skip
    lines = header + list(_timeline(detail))
    return "\n".join(lines) + "\n"


def _timeline(detail: Mapping[str, Any]) -> Iterator[str]:
    """Transcript lines with AUTH attempts and messages at their moments."""
    items: list[tuple[float, int, int, str]] = []
    for index, event in enumerate(detail["events"]):
        prefix = "C:" if event["direction"] == "c" else "S:"
        items.append((event["ts"], 0, index, f"{prefix} {_clean(event['line'], 400)}"))
    for index, auth in enumerate(detail["auth"]):
        secret = (
            f"password={_clean(auth['password'])}"
            if auth["password"] is not None
            else f"token={_clean(auth['token'] or '')}"
        )
        items.append(
            (
                auth["ts"],
                1,
                index,
                f"   [AUTH {auth['mechanism']} user={_clean(auth['username'] or '')} "
                f"{secret} -> {auth['outcome']}]",
            )
        )
    for index, message in enumerate(detail["messages"]):
        text = [
            f"   [message {message['id']}] from <{_clean(message['mail_from'] or '')}> to "
            + ", ".join(f"<{_clean(r)}>" for r in message["rcpt_tos"])
            + f"; {message['size']} bytes, sha256 {message['sha256']}",
            f"    subject: {_clean(message['subject'] or '-')}",
            *(
                [f"    analysis: cut short, {_cut_reason(message['analysis_truncated'])}"]
                if message.get("analysis_truncated")
                else []
            ),
            f"    stored:  {message['path'] or '(not kept: over the storage cap)'}",
        ]
        text += [f"    url:     {_clean(url)}" for url in message["urls"]]
        text += [
            f"    attachment: {_clean(a['filename'] or '(no name)')} {a['content_type']} "
            f"{a['size']} bytes sha256 {a['sha256']}"
            for a in message["attachments"]
        ]
        items.append((message["ts"], 1, 1000 + index, "\n".join(text)))
    items.sort(key=lambda item: item[:3])
    for ts, _, _, entry in items:
        yield f"{_clock(ts)} {entry}"


# --- helpers ------------------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _clock(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _clean(value: object, width: int = _WIDTH) -> str:
    """Attacker-supplied text made safe to print: control characters (and the Unicode
    ones that reorder text) as escapes, cut at ``width`` characters."""
    text = escape_controls(str(value))
    return text if len(text) <= width else text[: width - 3] + "..."


def _csv_cell(value: object) -> object:
    """A CSV cell: text with control and bidi characters escaped, numbers as they are."""
    return escape_controls(value) if isinstance(value, str) else value


class _SafeWriter:
    """A csv writer whose text cells are escaped (:func:`_csv_cell`)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def writerow(self, row: Sequence[object]) -> None:
        self.writer.writerow([_csv_cell(cell) for cell in row])


#: What messages.analysis_truncated says, for people.
_CUT_REASONS: Final = {
    "parts": "too many MIME parts (analysis_max_parts)",
    "depth": "parts nested too deeply (analysis_max_depth)",
    "budget": "out of time (analysis_budget)",
    "size": "only the start of the message was parsed",
    "backlog": "too many messages waiting: only the subject was read",
    "error": "a part could not be read",
}


def _cut_reason(reason: str) -> str:
    return _CUT_REASONS.get(reason, _clean(reason))


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover
