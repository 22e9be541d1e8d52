"""``mailgate queue ...``: look at the relay queue and act on it, also while the server runs.

::

    mailgate queue list [--json] [--state S] [--domain D] --config FILE
    mailgate queue show ID [--json] --config FILE
    mailgate queue flush [--domain D] [ID...] --config FILE
    mailgate queue hold ID... | release ID... | delete ID... | bounce ID... [--reason TEXT]
    mailgate queue stats [--json] --config FILE
    mailgate queue migrate [--status] --config FILE

The queue directory is the server's: ``[queue] path`` of the file, else ``queue`` under
``state_dir`` (:meth:`mailgate.queue.settings.QueueSettings.directory`). Every change is
a committed transaction of the store; a running server notices it within a second
through the store's change notification, so ``flush`` and ``release`` take effect at
once. Problems end the command with one line on stderr and these exit statuses:

* 0: done;
* 1: an ID given is not in the queue (the others were acted on);
* 2: the command line or the configuration is wrong;
* 3: the queue cannot be used (its directory is missing or unreadable, or it is damaged).

Run as root, a command becomes the user that owns the queue directory before opening it
(files it creates there must stay usable by the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate.queue import (
    HistoryEntry,
    MessageDetails,
    QueuedMessage,
    QueueError,
    QueueFilter,
    QueuePolicy,
    QueueStats,
    RecipientInfo,
    RecipientState,
    RemoteReply,
    SQLiteQueueStore,
)
from mailgate.queue.store import QueueStore
from mailgate.server.options import ServerOptions

if TYPE_CHECKING:
    # Not at run time: mailgate.queue.settings imports the outbound engine, which a
    # queue command does not need to start.
    from mailgate.queue.settings import QueueSettings

EXIT_OK = 0
EXIT_UNKNOWN_ID = 1
EXIT_CONFIG = 2
EXIT_QUEUE = 3

#: How much of a message ``queue show`` reads looking for the end of its header.
MAX_HEADER_BYTES = 1024 * 1024

_STATES = tuple(state.value for state in RecipientState)

_EPILOG = """\
where the queue is:
  The queue directory is the one the server uses: [queue] path in the file given with
  --config, else "queue" under [server] state_dir. Run these commands as the user the
  server runs as, or as root: root becomes the user that owns the queue directory
  first, so that files created there stay writable by the server.

exit status:
  0 done; 1 an ID given is not in the queue (the others were acted on); 2 the command
  line or the configuration is wrong; 3 the queue cannot be used (missing directory,
  no permission, damaged database).
"""


class QueueCommandError(Exception):
    """A problem to report in one line, with the exit status it ends the command with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class QueueLocation:
    """Where the server's queue is, and the settings it was found with."""

    directory: Path
    policy: QueuePolicy
    options: ServerOptions
    #: The setting the directory comes from, for error messages.
    source: str
    #: The ``[queue]`` table: which backend, and its database with PostgreSQL.
    settings: QueueSettings | None = None


