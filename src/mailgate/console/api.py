"""The JSON API under ``/api/v1/`` (docs/api.md, docs/openapi.yaml).

- the queue, over the :class:`~mailgate.queue.QueueStore` interface: list, statistics,
  one message with its history, and the operator's actions (flush, hold, release,
  delete);
- the honeypot's captures, through the read-only reports of
  :mod:`mailgate.honeypot.report` (what ``mailgate honeypot report`` prints): sessions,
  one session's transcript, the credentials tried, the messages, the summary figures and
  sessions over time;
- capture mode's messages: search, one message's parts, delete, and release to an
  address through the queue (when the server sends mail onward);
- live updates: Server-Sent Events (``/events``) or a WebSocket (``/ws``).

Every answer is JSON, ASCII only (``\\uNNNN`` escapes): captured text may hold control
and direction characters, and a consumer that pastes a value into a page or a terminal
gets it escaped. Errors are ``{"error": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import ipaddress
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiohttp import web

from .context import CONSOLE_KEY, USER_KEY

if TYPE_CHECKING:
    import sqlite3

    from mailgate.delivery.capture import CapturedMessages
    from mailgate.queue import QueueStore

__all__ = ["add_routes", "to_json"]

PREFIX: Final = "/api/v1"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
#: Largest JSON body an action takes (a reason, a domain).
_MAX_BODY: Final = 16 * 1024

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """``value`` as JSON data: dataclasses as objects, enums as their value, tuples and
    sets as lists (sets sorted), non-finite floats as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_json(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, Mapping):
        return {str(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(to_json(item) for item in value)
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_dumps = functools.partial(json.dumps, ensure_ascii=True, separators=(",", ":"))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(to_json(data), status=status, dumps=_dumps)


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"error": detail}, status=status, dumps=_dumps)


def _limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise web.HTTPBadRequest(
            text=_dumps({"error": f"limit must be a number from 1 to {MAX_LIMIT}"}),
            content_type="application/json",
        )
    return int(text)


