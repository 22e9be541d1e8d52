"""Honeypot mode: a mailgate server assembled from honeypot settings.

:func:`build_server` turns the server settings and :class:`~mailgate.honeypot.settings.HoneypotOptions`
(what ``mailgate honeypot`` and a ``mode = "honeypot"`` configuration give) into a
:class:`HoneypotServer` with the safe honeypot set-up:

- mail for every domain is accepted (an open relay, as far as the client can tell) but
  never relayed or delivered: no Maildir, mbox, forwarding or webhook is configured (the
  configuration refuses them), and the honeypot plugin's 250 ends the message chain;
- everything is stored under the data directory: the capture store (``capture.sqlite3``
  and ``messages/``), the spool and the development TLS certificate (``state/``);
- the persona (a built-in or a TOML profile) words every reply, and gives the host name,
  the SIZE limit and the SASL mechanisms unless the settings name their own;
- STARTTLS works (a certificate is made in the data directory when none is given), so the
  persona advertises it; AUTH is offered before TLS too, since a honeypot wants the
  credentials;
- the per-IP connection rate limit and the network block list are the policy plugins
  (rate limits, lists), refusing with the persona's texts;
- :class:`~mailgate.honeypot.plugin.HoneypotPlugin` captures transcripts, credentials and
  messages, tarpits and ends long sessions.

From code::

    from mailgate.honeypot.settings import HoneypotOptions
    from mailgate.honeypot.mode import build_server
    from mailgate.server.options import ListenAddress, ServerOptions

    server = build_server(
        ServerOptions(listen=(ListenAddress("0.0.0.0", 25),)),
        HoneypotOptions(data_dir=Path("/var/lib/honeypot"), persona="exim"),
    )
    server.run()
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mailgate.hooks import Hooks, Message, Session
from mailgate.plugins import chain, relay
from mailgate.plugins.lists import Lists
from mailgate.plugins.policy import PolicyConfigError, PolicyEnv
from mailgate.plugins.rate_limits import RateLimits
from mailgate.protocol import Reply
from mailgate.protocol.persona import echo
from mailgate.server.app import SMTPServer, StartPlugins
from mailgate.server.options import PolicySection, ServerOptions
from mailgate.server.tls import TLSConfigError, ensure_dev_certificate
from mailgate.settings import ConfigError

from .personas import PERSONAS, PersonaProfile, ProfileError, load_profile
from .plugin import AddressCounts, HoneypotPlugin
from .recipients import RecipientPolicy, default_domains
from .settings import HoneypotOptions
from .store import CaptureError, CaptureStore, RawMessage

log = logging.getLogger("mailgate.honeypot")

__all__ = [
    "HoneypotServer",
    "build_server",
    "honeypot_server_options",
    "load_persona",
    "run",
]

#: Subdirectory of the data directory for the spool and the development certificate.
STATE_DIR = "state"
#: The SIZE limit when the persona advertises SIZE without a number: something must stop
#: a client from filling the disk through the spool.
FALLBACK_MAX_SIZE = 25 * 1024 * 1024
#: The relay policy keeps its open_relay warning to itself: the honeypot says it in its
#: own start line instead.
_QUIET_RELAY = PolicySection(relay.TABLE, {"warn_open_relay": False}, None, "honeypot mode (relay)")


def load_persona(honeypot: HoneypotOptions) -> PersonaProfile:
    """The persona profile the settings ask for: ``profile`` (a TOML file, its ``base``
    defaulting to ``persona``), a generated identity (``generate_identity``, see
    mailgate.honeypot.identity) or the built-in ``persona``."""
    if honeypot.generate_identity:
        from .identity import persona_for_start

        return persona_for_start(honeypot)
    try:
        if honeypot.profile is not None:
            return load_profile(honeypot.profile, base=honeypot.persona)
        return PERSONAS[honeypot.persona]
    except ProfileError as exc:
        raise ConfigError(f"persona profile {exc}") from None
    except KeyError:
        names = ", ".join(PERSONAS)
        raise ConfigError(f"unknown persona {honeypot.persona!r}; built-in: {names}") from None


def honeypot_server_options(
    options: ServerOptions, honeypot: HoneypotOptions, profile: PersonaProfile
) -> ServerOptions:
    """``options`` with the honeypot's fixed settings: sink delivery, open relay, no relay
    networks (nobody is exempt from the policy), state under the data directory, AUTH
    before TLS, the persona; and the persona's host name, SIZE, SASL mechanisms,
    recipient and AUTH failure limits where the settings (``honeypot.given``) name none. The limits and lists tables are left out:
    :func:`build_server` makes those plugins itself, with the persona's refusals."""
    given = honeypot.given
    if options.workers > 1:
        raise ConfigError("honeypot mode runs in one process; remove workers")
    # Settings given in code that a honeypot cannot honour (mailgate.config refuses them
    # in files and flags): never drop a delivery or an auth backend silently.
    refused = [
        name
        for name, value in (
            ("forward", options.forward),
            ("webhook", options.webhook),
            ("aiosmtpd_handler", options.aiosmtpd_handler),
            ("mbox", options.delivery == "mbox"),
            ("capture", options.delivery == "capture"),
            ("auth_users", options.auth_users),
            ("users_file", options.users_file),
            ("auth_capture", options.auth_capture),
            ("local_domains", options.local_domains),
            ("lmtp", options.lmtp),
        )
        if value
    ]
    if refused:
        raise ConfigError(
            f"not for honeypot mode: {', '.join(refused)} (a honeypot never delivers, "
            "relays or checks passwords; everything stays in its data directory)"
        )
    hostname = options.hostname if "hostname" in given else profile.hostname
    max_recipients = options.max_recipients
    if "max_recipients" not in given and profile.recipient_limit is not None:
        max_recipients = profile.recipient_limit
    max_auth_failures = options.max_auth_failures
    if "max_auth_failures" not in given and profile.auth_failure_limit is not None:
        max_auth_failures = profile.auth_failure_limit
    if "max_size" in given:
        max_size = options.max_size
    else:
        max_size = profile.message_size_limit or FALLBACK_MAX_SIZE
    return dataclasses.replace(
        options,
        hostname=hostname,
        max_recipients=max_recipients,
        max_auth_failures=max_auth_failures,
        delivery="sink",
        state_dir=honeypot.data_dir / STATE_DIR,
        max_size=max_size,
        auth_mechanisms=(
            options.auth_mechanisms if "auth_mechanisms" in given else profile.auth_mechanisms
        ),
        allow_insecure_auth=(
            options.allow_insecure_auth if "allow_insecure_auth" in given else True
        ),
        auth_users=(),
        users_file=None,
        auth_capture=None,
        aiosmtpd_handler=None,
        forward=(),
        webhook=(),
        lmtp=False,
        workers=1,
        open_relay=True,
        local_domains=(),
        relay_networks=(),
        # Nothing is delivered; the stored copy is what the client sent.
        received_header=False,
        persona=profile.persona,
        policy=tuple(s for s in options.policy if s.name not in ("limits", "lists")),
    )


