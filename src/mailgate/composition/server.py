"""``mailgate.Server``: the server as users know it, built from settings.

:class:`Server` is the core :class:`~mailgate.server.app.SMTPServer` with two things added:
it takes the settings of ``mailgate serve`` as keyword arguments (read by
:func:`mailgate.config.options_from_settings`), and at start it adds the built-in plugins
those settings ask for (:mod:`.builtins`). :func:`run` is what ``mailgate serve`` calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailgate.hooks import Hooks
from mailgate.server import runner
from mailgate.server.app import SMTPServer, StartPlugins
from mailgate.server.options import SenderMap, ServerOptions

from .builtins import builtin_plugins, policy_plugins

if TYPE_CHECKING:
    from mailgate.console import Console, ConsoleSources

__all__ = ["Server", "run"]


class Server(SMTPServer):
    """An SMTP/LMTP server: listeners, hooks, limits, graceful shutdown.

    Construct it with the same settings as ``mailgate serve`` (keyword arguments named
    like the ``[server]`` keys, e.g. ``Server(hostname="mx.example.com",
    listen="127.0.0.1:0")``) or with a ready :class:`ServerOptions`. Register hooks with
    the ``on_<stage>`` decorators, :meth:`add_plugin` and :meth:`use`, then
    ``await server.start()`` / ``await server.stop()``, ``async with server:``, or
    :meth:`run` in a script.

    ``sender_map``: on submission listeners, which sender addresses each authenticated
    user may use: ``sender_map(user)`` returns address patterns (``user@domain``,
    ``*@domain``...) or None, and may be a coroutine function (see
    :mod:`mailgate.plugins.submission`).
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        hooks: Hooks | None = None,
        *,
        sender_map: SenderMap | None = None,
        **settings: Any,
    ) -> None:
        if options is None or settings:
            # Imported here: the configuration reader is only needed for settings.
            from mailgate.config import ConfigError, options_from_settings

            if options is not None:
                raise TypeError("give either a ServerOptions or keyword settings, not both")
            try:
                options = options_from_settings(settings)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if sender_map is not None:
            if not callable(sender_map):
                raise TypeError(
                    "sender_map must be a callable: user -> address patterns; give a fixed "
                    "table as senders={user: [patterns]}"
                )
            options = dataclasses.replace(options, sender_map=sender_map)
        super().__init__(options, hooks)
        #: The operations console while the server runs with ``admin_listen``, else None.
        self.console: Console | None = None

    async def start(self, *, reuse_port: bool = False) -> None:
        """Start the listeners, then the operations console when ``admin_listen`` is set
        (a console that cannot start stops the server again: StartupError)."""
        await super().start(reuse_port=reuse_port)
        if self.options.admin_listen is None or self.console is not None:
            return
        # Imported here: aiohttp's server and prometheus-client only when asked for.
        from mailgate.console import Console

        try:
            console = Console.from_options(self, self.options, self.console_sources())
            if console is not None:
                await console.start(reuse_port=reuse_port)
        except BaseException:
            await super().shutdown()
            raise
        self.console = console

    async def shutdown(self) -> None:
        """Stop the console first (its readiness check fails from then on), then the
        server (see :meth:`SMTPServer.shutdown`)."""
        console, self.console = self.console, None
        if console is not None:
            await console.stop()
        await super().shutdown()

    def console_sources(self) -> ConsoleSources:
        """What the console shows besides the counters: capture mode's store when the
        server captures (the queue's store comes when the server runs a queue)."""
        from mailgate.console import ConsoleSources
        from mailgate.delivery.capture import CaptureDelivery

        capture = next(
            (p.store for p in self.hooks.plugins() if isinstance(p, CaptureDelivery)), None
        )
        return ConsoleSources(capture=capture)

    def start_plugins(self) -> StartPlugins:
        """The plugins the settings ask for: the policy plugins ahead of those registered
        in code, then auth backends, an aiosmtpd handler and deliveries after them."""
        return StartPlugins(first=policy_plugins(self.options), last=builtin_plugins(self.options))


def run(
    options: ServerOptions,
    make_hooks: Callable[[ServerOptions], Hooks] | None = None,
    *,
    reload_options: runner.Reloader | None = None,
) -> int:
    """Run a :class:`Server` for ``options`` in this process (or one in each of
    ``options.workers`` child processes), until SIGTERM/SIGINT; the exit status.
    ``make_hooks(options)`` may give each server its :class:`~mailgate.hooks.Hooks`."""

    def make_server(options: ServerOptions) -> Server:
        return Server(options, make_hooks(options) if make_hooks is not None else None)

    return runner.run(options, make_server, reload_options=reload_options)