def _bad_request(detail: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=_dumps({"error": detail}), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of an action's body (empty body: ``{}``)."""
    if not request.can_read_body:
        return {}
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise _bad_request("request body too large")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise _bad_request("the body is not JSON") from None
    if not isinstance(data, dict):
        raise _bad_request("the body must be a JSON object")
    return data


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad_request(f"{key} must be a string")
    return value


# --- the queue --------------------------------------------------------------------------


def _queue(request: web.Request) -> QueueStore:
    store = request.app[CONSOLE_KEY].sources.queue
    if store is None:
        raise web.HTTPNotFound(
            text=_dumps({"error": "this server has no queue"}), content_type="application/json"
        )
    return store


async def _queue_list(request: web.Request) -> web.Response:
    from mailgate.queue import QueueFilter, RecipientState

    store = _queue(request)
    states: frozenset[RecipientState] | None = None
    if "state" in request.query:
        names = [n for text in request.query.getall("state") for n in text.split(",") if n]
        try:
            states = frozenset(RecipientState(name) for name in names)
        except ValueError:
            allowed = ", ".join(state.value for state in RecipientState)
            raise _bad_request(f"state must be one of {allowed}") from None
    domain = request.query.get("domain") or None
    messages = await store.list_messages(
        QueueFilter(states=states, domain=domain, limit=_limit(request))
    )
    return _json({"messages": messages})


async def _queue_stats(request: web.Request) -> web.Response:
    stats = await _queue(request).stats()
    data = to_json(stats)
    data["by_domain"] = {
        domain: dict(zip(stats.bucket_labels, counts, strict=True))
        for domain, counts in stats.by_domain.items()
    }
    return _json(data)


async def _queue_show(request: web.Request) -> web.Response:
    details = await _queue(request).show(request.match_info["id"])
    if details is None:
        return _error(404, "no such message in the queue")
    return _json({"message": details.message, "history": details.history})


async def _queue_flush_all(request: web.Request) -> web.Response:
    store = _queue(request)
    domain = _optional_text(await _body(request), "domain")
    return _json({"recipients": await store.flush(domain=domain)})


def _action(
    act: Callable[[QueueStore, str, dict[str, Any]], Awaitable[int]], counted: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A handler applying ``act`` to the message of the path; 404 when it is unknown."""

    async def handler(request: web.Request) -> web.Response:
        store = _queue(request)
        message_id = request.match_info["id"]
        data = await _body(request)
        if await store.show(message_id) is None:
            return _error(404, "no such message in the queue")
        return _json({counted: await act(store, message_id, data)})

    return handler


async def _flush(store: QueueStore, message_id: str, data: dict[str, Any]) -> int:
    return await store.flush(ids=[message_id])


async def _hold(store: QueueStore, message_id: str, data: dict[str, Any]) -> int:
    reason = _optional_text(data, "reason")
    return await store.hold([message_id], reason or "held by the operator")


async def _release(store: QueueStore, message_id: str, data: dict[str, Any]) -> int:
    return await store.release([message_id])


async def _delete(store: QueueStore, message_id: str, data: dict[str, Any]) -> int:
    return await store.delete([message_id])


# --- the honeypot ------------------------------------------------------------------------


async def _honeypot(request: web.Request, read: Callable[[sqlite3.Connection], T]) -> T:
    """``read(db)`` on a read-only connection to the capture store, in a thread."""
    from mailgate.honeypot import report

    data_dir = request.app[CONSOLE_KEY].sources.honeypot_dir
    if data_dir is None:
        raise web.HTTPNotFound(
            text=_dumps({"error": "this server is no honeypot"}), content_type="application/json"
        )

    def run() -> T:
        db = report.open_database(data_dir)
        try:
            return read(db)
        finally:
            db.close()

    try:
        return await asyncio.to_thread(run)
    except report.ReportError as exc:
        raise web.HTTPNotFound(
            text=_dumps({"error": str(exc)}), content_type="application/json"
        ) from None


def _since(request: web.Request) -> float | None:
    from mailgate.honeypot import report

    try:
        return report.parse_since(request.query.get("since"))
    except report.ReportError as exc:
        raise _bad_request(str(exc).replace("--since", "since")) from None


async def _honeypot_summary(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    since, top = _since(request), request.query.get("top", "10")
    if not top.isdigit() or not 1 <= int(top) <= 100:
        raise _bad_request("top must be a number from 1 to 100")
    return _json(await _honeypot(request, lambda db: report.summary(db, since=since, top=int(top))))


async def _honeypot_sessions(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    since, limit, ip = _since(request), _limit(request), request.query.get("ip")
    if ip is not None:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            raise _bad_request("ip must be an IP address or a network (CIDR)") from None
    found = await _honeypot(
        request, lambda db: report.sessions(db, since=since, ip=ip, limit=limit)
    )
    return _json({"sessions": found})


async def _honeypot_session(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    session_id = request.match_info["id"]
    return _json(await _honeypot(request, lambda db: report.session_detail(db, session_id)))


async def _honeypot_credentials(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    since, limit = _since(request), _limit(request)
    found = await _honeypot(request, lambda db: report.credentials(db, since=since, limit=limit))
    return _json({"credentials": found})


async def _honeypot_messages(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    since, limit = _since(request), _limit(request)
    found = await _honeypot(request, lambda db: report.messages(db, since=since, limit=limit))
    return _json({"messages": found})


async def _honeypot_message_raw(request: web.Request) -> web.Response:
    """A captured message's source, as a download of plain text (never rendered)."""
    from mailgate.honeypot import report

    message_id = request.match_info["id"]
    data_dir = request.app[CONSOLE_KEY].sources.honeypot_dir
    path = await _honeypot(request, lambda db: report.message_file(db, message_id))
    if path is None or data_dir is None:
        return _error(404, "the honeypot kept no source of this message")
    try:
        raw = await asyncio.to_thread((data_dir / path).read_bytes)
    except OSError:
        return _error(404, "the honeypot kept no source of this message")
    safe_name = "".join(c for c in message_id if c.isalnum()) or "message"
    return web.Response(
        body=raw,
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{safe_name}.eml"',
        },
    )


#: The bucket sizes the timeline offers (seconds): a minute to a day.
_TIMELINE_BUCKETS: Final = (60, 300, 900, 3600, 21600, 86400)


async def _honeypot_timeline(request: web.Request) -> web.Response:
    from mailgate.honeypot import report

    since = _since(request)
    text = request.query.get("bucket", "3600")
    if not text.isdigit() or int(text) not in _TIMELINE_BUCKETS:
        raise _bad_request(
            "bucket must be one of " + ", ".join(str(b) for b in _TIMELINE_BUCKETS) + " (seconds)"
        )
    bucket = int(text)
    found = await _honeypot(request, lambda db: report.timeline(db, since=since, bucket=bucket))
    return _json(found)


# --- captured messages (capture mode) -------------------------------------------------


def _capture(request: web.Request) -> CapturedMessages:
    store = request.app[CONSOLE_KEY].sources.capture
    if store is None:
        raise web.HTTPNotFound(
            text=_dumps({"error": "this server does not capture mail (--capture DIR)"}),
            content_type="application/json",
        )
    return store


def _time(request: web.Request, name: str) -> float | None:
    """A query parameter that is a time: Unix seconds or ISO 8601 (UTC unless it says)."""
    text = request.query.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _bad_request(f"{name} must be Unix seconds or an ISO 8601 date or time") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


async def _messages_list(request: web.Request) -> web.Response:
    from mailgate.delivery.capture import MessageQuery

    store = _capture(request)
    offset_text = request.query.get("offset", "0")
    if not offset_text.isdigit():
        raise _bad_request("offset must be a number")
    query = MessageQuery(
        text=request.query.get("q") or None,
        sender=request.query.get("sender") or None,
        recipient=request.query.get("recipient") or None,
        subject=request.query.get("subject") or None,
        since=_time(request, "since"),
        before=_time(request, "before"),
        limit=_limit(request),
        offset=int(offset_text),
    )
    found, total = await asyncio.to_thread(store.search, query)
    return _json({"messages": found, "total": total, "version": store.version})


def _message_id(request: web.Request, store: CapturedMessages) -> str:
    message_id = request.match_info["id"]
    if not message_id.isalnum():
        raise web.HTTPNotFound(
            text=_dumps({"error": "no such message"}), content_type="application/json"
        )
    return message_id


async def _message_show(request: web.Request) -> web.Response:
    from mailgate.delivery.capture import message_parts

    store = _capture(request)
    message_id = _message_id(request, store)

    def read() -> dict[str, Any] | None:
        found = store.get(message_id)
        if found is None:
            return None
        return {"message": to_json(found), **message_parts(store.parsed(message_id))}

    try:
        shown = await asyncio.to_thread(read)
    except FileNotFoundError:
        shown = None
    if shown is None:
        return _error(404, "no such message")
    return _json(shown)


#: The HTML body of a mail, served to the UI's sandboxed frame: the CSP's ``sandbox``
#: gives it an opaque origin with scripts, forms and pop-ups off even when opened on its
#: own; inline styles are allowed (they run nothing), images only when asked.
_HTML_POLICY: Final = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src {images}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


async def _message_html(request: web.Request) -> web.Response:
    from mailgate.delivery.capture import message_parts

    store = _capture(request)
    message_id = _message_id(request, store)
    try:
        parts = await asyncio.to_thread(lambda: message_parts(store.parsed(message_id)))
    except FileNotFoundError:
        return _error(404, "no such message")
    if parts["html"] is None:
        return _error(404, "the message has no HTML body")
    remote = request.query.get("images") == "remote"
    return web.Response(
        text=parts["html"],
        content_type="text/html",
        headers={
            "Content-Security-Policy": _HTML_POLICY.format(
                images="data: http: https:" if remote else "data:"
            ),
            # Framed by the console's own page only.
            "X-Frame-Options": "SAMEORIGIN",
        },
    )


async def _message_raw(request: web.Request) -> web.Response:
    store = _capture(request)
    message_id = _message_id(request, store)
    try:
        raw = await asyncio.to_thread(store.raw, message_id)
    except FileNotFoundError:
        return _error(404, "no such message")
    # Plain text, never rendered: the source of a message is shown, not interpreted.
    return web.Response(
        body=raw,
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Disposition": f'inline; filename="{message_id}.eml"',
        },
    )


