"""The honeypot plugin: capture credentials and messages, and slow attackers down.

``HoneypotPlugin`` is an extension-API plugin (name ``honeypot``) that

- answers AUTH as configured (``auth_outcome``: ``refuse``, ``accept`` or
  ``accept-after:N`` -- the Nth attempt from an address and later ones are accepted)
  and records every attempt: mechanism, user name, password (PLAIN, LOGIN), bearer
  token (XOAUTH2), or challenge and digest (CRAM-MD5, in hashcat's ``$cram_md5$``
  format); with ``drop_after_credentials`` it answers 535 and hangs up instead;
- stores every message: the bytes the client sent (the server's own trace headers taken
  off), their SHA-256, subject, URLs and attachments, then answers 250 -- a honeypot never
  relays or delivers: its 250 ends the message chain, so no delivery step after it runs;
- tarpits: before each answer it waits ``tarpit`` seconds times the number of
  connections seen from the client's address (at most ``tarpit_max``);
- counts connections and AUTH attempts per address in this process, or, given
  ``address_counts`` (``[state] backend = "redis"``), over every node sharing the store:
  the tarpit and ``accept-after:N`` then see what the address did on any node. When the
  store does not answer, this process's own counts are used (or, when the store says to
  fail closed, the connection gets ``421 4.3.0`` and AUTH ``454 4.7.0``);
- adds a persona's timing jitter: a delay drawn from ``banner_delay`` before the banner
  and from ``reply_delay`` before the other answers it paces (``(0, 0)``, the default:
  none, and no sleep at all);
- keeps the store's total cap while mail is received: at DATA it reserves room for the
  message (its announced SIZE, else the server's message size limit) and, when even
  pruning the oldest finished sessions cannot make room, refuses the DATA with ``452
  4.3.1`` (``storage_full_reply``); a running count of the spool directory catches
  clients that send more than they announced, and closes the newest of the messages in
  flight with that reply while the store is over its cap;
- ends sessions older than ``max_session_seconds``: with ``421 4.4.2`` at the next
  command, and with a timer for clients that send nothing or only commands no plugin
  sees (NOOP, RSET) -- the timer needs the server, given by :meth:`install`, to close
  the session (``server.close_session``).

The replies it words itself can be given in other words (a persona's): see
``auth_drop_reply``, ``session_expired_reply``, ``storage_full_reply`` and
``message_reply``.

``plugin.recorder`` is the server's transcript tap (``server.recorder``) feeding the same
:class:`~mailgate.honeypot.store.CaptureStore`; :meth:`install` sets both up::

    store = CaptureStore("/var/lib/mailgate-honeypot", jsonl="-")
    HoneypotPlugin(store, auth_outcome="accept-after:3", tarpit=0.5).install(server)
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import logging
import os
import random
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

from mailgate.hooks import (
    Address,
    AuthAttempt,
    Envelope,
    Message,
    Reject,
    Session,
    TempFail,
)
from mailgate.plugins.state import StateUnavailable
from mailgate.protocol import Reply
from mailgate.protocol.replies import AUTH_FAILED
from mailgate.protocol.sasl import MECHANISMS

from .extract import (
    MAX_ATTACHMENTS,
    MAX_DEPTH,
    MAX_PARTS,
    MAX_URLS,
    Extracted,
    extract,
    extract_subject,
)
from .recipients import RecipientPolicy, RecipientReply, VerifyLine
from .settings import AUTH_OUTCOMES, parse_auth_outcome
from .store import CaptureStore, RawMessage

if TYPE_CHECKING:
    # Types only: importing the plugin (the configuration reader does, for
    # parse_auth_outcome) should not load the server.
    from mailgate.server.host import SessionRecorder
    from mailgate.server.options import ServerOptions

log = logging.getLogger("mailgate.honeypot")

__all__ = [
    "AUTH_OUTCOMES",
    "CaptureRecorder",
    "HoneypotHost",
    "HoneypotPlugin",
    "MessageReply",
    "SessionReply",
    "parse_auth_outcome",
]

NAME: Final = "honeypot"
#: Addresses remembered for the tarpit and accept-after (least recently seen forgotten).
MAX_ADDRESSES: Final = 65536
#: Bytes read from the top of a message to find the server's own trace header.
_TOP: Final = 64 * 1024
#: Messages waiting for analysis beyond which a new one only has its subject read.
MAX_ANALYSIS_BACKLOG: Final = 32
#: Seconds between two looks at the spool directory while messages are in flight.
SPOOL_CHECK_INTERVAL: Final = 0.05


#: A reply worded for one session (a persona's text naming the client, say).
SessionReply = Callable[[Session], Reply]
#: The reply to a captured message; ``RawMessage`` is None when it could not be stored.
MessageReply = Callable[[Session, Message, RawMessage | None], Reply]


class AddressCounts(Protocol):
    """Per-address counts shared by several nodes
    (:class:`~mailgate.plugins.redis_state.RedisAddressCounts`). ``bump`` adds one to
    ``counter`` (``"connections"``, ``"auth_attempts"``) of ``ip`` and returns the new
    total; it raises :class:`~mailgate.plugins.state.StateUnavailable` when the store
    does not answer."""

    async def bump(self, ip: str, counter: str) -> int: ...

    async def aclose(self) -> None: ...


class HoneypotHost(Protocol):
    """What :meth:`HoneypotPlugin.install` needs of a server (``mailgate.Server`` and
    the core ``SMTPServer`` are such servers)."""

    @property
    def options(self) -> ServerOptions: ...

    #: The transcript tap for connections made from now on.
    recorder: SessionRecorder | None

    def add_plugin(self, plugin: Any) -> Any: ...

    def close_session(self, session: Session, reply: Reply, reason: str = "closed") -> bool: ...


class CaptureRecorder:
    """The server's transcript tap (``SessionRecorder``) writing to a CaptureStore."""

    def __init__(self, store: CaptureStore) -> None:
        self.store = store

    def opened(self, session: Session) -> None:
        self.store.session_opened(session)

    def received(self, session: Session, line: bytes) -> None:
        self.store.line(session, "c", line)

    def sent(self, session: Session, data: bytes) -> None:
        self.store.line(session, "s", data)

    def tls(self, session: Session) -> None:
        self.store.session_tls(session)

    def closed(self, session: Session, reason: str) -> None:
        self.store.session_closed(session, reason)