def locate_queue(config: str | None, command: str = "mailgate queue") -> QueueLocation:
    """The queue directory and policy of the configuration in ``config`` (``None``: the
    defaults of ``mailgate serve`` without a file), computed as the server computes
    them. Raises QueueCommandError (EXIT_CONFIG) for a configuration problem."""
    from mailgate.config import ConfigError, build_options
    from mailgate.queue import DurationError
    from mailgate.queue.settings import queue_settings, redacted_dsn

    try:
        # The DKIM keys are read by the server (and by sendmail when it queues), not by
        # every command that finds the queue: they may be kept from the user running it.
        options = build_options(argparse.Namespace(config=config), read_keys=False)
        settings = queue_settings(options.policy)
        policy = settings.policy()
    except ConfigError as exc:
        raise QueueCommandError(f"{command}: error: {exc}", EXIT_CONFIG) from None
    except (DurationError, ValueError) as exc:
        where = config if config is not None else "the defaults"
        raise QueueCommandError(f"{command}: error: {where} [queue]: {exc}", EXIT_CONFIG) from None
    directory = settings.directory(options.state_dir)
    if settings.path is not None:
        source = f"[queue] path in {config}"
    else:
        in_file = f" in {config}" if config is not None else " (no --config given)"
        source = f'"queue" under [server] state_dir{in_file}; set [queue] path to choose'
    if settings.backend == "postgresql" and settings.dsn:
        source = f"[queue] dsn {redacted_dsn(settings.dsn)} in {config}"
    return QueueLocation(directory, policy, options, source, settings)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def open_queue(
    location: QueueLocation,
    *,
    create: bool = False,
    migrate: bool | None = False,
    command: str = "mailgate queue",
) -> AsyncIterator[QueueStore | None]:
    """The store of ``location``, closed at the end. ``None`` when the directory exists
    but is empty (the server has not created the queue yet) and ``create`` is false:
    a command that only reads must not create files. A missing directory is an error
    unless ``create``. ``migrate``: create or update the schema (``None``: as ``[queue]
    migrate`` says); otherwise a missing or older schema ends the command with one line
    saying to run ``mailgate queue migrate``. Run as root, the process becomes the
    queue's owner first (for good: it is a command that ends soon after)."""
    directory = location.directory
    settings = location.settings
    if migrate is None:
        migrate = settings is None or settings.migrate == "auto"
    if settings is not None and settings.backend == "postgresql":
        async with _database_queue(settings, directory, command, migrate=migrate) as store:
            yield store
        return
    where = f"the queue at {directory} ({location.source})"
    if not create:
        try:
            if not directory.is_dir():
                raise QueueCommandError(
                    f"{command}: no queue: {where} is not a directory", EXIT_QUEUE
                )
            empty = not any(directory.iterdir())
        except OSError as exc:
            raise QueueCommandError(
                f"{command}: cannot read {where}: {_reason(exc)}", EXIT_QUEUE
            ) from None
        if empty:
            yield None
            return
    _become_owner(directory, where, command)
    try:
        store = await SQLiteQueueStore.open(directory, policy=location.policy, migrate=migrate)
    except (OSError, sqlite3.Error, QueueError) as exc:
        raise QueueCommandError(
            f"{command}: cannot open {where}: {_reason(exc)}", EXIT_QUEUE
        ) from None
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _database_queue(
    settings: QueueSettings, directory: Path, command: str, *, migrate: bool
) -> AsyncIterator[QueueStore]:
    """The PostgreSQL queue the server uses (``[queue] backend = "postgresql"``): the
    same database, never a SQLite file beside it (mail queued there would not be sent)."""
    from mailgate.queue.plugin import open_store

    try:
        store = await open_store(settings, directory, make_directory=False, migrate=migrate)
    except QueueError as exc:
        raise QueueCommandError(f"{command}: cannot open the queue: {exc}", EXIT_QUEUE) from None
    try:
        yield store
    finally:
        await store.aclose()