async def _message_attachment(request: web.Request) -> web.Response:
    from mailgate.delivery.capture import attachment

    store = _capture(request)
    message_id = _message_id(request, store)
    index_text = request.match_info["index"]
    if not index_text.isdigit():
        return _error(404, "no such attachment")
    try:
        found = await asyncio.to_thread(
            lambda: attachment(store.parsed(message_id), int(index_text))
        )
    except FileNotFoundError:
        found = None
    if found is None:
        return _error(404, "no such attachment")
    filename, _, data = found
    # Always a download of opaque bytes: an attached HTML page or SVG never runs here.
    safe_name = "".join(
        c for c in (filename or f"attachment-{index_text}") if c.isalnum() or c in "._-"
    )
    return web.Response(
        body=data,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{safe_name or "attachment"}"',
        },
    )


async def _message_delete(request: web.Request) -> web.Response:
    store = _capture(request)
    message_id = _message_id(request, store)
    if not await asyncio.to_thread(store.delete, message_id):
        return _error(404, "no such message")
    return _json({"messages": 1})


async def _messages_delete_all(request: web.Request) -> web.Response:
    store = _capture(request)
    return _json({"messages": await asyncio.to_thread(store.delete_all)})


#: Most addresses one release sends to.
_MAX_RELEASE_RECIPIENTS: Final = 100


