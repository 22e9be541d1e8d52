"""Commands aiosmtplib has no method for, or runs otherwise than a relaying client needs:
LMTP's LHLO (RFC 2033) and a QUIT that never raises."""

from __future__ import annotations

import contextlib
from typing import Final

import aiosmtplib
from aiosmtplib import SMTPResponse

__all__ = ["QUIT_TIMEOUT", "lhlo", "quit_politely"]

#: QUIT waits at most this long (seconds): the message is through, only manners are left.
QUIT_TIMEOUT: Final = 5.0


async def lhlo(smtp: aiosmtplib.SMTP) -> SMTPResponse:
    """Send LHLO with the client's name; a 250 reply is given to aiosmtplib as the EHLO
    reply, so it knows the extensions (and never sends EHLO itself). Any other reply is
    returned for the caller to refuse the session with."""
    name = (smtp.local_hostname or "localhost").encode("ascii")
    response = await smtp.execute_command(b"LHLO", name)
    if response.code == 250:
        smtp.last_ehlo_response = response
    return response


async def quit_politely(smtp: aiosmtplib.SMTP, timeout: float) -> None:
    """QUIT if the connection is still usable, then close it in any case."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=min(timeout, QUIT_TIMEOUT))
    smtp.close()
