"""mailgate: an embeddable SMTP/LMTP server.

The names most programs need are here: ``from mailgate import Server, Reject, TempFail,
Accept``. They are imported on first use, so ``mailgate --help`` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mailgate.version import __version__

_EXPORTS = {
    "Server": "mailgate.composition.server",
    "ServerOptions": "mailgate.server.options",
    "Accept": "mailgate.hooks",
    "Reject": "mailgate.hooks",
    "TempFail": "mailgate.hooks",
    "Address": "mailgate.hooks",
    "AuthAttempt": "mailgate.hooks",
    "Envelope": "mailgate.hooks",
    "Message": "mailgate.hooks",
    "PerRecipient": "mailgate.hooks",
    "Session": "mailgate.hooks",
    "HookContext": "mailgate.hooks",
    "HookError": "mailgate.hooks",
}

if TYPE_CHECKING:
    from mailgate.composition.server import Server
    from mailgate.hooks import (
        Accept,
        Address,
        AuthAttempt,
        Envelope,
        HookContext,
        HookError,
        Message,
        PerRecipient,
        Reject,
        Session,
        TempFail,
    )
    from mailgate.server.options import ServerOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mailgate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Accept",
    "Address",
    "AuthAttempt",
    "Envelope",
    "HookContext",
    "HookError",
    "Message",
    "PerRecipient",
    "Reject",
    "Server",
    "ServerOptions",
    "Session",
    "TempFail",
    "__version__",
]