def _addresses(data: Mapping[str, Any], key: str) -> list[str]:
    """``data[key]``: one address or a list of them, each a valid forward-path."""
    from mailgate.protocol.address import AddressError, parse_forward_path

    value = data.get(key)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise _bad_request(f"{key} must be an address or a list of addresses")
    if len(items) > _MAX_RELEASE_RECIPIENTS:
        raise _bad_request(f"{key}: at most {_MAX_RELEASE_RECIPIENTS} addresses")
    found = []
    for item in items:
        text = item.strip().removeprefix("<").removesuffix(">")
        try:
            address = parse_forward_path(f"<{text}>", smtputf8=True)
        except AddressError as exc:
            raise _bad_request(f"{key}: {item!r} is not an address: {exc}") from None
        found.append(str(address))
    return found


async def _message_release(request: web.Request) -> web.Response:
    """Send a captured message to the addresses of ``to`` through the queue: routed by
    the server's rules, delivered like any queued mail (retries, DSNs to ``from``)."""
    from mailgate.protocol.address import AddressError, parse_reverse_path
    from mailgate.queue import QueueError

    console = request.app[CONSOLE_KEY]
    store = _capture(request)
    message_id = _message_id(request, store)
    submit = console.sources.submit
    if submit is None:
        return _error(
            409,
            "releasing needs the outbound queue: this server has no [[routes]] that send "
            "mail onward",
        )
    data = await _body(request)
    recipients = _addresses(data, "to")
    found = await asyncio.to_thread(store.get, message_id)
    if found is None:
        return _error(404, "no such message")
    sender = _optional_text(data, "from")
    if sender is None:
        sender = found.sender
    else:
        try:
            parsed = parse_reverse_path(f"<{sender.strip().strip('<>')}>", smtputf8=True)
        except AddressError as exc:
            raise _bad_request(f"from: {sender!r} is not an address: {exc}") from None
        sender = str(parsed) if parsed is not None else ""
    try:
        queue_id = await submit(
            sender,
            recipients,
            store.path_of(message_id),
            submitter=str(request.get(USER_KEY, "console")),
            listener="console",
        )
    except FileNotFoundError:
        return _error(404, "no such message")
    except QueueError as exc:
        return _error(422, f"not released: {exc}")
    return _json({"queue_id": queue_id, "sender": sender, "recipients": recipients}, 202)


# --- live updates ---------------------------------------------------------------------

#: How often an event stream looks for changes, and how often it sends a comment so that
#: proxies and browsers keep an idle stream open.
EVENT_POLL_SECONDS: Final = 0.25
_KEEPALIVE_SECONDS: Final = 15.0


def _versions(request: web.Request) -> dict[str, int]:
    """A number per source that changes whenever the source does."""
    sources = request.app[CONSOLE_KEY].sources
    versions: dict[str, int] = {}
    if sources.capture is not None:
        versions["messages"] = sources.capture.version
    if sources.queue is not None:
        versions["queue"] = sources.queue.change_count
    return versions


