"""asyncio server: listeners, TLS, PROXY header, timeouts, limits, workers.

``run(options, hooks)`` is what ``mailgate serve`` calls; embedders can use :class:`Server`
directly inside their own event loop.
"""

from __future__ import annotations

from .app import Server, protocol_config
from .connection import SessionRecorder
from .errors import StartupError
from .options import ListenAddress, ServerOptions
from .runner import run, serve

__all__ = [
    "ListenAddress",
    "Server",
    "ServerOptions",
    "SessionRecorder",
    "StartupError",
    "protocol_config",
    "run",
    "serve",
]
