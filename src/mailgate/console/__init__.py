"""The operations console: an HTTP server on the SMTP server's event loop.

``mailgate serve --admin-listen HOST:PORT`` (``admin_listen`` in ``[server]``) starts it
with the server and stops it with the server. It serves Prometheus metrics
(``/metrics``), health checks (``/healthz``, ``/readyz``) and a JSON API under
``/api/v1/`` for the queue and the honeypot's captures (docs/api.md).

A mode layer: it reads the server core's counters and the public interfaces of the queue
store, the policy plugins and the honeypot's capture store; the composition layer
(``mailgate.Server``) and the command line start it.

- :mod:`.service`: :class:`Console`, the HTTP server (bind, access rules, start, stop);
- :mod:`.metrics`: the Prometheus collector over the server's counters;
- :mod:`.api`: the JSON API.
"""

from __future__ import annotations

from .context import ConsoleSources
from .service import Console, is_loopback, read_token

__all__ = ["Console", "ConsoleSources", "is_loopback", "read_token"]