async def _changes(request: web.Request) -> AsyncIterator[list[tuple[str, int]]]:
    """Every ``EVENT_POLL_SECONDS`` until the console stops: the sources that changed
    since the last look, as (name, new version) pairs (often none)."""
    console = request.app[CONSOLE_KEY]
    seen = _versions(request)
    while not console.closing.is_set():
        try:
            await asyncio.wait_for(console.closing.wait(), EVENT_POLL_SECONDS)
            return
        except TimeoutError:
            pass
        now = _versions(request)
        yield [(name, version) for name, version in now.items() if seen.get(name) != version]
        seen = now


async def _events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: ``event: messages`` when the captured mail changes, ``event:
    queue`` when the queue does (``data``: the new version), until the client leaves or
    the console stops."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b"retry: 2000\n: connected\n\n")
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    try:
        async for changed in _changes(request):
            for name, version in changed:
                await response.write(f"event: {name}\ndata: {version}\n\n".encode())
            if changed:
                quiet_since = loop.time()
            elif loop.time() - quiet_since > _KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                quiet_since = loop.time()
    except (ConnectionError, RuntimeError):  # the client left
        pass
    return response


async def _websocket(request: web.Request) -> web.StreamResponse:
    """The same events over a WebSocket: a JSON object per change, ``{"event":
    "messages", "version": 12}``, after a first ``{"event": "connected", "versions":
    {...}}``. What the client sends is ignored. A page of another site may not open it
    (its Origin must be the console's own, when the browser sends one)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"http://{request.headers.get('Host', '')}":
        return _error(403, "cross-origin WebSocket refused")
    socket = web.WebSocketResponse(heartbeat=_KEEPALIVE_SECONDS, max_msg_size=4096)
    await socket.prepare(request)
    # Reading is what notices a close from the client (and answers its pings).
    reader = asyncio.ensure_future(_ignore_messages(socket))
    try:
        await socket.send_str(_dumps({"event": "connected", "versions": _versions(request)}))
        async for changed in _changes(request):
            if reader.done() or socket.closed:
                break
            for name, version in changed:
                await socket.send_str(_dumps({"event": name, "version": version}))
    except (ConnectionError, RuntimeError):  # the client left
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await socket.close()
    return socket


async def _ignore_messages(socket: web.WebSocketResponse) -> None:
    async for _ in socket:
        pass


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get(f"{PREFIX}/events", _events)
    router.add_get(f"{PREFIX}/ws", _websocket)
    router.add_get(f"{PREFIX}/messages", _messages_list)
    router.add_delete(f"{PREFIX}/messages", _messages_delete_all)
    router.add_get(f"{PREFIX}/messages/{{id}}", _message_show)
    router.add_delete(f"{PREFIX}/messages/{{id}}", _message_delete)
    router.add_get(f"{PREFIX}/messages/{{id}}/raw", _message_raw)
    router.add_get(f"{PREFIX}/messages/{{id}}/html", _message_html)
    router.add_get(f"{PREFIX}/messages/{{id}}/attachments/{{index}}", _message_attachment)
    router.add_post(f"{PREFIX}/messages/{{id}}/release", _message_release)
    router.add_get(f"{PREFIX}/queue", _queue_list)
    router.add_get(f"{PREFIX}/queue/stats", _queue_stats)
    router.add_post(f"{PREFIX}/queue/flush", _queue_flush_all)
    router.add_get(f"{PREFIX}/queue/{{id}}", _queue_show)
    router.add_post(f"{PREFIX}/queue/{{id}}/flush", _action(_flush, "recipients"))
    router.add_post(f"{PREFIX}/queue/{{id}}/hold", _action(_hold, "recipients"))
    router.add_post(f"{PREFIX}/queue/{{id}}/release", _action(_release, "recipients"))
    router.add_delete(f"{PREFIX}/queue/{{id}}", _action(_delete, "messages"))
    router.add_get(f"{PREFIX}/honeypot/summary", _honeypot_summary)
    router.add_get(f"{PREFIX}/honeypot/sessions", _honeypot_sessions)
    router.add_get(f"{PREFIX}/honeypot/sessions/{{id}}", _honeypot_session)
    router.add_get(f"{PREFIX}/honeypot/credentials", _honeypot_credentials)
    router.add_get(f"{PREFIX}/honeypot/messages", _honeypot_messages)
    router.add_get(f"{PREFIX}/honeypot/messages/{{id}}/raw", _honeypot_message_raw)
    router.add_get(f"{PREFIX}/honeypot/timeline", _honeypot_timeline)
