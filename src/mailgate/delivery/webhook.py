"""POST every accepted message to an HTTP endpoint, before the 250.

``WebhookDelivery("https://app.example.com/mail")`` is a message-stage plugin. Each message
is one ``multipart/form-data`` POST (aiohttp) with two parts:

* ``envelope`` (``application/json``)::

    {"id": "...", "mail_from": "a@example.org", "mail_params": {"BODY": "8BITMIME"},
     "rcpt_tos": [{"address": "b@example.com", "params": {}}],
     "size": 1234, "received_at": "2024-05-01T12:00:00.123456+00:00",
     "session": {"id": "...", "peer": {"host": "192.0.2.1", "port": 50123},
                 "helo": "client.example.org", "user": null, "lmtp": false,
                 "tls": {"version": "TLSv1.3", "cipher": "...", "server_name": null}}}

  ``mail_from`` is ``""`` for the null sender ``<>``; ``tls`` is ``null`` without TLS;
  ``size`` counts the bytes the client sent (the ``message`` part has mailgate's
  ``Received:`` header on top, unless that is switched off).
* ``message`` (``message/rfc822``, file name ``<id>.eml``): the raw message exactly as
  stored (trace header included), streamed from the spool file, never read whole.

The request also carries ``Idempotency-Key: <message id>`` (a retried POST may arrive
twice; the key lets the endpoint notice), any ``headers=`` given, and HTTP Basic auth when
the URL has ``user:password@`` (the plugin's ``name`` never shows them).

What the endpoint's answer means for the SMTP client:

=====================================  ==========================================================
2xx                                    delivered (250)
5xx, 408, 429, no connection, timeout  retried ``retries`` more times, waiting ``backoff`` * 2^n
                                       seconds (at most ``max_backoff``; a ``Retry-After`` in
                                       seconds is honoured up to that cap); then ``451``:
                                       ``4.4.1`` no answer / cannot connect, ``4.7.5`` TLS
                                       handshake failed, ``4.3.2`` for 429 and 503 (not
                                       accepting now), ``4.3.0`` other 5xx / 408
413                                    ``552 5.3.4`` message too big for the endpoint
other 4xx (400, 415, 422, ...)         ``554 5.7.1``: the endpoint will never take this message
401, 403, 404, 405, 407, 3xx           ``451 4.3.0`` without retrying: the webhook is
                                       misconfigured (wrong URL or credentials); mail must
                                       not bounce for that, the senders retry later
=====================================  ==========================================================

A ``text/plain`` body of a refusing answer gives the text of the SMTP reply (first line,
printable ASCII, 200 characters at most); otherwise the text names the HTTP status.

One ``aiohttp.ClientSession`` per plugin is created on first use on the running loop and
reused (keep-alive). Used from another loop later (a restarted server, a test calling
``asyncio.run`` twice), the plugin starts a new session there; the old one is closed on
its loop if that still runs, else dropped. Call ``await aclose()`` when done with the
plugin. https endpoints are verified with the system's CAs, or ``ssl_context=``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from mailgate.hooks import Envelope, HookError, Message, Reject, Session, TempFail

__all__ = ["WebhookDelivery"]

log = logging.getLogger("mailgate.delivery.webhook")

_RETRY_STATUS: Final = frozenset({408, 429})
# The endpoint is reachable but points elsewhere or wants other credentials: an operator
# must fix the configuration; until then mail waits at the senders instead of bouncing.
_MISCONFIGURED: Final = frozenset({401, 403, 404, 405, 407})
_MAX_REASON: Final = 200
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_USER_AGENT: Final = "mailgate-webhook"


class _Attempt(Exception):
    """One POST that did not deliver: the refusal to give if no retry helps, whether a
    retry may help, and how long the endpoint asked us to wait."""

    def __init__(
        self, refusal: Reject | TempFail, *, retry: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(refusal.text)
        self.refusal = refusal
        self.retry = retry
        self.retry_after = retry_after


class WebhookDelivery:
    """POST each message to ``url``; see the module docstring for the request and what the
    endpoint's answers mean.

    ``timeout``: seconds for one POST, start to end. ``retries``: further attempts after
    the first (so ``retries=3`` is up to four POSTs). ``backoff``/``max_backoff``: the
    waits between attempts. ``headers``: extra request headers (e.g. an API key).
    ``required=False``: run after the 250, in the background. ``ssl_context``: how to
    verify an https endpoint (default: the system's CAs).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
        required: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        try:
            parsed = URL(url.strip())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"webhook URL {_redact(url)!r}: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"webhook URL {_redact(url)!r}: use http:// or https:// with a host")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("webhook timeout must be positive; retries and backoffs not negative")
        self.url = parsed.with_user(None)  # drops the password too
        self.name = f"webhook:{self.url}"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers: CIMultiDict[str] = CIMultiDict({"User-Agent": _USER_AGENT})
        if parsed.user is not None or parsed.password is not None:
            self.headers["Authorization"] = aiohttp.encode_basic_auth(
                parsed.user or "", parsed.password or ""
            )
        self.headers.update(headers or {})
        self.required = required
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<WebhookDelivery {self.url}>"

    # --- the message stage ----------------------------------------------------------------

    async def on_message(self, session: Session, envelope: Envelope, message: Message) -> None:
        if message.path is None:
            raise HookError(f"{self.name} needs the message bytes (a spool)")
        await self._deliver(message, envelope_json(session, envelope, message))

    async def _deliver(self, message: Message, metadata: dict[str, Any]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._post(message, metadata)
                if attempt > 1:
                    log.info("message %s: %s took it on attempt %d", message.id, self.name, attempt)
                return
            except _Attempt as failed:
                if not failed.retry or attempt > self.retries:
                    level = logging.INFO if isinstance(failed.refusal, Reject) else logging.WARNING
                    log.log(
                        level,
                        "message %s: %s: %s (attempt %d)",
                        message.id,
                        self.name,
                        failed,
                        attempt,
                    )
                    raise failed.refusal from None
                delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
                if failed.retry_after is not None:
                    delay = min(max(delay, failed.retry_after), self.max_backoff)
                log.debug(
                    "message %s: %s: %s; retrying in %.2f s", message.id, self.name, failed, delay
                )
                await asyncio.sleep(delay)

    async def _post(self, message: Message, metadata: dict[str, Any]) -> None:
        # A file of its own per attempt: aiohttp reads it in chunks in a worker thread
        # (never the whole message in memory) and closes it when the request is sent.
        file = await asyncio.get_running_loop().run_in_executor(None, message.open)
        try:
            await self._post_file(message, metadata, file)
        finally:
            file.close()

    async def _post_file(self, message: Message, metadata: dict[str, Any], file: IO[bytes]) -> None:
        form = aiohttp.MultipartWriter("form-data")
        part = form.append_json(metadata)
        part.set_content_disposition("form-data", name="envelope")
        part = form.append(file, {"Content-Type": "message/rfc822"})
        part.set_content_disposition("form-data", name="message", filename=f"{message.id}.eml")
        headers = CIMultiDict(self.headers)
        headers["Idempotency-Key"] = message.id
        try:
            async with self._client().post(
                self.url,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                if 200 <= response.status <= 299:
                    return
                raise await _judge(response)
        except _Attempt:
            raise
        except TimeoutError:
            raise _Attempt(_unavailable("no answer in time", "4.4.1"), retry=True) from None
        except aiohttp.ClientSSLError:  # a certificate we cannot trust will not change soon,
            # but an operator may be replacing it right now: temporary, and retried
            raise _Attempt(_unavailable("TLS handshake failed", "4.7.5"), retry=True) from None
        except aiohttp.ClientConnectionError as exc:
            raise _Attempt(
                _unavailable(f"cannot connect ({type(exc).__name__})", "4.4.1"), retry=True
            ) from None
        except aiohttp.ClientError as exc:  # a malformed answer, a broken payload
            raise _Attempt(
                _unavailable(f"bad answer ({type(exc).__name__})", "4.3.0"), retry=True
            ) from None

    # --- the HTTP session -----------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        """The session for the running loop, made on first use there."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and not session.closed and self._session_loop is loop:
            return session
        if session is not None and not session.closed:
            self._abandon(session, self._session_loop)
        self._session = aiohttp.ClientSession()
        self._session_loop = loop
        return self._session

    @staticmethod
    def _abandon(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop | None) -> None:
        """Let go of a session made on another loop: closed there if that loop still runs;
        otherwise its sockets died with their loop and it is only detached."""
        if loop is not None and not loop.is_closed() and loop.is_running():
            closing = session.close()
            try:
                asyncio.run_coroutine_threadsafe(closing, loop)
                return
            except RuntimeError:  # the loop closed just now
                closing.close()
        session.detach()

    async def aclose(self) -> None:
        """Close the HTTP session (connections kept alive). The plugin makes a new one if
        used again."""
        session, loop = self._session, self._session_loop
        self._session = self._session_loop = None
        if session is None or session.closed:
            return
        if loop is asyncio.get_running_loop():
            await session.close()
        else:
            self._abandon(session, loop)


# --- helpers --------------------------------------------------------------------------------


def envelope_json(session: Session, envelope: Envelope, message: Message) -> dict[str, Any]:
    """The ``envelope`` part: what the message's envelope and session were."""
    tls = session.tls
    return {
        "id": message.id,
        "mail_from": envelope.sender,
        "mail_params": dict(envelope.mail_params),
        "rcpt_tos": [{"address": str(r), "params": dict(r.params)} for r in envelope.rcpt_tos],
        "size": message.size,
        "received_at": datetime.fromtimestamp(message.received_at, UTC).isoformat(),
        "session": {
            "id": session.id,
            "peer": {"host": session.peer_host, "port": session.peer_port},
            "helo": session.helo,
            "user": session.user,
            "lmtp": session.lmtp,
            "tls": None
            if tls is None
            else {"version": tls.version, "cipher": tls.cipher, "server_name": tls.server_name},
        },
    }


def _redact(url: str) -> str:
    """The URL as error messages show it: never the password."""
    return re.sub(r"(//[^/@?#]*?:)[^/@?#]*@", r"\1***@", url)


def _unavailable(why: str, enhanced: str) -> TempFail:
    return TempFail(451, f"Webhook endpoint unavailable: {why}, try again later", enhanced=enhanced)


async def _judge(response: aiohttp.ClientResponse) -> _Attempt:
    """What a non-2xx answer means (see the table in the module docstring)."""
    status = response.status
    reason = await _reason(response) or f"HTTP {status} {response.reason or ''}".strip()
    if status >= 500 or status in _RETRY_STATUS:
        enhanced = "4.3.2" if status in (429, 503) else "4.3.0"
        return _Attempt(
            _unavailable(reason, enhanced), retry=True, retry_after=_retry_after(response)
        )
    if status in _MISCONFIGURED or 300 <= status <= 399:
        return _Attempt(
            TempFail(
                451, f"Webhook endpoint misconfigured: {reason}, try again later", enhanced="4.3.0"
            ),
            retry=False,
        )
    if status == 413:
        return _Attempt(
            Reject(552, f"Message too big for the webhook endpoint: {reason}", enhanced="5.3.4"),
            retry=False,
        )
    if 400 <= status <= 499:
        return _Attempt(
            Reject(554, f"Webhook endpoint refused the message: {reason}", enhanced="5.7.1"),
            retry=False,
        )
    # 1xx and other oddities that aiohttp hands over as a final answer
    return _Attempt(_unavailable(f"unexpected HTTP {status}", "4.3.0"), retry=True)


async def _reason(response: aiohttp.ClientResponse) -> str | None:
    """The first line of a short text/plain body, made safe for an SMTP reply."""
    if response.content_type != "text/plain":
        return None
    try:
        head = await response.content.read(4096)
    except (aiohttp.ClientError, TimeoutError):
        return None
    line = head.decode("utf-8", "replace").strip().split("\n", 1)[0]
    return _UNPRINTABLE.sub("?", line).strip()[:_MAX_REASON] or None


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
