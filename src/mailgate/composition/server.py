"""``mailgate.Server``: the server as users know it, built from settings.

:class:`Server` is the core :class:`~mailgate.server.app.SMTPServer` with two things added:
it takes the settings of ``mailgate serve`` as keyword arguments (read by
:func:`mailgate.config.options_from_settings`), and at start it adds the built-in plugins
those settings ask for (:mod:`.builtins`). :func:`run` is what ``mailgate serve`` calls.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mailgate.hooks import Hooks
from mailgate.server import runner
from mailgate.server.app import SMTPServer, StartPlugins
from mailgate.server.options import SenderMap, ServerOptions
from mailgate.settings.machine import machine_name_choice

from .builtins import builtin_plugins, message_signer, policy_plugins, routing_plugin
from .reload import PolicyReload, ReloadError

if TYPE_CHECKING:
    from mailgate.console import Console, ConsoleSources

__all__ = ["Server", "run"]

log = logging.getLogger("mailgate.server")


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
        server (see :meth:`SMTPServer.shutdown`), then the policy plugins a SIGHUP
        replaced."""
        console, self.console = self.console, None
        if console is not None:
            await console.stop()
        await super().shutdown()
        policy: PolicyReload | None = getattr(self, "_policy", None)
        if policy is not None:
            await policy.aclose()

    def console_sources(self) -> ConsoleSources:
        """What the console shows besides the counters: capture mode's store when the
        server captures, and the queue's store when it sends mail onward ([[routes]]),
        with the queue's submit for releasing captured messages."""
        from mailgate.console import ConsoleSources
        from mailgate.delivery.capture import CaptureDelivery
        from mailgate.queue.plugin import QueuePlugin

        plugins = self.hooks.plugins()
        capture = next((p.store for p in plugins if isinstance(p, CaptureDelivery)), None)
        queue = next((p for p in plugins if isinstance(p, QueuePlugin)), None)
        return ConsoleSources(
            queue=queue.store if queue is not None else None,
            capture=capture,
            submit=queue.submit if queue is not None else None,
        )

    def start_plugins(self) -> StartPlugins:
        """The plugins the settings ask for: the policy plugins ahead of those registered
        in code, then auth backends, an aiosmtpd handler and deliveries after them."""
        choice = machine_name_choice()
        if choice is not None and choice[0] == self.options.hostname:
            # No hostname was given: say which of the machine's names the banner uses.
            log.info("host name %s (from %s); set hostname to choose another", choice[0], choice[1])
        first = policy_plugins(self.options)
        last = builtin_plugins(self.options, routing=routing_plugin(first))
        self._policy = PolicyReload(first)
        return StartPlugins(first=first, last=last)

    def reload(self, options: ServerOptions) -> None:
        """SIGHUP: the policy chain is built again from ``options`` and swapped in whole
        (see :mod:`.reload`); when it cannot be built, nothing changes and one error line
        says why. The DKIM and ARC keys are read again (a key rotated on disk is used
        from now on). Then certificates and settings as the core server reloads them."""
        from mailgate.queue.plugin import QueuePlugin
        from mailgate.settings import ConfigError

        queue = next((p for p in self.hooks.plugins() if isinstance(p, QueuePlugin)), None)
        signer = queue.signer if queue is not None else None
        if queue is not None and self._started:
            try:
                signer = message_signer(options)
            except ConfigError as exc:
                log.error("reload: configuration not reloaded, the old one runs on: %s", exc)
                return
        policy: PolicyReload | None = getattr(self, "_policy", None)
        if policy is not None and self._started:
            try:
                policy.swap(self.hooks, options, self.options, lambda: self.connections)
            except ReloadError as exc:
                log.error("reload: configuration not reloaded, the old one runs on: %s", exc)
                return
        if queue is not None:
            queue.signer = signer
        super().reload(options)

    def reload_plugins(self, skip: Sequence[Any] = ()) -> None:
        # The policy plugins have just read their files.
        policy: PolicyReload | None = getattr(self, "_policy", None)
        super().reload_plugins([*skip, *(policy.chain if policy is not None else ())])


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