@dataclass(slots=True)
class _Address:
    """What the plugin remembers about one client address."""

    connections: int = 0
    auth_attempts: int = 0


class HoneypotPlugin:
    """See the module docstring. Constructor arguments:

    ``store``: the CaptureStore (closed by :meth:`aclose` unless ``close_store=False``);
    ``auth_outcome``: ``"refuse"`` (default), ``"accept"`` or ``"accept-after:N"``;
    ``drop_after_credentials``: answer 535 and disconnect after recording credentials;
    ``tarpit``: seconds per connection seen from the address (0: off), ``tarpit_max``:
    the cap of one delay (keep it below the server's ``hook_timeout``);
    ``max_session_seconds``: the longest session (None: no limit);
    ``max_urls``/``max_attachments``/``max_parse_bytes``: what message parsing keeps and
    reads; ``analysis_budget`` (CPU seconds per message, None: no limit),
    ``analysis_max_parts`` and ``analysis_max_depth``: how much of a message is analysed;
    ``analysis_workers``: threads analysing messages, ``io_workers``: threads copying
    them into the store (both pools the plugin's own, so that neither can hold up the
    event loop's default executor, which the server opens spool files in);
    ``max_analysis_backlog``: messages waiting for analysis beyond which a new one only
    has its subject read; ``auth_mechanisms``: offered when no ``auth_mechanisms`` setting overrides;
    ``clock``: the time source (session ages compare with ``session.started_at``);
    ``address_counts``: where connections and AUTH attempts per address are counted
    when several nodes share them (None: in this process); closed by :meth:`aclose`;
    ``banner_delay``/``reply_delay``: ``(min, max)`` seconds of jitter before the banner /
    before each other paced answer (a persona's timing; added to the tarpit), ``rng``
    the random source it is drawn from.

    ``storage_check_interval``: seconds between two looks at the spool directory while
    messages are received (the running count of bytes in flight).

    ``recipients``: a :class:`~mailgate.honeypot.recipients.RecipientPolicy` deciding
    which RCPTs are taken (local users, relaying) and how the others are refused, in the
    persona's words; None takes every recipient. ``vrfy_checks_users``: VRFY of an
    unknown user or another domain gets the same refusal as RCPT (Postfix does that).
    ``vrfy_user_line``/``vrfy_unknown_user``: VRFY and EXPN are answered from the
    policy's users, full names and aliases in these words (Sendmail does that).

    Replies in other words (a persona's), each None for the plugin's own:
    ``auth_drop_reply(session)``: the 5xx that ends a session with
    ``drop_after_credentials``; ``session_expired_reply(session)``: what a session past
    ``max_session_seconds`` is closed with (its code says whether the next command gets a
    Reject or a TempFail); ``storage_full_reply(session)``: the 4xx for a DATA refused
    (or a message in flight stopped) because the store is at its total cap;
    ``message_reply(session, message, raw)``: the answer to a
    captured message, called after it was stored (``raw`` has its bytes' head, to quote
    the Message-ID, say), instead of the server's 250.
    """

    name = NAME

    def __init__(
        self,
        store: CaptureStore,
        *,
        auth_outcome: str = "refuse",
        drop_after_credentials: bool = False,
        tarpit: float = 0.0,
        tarpit_max: float = 10.0,
        max_session_seconds: float | None = None,
        max_urls: int = MAX_URLS,
        max_attachments: int = MAX_ATTACHMENTS,
        max_parse_bytes: int = 10 * 1024 * 1024,
        analysis_budget: float | None = 2.0,
        analysis_max_parts: int = MAX_PARTS,
        analysis_max_depth: int = MAX_DEPTH,
        analysis_workers: int = 1,
        io_workers: int = 4,
        max_analysis_backlog: int = MAX_ANALYSIS_BACKLOG,
        auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"),
        close_store: bool = True,
        clock: Callable[[], float] = time.time,
        auth_drop_reply: SessionReply | None = None,
        session_expired_reply: SessionReply | None = None,
        storage_full_reply: SessionReply | None = None,
        message_reply: MessageReply | None = None,
        storage_check_interval: float = SPOOL_CHECK_INTERVAL,
        address_counts: AddressCounts | None = None,
        banner_delay: tuple[float, float] = (0.0, 0.0),
        reply_delay: tuple[float, float] = (0.0, 0.0),
        rng: random.Random | None = None,
        recipients: RecipientPolicy | None = None,
        vrfy_checks_users: bool = False,
        vrfy_user_line: VerifyLine | None = None,
        vrfy_unknown_user: RecipientReply | None = None,
    ) -> None:
        self.store = store
        self.address_counts = address_counts
        for what, (low, high) in (("banner_delay", banner_delay), ("reply_delay", reply_delay)):
            if not 0 <= low <= high:
                raise ValueError(f"{what} must be (min, max) with 0 <= min <= max")
        self.banner_delay = (float(banner_delay[0]), float(banner_delay[1]))
        self.reply_delay = (float(reply_delay[0]), float(reply_delay[1]))
        self._rng = rng or random.Random()
        #: VRFY answered from ``recipients`` like RCPT (the persona's product does so).
        self.vrfy_checks_users = vrfy_checks_users
        #: VRFY/EXPN answered from ``recipients``' users, full names and aliases in these
        #: words (Sendmail); None: not answered so.
        self.vrfy_user_line = vrfy_user_line
        self.vrfy_unknown_user = vrfy_unknown_user
        #: Which recipients are taken and how the others are refused (None: all taken).
        self.recipients = recipients
        self.auth_mode, self.accept_after = parse_auth_outcome(auth_outcome)
        self.auth_outcome = auth_outcome
        if tarpit < 0 or tarpit_max < 0:
            raise ValueError("tarpit and tarpit_max must not be negative")
        if max_session_seconds is not None and max_session_seconds <= 0:
            raise ValueError("max_session_seconds must be positive (or None for no limit)")
        self.drop_after_credentials = drop_after_credentials
        self.tarpit = float(tarpit)
        self.tarpit_max = float(tarpit_max)
        self.max_session_seconds = max_session_seconds
        self.max_urls = max_urls
        self.max_attachments = max_attachments
        self.max_parse_bytes = max_parse_bytes
        if analysis_budget is not None and analysis_budget < 0:
            raise ValueError("analysis_budget must not be negative (or None for no limit)")
        if analysis_max_parts < 1 or analysis_max_depth < 1:
            raise ValueError("analysis_max_parts and analysis_max_depth must be at least 1")
        self.analysis_budget = analysis_budget
        self.analysis_max_parts = analysis_max_parts
        self.analysis_max_depth = analysis_max_depth
        self.max_analysis_backlog = max(0, max_analysis_backlog)
        #: Seconds the answer to a message waits for its analysis at most.
        self.reply_wait = (analysis_budget if analysis_budget is not None else 10.0) + 1.0
        self._analysis_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, analysis_workers), thread_name_prefix="honeypot-analysis"
        )
        self._io_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, io_workers), thread_name_prefix="honeypot-io"
        )
        #: Messages handed to the analysis pool and not finished.
        self._analysing = 0
        #: Set by aclose: analyses still waiting only read the subject.
        self._closing = False
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.close_store = close_store
        self.clock = clock
        self.auth_drop_reply = auth_drop_reply
        self.session_expired_reply = session_expired_reply
        self.storage_full_reply = storage_full_reply
        self.message_reply = message_reply
        self.storage_check_interval = storage_check_interval
        #: Session id -> size of its complete message whose spool file the server has
        #: not dropped yet (between the message stage and the next DATA or the close).
        self._finishing: dict[str, int] = {}
        #: Sessions receiving a message now (reserved in the store), oldest first.
        self._in_flight: dict[str, Session] = {}
        #: Of those, the ones whose message has not ended yet (it can still grow).
        self._receiving: dict[str, Session] = {}
        self._spool_watch: asyncio.Task[None] | None = None
        self.recorder = CaptureRecorder(store)
        self.server: HoneypotHost | None = None
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self._captures: set[asyncio.Future[None]] = set()

    def install(self, server: HoneypotHost) -> HoneypotPlugin:
        """Add this plugin to ``server`` and make its recorder the server's transcript tap;
        also lets ``max_session_seconds`` close sessions that stay silent."""
        hook_timeout = server.options.hook_timeout
        if self.tarpit and self.tarpit_max >= hook_timeout:
            self.tarpit_max = max(0.0, hook_timeout - 1.0)
            log.warning(
                "honeypot: tarpit_max lowered to %.1f s, below hook_timeout (%.0f s)",
                self.tarpit_max,
                hook_timeout,
            )
        # Jitter is the persona's look, never a reason for a 451: keep the longest one
        # (with the tarpit's) below the hook timeout too.
        room = max(0.0, hook_timeout - 1.0 - (self.tarpit_max if self.tarpit else 0.0))
        for what in ("banner_delay", "reply_delay"):
            low, high = getattr(self, what)
            if high > room:
                setattr(self, what, (min(low, room), room))
                log.warning(
                    "honeypot: %s lowered to at most %.1f s, below hook_timeout (%.0f s)",
                    what,
                    room,
                    hook_timeout,
                )
        server.add_plugin(self)
        server.recorder = self.recorder
        self.server = server
        return self

    # --- stages ------------------------------------------------------------------------------

    async def on_connect(self, session: Session) -> None:
        state = self._address(session.peer_host)
        state.connections = await self._count(session, "connections", state.connections)
        if self.max_session_seconds is not None and self.server is not None:
            loop = asyncio.get_running_loop()
            remaining = self.max_session_seconds - (self.clock() - session.started_at)
            timer = loop.call_later(max(0.0, remaining), self._expire, session)
            session.notes.setdefault(self.name, {})["timer"] = timer
        await self._pace(session, jitter=self.banner_delay)

    async def on_helo(self, session: Session, hostname: str) -> None:
        await self._pace(session)

    async def on_auth(self, session: Session, auth: AuthAttempt) -> bool | None:
        state = self._address(session.peer_host)
        state.auth_attempts = await self._count(session, "auth_attempts", state.auth_attempts)
        if self.auth_mode == "accept":
            accepted = True
        elif self.auth_mode == "accept-after":
            accepted = state.auth_attempts >= self.accept_after
        else:
            accepted = False
        mechanism = MECHANISMS.get(auth.method)
        if mechanism is not None and mechanism.capture_only:
            # DIGEST-MD5: the protocol refuses it whatever this says (no rspauth without
            # the real password), so the record says so too.
            accepted = False
        drop = self.drop_after_credentials
        outcome = "dropped" if drop else ("accepted" if accepted else "refused")
        token = auth.token
        if auth.method == "CRAM-MD5" and auth.challenge is not None and auth.digest:
            token = _hashcat_cram_md5(auth.username, auth.challenge, auth.digest)
        self.store.auth_attempt(
            session,
            mechanism=auth.method,
            username=auth.username,
            password=auth.password,
            token=token,
            outcome=outcome,
        )
        log.info(
            "session %s: AUTH %s %r from %s (attempt %d from this address): %s",
            session.id,
            auth.method,
            auth.username,
            session.peer_host,
            state.auth_attempts,
            outcome,
        )
        await self._pace(session, check_age=False)
        if drop:
            reply = self.auth_drop_reply(session) if self.auth_drop_reply else AUTH_FAILED
            raise Reject(reply.code, reply.text, enhanced=reply.status, disconnect=True)
        self._check_age(session)
        # Refused: None leaves the answer to the server (its usual 535 after its failure
        # delay); another auth plugin could still accept, which a honeypot does not have.
        return True if accepted else None

    async def on_mail(self, session: Session, envelope: Envelope, address: Address) -> None:
        await self._pace(session)

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> Reply | None:
        await self._pace(session)
        if self.recipients is not None:
            return self.recipients.judge(session, address, envelope.mail_from)
        return None

    async def on_vrfy(self, session: Session, argument: str, expand: bool) -> Reply | None:
        # Products that look the user up for VRFY (Postfix) refuse unknown users and other
        # domains in their RCPT words; EXPN is left to the persona's answer.
        if (
            self.recipients is not None
            and self.vrfy_user_line is not None
            and self.vrfy_unknown_user is not None
        ):
            # Products that answer from the password file and aliases (Sendmail).
            return self.recipients.answer_verify(
                session,
                argument,
                expand,
                user_line=self.vrfy_user_line,
                unknown=self.vrfy_unknown_user,
            )
        if self.recipients is not None and self.vrfy_checks_users and not expand:
            return self.recipients.judge_vrfy(session, argument)
        return None

    async def on_data_start(self, session: Session, envelope: Envelope) -> None:
        # The session's last message, if any, was dropped from the spool before this.
        self._finishing.pop(session.id, None)
        await self._pace(session)
        await self._reserve(session, envelope)

    async def on_message(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Reply | bool:
        # Shielded: a client that goes away while its message is read must not leave the
        # raw file placed without its row (orphaned, never pruned). The capture finishes
        # on its own and the stage is cancelled as usual.
        self._receiving.pop(session.id, None)  # complete: it cannot grow any more
        # Its spool file stays until the server drops it after the reply, when its
        # reservation is gone already: counted as expected until then, so the spool
        # watch does not take it for a client sending more than it reserved.
        self._finishing[session.id] = message.size
        stored: asyncio.Future[RawMessage | None] = asyncio.get_running_loop().create_future()
        capture = asyncio.ensure_future(self._capture(session, envelope, message, stored))
        self._captures.add(capture)
        capture.add_done_callback(self._captures.discard)
        try:
            raw = await asyncio.shield(stored)
            # The answer waits for the analysis only so long: behind a backlog of hostile
            # messages it comes anyway, and the row is written when the analysis is done.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(capture), self.reply_wait)
        finally:
            self._release(session)
        await self._pace(session, check_age=False)
        # The 250 (or the reply given) ends the chain: no delivery step after this one runs.
        if self.message_reply is not None:
            return self.message_reply(session, message, raw)
        return True

    async def _capture(
        self,
        session: Session,
        envelope: Envelope,
        message: Message,
        stored: asyncio.Future[RawMessage | None],
    ) -> None:
        """Store the message (``stored`` gets what was stored, None when it could not
        be), analyse it and record it."""
        loop = asyncio.get_running_loop()
        keep = self.store.reserve_message_bytes(session.id, message.size)
        raw: RawMessage | None = None
        try:
            raw = await loop.run_in_executor(
                self._io_pool, self._read_message, message, keep, session.id
            )
            stored.set_result(raw)
            extracted = await self._analyse(raw)
        except Exception:
            log.exception("session %s: message %s could not be captured", session.id, message.id)
            if not stored.done():
                stored.set_result(None)
            return
        except BaseException:
            if not stored.done():
                stored.set_result(raw)
            raise
        truncated = extracted.truncated
        if truncated is None and raw.size > len(raw.head):
            truncated = "size"
        self.store.message(
            session,
            message_id=message.id,
            ts=message.received_at,
            mail_from=envelope.sender,
            rcpt_tos=[str(r) for r in envelope.rcpt_tos],
            raw=raw,
            subject=extracted.subject,
            urls=extracted.urls,
            attachments=extracted.attachments,
            analysis_truncated=truncated,
        )
        log.info(
            "session %s: captured message %s from=<%s> rcpts=%d size=%d sha256=%s%s",
            session.id,
            message.id,
            envelope.sender,
            len(envelope.rcpt_tos),
            raw.size,
            raw.sha256,
            f" (analysis cut short: {truncated})" if truncated else "",
        )

    async def _analyse(self, raw: RawMessage) -> Extracted:
        """Subject, URLs and attachments of a stored message, found in the analysis pool
        within the budget; with too many messages waiting, only the subject."""
        if self._analysing >= self.max_analysis_backlog:
            return Extracted(extract_subject(raw.head), (), (), "backlog")
        self._analysing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._analysis_pool, functools.partial(self._extract, raw.head)
            )
        finally:
            self._analysing -= 1

    def _extract(self, head: bytes) -> Extracted:
        """In an analysis thread. A message still waiting when the plugin closes only has
        its subject read: shutting down must not wait for a backlog of analyses."""
        if self._closing:
            return Extracted(extract_subject(head), (), (), "backlog")
        return extract(
            head,
            max_urls=self.max_urls,
            max_attachments=self.max_attachments,
            max_parts=self.analysis_max_parts,
            max_depth=self.analysis_max_depth,
            budget=self.analysis_budget,
        )

    async def on_close(self, session: Session) -> None:
        self._release(session)
        self._finishing.pop(session.id, None)
        notes = session.notes.get(self.name)
        if notes is not None and notes.get("timer") is not None:
            notes.pop("timer").cancel()

    async def aclose(self) -> None:
        self._closing = True
        if self.address_counts is not None:
            await self.address_counts.aclose()
        if self._spool_watch is not None:
            self._spool_watch.cancel()
        if self._captures:  # messages still being read: their rows belong in the store
            await asyncio.gather(*self._captures, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self.close_store:
            await loop.run_in_executor(self._io_pool, self.store.close)
        else:
            await loop.run_in_executor(self._io_pool, self.store.flush)
        self._analysis_pool.shutdown(wait=False)
        self._io_pool.shutdown(wait=False)

    # --- helpers -----------------------------------------------------------------------------

    async def _count(self, session: Session, counter: str, mine: int) -> int:
        """One more ``counter`` for the session's address: the total over every node when
        the counts are shared, else (or when the store does not answer) this process's."""
        shared = self.address_counts
        if shared is None:
            return mine + 1
        try:
            return await shared.bump(session.peer_host, counter)
        except StateUnavailable as exc:
            # The store logs the outage once; this session's fallback goes to DEBUG.
            log.debug("session %s: %s counted here only: %s", session.id, counter, exc)
            if not exc.fail_closed:
                return mine + 1
            if counter == "auth_attempts":
                raise TempFail(
                    454, "Temporary authentication failure, try again later", enhanced="4.7.0"
                ) from None
            raise TempFail(
                421,
                "Service temporarily unavailable, try again later",
                enhanced="4.3.0",
                disconnect=True,
            ) from None

    def _address(self, ip: str) -> _Address:
        addresses = self._addresses
        state = addresses.get(ip)
        if state is None:
            state = addresses[ip] = _Address()
            if len(addresses) > MAX_ADDRESSES:
                addresses.popitem(last=False)
        else:
            addresses.move_to_end(ip)
        return state

    async def _reserve(self, session: Session, envelope: Envelope) -> None:
        """Reserve room in the store for the message about to come, pruning the oldest
        finished sessions if needed; refuse the DATA when there is none."""
        store = self.store
        if store.max_total_bytes is None:
            return
        limit = self.server.options.max_size if self.server is not None else None
        size = limit or 0
        announced = envelope.mail_params.get("SIZE")
        if announced is not None and announced.isdigit():
            size = int(announced) if not limit else min(int(announced), limit)
        if not store.reserve_incoming(session.id, size):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io_pool, store.make_room, size)
            if not store.reserve_incoming(session.id, size):
                log.warning(
                    "session %s: DATA refused, the capture store is full (%d bytes stored,"
                    " %d reserved for messages in flight, cap %d)",
                    session.id,
                    store.stored_bytes,
                    store.reserved_bytes(),
                    store.max_total_bytes,
                )
                reply = self._storage_full(session)
                raise TempFail(reply.code, reply.text, enhanced=reply.status)
        self._in_flight[session.id] = session
        self._receiving[session.id] = session
        if self._spool_watch is None or self._spool_watch.done():
            self._spool_watch = asyncio.ensure_future(self._watch_spool())

    def _release(self, session: Session) -> None:
        self._receiving.pop(session.id, None)
        if self._in_flight.pop(session.id, None) is not None:
            self.store.release_incoming(session.id)

    def _storage_full(self, session: Session) -> Reply:
        if self.storage_full_reply is not None:
            return self.storage_full_reply(session)
        return Reply(452, "4.3.1", ("Insufficient system storage",))

    async def _watch_spool(self) -> None:
        """While messages are in flight: the running count of what they really take in
        the spool, against what was reserved for them. Bytes beyond the reservations
        (clients sending more than they announced) that take the store over its cap stop
        the newest message in flight, until it is under the cap again."""
        server = self.server
        spool = getattr(server, "spool_dir", None)
        cap = self.store.max_total_bytes
        if server is None or spool is None or cap is None:
            return
        loop = asyncio.get_running_loop()
        while self._receiving:
            await asyncio.sleep(self.storage_check_interval)
            spooled = await loop.run_in_executor(self._io_pool, _directory_bytes, spool)
            reserved = self.store.reserved_bytes() + sum(self._finishing.values())
            # Honest clients stay within their reservations, which fit under the cap.
            # Acting at the database's headroom leaves a fast client less to overshoot by.
            limit = cap - self.store.journal_limit()
            if spooled <= reserved or self.store.stored_bytes + spooled <= limit:
                continue
            for session in reversed(list(self._receiving.values())):
                reply = self._storage_full(session)
                log.warning(
                    "session %s: message stopped, the capture store is over its cap (%d"
                    " bytes in flight, %d reserved)",
                    session.id,
                    spooled,
                    reserved,
                )
                self._release(session)
                server.close_session(session, reply, "storage-full")
                break

    def delay(self, ip: str) -> float:
        """The tarpit delay for the address now."""
        if not self.tarpit:
            return 0.0
        state = self._addresses.get(ip)
        connections = state.connections if state is not None else 1
        return min(self.tarpit * max(1, connections), self.tarpit_max)

    async def _pace(
        self,
        session: Session,
        *,
        check_age: bool = True,
        jitter: tuple[float, float] | None = None,
    ) -> None:
        if check_age:
            self._check_age(session)
        delay = self.delay(session.peer_host)
        low, high = self.reply_delay if jitter is None else jitter
        if high > 0:
            delay += self._rng.uniform(low, high)
        if delay > 0:
            await asyncio.sleep(delay)

    def _check_age(self, session: Session) -> None:
        limit = self.max_session_seconds
        if limit is not None and self.clock() - session.started_at >= limit:
            log.info("session %s: longer than %.0f s, closing", session.id, limit)
            raise self.too_long_refusal(session)

    def _expire(self, session: Session) -> None:
        """The max_session_seconds timer: close the session's connection with a 421."""
        server = self.server
        if server is None:
            return
        if server.close_session(session, self.too_long_reply(session), "max-session"):
            log.info(
                "session %s: longer than %.0f s, closing", session.id, self.max_session_seconds
            )

    def too_long_refusal(self, session: Session) -> Reject | TempFail:
        """What a session older than max_session_seconds gets at its next command
        (``session_expired_reply`` words it, when given)."""
        if self.session_expired_reply is not None:
            reply = self.session_expired_reply(session)
            kind = TempFail if reply.code < 500 else Reject
            return kind(reply.code, reply.text, enhanced=reply.status, disconnect=True)
        return TempFail(421, _TIMEOUT_TEXT, enhanced="4.4.2", disconnect=True)

    def too_long_reply(self, session: Session) -> Reply:
        """What the session timer closes a too long session with
        (``session_expired_reply`` words it, when given)."""
        if self.session_expired_reply is not None:
            return self.session_expired_reply(session)
        hostname = self.server.options.hostname if self.server is not None else "localhost"
        return Reply(421, "4.4.2", (f"{hostname} {_TIMEOUT_TEXT}",))

    def _read_message(
        self, message: Message, keep: bool, reserved: str | None = None
    ) -> RawMessage:
        """In an I/O thread: store the message as the client sent it, with its top."""
        with message.open() as source:
            _skip_own_headers(source, message.id)
            # The spool file itself when the client's bytes start at its top (honeypot mode
            # adds no trace header): hard-linked into the store, never copied.
            same = message.path is not None and source.tell() == 0
            return self.store.save_raw(
                source,
                keep=keep,
                head=self.max_parse_bytes,
                link_from=message.path if same else None,
                reserved=reserved,
            )


