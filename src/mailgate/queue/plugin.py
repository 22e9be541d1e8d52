"""The queue in a running server: a message-stage delivery that queues what the routing
rules send onward, and the runner that delivers it.

At the message stage :class:`QueuePlugin` asks the routing rules where each recipient
goes (a callable given by the composition layer: the queue does not know the routing
plugin) and enqueues, in one transaction, the recipients whose destination is
``relay:<domain>`` or ``forward:<url>``, with their DSN parameters (NOTIFY, ORCPT) and
the message's (ENVID, RET, SMTPUTF8, BODY). The step is required: the 250 is sent only
once ``enqueue`` returned, that is once the message and its recipients are durable. A
queue that cannot be written answers ``451 4.3.0`` and nothing is accepted.

What the local deliveries (Maildir, mbox, forward, webhook, an aiosmtpd handler) see:

* some recipients route to ``deliver``: this step returns nothing and the local
  deliveries after it run as they always did (they store the message once, whatever its
  recipients);
* none does: this step answers for the message (``Accept``), so the built-in local
  deliveries after it do not run and store nothing. Message hooks registered in code run
  before the built-in deliveries, so they still see every message.

A recipient whose decision is a reject reply (accepted at RCPT by an earlier step,
before routing could refuse it) is not queued: when every recipient is one, the message
is refused with that reply; otherwise the others are delivered and a failure DSN with
that reply goes back to the sender.

``astart()`` opens the store and starts the :class:`~mailgate.queue.runner.QueueRunner`;
``aclose()`` stops it (in-flight deliveries finish or are handed back) and closes the
store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailgate.dns import Resolver
from mailgate.hooks import Accept, Address, Envelope, Message, Reject, Session, TempFail
from mailgate.server.received import with_protocol

from . import dsn
from .model import ClientInfo, NewMessage, NewRecipient, parse_notify
from .outbound import Forward, OutboundEngine, OutboundOptions
from .runner import BounceRoute, QueueRunner
from .settings import QueueSettings, redacted_dsn
from .signing import MessageSigner
from .sqlite import INLINE_BODY_LIMIT, SQLiteQueueStore
from .sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from .sqlite import migrate as sqlite_migrate
from .sqlite import schema_version as sqlite_schema_version
from .store import QueueError, QueueStore

__all__ = [
    "DestinationLookup",
    "Migration",
    "QueuePlugin",
    "migrate_queue",
    "open_store",
    "schema_status",
]

log = logging.getLogger("mailgate.queue")

#: The accepted recipients of a transaction grouped by destination key (``deliver``,
#: ``relay:<domain>``, ``forward:<url>``, or a reject reply): what
#: ``RoutingPlugin.destinations(session, envelope)`` gives.
DestinationLookup = Callable[[Session, Envelope], Mapping[str, Sequence[Address]]]

_ONWARD = ("relay:", "forward:")
#: Longest a message waits for the queue to open at start.
_OPEN_WAIT = 30.0
_QUEUE_FAILED = "Requested action aborted: local error in processing (queue)"


class QueuePlugin:
    """Queue the recipients routed onward; deliver them in the background.

    ``destinations`` groups a transaction's recipients by destination key;
    ``forward_targets`` gives the smarthost (URL and credentials) of each ``forward:``
    key; ``bounce_route`` where a DSN to an address goes. ``directory`` and ``settings``
    are the ``[queue]`` table's, ``outbound`` the ``[outbound]`` table's; ``resolver``
    mailgate's resolver (``dns_nameservers``). ``store``: an open store to use instead
    of opening one in ``directory`` (it is then not closed here either). ``signer``: the
    ``[[dkim_sign]]`` and ``[arc_seal]`` keys; the message is signed once, here, and the
    queue keeps the signed bytes, so a retry sends them as they are.
    """

    name = "queue"
    #: The 250 waits for the enqueue.
    required = True

    def __init__(
        self,
        *,
        destinations: DestinationLookup,
        hostname: str,
        directory: Path | None = None,
        settings: QueueSettings | None = None,
        outbound: OutboundOptions | None = None,
        forward_targets: Mapping[str, Forward] | None = None,
        bounce_route: BounceRoute | None = None,
        resolver: Resolver | None = None,
        store: QueueStore | None = None,
        signer: MessageSigner | None = None,
    ) -> None:
        if store is None and directory is None:
            raise ValueError("QueuePlugin needs a queue directory or an open store")
        self.destinations = destinations
        self.hostname = hostname
        self.directory = directory
        self.settings = settings or QueueSettings()
        self.outbound = outbound or OutboundOptions(helo=hostname)
        self.forward_targets = dict(forward_targets or {})
        self.bounce_route = bounce_route
        self.resolver = resolver
        #: DKIM signatures and ARC seals added when a message is queued (None: none);
        #: a SIGHUP replaces it with one whose key files were read again.
        self.signer = signer
        self.store: QueueStore | None = store
        self._owns_store = store is None
        self.runner: QueueRunner | None = None
        self.engine: OutboundEngine | None = None
        # Set once the store is open: a message that completes between the listeners'
        # bind and the end of astart() waits for it rather than getting a 451.
        self._ready = asyncio.Event()
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def astart(self) -> None:
        """Open the store and start delivering (the server calls this once its listeners
        are bound)."""
        if self.store is None:
            assert self.directory is not None
            self.store = await open_store(self.settings, self.directory)
        self._ready.set()
        outbound = self.outbound
        if outbound.mta_sts_cache_file is None and self.directory is not None:
            # MTA-STS policies outlive a restart (RFC 8461 5.1), next to the queue.
            outbound = dataclasses.replace(
                outbound, mta_sts_cache_file=str(self.directory / "mta-sts.json")
            )
        self.engine = OutboundEngine(outbound, resolver=self.resolver)
        self.runner = QueueRunner(
            self.store,
            self.engine,
            hostname=self.hostname,
            forward_targets=self.forward_targets,
            bounce_route=self.bounce_route,
            max_deliveries=self.settings.max_deliveries,
            destination_concurrency=self.settings.destination_concurrency or None,
            # A store without body files (PostgreSQL) copies a body here for a delivery.
            spool=self.directory,
            sign_report=self._signed_report,
        )
        self.runner.start()
        log.info(
            "queue %s: open; delivering up to %d at once",
            self._where(),
            self.settings.max_deliveries,
        )

    def _where(self) -> str:
        """The queue's location for the log (never the DSN's password)."""
        if not self._owns_store:
            return "(given store)"
        if self.settings.backend == "postgresql" and self.settings.dsn:
            return redacted_dsn(self.settings.dsn)
        return str(self.directory)

    async def aclose(self) -> None:
        self._closed = True
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.aclose()
        store = self.store
        if store is not None and self._owns_store:
            self.store = None
            await store.aclose()

    # --- the message stage --------------------------------------------------------------------

    async def on_message(
        self, session: Session, envelope: Envelope, message: Message
    ) -> Accept | None:
        groups = self.destinations(session, envelope)
        onward: list[tuple[str, Address]] = []
        refused: list[tuple[str, Address]] = []
        local = False
        for key, rcpts in groups.items():
            if key.startswith(_ONWARD):
                onward.extend((key, rcpt) for rcpt in rcpts)
            elif key == "deliver":
                local = True
            else:
                refused.extend((key, rcpt) for rcpt in rcpts)
        if refused and not onward and not local:
            raise _refusal(refused[0][0])
        if not onward and not refused:
            return None  # everything is local: the deliveries after this one
        store = self.store if self.store is not None else await self._opened()
        if store is None or message.path is None:
            log.error("message %s: the queue is not open; refused for now", message.id)
            raise TempFail(451, _QUEUE_FAILED, enhanced="4.3.0")
        if onward:
            await self._enqueue(store, session, envelope, message, onward)
        if refused:
            await self._bounce_refused(store, session, envelope, message, refused)
        return None if local else Accept()

    async def _opened(self) -> QueueStore | None:
        """The store, once astart() has opened it (bounded wait); None when closed."""
        if self._closed:
            return None
        try:
            await asyncio.wait_for(self._ready.wait(), _OPEN_WAIT)
        except TimeoutError:
            return None
        return self.store

    async def _enqueue(
        self,
        store: QueueStore,
        session: Session,
        envelope: Envelope,
        message: Message,
        onward: list[tuple[str, Address]],
    ) -> None:
        try:
            recipients = [
                NewRecipient(
                    str(rcpt),
                    key,
                    orcpt=rcpt.params.get("ORCPT"),
                    notify=parse_notify(rcpt.params.get("NOTIFY")),
                )
                for key, rcpt in onward
            ]
            params = envelope.mail_params
            ret = params.get("RET")
            loop = asyncio.get_running_loop()
            require_tls = "REQUIRETLS" in params
            path = message.path or Path()

            def sync_and_read_header() -> bool:
                # One trip to a worker thread: the spool file is fsynced once, to be
                # hard-linked into the queue (Maildir then finds it synced too), and
                # the header read for TLS-Required (RFC 8689 4.1: it counts only without
                # the MAIL parameter).
                message.sync()
                return not require_tls and tls_required_no(path)

            # A small message is queued as bytes: the store makes them durable with its
            # commit (the SQLite store keeps them in the row), so the spool file needs no
            # fsync of its own. It was written and flushed through this loop just now,
            # so it is read back here, from the page cache, as the server writes it: a
            # trip to a thread would cost more than the read.
            data = _small_message(path) if message.size <= INLINE_BODY_LIMIT else None
            if data is not None:
                tls_optional = not require_tls and _says_tls_not_required(data)
            else:
                tls_optional = await loop.run_in_executor(None, sync_and_read_header)
            new = NewMessage(
                envelope.sender,
                recipients,
                envid=params.get("ENVID"),
                ret="FULL" if ret == "FULL" else "HDRS" if ret == "HDRS" else None,
                smtputf8=envelope.smtputf8,
                body_type=params.get("BODY"),
                client=client_info(session, utf8=envelope.smtputf8),
                received_at=message.received_at,
                require_tls=require_tls,
                tls_optional=tls_optional,
            )
            signed = await self._signed(session, envelope, message)
            if signed is not None:
                queue_id = await store.enqueue(new, signed)
            elif data is not None:
                queue_id = await store.enqueue(new, data)
            else:
                # Synced above: hard-linked into the queue, no copy.
                queue_id = await store.enqueue(new, path, synced=True)
        except Exception:
            log.exception("message %s: cannot be queued; answered 451", message.id)
            raise TempFail(451, _QUEUE_FAILED, enhanced="4.3.0") from None
        log.info(
            "message %s: queued as %s for %d recipient(s): %s",
            message.id,
            queue_id,
            len(onward),
            ", ".join(sorted({key for key, _ in onward})),
        )

    async def submit(
        self,
        sender: str,
        recipients: Sequence[str],
        body: Path,
        *,
        submitter: str,
        listener: str = "console",
    ) -> str:
        """Queue a message that did not arrive over SMTP (the console's release of a
        captured message) and return its queue id once it is durable.

        Each recipient is routed by the same ``[[routes]]`` as mail from a local client
        authenticated as ``submitter`` (the operator). Every one must go onward (relay
        or forward): one the rules deliver locally or refuse raises :class:`QueueError`
        naming it, and nothing is queued. ``body`` is read as it is (hard-linked into
        the queue where the file system allows; the file is not changed); with
        ``[[dkim_sign]]`` the queue gets a signed copy instead."""
        if not recipients:
            raise QueueError("no recipients")
        store = self.store if self.store is not None else await self._opened()
        if store is None:
            raise QueueError("the queue is not open")
        session = Session(
            id=f"{listener}-submit",
            peer_host="127.0.0.1",
            peer_port=0,
            local_host="127.0.0.1",
            local_port=0,
            user=submitter,
        )
        sender_address = Address(sender)
        envelope = Envelope(
            mail_from=sender_address, rcpt_tos=tuple(Address(r) for r in recipients)
        )
        queued: list[NewRecipient] = []
        for key, rcpts in self.destinations(session, envelope).items():
            for rcpt in rcpts:
                if not key.startswith(_ONWARD):
                    what = "for local delivery" if key == "deliver" else f"refused: {key}"
                    raise QueueError(f"<{rcpt}> is not routed onward ({what})")
                queued.append(NewRecipient(str(rcpt), key))
        smtputf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        new = NewMessage(
            sender,
            queued,
            smtputf8=smtputf8,
            client=ClientInfo(protocol="local", auth_user=submitter, listener=listener),
        )
        source: Path | bytes = body
        if self.signer is not None:
            # Mail an operator sends on is the server's own: signed as sendmail's is.
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(None, body.read_bytes)
            signed = await loop.run_in_executor(None, self._signed_report, data)
            if signed is not data:
                source = signed
        queue_id = await store.enqueue(new, source)
        log.info(
            "queue %s: submitted by %s through the %s for %d recipient(s): %s",
            queue_id,
            submitter,
            listener,
            len(queued),
            ", ".join(r.address for r in queued),
        )
        return queue_id

    async def _signed(self, session: Session, envelope: Envelope, message: Message) -> bytes | None:
        """The message with the DKIM signatures and ARC set of ``signer`` on top, or None
        when none applies (the spool file is then queued as it is). This is the last
        step that sees the message before it is queued: every change is signed. A
        message that cannot be signed (a malformed header section) goes unsigned, with a
        warning: refusing it would not make the next attempt any better."""
        signer = self.signer
        path = message.path
        if signer is None or path is None:
            return None

        def sign() -> bytes | None:
            data = path.read_bytes()
            try:
                added, what = signer.sign(
                    data,
                    envelope_sender=envelope.sender,
                    client=session.peer_host,
                    user=session.user if session.authenticated else None,
                )
            except Exception as exc:  # dkimpy's DKIMException, and what its parser raises
                log.warning("message %s: not signed: %s", message.id, exc)
                return None
            if not added:
                return None
            log.info("message %s: signed: %s", message.id, "; ".join(what))
            return added + data

        return await asyncio.get_running_loop().run_in_executor(None, sign)

    def _signed_report(self, report: bytes) -> bytes:
        """A message that did not come over SMTP (a delivery report mailgate wrote, one
        an operator released) with the signatures of the keys (those of now: a SIGHUP may
        have replaced them) that match its From; ``report`` itself when none does. Run
        in a thread."""
        signer = self.signer
        if signer is None:
            return report
        try:
            added, what = signer.sign_local(report)
        except Exception as exc:  # as for a message: sent unsigned rather than not at all
            log.warning("delivery report: not signed: %s", exc)
            return report
        if not what:
            return report
        log.debug("delivery report signed: %s", "; ".join(what))
        return added + report

    async def _bounce_refused(
        self,
        store: QueueStore,
        session: Session,
        envelope: Envelope,
        message: Message,
        refused: list[tuple[str, Address]],
    ) -> None:
        """Recipients a reject rule would have refused, accepted by an earlier step: the
        mail was taken, so the sender is told (a failure DSN with the rule's reply)."""
        sender = envelope.sender
        wanted = [
            (key, rcpt)
            for key, rcpt in refused
            if sender and _wants_failure(rcpt.params.get("NOTIFY"))
        ]
        for key, rcpt in refused:
            log.warning("message %s: <%s> not delivered: %s", message.id, rcpt, key)
        if not wanted:
            return
        results = []
        for key, rcpt in wanted:
            code, status, text = _parse_reply(key)
            failed = status if status.startswith("5") else "5" + status[1:]
            results.append(
                dsn.RecipientResult(
                    address=str(rcpt),
                    action=dsn.Action.FAILED,
                    status=failed,
                    orcpt=rcpt.params.get("ORCPT"),
                    remote_mta=self.hostname,
                    diagnostic=dsn.Diagnostic(code, status, text),
                    last_attempt=message.received_at,
                )
            )
        facts = dsn.MessageFacts(
            sender=sender,
            reporting_mta=self.hostname,
            arrival_date=message.received_at,
            envid=envelope.mail_params.get("ENVID"),
            ret="HDRS" if envelope.mail_params.get("RET") == "HDRS" else None,
            received_from=session.helo or session.peer_host,
            queue_id=message.id,
        )
        path = message.path
        assert path is not None
        loop = asyncio.get_running_loop()
        try:
            report = await loop.run_in_executor(None, dsn.build_dsn, facts, results, path)
            report = await loop.run_in_executor(None, self._signed_report, report)
            destination = self.bounce_route(sender) if self.bounce_route else None
            if destination is None or not destination.startswith(_ONWARD):
                destination = f"relay:{sender.rpartition('@')[2].lower()}"
            await store.enqueue(
                NewMessage(
                    "",
                    [NewRecipient(sender, destination, notify=frozenset())],
                    smtputf8=not sender.isascii(),
                    body_type="8BITMIME" if dsn.needs_8bitmime(report) else None,
                    client=ClientInfo(protocol="local", listener="dsn"),
                ),
                report,
            )
        except Exception:
            log.exception("message %s: cannot queue the report of refused recipients", message.id)
            raise TempFail(451, _QUEUE_FAILED, enhanced="4.3.0") from None


def _small_message(path: Path) -> bytes | None:
    """The message in ``path`` when it is at most :data:`INLINE_BODY_LIMIT` bytes long
    (the server may have added a header since ``Message.size`` was counted)."""
    with open(path, "rb") as file:
        data = file.read(INLINE_BODY_LIMIT + 1)
    return data if len(data) <= INLINE_BODY_LIMIT else None


#: How far into a message the header is looked at for ``TLS-Required``.
_HEADER_SCAN = 256 * 1024


def tls_required_no(path: Path) -> bool:
    """Whether the message's header has ``TLS-Required: No`` (RFC 8689 5): the sender
    asks that the recipient domains' TLS policies not hold it back. Blocking."""
    try:
        with open(path, "rb") as file:
            head = file.read(_HEADER_SCAN)
    except OSError:
        return False
    return _says_tls_not_required(head)


def _says_tls_not_required(head: bytes) -> bool:
    """:func:`tls_required_no` of the message's first bytes."""
    head = head[:_HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    header = head[: end if end >= 0 else len(head)]
    # Unfold (RFC 5322 2.2.3), then look at each field by name.
    unfolded = header.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"tls-required":
            return value.strip().lower() == b"no"
    return False


async def open_store(
    settings: QueueSettings,
    directory: Path,
    *,
    make_directory: bool = True,
    migrate: bool | None = None,
) -> QueueStore:
    """Open the store ``settings.backend`` names: SQLite in ``directory``, or the
    PostgreSQL database of ``settings.dsn`` (its tables in ``settings.schema``).
    ``migrate``: create or update the schema first (``None``: when ``[queue] migrate =
    "auto"``; migrations wait for each other, so nodes starting at once take turns);
    otherwise a missing or older schema is a QueueError saying to run ``mailgate queue
    migrate``. ``directory`` is made unless ``make_directory`` is false (a command that
    only uses the database): it holds the DSN producer's lock (SQLite) and, with
    PostgreSQL, the bodies copied out for a delivery."""
    policy = settings.policy()
    if migrate is None:
        migrate = settings.migrate == "auto"
    if settings.backend != "postgresql":
        return await SQLiteQueueStore.open(directory, policy=policy, migrate=migrate)
    _need_postgres(settings)
    from .postgres import PostgresQueueStore

    assert settings.dsn is not None
    if make_directory:
        directory.mkdir(parents=True, exist_ok=True)
    try:
        return await PostgresQueueStore.open(
            settings.dsn, schema=settings.schema, policy=policy, migrate=migrate
        )
    except Exception as exc:  # refused, unreachable, wrong password, schema too new/old
        raise QueueError(
            f"queue database {redacted_dsn(settings.dsn)}: {_without(exc, settings.dsn)}"
        ) from None


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``mailgate queue migrate`` did: the schema version found, the version now in
    place (this mailgate's), and where."""

    where: str
    before: int
    after: int


async def schema_status(settings: QueueSettings, directory: Path) -> Migration:
    """The queue schema's version now and this mailgate's (``after``), changing nothing."""
    if settings.backend != "postgresql":
        before = await asyncio.to_thread(sqlite_schema_version, directory)
        return Migration(str(directory), before, SQLITE_SCHEMA_VERSION)
    _need_postgres(settings)
    from .postgres import SCHEMA_VERSION, schema_version

    assert settings.dsn is not None
    where = f"schema {settings.schema!r} of {redacted_dsn(settings.dsn)}"
    try:
        before = await schema_version(settings.dsn, settings.schema)
    except Exception as exc:
        raise QueueError(
            f"queue database {redacted_dsn(settings.dsn)}: {_without(exc, settings.dsn)}"
        ) from None
    return Migration(where, before, SCHEMA_VERSION)


async def migrate_queue(settings: QueueSettings, directory: Path) -> Migration:
    """Create or update the queue's schema to this mailgate's version (idempotent; a
    concurrent migrator waits and then finds nothing to do)."""
    if settings.backend != "postgresql":
        before = await asyncio.to_thread(sqlite_migrate, directory)
        return Migration(str(directory), before, SQLITE_SCHEMA_VERSION)
    status = await schema_status(settings, directory)
    from .postgres import migrate

    assert settings.dsn is not None
    try:
        after = await migrate(settings.dsn, schema=settings.schema)
    except Exception as exc:
        raise QueueError(
            f"queue database {redacted_dsn(settings.dsn)}: {_without(exc, settings.dsn)}"
        ) from None
    return Migration(status.where, status.before, after)


def _need_postgres(settings: QueueSettings) -> None:
    """Check that mailgate.queue.postgres can be imported (only now: asyncpg is the
    optional ``postgresql`` extra) and that a DSN is given."""
    if not settings.dsn:
        raise QueueError('[queue] backend = "postgresql" needs [queue] dsn')
    try:
        from .postgres import PostgresQueueStore  # noqa: F401
    except ImportError as exc:
        raise QueueError(f"{POSTGRESQL_MISSING} ({exc})") from None


#: The error when ``backend = "postgresql"`` is chosen without asyncpg installed.
POSTGRESQL_MISSING = (
    '[queue] backend = "postgresql" needs asyncpg: pip install "mailgate[postgresql]"'
)


def _without(exc: BaseException, dsn: str) -> str:
    """The error's text with the DSN (and so its password) taken out, in case it is quoted."""
    return str(exc).replace(dsn, redacted_dsn(dsn))


def client_info(session: Session, *, utf8: bool = False) -> ClientInfo:
    """What the queue keeps of the client that handed a message over."""
    tls = session.tls
    return ClientInfo(
        address=session.peer_host,
        port=session.peer_port,
        helo=session.helo,
        protocol=with_protocol(
            lmtp=session.lmtp,
            esmtp=session.esmtp,
            tls=tls is not None,
            auth=session.authenticated,
            utf8=utf8,
        ),
        tls=" ".join(part for part in (tls.version, tls.cipher) if part) or None
        if tls is not None
        else None,
        auth_user=session.user,
        listener=f"{session.local_host}:{session.local_port}",
    )


def _parse_reply(text: str) -> tuple[int, str, str]:
    """A reject rule's reply as its destination key writes it: ``550 5.7.1 text``."""
    code_text, _, rest = text.partition(" ")
    code = int(code_text) if code_text.isdigit() else 550
    first, _, remainder = rest.partition(" ")
    if first[:1] in ("4", "5") and first.count(".") == 2:
        return code, first, remainder
    return code, f"{str(code)[0]}.0.0", rest


def _refusal(reply: str) -> Reject | TempFail:
    code, status, text = _parse_reply(reply)
    if code >= 500:
        return Reject(code, text, enhanced=status)
    return TempFail(code, text, enhanced=status)


def _wants_failure(notify: str | None) -> bool:
    keywords = parse_notify(notify)
    return keywords is None or "FAILURE" in keywords
