"""Forward each accepted message to another SMTP or LMTP server, before the 250.

``ForwardDelivery("smtp://mail.internal:25")`` is a message-stage plugin: the client gets
its 250 only once the next server has taken the message, and otherwise the next server's
refusal (5xx) or a 451 -- mailgate keeps no queue of its own here.

URLs (the ``forward`` setting takes a list of them)::

    smtp://host[:port]      SMTP, port 25; STARTTLS when the server offers it
    smtps://host[:port]     SMTP over implicit TLS, port 465
    lmtp://host[:port]      LMTP (RFC 2033), port 24; one reply per recipient
    smtp://user:password@host:587?starttls=require&cafile=/etc/ssl/internal-ca.pem

Query options: ``starttls=auto|require|no`` (smtp and lmtp; default ``auto``) and
``cafile=PATH`` (CA certificates to verify the server with, PEM). Code may instead pass
``tls_context=`` (an ``ssl.SSLContext`` used for both STARTTLS and implicit TLS).

TLS policy. ``smtps://`` and ``starttls=require`` verify the server's certificate and
name (system CAs, or ``cafile`` / ``tls_context``). ``starttls=auto`` without a CA or
context is opportunistic TLS (RFC 7435): encrypt when offered, without verifying, since
the alternative is plain text. Credentials from the URL are sent only over TLS unless
``allow_insecure_auth=True``.

How LMTP runs on aiosmtplib, which has only an SMTP client: the connection, TLS, the
greeting, AUTH, MAIL and RCPT go through ``aiosmtplib.SMTP``; LHLO is sent with
``execute_command`` and its reply stored as ``last_ehlo_response`` (so aiosmtplib knows
the extensions and never sends EHLO). For the message itself the plugin borrows the
connection's transport (``transport.set_protocol``) and installs a small protocol
(:mod:`mailgate.smtpclient.body`): it streams the spooled file with dot-stuffing and real flow control (aiosmtplib's
``data()`` wants the whole message as bytes), and it reads one reply (SMTP) or one reply
per accepted recipient (LMTP) -- aiosmtplib's protocol reads one reply per command and
drops replies that arrive back to back. The transport goes back to aiosmtplib for QUIT.

Answers. A refusal by the next server is passed on with its code, enhanced code and text
(5xx as :class:`~mailgate.hooks.Reject`, 4xx as :class:`~mailgate.hooks.TempFail`);
connection trouble is ``451 4.4.1`` (cannot connect) or ``451 4.4.2`` (lost, timed out),
TLS trouble ``451 4.7.5``/``4.7.4``. When the next server refuses only some recipients,
an SMTP client cannot be told per recipient, so nothing is sent and the client gets
``451 4.4.0`` naming how many were refused: it retries, nobody gets a copy twice, and the
sender learns of permanent refusals when its retries run out. When an LMTP server takes
the message for some recipients and refuses it for others (after DATA, too late to take
back), the answer is the same 451: a retry may give some recipients a second copy, which
beats losing the others' copy. A mailgate LMTP front (``lmtp=true``) instead answers
each recipient with what the next server said. All recipients refused: the next
server's refusal (a temporary one if any was temporary).

Each message uses a connection of its own (no pooling); the client's SIZE, BODY=8BITMIME
(when the next server has 8BITMIME), SMTPUTF8 and DSN parameters (when it has DSN) are
passed on. BODY=BINARYMIME goes by ``BDAT`` when the next server offers CHUNKING and
BINARYMIME, and is refused (554 5.6.3) otherwise; non-ASCII addresses need SMTPUTF8
there (else 550 5.6.7).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from typing import IO

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailgate.hooks import (
    Envelope,
    HookError,
    Message,
    PerRecipient,
    Reject,
    Session,
    TempFail,
)
from mailgate.smtpclient import (
    borrowed_transport,
    display_host,
    lhlo,
    mail_params,
    opportunistic_context,
    parse_url,
    quit_politely,
    rcpt_params,
    send_message,
    split_reply,
    ssl_error,
)

__all__ = ["ForwardDelivery"]

log = logging.getLogger("mailgate.delivery.forward")


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


#: A recipient the next server did not take: the step ("recipient refused", "message
#: refused") and its reply.
_Failed = tuple[str, SMTPResponse]


class _Refused(Exception):
    """The next server answered a step of the transaction with a failure reply."""

    def __init__(self, step: str, response: SMTPResponse) -> None:
        super().__init__(f"{step}: {response.code} {response.message}")
        self.step = step
        self.response = response


class ForwardDelivery:
    """Hand every message to another server with aiosmtplib; see the module docstring.

    ``timeout`` bounds connecting and each wait for the next server (seconds).
    ``required=False`` makes it a background delivery that runs after the 250.
    ``tls_context`` replaces the URL's ``cafile`` for certificate checks;
    ``helo_name`` is the EHLO/LHLO name (default: this machine's name).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        required: bool = True,
        tls_context: ssl.SSLContext | None = None,
        helo_name: str | None = None,
        allow_insecure_auth: bool = False,
    ) -> None:
        target = parse_url(url)
        if timeout <= 0:
            raise ValueError("forward timeout must be positive")
        self.target = target
        self.lmtp = target.scheme == "lmtp"
        self.name = f"forward:{display_host(target.host)}:{target.port}"
        self.timeout = timeout
        self.required = required
        self.helo_name = helo_name
        self.allow_insecure_auth = allow_insecure_auth
        verify = (
            tls_context is not None
            or target.cafile is not None
            or target.scheme == "smtps"
            or target.starttls == "require"
        )
        self.verify_tls = verify
        if tls_context is not None:
            self._tls = tls_context
        elif verify:
            try:
                self._tls = ssl.create_default_context(cafile=target.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"forward URL: cannot load cafile {target.cafile}: {exc}"
                ) from None
        else:
            # Opportunistic TLS (RFC 7435): better than plain text, so no certificate check.
            self._tls = opportunistic_context()

    def __repr__(self) -> str:
        return f"<ForwardDelivery {self.target.scheme}://{self.name.removeprefix('forward:')}>"

    # --- the message stage ------------------------------------------------------------------

    async def on_message(
        self, session: Session, envelope: Envelope, message: Message
    ) -> PerRecipient | None:
        if message.path is None:
            raise HookError(f"{self.name} needs the message bytes (a spool)")
        loop = asyncio.get_running_loop()
        file = await loop.run_in_executor(None, message.open)
        try:
            answers = await self._deliver(envelope, message, file, per_recipient=session.lmtp)
            if session.lmtp:
                return PerRecipient([None if a is None else _refusal(*a) for a in answers])
            _one_answer(answers)  # raises unless every recipient was delivered
        except (Reject, TempFail) as refusal:
            level = logging.INFO if isinstance(refusal, Reject) else logging.WARNING
            log.log(level, "message %s: %s: %s %s", message.id, self.name, refusal.code, refusal)
            raise
        finally:
            file.close()
        return None

    async def _deliver(
        self, envelope: Envelope, message: Message, file: IO[bytes], *, per_recipient: bool
    ) -> list[_Failed | None]:
        """One answer per recipient (None: delivered), or raise for all of them.
        ``per_recipient``: our client can be answered per recipient (an LMTP front)."""
        target = self.target
        helo = self.helo_name or await asyncio.get_running_loop().run_in_executor(None, _fqdn)
        smtp = aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            use_tls=target.scheme == "smtps",
            start_tls=False,  # decided below, after EHLO/LHLO
            tls_context=self._tls,
            local_hostname=helo,
            timeout=self.timeout,
        )
        polite = False  # QUIT only where the session is between commands
        try:
            await smtp.connect()
            await self._greet(smtp)
            await self._secure(smtp)
            await self._login(smtp)
            answers = await self._transaction(smtp, envelope, file, per_recipient)
            polite = True
        except (Reject, TempFail):
            polite = True
            raise
        except _Refused as refused:
            polite = True
            raise _refusal(f"{refused.step} refused", refused.response) from None
        except BaseException as exc:
            failure = self._failure(exc)
            if failure is None:
                raise
            log.warning("message %s: %s: %s", message.id, self.name, _describe(exc))
            raise failure from None
        finally:
            if polite:
                await quit_politely(smtp, self.timeout)
            else:
                smtp.close()
        return answers

    async def _greet(self, smtp: aiosmtplib.SMTP) -> None:
        """EHLO (HELO if refused), or LHLO for LMTP: LHLO is not an aiosmtplib method, so
        it is sent as a command and its reply given to aiosmtplib as the EHLO reply."""
        if self.lmtp:
            response = await lhlo(smtp)
            if response.code != 250:
                raise _Refused("LHLO", response)
            return
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()

    async def _secure(self, smtp: aiosmtplib.SMTP) -> None:
        mode = self.target.starttls
        if mode == "no" or _uses_tls(smtp):
            return
        if not smtp.supports_extension("starttls"):
            if mode == "require":
                raise TempFail(
                    451, "Forwarding failed: the next server offers no TLS", enhanced="4.7.4"
                )
            return
        await smtp.starttls(tls_context=self._tls, server_hostname=self.target.host)
        await self._greet(smtp)  # RFC 3207: forget what was said before TLS

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        target = self.target
        if target.username is None:
            return
        if not _uses_tls(smtp) and not self.allow_insecure_auth:
            raise TempFail(
                451, "Forwarding failed: will not authenticate without TLS", enhanced="4.7.0"
            )
        if not smtp.supports_extension("auth") or not smtp.supported_auth_methods:
            raise TempFail(
                451, "Forwarding failed: the next server offers no usable AUTH", enhanced="4.7.0"
            )
        await smtp.login(target.username, target.password or "")

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        envelope: Envelope,
        file: IO[bytes],
        per_recipient: bool,
    ) -> list[_Failed | None]:
        size = await asyncio.get_running_loop().run_in_executor(None, _file_size, file)
        binary = envelope.body == "BINARYMIME"
        if binary and not (
            smtp.supports_extension("chunking") and smtp.supports_extension("binarymime")
        ):
            raise Reject(
                554, "Forwarding refused: the next server cannot take binary MIME", enhanced="5.6.3"
            )
        utf8 = envelope.smtputf8 and smtp.supports_extension("smtputf8")
        if envelope.smtputf8 and not utf8 and not _all_ascii(envelope):
            raise Reject(
                550,
                "Forwarding refused: the next server does not support SMTPUTF8 addresses",
                enhanced="5.6.7",
            )
        encoding = "utf-8" if utf8 else "ascii"
        response = await smtp.execute_command(
            b"MAIL",
            b"FROM:<" + envelope.sender.encode(encoding) + b">",
            *mail_params(
                smtp,
                size=size,
                body=envelope.body,
                smtputf8=utf8,
                ret=envelope.mail_params.get("RET"),
                envid=envelope.mail_params.get("ENVID"),
            ),
        )
        if response.code != 250:
            raise _Refused("MAIL FROM", response)

        answers: list[_Failed | None] = []
        accepted: list[int] = []
        for index, rcpt in enumerate(envelope.rcpt_tos):
            response = await smtp.execute_command(
                b"RCPT",
                b"TO:<" + rcpt.encode(encoding) + b">",
                *rcpt_params(
                    smtp, notify=rcpt.params.get("NOTIFY"), orcpt=rcpt.params.get("ORCPT")
                ),
            )
            if response.code in (250, 251):
                accepted.append(index)
                answers.append(None)
            else:
                answers.append(("recipient refused", response))
        refused = len(answers) - len(accepted)
        if not accepted or (refused and not per_recipient):
            # Nothing to send, or an SMTP front that cannot answer per recipient: abort
            # the transaction (see the module docstring).
            return answers

        if binary:
            replies = await self._send_body(smtp, file, size, len(accepted), bdat=True)
        else:
            response = await smtp.execute_command(b"DATA")
            if response.code != 354:
                raise _Refused("DATA", response)
            replies = await self._send_body(smtp, file, size, len(accepted), bdat=False)
        if not self.lmtp:
            replies = replies * len(accepted)  # SMTP: one reply for every recipient
        for index, reply in zip(accepted, replies, strict=True):
            if reply.code != 250:
                answers[index] = ("message refused", reply)
        return answers

    async def _send_body(
        self, smtp: aiosmtplib.SMTP, file: IO[bytes], size: int, replies: int, *, bdat: bool
    ) -> list[SMTPResponse]:
        """Stream the message on the borrowed transport; the replies to it (one, or one
        per accepted recipient for LMTP)."""
        async with borrowed_transport(smtp, self.timeout) as (transport, receiver):
            if bdat:
                transport.write(b"BDAT %d LAST\r\n" % size)
            await send_message(transport, receiver, file, dot_stuffed=not bdat)
            count = replies if self.lmtp else 1
            return [await receiver.reply() for _ in range(count)]

    # --- mapping failures to answers ----------------------------------------------------------

    def _failure(self, exc: BaseException) -> TempFail | None:
        """The answer for a failure to talk to the next server; None: not ours to map."""
        if ssl_error(exc) is not None:
            return TempFail(
                451, "Forwarding failed: TLS with the next server failed", enhanced="4.7.5"
            )
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            return TempFail(
                451, "Forwarding failed: the next server refused our credentials", enhanced="4.7.0"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            return TempFail(
                451, "Forwarding failed: the next server refuses connections", enhanced="4.4.1"
            )
        if isinstance(exc, aiosmtplib.SMTPConnectError):  # refused, unreachable, timed out
            return TempFail(
                451, "Forwarding failed: cannot connect to the next server", enhanced="4.4.1"
            )
        if isinstance(exc, aiosmtplib.SMTPResponseException):  # EHLO/HELO, odd replies
            return TempFail(
                451,
                "Forwarding failed: the next server did not accept the session",
                enhanced="4.4.2",
            )
        if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
            return TempFail(451, "Forwarding failed: the next server timed out", enhanced="4.4.2")
        if isinstance(exc, ConnectionError):  # includes SMTPServerDisconnected
            return TempFail(
                451, "Forwarding failed: lost the connection to the next server", enhanced="4.4.2"
            )
        if isinstance(exc, aiosmtplib.SMTPException | OSError):
            return TempFail(
                451, "Forwarding failed: error talking to the next server", enhanced="4.4.2"
            )
        return None


# --- helpers -------------------------------------------------------------------------------


def _file_size(file: IO[bytes]) -> int:
    return os.fstat(file.fileno()).st_size


def _all_ascii(envelope: Envelope) -> bool:
    return envelope.sender.isascii() and all(r.isascii() for r in envelope.rcpt_tos)


def _refusal(what: str, response: SMTPResponse) -> Reject | TempFail:
    """The next server's failure reply as ours, with its code, enhanced code and text."""
    status, lines = split_reply(response)
    code = response.code
    text = "\n".join(lines) or "no reason given"
    if 500 <= code <= 599:
        cls: type[Reject | TempFail] = Reject
        prefix = "Forwarding refused"
    else:
        cls = TempFail
        prefix = "Forwarding failed"
        # 421 would tell our client we are closing; any other odd code is a 451.
        code = code if 400 <= code <= 499 and code != 421 else 451
    klass = str(code // 100)
    if status is None or not status.startswith(klass + "."):
        status = f"{klass}.0.0"
    return cls(code, f"{prefix} ({what}): {text}", enhanced=status)


def _one_answer(answers: Sequence[_Failed | None]) -> None:
    """An SMTP front has one reply for the message: success only if every recipient was
    delivered; the next server's refusal if all were refused (a temporary one if any);
    otherwise a 451 that says how many were refused."""
    failed = [a for a in answers if a is not None]
    if not failed:
        return None
    if len(failed) == len(answers):
        refusals = [_refusal(*a) for a in failed]
        temporary = [r for r in refusals if isinstance(r, TempFail)]
        raise temporary[0] if temporary else refusals[0]
    _, first = failed[0]
    status, lines = split_reply(first)
    reason = " ".join(filter(None, (str(first.code), status, lines[0] if lines else None)))
    raise TempFail(
        451,
        f"Forwarding incomplete: the next server refused {len(failed)} of {len(answers)} "
        f"recipients (first: {reason})",
        enhanced="4.4.0",
    )


def _uses_tls(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.is_connected and smtp.get_transport_info("sslcontext") is not None


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({cause})" if cause is not None and str(cause) not in text else text
