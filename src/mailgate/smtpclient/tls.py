"""TLS for a client: the opportunistic context, and the TLS failure behind an error."""

from __future__ import annotations

import functools
import ssl
from typing import Final

__all__ = ["opportunistic_context", "ssl_error"]

# How far down ``__cause__``/``__context__`` a TLS failure is looked for.
_MAX_CHAIN: Final = 10


@functools.cache
def opportunistic_context() -> ssl.SSLContext:
    """Encrypt with whatever certificate is shown (RFC 7435: better than plain text);
    whether it verifies is for the caller to find out afterwards, if it cares."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` ``exc`` is or was caused by (aiosmtplib wraps it)."""
    seen = 0
    while exc is not None and seen < _MAX_CHAIN:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
