"""asyncio server: listeners, TLS, PROXY header, timeouts, limits, workers.

The core: :class:`SMTPServer` takes its options and hooks from outside and imports no
configuration reader and no plugin. ``mailgate.Server`` (``mailgate.composition``) is the
server built from settings with the built-in plugins; ``mailgate serve`` runs that one.
``run(options, make_server)`` runs a server made by ``make_server`` in this process or in
worker processes; embedders can use a server directly inside their own event loop.
"""

from __future__ import annotations

from .app import SMTPServer, StartPlugins, protocol_config
from .errors import StartupError
from .host import SessionRecorder
from .options import ListenAddress, ServerOptions
from .runner import run, serve

__all__ = [
    "ListenAddress",
    "SMTPServer",
    "ServerOptions",
    "SessionRecorder",
    "StartPlugins",
    "StartupError",
    "protocol_config",
    "run",
    "serve",
]