class _Texts:
    """The persona's server-layer texts, as the replies the plugins are given."""

    def __init__(self, profile: PersonaProfile, hostname: str) -> None:
        self.profile = profile
        self.hostname = hostname

    def reply(self, name: str, session: Session, **values: object) -> Reply:
        return self.profile.format(
            name, hostname=self.hostname, client_ip=session.peer_host, **values
        )

    def recipient_reply(self, name: str, session: Session, address: str) -> Reply:
        """A refused recipient's text: ``{address}`` the address, ``{path}`` the path as
        the client wrote it (a hooks Address's ``written``; else ``<address>``), made
        safe to show."""
        written = getattr(address, "written", "") or f"<{address}>"
        return self.reply(name, session, address=echo(str(address)), path=echo(written))

    def unknown_user(self, session: Session, address: str) -> Reply:
        return self.recipient_reply("unknown_user", session, address)

    def relay_denied(self, session: Session, address: str) -> Reply:
        return self.recipient_reply("relay_denied", session, address)

    def restricted_characters(self, session: Session, address: str) -> Reply:
        return self.recipient_reply("restricted_characters", session, address)

    def sender_domain_unknown(self, session: Session, address: str, sender: str) -> Reply:
        """A recipient refused for its sender's domain: ``{address}``/``{path}`` as for
        the other refusals, ``{sender}`` the sender."""
        written = getattr(address, "written", "") or f"<{address}>"
        return self.reply(
            "sender_domain_unknown",
            session,
            address=str(address),
            path=echo(written),
            sender=echo(sender),
        )

    def vrfy_user(self, session: Session, user: str, full_name: str) -> Reply:
        """One line of a VRFY/EXPN answer: a local user (with its full name if it has
        one) or, from an alias, an address."""
        if full_name:
            return self.reply("vrfy_user_named", session, user=user, fullname=full_name)
        if "@" in user:
            # An alias's remote target: shown as it is, not at this host.
            local, _, domain = user.rpartition("@")
            return self.profile.format(
                "vrfy_user", hostname=domain, client_ip=session.peer_host, user=local
            )
        return self.reply("vrfy_user", session, user=user)

    def vrfy_unknown_user(self, session: Session, address: str) -> Reply:
        return self.reply("vrfy_unknown_user", session, address=address)

    def too_many_connections(self, session: Session) -> Reply:
        return self.reply("too_many_connections", session)

    def rejected_client(self, session: Session) -> Reply:
        return self.reply("rejected", session, address="")

    def auth_failed(self, session: Session) -> Reply:
        return self.reply("auth_failed", session)

    def idle_timeout(self, session: Session) -> Reply:
        return self.reply("idle_timeout", session)

    def insufficient_storage(self, session: Session) -> Reply:
        return self.reply("insufficient_storage", session)

    def message_queued(self, session: Session, message: Message, raw: RawMessage | None) -> Reply:
        """The end-of-data reply: ``message_queued`` with a queue id in the product's
        format, made up for the reply (the store keys messages by mailgate's own id; the
        transcript keeps the reply as sent), quoting the message's Message-ID where the
        product does (Exchange)."""
        return self.profile.queued_reply(
            hostname=self.hostname,
            client_ip=session.peer_host,
            message_id=_message_id(raw.head) if raw is not None else None,
            now=message.received_at,
            prdr="PRDR" in message.envelope.mail_params,
        )


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<([!-;=?-~]{1,250})>", re.I | re.M)


