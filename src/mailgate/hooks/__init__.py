"""The extension API: stages, the objects hooks see, results, chain ordering.

One mechanism underneath three shapes:

* callbacks: ``server.on_rcpt(func)`` / ``hooks.on("rcpt", func)`` -- a one-step plugin;
* plugins: an object with a ``name`` and methods named after stages (``on_connect``,
  ``on_tls``, ``on_helo``, ``on_auth``, ``on_mail``, ``on_rcpt``, ``on_data_start``,
  ``on_message``, ``on_reset``, ``on_close``), added with optional ``before=``/``after=``;
* middleware: ``hooks.use(mw)`` with ``async def mw(ctx, call_next)`` around every stage.

Steps may be async or plain functions. A step returns ``None`` (go on), returns
:class:`Accept` or ``True`` (answer now with success, skip the rest of the chain), returns
``False`` (refuse with the stage's default refusal), or raises :class:`Reject` /
:class:`TempFail` (answer now with that 5xx / 4xx). Returning a
:class:`~mailgate.protocol.Reply` answers with exactly that reply. Any other exception,
and a chain that outlives its timeout, becomes ``451 4.3.0`` and is logged; it never
reaches the client as a traceback.

Import direction: ``mailgate.server`` calls into this package; it imports only
``mailgate.protocol``. Plugins import only this package (``from mailgate.hooks import ...``).

Inside, modules import downward only: ``stages`` <- ``outcomes`` (results, HookError) <-
``session`` (the objects hooks see; ``chunks`` reads a message's file for it) <- ``runner``
(running one chain) <- ``registry`` (:class:`Hooks`: plugins, middleware, ordering).
"""

from __future__ import annotations

from mailgate.hooks.outcomes import (
    Accept,
    HookError,
    Outcome,
    PerRecipient,
    Reject,
    TempFail,
    default_status,
)
from mailgate.hooks.registry import Hooks, Step
from mailgate.hooks.runner import HookContext, Middleware

# The module's logger was reachable as ``mailgate.hooks.log`` before the package split.
from mailgate.hooks.runner import log as log
from mailgate.hooks.session import (
    READ_LIMIT,
    Address,
    AuthAttempt,
    Envelope,
    HeaderPredicate,
    Message,
    MessageTooLarge,
    Session,
    TLSInfo,
    fold_header,
)
from mailgate.hooks.stages import NOTIFICATIONS, STAGES

__all__ = [
    "NOTIFICATIONS",
    "READ_LIMIT",
    "STAGES",
    "Accept",
    "Address",
    "AuthAttempt",
    "Envelope",
    "HeaderPredicate",
    "HookContext",
    "HookError",
    "Hooks",
    "Message",
    "MessageTooLarge",
    "Middleware",
    "Outcome",
    "PerRecipient",
    "Reject",
    "Session",
    "Step",
    "TLSInfo",
    "TempFail",
    "default_status",
    "fold_header",
]