def _become_owner(directory: Path, where: str, command: str) -> None:
    """Run as root, become the user that owns the queue (of the nearest existing
    directory on its path, when it is not made yet) before touching it: the files the
    store creates there (the database's journal, lock files, bodies) must stay usable
    by the server, which runs as that user. Nothing changes for other users, or when
    root owns the queue."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    existing = next((path for path in (directory, *directory.parents) if path.exists()), None)
    if existing is None:
        return
    try:
        status = existing.stat()
    except OSError:
        return
    if status.st_uid == 0:
        return
    import pwd

    try:
        entry = pwd.getpwuid(status.st_uid)
        name: str | None = entry.pw_name
        gid = entry.pw_gid
    except KeyError:  # an owner without a passwd entry: its group is the directory's
        name, gid = None, status.st_gid
    try:
        if name is not None:
            os.initgroups(name, gid)
        else:
            os.setgroups([])
        os.setgid(gid)
        os.setuid(status.st_uid)
    except OSError as exc:
        who = name or str(status.st_uid)
        raise QueueCommandError(
            f"{command}: {where} belongs to user {who}, and switching to that user failed: "
            f"{_reason(exc)}; run this as {who}",
            EXIT_QUEUE,
        ) from None


# --- the parser ----------------------------------------------------------------------------


def add_queue_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``queue`` and its subcommands to the ``mailgate`` parser."""
    queue = commands.add_parser(
        "queue",
        help="list, inspect, retry, hold, release, delete or bounce queued mail",
        description="Look at the relay queue and act on it, also while the server runs "
        "(it notices changes within a second).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    def action(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name,
            help=help,
            description=description,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--config",
            metavar="FILE",
            help="the server's configuration file (its [queue] path or state_dir)",
        )
        return parser

    list_ = action(
        "list",
        "list queued messages and the state of each recipient",
        "List the messages in the queue, oldest first, each with its recipients: state "
        "(queued, deferred, held, delivered, failed), attempts, next attempt, last reply.",
    )
    list_.add_argument("--json", action="store_true", help="print JSON instead of text")
    list_.add_argument(
        "--state",
        action="append",
        choices=_STATES,
        metavar="STATE",
        help="only messages with a recipient in this state (" + ", ".join(_STATES) + "); "
        "may be repeated",
    )
    list_.add_argument(
        "--domain", metavar="DOMAIN", help="only messages with a recipient in this domain"
    )

    show = action(
        "show",
        "show one message: envelope, recipients, history and headers",
        "Show a queued message: its envelope, each recipient's state, the delivery "
        "history and the message's header.",
    )
    show.add_argument("id", metavar="ID", help="the queue id")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")

    flush = action(
        "flush",
        "retry deferred mail now",
        "Make pending recipients due now: those of the IDs given, of --domain, or all.",
    )
    flush.add_argument("ids", nargs="*", metavar="ID", help="queue ids (default: every message)")
    flush.add_argument("--domain", metavar="DOMAIN", help="only recipients in this domain")

    hold = action(
        "hold",
        "put messages on hold",
        "Stop delivery attempts for the pending recipients of these messages until "
        "'mailgate queue release'. Held mail is not tried, so it is not returned while "
        "held; its lifetime still counts from its arrival (see docs/operations.md).",
    )
    hold.add_argument("ids", nargs="+", metavar="ID", help="queue ids")
    hold.add_argument(
        "--reason", default="held by the operator", metavar="TEXT", help="shown by list and show"
    )

    release = action(
        "release",
        "release held messages",
        "Held recipients of these messages are queued again and due now.",
    )
    release.add_argument("ids", nargs="+", metavar="ID", help="queue ids")

    delete = action(
        "delete",
        "delete messages without a report to the sender",
        "Remove these messages, their recipients, history and body. The sender is not told.",
    )
    delete.add_argument("ids", nargs="+", metavar="ID", help="queue ids")

    bounce = action(
        "bounce",
        "fail messages now and return them to their sender",
        "Fail every recipient of these messages that is not delivered yet: the sender gets "
        "a failure report (DSN), sent by the server, as for any failed delivery.",
    )
    bounce.add_argument("ids", nargs="+", metavar="ID", help="queue ids")
    bounce.add_argument(
        "--reason",
        default="",
        metavar="TEXT",
        help="the diagnostic the report gives (default: returned by the operator)",
    )

    migrate = action(
        "migrate",
        "create or update the queue's schema to this mailgate's version",
        "Bring the queue's database (SQLite in the queue directory, or the [queue] schema "
        "of the PostgreSQL database) to the schema version this mailgate uses, and say "
        "which version it was and is. Safe to run again (nothing to do) and from several "
        "nodes at once (they take turns). Needed before the other commands and, with "
        '[queue] migrate = "manual", before serve.',
    )
    migrate.add_argument(
        "--status",
        action="store_true",
        help="only show the version in place and this mailgate's; exit status 1 when a "
        "migration is due",
    )

    stats = action(
        "stats",
        "counts by state, by destination domain and by age",
        "Count recipients by state, and the recipients not yet delivered by domain and by "
        "age in minutes, like Postfix's qshape.",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_queue(args: argparse.Namespace) -> int:
    """Run ``mailgate queue ...``; the exit status."""
    handlers: dict[str, Callable[[QueueStore | None, argparse.Namespace], Awaitable[int]]] = {
        "list": _list,
        "show": _show,
        "flush": _flush,
        "hold": _hold,
        "release": _release,
        "delete": _delete,
        "bounce": _bounce,
        "stats": _stats,
    }
    try:
        location = locate_queue(args.config)
        if args.queue_command == "migrate":
            return asyncio.run(_migrate(location, status_only=args.status))
        handler = handlers[args.queue_command]

        async def run() -> int:
            async with open_queue(location) as store:
                return await handler(store, args)

        return asyncio.run(run())
    except QueueCommandError as exc:
        return _fail(str(exc), exc.status)
    except store_errors() as exc:
        # The queue failed under us (disk full, damaged database): one line, no traceback.
        return _fail(f"mailgate queue: the queue failed: {_reason(exc)}", EXIT_QUEUE)
    except KeyboardInterrupt:
        return _fail("mailgate queue: interrupted", EXIT_QUEUE)


def store_errors() -> tuple[type[BaseException], ...]:
    """The errors a queue store may raise when its disk or database fails: reported in
    one line by the commands, never as a traceback. asyncpg's only when it is installed
    (the PostgreSQL backend)."""
    from mailgate.queue import QueueError

    errors: tuple[type[BaseException], ...] = (OSError, sqlite3.Error, QueueError)
    try:
        import asyncpg
    except ImportError:
        return errors
    return (*errors, asyncpg.PostgresError, asyncpg.InterfaceError)


def _fail(message: str, status: int) -> int:
    print(" ".join(message.splitlines()), file=sys.stderr)
    return status


# --- migrate ---------------------------------------------------------------------------------


async def _migrate(location: QueueLocation, *, status_only: bool) -> int:
    from mailgate.queue.plugin import migrate_queue, schema_status
    from mailgate.queue.settings import QueueSettings

    settings = location.settings if location.settings is not None else QueueSettings()
    command = "mailgate queue migrate"
    if settings.backend != "postgresql":
        _become_owner(location.directory, f"the queue at {location.directory}", command)
    try:
        if status_only:
            found = await schema_status(settings, location.directory)
        else:
            found = await migrate_queue(settings, location.directory)
    except (OSError, sqlite3.Error, QueueError) as exc:
        raise QueueCommandError(f"{command}: {_reason(exc)}", EXIT_QUEUE) from None
    if status_only:
        due = found.before < found.after
        state = "a migration is due" if due else "up to date"
        print(
            f"queue {found.where}: schema version {found.before}; this mailgate uses "
            f"{found.after}: {state}"
        )
        return EXIT_UNKNOWN_ID if due else EXIT_OK
    if found.before == found.after:
        print(f"queue {found.where}: schema version {found.after}, up to date; nothing to do")
    else:
        print(f"queue {found.where}: schema migrated from version {found.before} to {found.after}")
    return EXIT_OK


# --- list ------------------------------------------------------------------------------------


async def _list(store: QueueStore | None, args: argparse.Namespace) -> int:
    states = frozenset(RecipientState(state) for state in args.state) if args.state else None
    domain = _domain(args.domain)
    messages: list[QueuedMessage] = []
    if store is not None:
        messages = await store.list_messages(QueueFilter(states=states, domain=domain))
    now = time.time()
    if args.json:
        document = {"messages": [message_json(message, now) for message in messages]}
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(list_text(messages, now))
    return EXIT_OK


def list_text(messages: Sequence[QueuedMessage], now: float) -> str:
    """``queue list`` as text: one line per message, one indented line per recipient."""
    if not messages:
        return "the queue is empty"
    lines: list[str] = []
    counts = dict.fromkeys(RecipientState, 0)
    for message in messages:
        info = message.info
        lines.append(
            f"{info.id}  {info.size} bytes  {format_age(now - info.received_at)} old  "
            f"from <{info.sender}>"
        )
        width = max(len(recipient.address) for recipient in message.recipients)
        for recipient in message.recipients:
            counts[recipient.state] += 1
            lines.append(
                f"    {recipient.address.ljust(width)}  {recipient.state.value:<9}  "
                f"{_recipient_summary(recipient, now)}"
            )
    total = sum(counts.values())
    by_state = ", ".join(f"{count} {state.value}" for state, count in counts.items() if count)
    lines.append(
        f"-- {_plural(len(messages), 'message')}, {_plural(total, 'recipient')} ({by_state})"
    )
    return "\n".join(lines)


def _recipient_summary(recipient: RecipientInfo, now: float) -> str:
    parts = [_plural(recipient.attempts, "attempt")]
    if recipient.state.pending:
        due = recipient.next_attempt - now
        parts.append("next attempt now" if due <= 0 else f"next attempt in {format_age(due)}")
    elif recipient.state is RecipientState.HELD:
        parts.append(recipient.held_reason or "held")
    if recipient.last_reply is not None:
        parts.append(f"last reply: {recipient.last_reply}")
    elif recipient.last_diagnostic:
        parts.append(f"last: {recipient.last_diagnostic}")
    return ", ".join(parts)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: compact, for tables."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_time(moment: float | None) -> str | None:
    """ISO 8601 in UTC, to the second: ``2026-12-06T16:54:13Z``."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reply_json(reply: RemoteReply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def recipient_json(recipient: RecipientInfo, now: float) -> dict[str, Any]:
    pending = recipient.state.pending
    return {
        "id": recipient.id,
        "address": recipient.address,
        "destination": recipient.destination,
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "next_attempt": format_time(recipient.next_attempt) if pending else None,
        "next_attempt_in": max(0.0, round(recipient.next_attempt - now, 3)) if pending else None,
        "last_attempt": format_time(recipient.last_attempt_at),
        "last_reply": _reply_json(recipient.last_reply),
        "remote_mta": recipient.remote_mta,
        "status": recipient.last_status,
        "diagnostic": recipient.last_diagnostic,
        "held_reason": recipient.held_reason,
        "final_at": format_time(recipient.final_at),
        "notify": None if recipient.notify is None else sorted(recipient.notify),
        "orcpt": recipient.orcpt,
        "dsn_pending": recipient.dsn_pending,
    }


def message_json(message: QueuedMessage, now: float) -> dict[str, Any]:
    """One message of ``queue list --json`` (and the ``message`` of ``queue show --json``)."""
    info = message.info
    client = info.client
    return {
        "id": info.id,
        "sender": info.sender,
        "size": info.size,
        "received_at": format_time(info.received_at),
        "age": round(max(0.0, now - info.received_at), 3),
        "expires_at": format_time(info.expires_at),
        "envid": info.envid,
        "ret": info.ret,
        "smtputf8": info.smtputf8,
        "body": info.body_type,
        "requiretls": info.require_tls,
        "tls_required_no": info.tls_optional,
        "client": {
            "address": client.address,
            "name": client.name,
            "helo": client.helo,
            "protocol": client.protocol,
            "tls": client.tls,
            "auth_user": client.auth_user,
            "listener": client.listener,
        },
        "recipients": [recipient_json(recipient, now) for recipient in message.recipients],
    }


# --- show ------------------------------------------------------------------------------------


async def _show(store: QueueStore | None, args: argparse.Namespace) -> int:
    message_id = args.id.strip().upper()
    details = None if store is None else await store.show(message_id)
    if details is None or store is None:
        raise QueueCommandError(
            f"mailgate queue show: no message {args.id} in the queue", EXIT_UNKNOWN_ID
        )
    headers = await _read_headers(store, message_id)
    now = time.time()
    if args.json:
        document = message_json(details.message, now)
        document["history"] = [_history_json(entry) for entry in details.history]
        document["headers"] = None if headers is None else [list(pair) for pair in headers]
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(show_text(details, headers, now))
    return EXIT_OK


async def _read_headers(store: QueueStore, message_id: str) -> list[tuple[str, str]] | None:
    """The message's header fields (unfolded), read up to the blank line that ends them;
    ``None`` when the body file is gone."""
    data = bytearray()
    try:
        async for chunk in store.read_body(message_id):
            data += chunk
            if b"\r\n\r\n" in data or b"\n\n" in data or len(data) >= MAX_HEADER_BYTES:
                break
    except KeyError:
        return None
    return parse_header_fields(bytes(data[:MAX_HEADER_BYTES]))


def parse_header_fields(data: bytes) -> list[tuple[str, str]]:
    """``(name, value)`` of each field of the header at the start of ``data`` (folded
    lines joined, undecoded: what the message says, as it says it)."""
    fields: list[tuple[str, str]] = []
    for raw_line in data.split(b"\n"):
        line = raw_line.removesuffix(b"\r").decode("utf-8", "replace")
        if not line:
            break
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip()}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name:
            break  # the body began without a blank line
        fields.append((name, value.strip()))
    return fields


def _history_json(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "at": format_time(entry.at),
        "event": entry.event,
        "recipient": entry.recipient,
        "attempt": entry.attempt,
        "reply": _reply_json(entry.reply),
        "remote_mta": entry.remote_mta,
        "status": entry.status,
        "detail": entry.detail,
    }


def show_text(details: MessageDetails, headers: list[tuple[str, str]] | None, now: float) -> str:
    message = details.message
    info = message.info
    client = info.client
    lines = [f"message {info.id}"]

    def row(label: str, value: str | None) -> None:
        if value:
            lines.append(f"  {label:<10} {value}")

    row("sender", f"<{info.sender}>" + ("  (the null sender)" if info.null_sender else ""))
    row("size", f"{info.size} bytes")
    row("received", f"{format_time(info.received_at)} ({format_age(now - info.received_at)} ago)")
    row("expires", format_time(info.expires_at))
    came_from = [
        part
        for part in (
            client.address and f"{client.address}" + (f" ({client.name})" if client.name else ""),
            client.helo and f"helo {client.helo}",
            client.protocol,
            client.tls,
            client.auth_user and f"user {client.auth_user}",
            client.listener and f"on {client.listener}",
        )
        if part
    ]
    row("from", ", ".join(came_from))
    row("envid", info.envid)
    row("ret", info.ret)
    row(
        "body",
        " ".join(part for part in (info.body_type, "SMTPUTF8" if info.smtputf8 else None) if part),
    )
    row(
        "tls",
        "REQUIRETLS (only over verified TLS to a server offering it)"
        if info.require_tls
        else "TLS-Required: No (DANE and MTA-STS policies set aside)"
        if info.tls_optional
        else None,
    )
    lines.append("recipients")
    for recipient in message.recipients:
        lines.append(f"  {recipient.address}  {recipient.state.value}  via {recipient.destination}")
        lines.append(f"      {_recipient_summary(recipient, now)}")
        if recipient.remote_mta:
            lines.append(f"      remote MTA {recipient.remote_mta}")
    lines.append("history")
    for entry in details.history:
        parts = [format_time(entry.at) or "", entry.event]
        if entry.recipient:
            parts.append(entry.recipient)
        if entry.attempt is not None:
            parts.append(f"attempt {entry.attempt}")
        if entry.reply is not None:
            parts.append(str(entry.reply))
        if entry.remote_mta:
            parts.append(f"({entry.remote_mta})")
        # The detail of an attempt often is its reply again: said once.
        if entry.detail and entry.detail != (str(entry.reply) if entry.reply else None):
            parts.append(entry.detail)
        lines.append("  " + "  ".join(parts))
    lines.append("headers")
    if headers is None:
        lines.append("  (the body file is missing)")
    for name, value in headers or ():
        lines.append(f"  {name}: {value}")
    return "\n".join(lines)


# --- operator actions ------------------------------------------------------------------------


def _domain(domain: str | None) -> str | None:
    """A domain as the store keeps recipient domains: lower case, U-labels as given."""
    if domain is None:
        return None
    return domain.strip().strip("@").rstrip(".").lower() or None


async def _known(
    store: QueueStore | None, ids: Sequence[str], command: str
) -> tuple[list[str], list[str]]:
    """The ids given (upper-cased, as queue ids are) split into those in the queue and
    those not; the unknown ones are reported on stderr."""
    wanted = list(dict.fromkeys(item.strip().upper() for item in ids))
    found: set[str] = set()
    if store is not None and wanted:
        found = {
            message.id for message in await store.list_messages(QueueFilter(ids=tuple(wanted)))
        }
    unknown = [item for item in wanted if item not in found]
    if unknown:
        print(f"mailgate queue {command}: not in the queue: {', '.join(unknown)}", file=sys.stderr)
    return [item for item in wanted if item in found], unknown


async def _flush(store: QueueStore | None, args: argparse.Namespace) -> int:
    domain = _domain(args.domain)
    known, unknown = await _known(store, args.ids, "flush")
    touched = 0
    if store is not None and (known or not args.ids):
        touched = await store.flush(ids=known if args.ids else None, domain=domain)
    print(
        f"{_plural(touched, 'recipient')} made due now; a running server tries them within a second"
    )
    return EXIT_UNKNOWN_ID if unknown else EXIT_OK


async def _hold(store: QueueStore | None, args: argparse.Namespace) -> int:
    known, unknown = await _known(store, args.ids, "hold")
    touched = await store.hold(known, args.reason) if store is not None and known else 0
    print(f"{_plural(touched, 'recipient')} of {_plural(len(known), 'message')} held")
    return EXIT_UNKNOWN_ID if unknown else EXIT_OK


async def _release(store: QueueStore | None, args: argparse.Namespace) -> int:
    known, unknown = await _known(store, args.ids, "release")
    touched = await store.release(known) if store is not None and known else 0
    print(f"{_plural(touched, 'recipient')} of {_plural(len(known), 'message')} released, due now")
    return EXIT_UNKNOWN_ID if unknown else EXIT_OK


async def _delete(store: QueueStore | None, args: argparse.Namespace) -> int:
    known, unknown = await _known(store, args.ids, "delete")
    removed = await store.delete(known) if store is not None and known else 0
    print(f"{_plural(removed, 'message')} deleted")
    return EXIT_UNKNOWN_ID if unknown else EXIT_OK


async def _bounce(store: QueueStore | None, args: argparse.Namespace) -> int:
    known, unknown = await _known(store, args.ids, "bounce")
    failed = 0
    if store is not None and known:
        failed = await store.bounce(known, args.reason or "returned by the operator")
    print(
        f"{_plural(failed, 'recipient')} of {_plural(len(known), 'message')} failed; "
        "the server sends the failure reports (none for the null sender)"
    )
    return EXIT_UNKNOWN_ID if unknown else EXIT_OK


# --- stats -----------------------------------------------------------------------------------


async def _stats(store: QueueStore | None, args: argparse.Namespace) -> int:
    from mailgate.queue.model import age_bucket_labels

    if store is None:
        stats = QueueStats(0, dict.fromkeys(RecipientState, 0), {}, age_bucket_labels(), None)
    else:
        stats = await store.stats()
    now = time.time()
    if args.json:
        print(json.dumps(stats_json(stats, now), indent=2, ensure_ascii=False))
    else:
        print(stats_text(stats, now))
    return EXIT_OK


def stats_json(stats: QueueStats, now: float) -> dict[str, Any]:
    return {
        "messages": stats.messages,
        "oldest": format_time(stats.oldest),
        "oldest_age": None if stats.oldest is None else round(max(0.0, now - stats.oldest), 3),
        "recipients": {state.value: stats.by_state.get(state, 0) for state in RecipientState},
        "age_buckets_minutes": list(stats.bucket_labels),
        "by_domain": {
            domain: {"total": sum(counts), "by_age": list(counts)}
            for domain, counts in stats.by_domain.items()
        },
    }


def stats_text(stats: QueueStats, now: float) -> str:
    """Counts by state, then a qshape table: recipients not yet final per domain (most
    first) and per age bucket (minutes since the message arrived)."""
    oldest = (
        f", the oldest {format_age(now - stats.oldest)} old" if stats.oldest is not None else ""
    )
    lines = [f"{_plural(stats.messages, 'message')} in the queue{oldest}"]
    lines.append(
        "recipients: "
        + ", ".join(f"{stats.by_state.get(state, 0)} {state.value}" for state in RecipientState)
    )
    if not stats.by_domain:
        return "\n".join(lines)
    lines.append("")
    lines.append("recipients not yet delivered, by domain and age in minutes:")
    labels = stats.bucket_labels
    rows: list[tuple[str, int, tuple[int, ...]]] = [
        (domain or "(no domain)", sum(counts), counts) for domain, counts in stats.by_domain.items()
    ]
    rows.sort(key=lambda item: (-item[1], item[0]))
    totals = tuple(sum(row[2][index] for row in rows) for index in range(len(labels)))
    rows.insert(0, ("TOTAL", sum(totals), totals))
    name_width = max(len(row[0]) for row in rows)
    widths = [
        max(len(label), *(len(str(row[2][index])) for row in rows))
        for index, label in enumerate(labels)
    ]
    total_width = max(1, *(len(str(row[1])) for row in rows))
    header = f"{'':>{name_width}} {'T':>{total_width}} " + " ".join(
        f"{label:>{width}}" for label, width in zip(labels, widths, strict=True)
    )
    lines.append(header.rstrip())
    for name, total, counts in rows:
        cells = " ".join(f"{count:>{width}}" for count, width in zip(counts, widths, strict=True))
        lines.append(f"{name:>{name_width}} {total:>{total_width}} {cells}")
    return "\n".join(lines)
