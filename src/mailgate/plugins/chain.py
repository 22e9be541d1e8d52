"""The built-in policy plugins a set of options asks for, in chain order.

Kept with the plugins (not in ``mailgate.composition``) because it knows only policy
plugins: both the ``mailgate.Server`` facade and honeypot mode build their policy chain
with it, and honeypot mode sits below the facade.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailgate.server.options import ServerOptions

from . import (
    client_checks,
    dnsbl,
    greylist,
    lists,
    mail_auth,
    rate_limits,
    relay,
    routing,
    submission,
)
from .policy import PolicyEnv

__all__ = ["POLICY_MODULES", "policy_plugins"]

#: The policy plugin modules in chain order; each has ``plugins_from_options(env)``.
POLICY_MODULES = (
    lists,
    submission,
    relay,
    routing,
    rate_limits,
    dnsbl,
    client_checks,
    greylist,
    mail_auth,
)


def policy_plugins(options: ServerOptions, clock: Callable[[], float] | None = None) -> list[Any]:
    """The built-in policy plugins the options ask for, in chain order. The server puts them
    ahead of the plugins registered in code: a blocked client is refused before an
    application's hooks spend anything on it. Lists come first (an allow-listed client
    skips the later checks), then submission (AUTH before MAIL and the user's own senders,
    on submission listeners only), relay control, routing (reject rules answer at RCPT;
    the others note where each recipient goes), limits, DNS lists, client checks,
    greylisting, and SPF/DKIM/DMARC last (it reads the message)."""
    env = PolicyEnv(options) if clock is None else PolicyEnv(options, clock)
    plugins: list[Any] = []
    for module in POLICY_MODULES:
        plugins.extend(module.plugins_from_options(env))
    return plugins
