"""Which built-in plugins a set of options asks for.

The only module that knows every built-in plugin; the ``mailgate.Server`` facade asks it
once at start (:meth:`~mailgate.server.app.SMTPServer.start_plugins`): the policy
plugins go ahead of the hooks registered in code, the others after them, so built-in
deliveries run after an application's own message hooks (which may still order themselves
with ``before="maildir"``). Plugin modules are imported only when a server starts.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mailgate.server.options import ServerOptions
from mailgate.settings import ConfigError

__all__ = [
    "builtin_plugins",
    "message_signer",
    "policy_plugins",
    "queue_plugin",
    "routing_plugin",
]

log = logging.getLogger("mailgate.server")


def policy_plugins(options: ServerOptions, clock: Callable[[], float] | None = None) -> list[Any]:
    """The built-in policy plugins the options ask for, in chain order (see
    :func:`mailgate.plugins.chain.policy_plugins`)."""
    from mailgate.plugins import chain

    return chain.policy_plugins(options, clock)


def builtin_plugins(options: ServerOptions, routing: Any = None) -> list[Any]:
    """Plugin objects for ``options``, in chain order: auth backends, an aiosmtpd handler,
    then deliveries: the queue first (when ``routing``, the routing plugin of the policy
    chain, has relay or forward rules), then the local ones."""
    plugins: list[Any] = []
    if options.auth_users:
        from mailgate.plugins.static_auth import StaticUsers

        plugins.append(StaticUsers(dict(options.auth_users)))
    if options.users_file is not None:
        from mailgate.plugins.users_file import UsersFile

        plugins.append(UsersFile(options.users_file))
    if options.auth_capture is not None:
        from mailgate.plugins.capture import AuthCapture

        plugins.append(AuthCapture(options.auth_capture, options.state_dir))
    if options.aiosmtpd_handler is not None:
        from mailgate.compat.aiosmtpd import HandlerAdapter, load_handler

        plugins.append(
            HandlerAdapter(load_handler(options.aiosmtpd_handler), hostname=options.hostname)
        )
    queue = queue_plugin(options, routing)
    if queue is not None:
        plugins.append(queue)
    if options.delivery == "maildir":
        from mailgate.delivery.hooks import MaildirDelivery

        plugins.append(MaildirDelivery(options.maildir))
    elif options.delivery == "capture":
        from mailgate.delivery.capture import CaptureDelivery

        assert options.capture is not None
        plugins.append(CaptureDelivery(options.capture, max_bytes=options.capture_max_size or None))
    elif options.delivery == "mbox":
        from mailgate.delivery.hooks import MboxDelivery

        assert options.mbox is not None
        plugins.append(MboxDelivery(options.mbox))
    for url in options.forward:
        from mailgate.delivery.forward import ForwardDelivery

        plugins.append(ForwardDelivery(url, helo_name=options.hostname))
    for url in options.webhook:
        from mailgate.delivery.webhook import WebhookDelivery

        plugins.append(WebhookDelivery(url))
    return plugins


def routing_plugin(plugins: Sequence[Any]) -> Any:
    """The routing plugin among the policy plugins (None without ``[[routes]]``)."""
    from mailgate.plugins.routing import RoutingPlugin

    return next((plugin for plugin in plugins if isinstance(plugin, RoutingPlugin)), None)


def queue_plugin(options: ServerOptions, routing: Any) -> Any:
    """The queue, when the routing rules send mail onward (a relay or forward rule): it
    queues those recipients and delivers them, with the ``[queue]`` and ``[outbound]``
    settings and the server's resolver. None otherwise: without such rules nothing is
    queued and nothing changes."""
    from mailgate.plugins.routing import Action, RoutingPlugin

    table = routing.table if isinstance(routing, RoutingPlugin) else None
    if table is None or not any(
        route.action in (Action.RELAY, Action.FORWARD) for route in table.routes
    ):
        if any(section.name in ("dkim_sign", "arc_seal") for section in options.policy):
            log.warning(
                "[[dkim_sign]] and [arc_seal] sign mail the queue sends onward; without "
                "[[routes]] that relay or forward, nothing is signed"
            )
        return None
    from mailgate.dns import Resolver
    from mailgate.queue.outbound import Forward
    from mailgate.queue.plugin import QueuePlugin
    from mailgate.queue.settings import outbound_options, queue_settings

    settings = queue_settings(options.policy)
    if settings.backend == "postgresql" and importlib.util.find_spec("asyncpg") is None:
        # Said at start-up rather than when the first message is queued.
        from mailgate.queue.plugin import POSTGRESQL_MISSING

        raise ConfigError(POSTGRESQL_MISSING)
    forward_targets = {
        key: Forward(target.to, target.auth) for key, target in table.forward_targets().items()
    }

    def bounce_route(address: str) -> str | None:
        # A report goes where the rules send mail from <> to its address (a smarthost,
        # say); a local address is reached through its MX, as from any other server.
        return str(table.match(address, "", None, False).destination)

    return QueuePlugin(
        destinations=routing.destinations,
        hostname=options.hostname,
        directory=settings.directory(options.state_dir),
        settings=settings,
        outbound=outbound_options(options.policy, options.hostname),
        forward_targets=forward_targets,
        bounce_route=bounce_route,
        resolver=Resolver(options.dns_nameservers, timeout=options.dns_timeout),
        signer=message_signer(options),
    )


def message_signer(options: ServerOptions) -> Any:
    """The ``[[dkim_sign]]`` and ``[arc_seal]`` keys, read now (None without those
    tables); ConfigError naming the entry and key when one cannot be used. The start
    logs what will be signed."""
    from mailgate.queue.signing import message_signer as read_signer

    signer = read_signer(
        options.policy, hostname=options.hostname, relay_networks=options.relay_networks
    )
    for line in signer.describe() if signer is not None else ():
        log.info("%s", line)
    if (
        signer is not None
        and signer.arc is not None
        and not any(section.name == "mail_auth" for section in options.policy)
    ):
        log.warning(
            "[arc_seal] seals the Authentication-Results of [mail_auth], which is not "
            "configured: only messages your own hooks add them to are sealed"
        )
    return signer
