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
connection's transport (``transport.set_protocol``) and installs a small protocol of its
own: it streams the spooled file with dot-stuffing and real flow control (aiosmtplib's
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
import contextlib
import functools
import ipaddress
import logging
import os
import re
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Final, cast

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailgate.hooks import (
    Address,
    Envelope,
    HookError,
    Message,
    PerRecipient,
    Reject,
    Session,
    TempFail,
)

__all__ = ["ForwardDelivery"]

log = logging.getLogger("mailgate.delivery.forward")

_DEFAULT_PORTS: Final = {"smtp": 25, "smtps": 465, "lmtp": 24}
_STARTTLS_MODES: Final = ("auto", "require", "no")
_CHUNK: Final = 256 * 1024
# A reply longer than this (all its lines) is not SMTP; stop buffering it.
_MAX_REPLY: Final = 64 * 1024
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
# What of a remote reply's text is passed on: printable ASCII, a few short lines.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_LINE_TEXT: Final = 200
_MAX_LINES: Final = 5


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None
    starttls: str
    cafile: str | None


def _redact(url: str) -> str:
    """The URL as error messages show it: never the password."""
    return re.sub(r"(//[^/@?#]*?:)[^/@?#]*@", r"\1***@", url)


def _parse_url(url: str) -> _Target:
    """The parts of a forward URL; ValueError (one line) for anything unusable."""
    raw, url = url, _redact(url)  # ``url`` from here on is what messages show
    try:
        parts = urllib.parse.urlsplit(raw.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"forward URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"forward URL {url!r}: use smtp://, smtps:// or lmtp://")
    if not parts.hostname:
        raise ValueError(f"forward URL {url!r} names no host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"forward URL {url!r}: no path or fragment allowed")
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in ("starttls", "cafile"):
            raise ValueError(f"forward URL {url!r}: unknown option {key!r} (starttls, cafile)")
        options[key] = value
    starttls = options.get("starttls", "auto").lower()
    if starttls not in _STARTTLS_MODES:
        raise ValueError(f"forward URL {url!r}: starttls must be auto, require or no")
    if scheme == "smtps" and "starttls" in options:
        raise ValueError(f"forward URL {url!r}: smtps:// is TLS already; drop starttls=")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise ValueError(f"forward URL {url!r}: a password needs a user name")
    return _Target(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        username=username,
        password=password,
        starttls="no" if scheme == "smtps" else starttls,
        cafile=options.get("cafile") or None,
    )


def _display_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


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
        target = _parse_url(url)
        if timeout <= 0:
            raise ValueError("forward timeout must be positive")
        self.target = target
        self.lmtp = target.scheme == "lmtp"
        self.name = f"forward:{_display_host(target.host)}:{target.port}"
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
            self._tls = ssl.create_default_context()
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE

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
                await _quit(smtp, self.timeout)
            else:
                smtp.close()
        return answers

    async def _greet(self, smtp: aiosmtplib.SMTP) -> None:
        """EHLO (HELO if refused), or LHLO for LMTP: LHLO is not an aiosmtplib method, so
        it is sent as a command and its reply given to aiosmtplib as the EHLO reply."""
        if self.lmtp:
            name = (smtp.local_hostname or "localhost").encode("ascii")
            response = await smtp.execute_command(b"LHLO", name)
            if response.code != 250:
                raise _Refused("LHLO", response)
            smtp.last_ehlo_response = response
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
            *_mail_params(smtp, envelope, size, utf8),
        )
        if response.code != 250:
            raise _Refused("MAIL FROM", response)

        answers: list[_Failed | None] = []
        accepted: list[int] = []
        for index, rcpt in enumerate(envelope.rcpt_tos):
            response = await smtp.execute_command(
                b"RCPT", b"TO:<" + rcpt.encode(encoding) + b">", *_rcpt_params(smtp, rcpt)
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
        client_protocol = smtp.protocol
        if smtp.transport is None or client_protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        transport = cast(asyncio.Transport, smtp.transport)
        loop = asyncio.get_running_loop()
        body = _BodyProtocol(loop, self.timeout)
        transport.set_protocol(body)
        try:
            if bdat:
                transport.write(b"BDAT %d LAST\r\n" % size)
            before = b"\r\n"  # a message starts at the beginning of a line
            while chunk := await loop.run_in_executor(None, file.read, _CHUNK):
                transport.write(chunk if bdat else _dot_stuff(chunk, before))
                before = (before + chunk)[-2:]
                await body.drain()
            if not bdat:
                transport.write(b".\r\n" if before == b"\r\n" else b"\r\n.\r\n")
            count = replies if self.lmtp else 1
            answers = [await body.reply() for _ in range(count)]
        except BaseException:
            # Stopped inside the message: this session cannot be resumed, only dropped.
            if not transport.is_closing():
                transport.set_protocol(client_protocol)
                transport.abort()
            raise
        if not transport.is_closing():
            transport.set_protocol(client_protocol)  # back to aiosmtplib, for QUIT
        return answers

    # --- mapping failures to answers ----------------------------------------------------------

    def _failure(self, exc: BaseException) -> TempFail | None:
        """The answer for a failure to talk to the next server; None: not ours to map."""
        if _ssl_error(exc) is not None:
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


class _BodyProtocol(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while the message is sent: honours the
    transport's flow control and collects every complete reply, however they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._lines: list[str] = []
        self._error: Exception | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    # transport callbacks
    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._line(line)
        if len(self._buffer) > _MAX_REPLY or sum(map(len, self._lines)) > _MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
        self._wake()

    def _line(self, line: bytes) -> None:
        code = line[:3]
        if len(code) != 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._fail(aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response"))
            return
        self._lines.append(line[4:].strip().decode("utf-8", "replace"))
        if line[3:4] != b"-":
            self._replies.append(SMTPResponse(int(code), "\n".join(self._lines)))
            self._lines = []

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._writable.set()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # what the sender awaits
    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(self._timeout):
                    await self._writable.wait()
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from None
            if self._error is not None:
                raise self._error

    async def reply(self) -> SMTPResponse:
        deadline = self._loop.time() + self._timeout
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._wakeup = self._loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wakeup
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for the reply to the message"
                ) from None
        return self._replies.popleft()


# --- helpers -------------------------------------------------------------------------------


def _dot_stuff(chunk: bytes, before: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency for one chunk; ``before``: the last two bytes sent."""
    out = chunk.replace(b"\r\n.", b"\r\n..")
    if chunk.startswith(b".") and before.endswith(b"\r\n"):
        out = b"." + out
    elif chunk.startswith(b"\n.") and before.endswith(b"\r"):
        out = b"\n.." + out[2:]
    return out


def _file_size(file: IO[bytes]) -> int:
    return os.fstat(file.fileno()).st_size


def _all_ascii(envelope: Envelope) -> bool:
    return envelope.sender.isascii() and all(r.isascii() for r in envelope.rcpt_tos)


def _xtext(value: str) -> bytes:
    """RFC 3461 4 xtext: '+', '=' and anything outside '!'..'~' as +XX."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)


def _mail_params(smtp: aiosmtplib.SMTP, envelope: Envelope, size: int, utf8: bool) -> list[bytes]:
    """The MAIL parameters worth passing on that the next server understands."""
    params: list[bytes] = []
    if smtp.supports_extension("size"):
        params.append(b"SIZE=%d" % size)
    body = envelope.body
    if body == "BINARYMIME" or (body == "8BITMIME" and smtp.supports_extension("8bitmime")):
        params.append(b"BODY=" + body.encode())
    if utf8:
        params.append(b"SMTPUTF8")
    if smtp.supports_extension("dsn"):
        mail_params = envelope.mail_params
        if ret := mail_params.get("RET"):
            params.append(b"RET=" + ret.encode("ascii", "replace"))
        if envid := mail_params.get("ENVID"):
            params.append(b"ENVID=" + _xtext(envid))
    return params


def _rcpt_params(smtp: aiosmtplib.SMTP, rcpt: Address) -> list[bytes]:
    if not smtp.supports_extension("dsn"):
        return []
    params: list[bytes] = []
    if notify := rcpt.params.get("NOTIFY"):
        params.append(b"NOTIFY=" + notify.encode("ascii", "replace"))
    if orcpt := rcpt.params.get("ORCPT"):
        addr_type, _, address = orcpt.partition(";")
        if addr_type.lower() == "utf-8":
            # RFC 6533 utf-8-addr-xtext: non-ASCII and specials as \x{HEX}.
            text = "".join(
                c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                for c in address
            )
            params.append(b"ORCPT=" + addr_type.encode() + b";" + text.encode("ascii"))
        else:
            params.append(b"ORCPT=" + addr_type.encode("ascii", "replace") + b";" + _xtext(address))
    return params


def _split_reply(response: SMTPResponse) -> tuple[str | None, list[str]]:
    """The enhanced status code (from the first line) and the cleaned text lines."""
    status: str | None = None
    lines: list[str] = []
    for index, raw in enumerate(response.message.split("\n")):
        text = raw.strip()
        match = _ENHANCED.match(text)
        if match:
            if index == 0:
                status = ".".join(match.groups())
            text = text[match.end() :]
        text = _UNPRINTABLE.sub("?", text)[:_MAX_LINE_TEXT].strip()
        if text:
            lines.append(text)
    return status, lines[:_MAX_LINES]


def _refusal(what: str, response: SMTPResponse) -> Reject | TempFail:
    """The next server's failure reply as ours, with its code, enhanced code and text."""
    status, lines = _split_reply(response)
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
    status, lines = _split_reply(first)
    reason = " ".join(filter(None, (str(first.code), status, lines[0] if lines else None)))
    raise TempFail(
        451,
        f"Forwarding incomplete: the next server refused {len(failed)} of {len(answers)} "
        f"recipients (first: {reason})",
        enhanced="4.4.0",
    )


def _uses_tls(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.is_connected and smtp.get_transport_info("sslcontext") is not None


def _ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} ({cause})" if cause is not None and str(cause) not in text else text


async def _quit(smtp: aiosmtplib.SMTP, timeout: float) -> None:
    """QUIT politely if the connection is still usable, then close it in any case."""
    if smtp.is_connected:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=min(timeout, 5.0))
    smtp.close()