_TIMEOUT_TEXT: Final = "Error: timeout exceeded"
#: The "id QUEUE-ID" clause of a Received header.
_IDS: Final = re.compile(rb"\sid\s+([^\s;]+)")


def _directory_bytes(directory: Path) -> int:
    """Bytes of the files directly in ``directory`` (files may vanish meanwhile) but for
    those with other names too: a message already linked into the store counts there."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                    total += info.st_size
    return total


def _hashcat_cram_md5(username: str, challenge: bytes, digest: str) -> str:
    """CRAM-MD5 credentials as hashcat (mode 10200) and John the Ripper take them."""
    answer = f"{username} {digest}".encode()
    encoded = base64.b64encode(challenge).decode(), base64.b64encode(answer).decode()
    return f"$cram_md5${encoded[0]}${encoded[1]}"


def _skip_own_headers(source: IO[bytes], queue_id: str) -> None:
    """Position ``source`` after the server's own ``Received:`` header for this message
    (the one naming its queue id) and any header a step prepended above it; leave it at
    the start when there is none."""
    top = source.read(_TOP)
    end = _own_headers_end(top, queue_id)
    with contextlib.suppress(OSError):
        source.seek(end)


def _own_headers_end(top: bytes, queue_id: str) -> int:
    """Offset just past the server's Received header (see _skip_own_headers), or 0."""
    pos = 0
    length = len(top)
    while pos < length:
        # One header field: a line and its continuation lines.
        end = pos
        while True:
            newline = top.find(b"\n", end)
            if newline < 0:
                return 0  # the field goes past what was read: not ours
            end = newline + 1
            if end >= length or top[end : end + 1] not in (b" ", b"\t"):
                break
        field = top[pos:end]
        if field in (b"\r\n", b"\n") or b":" not in field.split(b"\n", 1)[0]:
            return 0  # end of the header section, or not a header at all
        if field[:9].lower() == b"received:" and queue_id.encode() in _IDS.findall(field):
            return end
        pos = end
    return 0
