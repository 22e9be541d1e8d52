"""Which built-in plugins a set of options asks for.

The only module that knows every built-in plugin; the ``mailgate.Server`` facade asks it
once at start (:meth:`~mailgate.server.app.SMTPServer.start_plugins`): the policy
plugins go ahead of the hooks registered in code, the others after them, so built-in
deliveries run after an application's own message hooks (which may still order themselves
with ``before="maildir"``). Plugin modules are imported only when a server starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailgate.server.options import ServerOptions

__all__ = ["builtin_plugins", "policy_plugins"]


def policy_plugins(options: ServerOptions, clock: Callable[[], float] | None = None) -> list[Any]:
    """The built-in policy plugins the options ask for, in chain order (see
    :func:`mailgate.plugins.chain.policy_plugins`)."""
    from mailgate.plugins import chain

    return chain.policy_plugins(options, clock)


def builtin_plugins(options: ServerOptions) -> list[Any]:
    """Plugin objects for ``options``, in chain order: auth backends, an aiosmtpd handler,
    then deliveries."""
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