def _message_id(head: bytes) -> str | None:
    """The Message-ID (without <>) in the header section of ``head``, if it has one."""
    ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
    match = _MESSAGE_ID.search(head[: min(ends)] if ends else head)
    return match[1].decode("ascii") if match else None


class Service(Protocol):
    """Something that runs beside a server: started after it, stopped before it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class HoneypotServer(SMTPServer):
    """A server in honeypot mode (see :func:`build_server`): ``honeypot`` is its
    settings, ``profile`` its persona, ``plugin`` the honeypot plugin and ``store`` the
    capture store."""

    honeypot: HoneypotOptions
    profile: PersonaProfile
    plugin: HoneypotPlugin
    store: CaptureStore
    #: Run beside the server (the operations console, added by the command line):
    #: started once the listeners are up, stopped before the server stops.
    services: list[Service]

    def __init__(self, options: ServerOptions, hooks: Hooks | None = None) -> None:
        super().__init__(options, hooks)
        self.services = []

    def start_plugins(self) -> StartPlugins:
        """The policy plugins of the configuration's other tables (DNS lists, client
        checks, ...) ahead of the honeypot's own; relay control stays quiet about the open
        relay (the start line says it). Nothing else: a honeypot delivers nothing and
        checks no password."""
        options = dataclasses.replace(self.options, policy=(*self.options.policy, _QUIET_RELAY))
        return StartPlugins(first=chain.policy_plugins(options))

    async def start(self, *, reuse_port: bool = False) -> None:
        await super().start(reuse_port=reuse_port)
        hp = self.honeypot
        recipients = self.plugin.recipients
        domains = (
            ", ".join(sorted(recipients.domains)) if recipients is not None else "every domain"
        )
        relaying = (
            "pretending to relay"
            if recipients is None or recipients.relay == "pretend"
            else "refusing relaying"
        )
        log.warning(
            "honeypot mode: persona %s as %s; accepting mail for its users at %s, %s; "
            "relaying and delivering none; capturing into %s%s",
            self.profile.name,
            self.options.hostname,
            domains,
            relaying,
            hp.data_dir,
            f" and JSON lines to {'stdout' if hp.jsonl == '-' else hp.jsonl}" if hp.jsonl else "",
        )
        started: list[Service] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except BaseException:
            for service in reversed(started):
                await service.stop()
            await super().shutdown()
            raise

    async def shutdown(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %r failed", service)
        await super().shutdown()


def build_server(
    options: ServerOptions,
    honeypot: HoneypotOptions,
    *,
    profile: PersonaProfile | None = None,
    store_settings: dict[str, Any] | None = None,
) -> HoneypotServer:
    """A honeypot server for ``options`` (the [server] settings) and ``honeypot``; not
    started. ``profile`` replaces the persona the settings name; ``store_settings`` are
    further CaptureStore arguments (tests use a short ``batch_seconds``). Raises
    ConfigError for settings that cannot work (a bad profile, an unusable data directory
    or certificate)."""
    if profile is None:
        profile = load_persona(honeypot)
    tables = options.policy
    options = honeypot_server_options(options, honeypot, profile)
    if options.tls_cert is None or options.tls_key is None:
        try:
            cert, key = ensure_dev_certificate(options.state_dir, options.hostname)
        except TLSConfigError as exc:
            raise ConfigError(str(exc)) from None
        options = dataclasses.replace(options, tls_cert=cert, tls_key=key)
    texts = _Texts(profile, options.hostname)
    env = PolicyEnv(options)
    policy = _policy_plugins(env, tables, honeypot, texts)
    address_counts = _address_counts(env)
    try:
        store = CaptureStore(
            honeypot.data_dir,
            jsonl=honeypot.jsonl,
            max_total_bytes=honeypot.max_storage,
            **(store_settings or {}),
        )
    except CaptureError as exc:
        raise ConfigError(str(exc)) from None
    try:
        plugin = HoneypotPlugin(
            store,
            auth_drop_reply=texts.auth_failed,
            session_expired_reply=texts.idle_timeout,
            storage_full_reply=texts.insufficient_storage,
            message_reply=texts.message_queued,
            auth_outcome=honeypot.auth_outcome,
            drop_after_credentials=honeypot.drop_after_credentials,
            tarpit=honeypot.tarpit,
            max_session_seconds=honeypot.max_session,
            analysis_budget=honeypot.analysis_budget,
            analysis_max_parts=honeypot.analysis_max_parts,
            analysis_max_depth=honeypot.analysis_max_depth,
            auth_mechanisms=options.auth_mechanisms,
            address_counts=address_counts,
            banner_delay=profile.banner_delay,
            reply_delay=profile.reply_delay,
            recipients=RecipientPolicy.build(
                domains=honeypot.domains or default_domains(options.hostname),
                users=(
                    honeypot.local_users
                    if honeypot.local_users is not None
                    else profile.local_users
                ),
                relay=honeypot.relay,
                unknown_user=texts.unknown_user,
                relay_denied=texts.relay_denied,
                percent_hack=profile.percent_hack,
                full_names={**profile.full_names, **dict(honeypot.full_names)},
                aliases={**profile.aliases, **dict(honeypot.aliases)},
                literal_senders_refused=profile.literal_senders_refused,
                sender_domain_unknown=texts.sender_domain_unknown,
                restricted=profile.restricted_local_parts,
                restricted_remote=profile.restricted_remote_local_parts,
                restricted_characters=texts.restricted_characters,
            ),
            vrfy_checks_users=profile.vrfy_checks_users,
            vrfy_user_line=texts.vrfy_user if profile.vrfy_answers_users else None,
            vrfy_unknown_user=texts.vrfy_unknown_user if profile.vrfy_answers_users else None,
        )
    except ValueError as exc:
        store.close()
        raise ConfigError(str(exc)) from None
    server = HoneypotServer(options)
    server.honeypot = honeypot
    server.profile = profile
    server.store = store
    server.plugin = plugin
    # Lists first (a blocked client is refused before anything is counted), then the
    # rate limits, then capture; policy plugins of other tables come ahead of these.
    for policy_plugin in policy:
        server.add_plugin(policy_plugin)
    plugin.install(server)
    return server


def _address_counts(env: PolicyEnv) -> AddressCounts | None:
    """Per-address counts over every node when ``[state]`` names a shared store."""
    try:
        state = env.shared_state()
    except PolicyConfigError as exc:
        raise ConfigError(str(exc)) from None
    if state is None:
        return None
    from mailgate.plugins.redis_state import RedisAddressCounts

    return RedisAddressCounts(state)


def _policy_plugins(
    env: PolicyEnv,
    tables: tuple[PolicySection, ...],
    honeypot: HoneypotOptions,
    texts: _Texts,
) -> list[Any]:
    """The lists and rate limits plugins from the configuration's [lists] and [limits]
    tables with the honeypot's ``block_networks`` and ``connections_per_ip`` over them."""
    plugins: list[Any] = []
    try:
        lists = _section(
            tables,
            "lists",
            {"block_networks": [str(n) for n in honeypot.block_networks]}
            if honeypot.block_networks
            else {},
        )
        if lists is not None:
            plugins.append(Lists.from_section(lists, env, client_refusal=texts.rejected_client))
        limits = _section(
            tables,
            "limits",
            {"connections_per_ip": honeypot.connections_per_ip}
            if honeypot.connections_per_ip
            else {},
        )
        if limits is not None:
            limits_plugin = RateLimits.from_section(
                limits, env, connect_refusal=texts.too_many_connections
            )
            if limits_plugin.active:
                plugins.append(limits_plugin)
    except (PolicyConfigError, ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    return plugins


def _section(
    tables: tuple[PolicySection, ...], name: str, overrides: dict[str, Any]
) -> PolicySection | None:
    """The configuration's ``name`` table with ``overrides`` over it (None: neither)."""
    existing = next((s for s in tables if s.name == name), None)
    if existing is None and not overrides:
        return None
    if existing is None:
        return PolicySection(name, overrides, None, f"honeypot settings ({name})")
    return dataclasses.replace(existing, values={**existing.values, **overrides})


def run(
    options: ServerOptions,
    honeypot: HoneypotOptions,
    services: Callable[[HoneypotServer], Sequence[Service]] | None = None,
) -> int:
    """Build the honeypot server and run it until SIGINT/SIGTERM (``mailgate honeypot``);
    the exit status. ConfigError for settings that cannot work; StartupError when the
    server cannot start (a port in use), for the command to report as ``serve`` does.
    ``services(server)`` gives what runs beside it (see :attr:`HoneypotServer.services`)."""
    from mailgate.server import runner

    server = build_server(options, honeypot)
    if services is not None:
        server.services.extend(services(server))
    return runner.run(server.options, lambda _options: server)
