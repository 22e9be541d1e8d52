"""One SMTP or LMTP session with a remote server, on aiosmtplib.

The client pieces it shares with :mod:`mailgate.delivery.forward` come from
:mod:`mailgate.smtpclient`: the body protocol (streams the spooled file with dot-stuffing
and flow control, and reads the one reply of SMTP or the reply per recipient of LMTP),
LMTP through aiosmtplib (LHLO as a plain command whose reply is taken as the EHLO reply),
reply cleaning and the MAIL/RCPT parameters. What is particular to this module: the
session is opened on a socket this module connects (to an address the MX lookup chose,
from ``source_address``, with the MX host's name for TLS), it stays open for more
transactions (RSET between them), MAIL/RCPT/DATA are pipelined when the server offers
PIPELINING, and every answer is per recipient instead of an exception.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Final

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailgate.smtpclient import (
    BodyProtocol,
    MessageFile,
    borrowed_transport,
    lhlo,
    mail_params,
    opportunistic_context,
    quit_politely,
    rcpt_params,
    send_message,
    split_reply,
    ssl_error,
)

from .model import DeliveryRequest, Outcome, PolicyInfo, RemoteMTA, Reply, TLSInfo
from .options import OutboundOptions
from .tlscheck import peer_chain
from .tlspolicy import TLSRequirement, base_requirement, warn_once

#: What a transaction can raise when the session breaks (lost, timed out, garbled).
_SESSION_ERRORS: Final = (aiosmtplib.SMTPException, OSError, TimeoutError)


#: ``may`` with the system's CAs for the log: an endpoint made without a policy.
_OPPORTUNISTIC: Final = base_requirement("may", "default", None)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to talk: ``host`` is the name (MX host or smarthost) used for TLS
    and logs, ``address`` the IP actually connected to, ``tls`` what its TLS must be
    (the destination's policy for this host)."""

    host: str
    address: str
    port: int
    lmtp: bool = False
    implicit_tls: bool = False
    tls: TLSRequirement = _OPPORTUNISTIC
    username: str | None = None
    password: str | None = None
    #: An MX host (not a smarthost): a server that greets with our own name is us.
    relay: bool = False

    @property
    def remote(self) -> RemoteMTA:
        return RemoteMTA(self.host, self.address, self.port)

    @property
    def policy(self) -> PolicyInfo:
        tls = self.tls
        return PolicyInfo(tls.level, tls.mode, tls.source, tls.reason)


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome for one recipient, before the engine adds the session's details."""

    outcome: Outcome
    status: str
    diagnostic: str
    reply: Reply | None = None


class HostFailure(Exception):
    """No usable session with this address (connection, greeting, EHLO, TLS, AUTH):
    the engine tries the next one. ``starttls_failed``: the TLS handshake after
    STARTTLS failed, so the same host may be tried again in plain text."""

    def __init__(
        self,
        outcome: Outcome,
        status: str,
        diagnostic: str,
        reply: Reply | None = None,
        *,
        starttls_failed: bool = False,
    ) -> None:
        super().__init__(diagnostic)
        self.answer = Answer(outcome, status, diagnostic, reply)
        self.starttls_failed = starttls_failed


def answer_from_reply(response: SMTPResponse, where: str, stage: str) -> Answer:
    """A server reply as an outcome: 2xx delivered, 5xx failed, anything else deferred;
    the enhanced code is the server's when its class agrees with the reply's."""
    status, lines = split_reply(response)
    code = response.code
    if 200 <= code <= 299:
        outcome, klass = Outcome.DELIVERED, "2"
    elif 500 <= code <= 599:
        outcome, klass = Outcome.FAILED, "5"
    else:
        outcome, klass = Outcome.DEFERRED, "4"
    enhanced = status
    if status is None or not status.startswith(klass + "."):
        status = f"{klass}.0.0"
    text = "\n".join(lines)
    reply = Reply(code if 0 < code < 1000 else 0, enhanced, text)
    said = " ".join(filter(None, (str(code), enhanced, " ".join(lines))))
    if outcome is Outcome.DELIVERED:
        diagnostic = f"host {where} said: {said}"
    else:
        diagnostic = f"host {where} said: {said} (in reply to {stage} command)"
    return Answer(outcome, status, diagnostic, reply)


class Session:
    """An open session after greeting, EHLO/LHLO, TLS and AUTH: ready for MAIL."""

    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        endpoint: Endpoint,
        tls: TLSInfo | None,
        options: OutboundOptions,
    ) -> None:
        self.smtp = smtp
        self.endpoint = endpoint
        self.remote = endpoint.remote
        self.where = f"{endpoint.host}[{endpoint.address}]"
        self.tls = tls
        self.options = options
        self.opened_at = time.monotonic()
        self.transactions = 0
        #: No transaction is open on the server: the last one ended with the reply to
        #: the message (RFC 5321 4.1.1.4: that ends it, whatever the reply), or RSET
        #: was accepted. A clean cached session needs no RSET before the next one.
        self.clean = True
        #: The last transaction lost the session before any reply came: the server
        #: took nothing (a cached connection it had closed meanwhile).
        self.unanswered = False

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    # --- between transactions -------------------------------------------------------------

    async def reset(self) -> bool:
        """RSET before a cached session's next transaction; False: it is not usable."""
        if not self.smtp.is_connected:
            return False
        try:
            response = await self.smtp.execute_command(
                b"RSET", timeout=self.options.command_timeout
            )
        except _SESSION_ERRORS:
            self.abort()
            return False
        if response.code != 250:
            await self.quit()
            return False
        self.clean = True
        return True

    async def quit(self) -> None:
        """QUIT politely when the session is still up, then close it in any case."""
        await quit_politely(self.smtp, self.options.command_timeout)

    def abort(self) -> None:
        self.smtp.close()

    # --- one transaction --------------------------------------------------------------------

    async def transact(self, request: DeliveryRequest, body: MessageFile) -> list[Answer]:
        """MAIL, one RCPT per recipient, DATA and the message: one answer per recipient
        of ``request``. Pipelined (RFC 2920) when the server offers it. Never raises for
        the remote side; afterwards :attr:`usable` says whether the session may carry
        another transaction."""
        self.transactions += 1
        self.unanswered = False
        refusal = self._cannot_take(request)
        if refusal is not None:
            return [refusal] * len(request.recipients)
        utf8 = request.smtputf8 or not _all_ascii(request)
        encoding = "utf-8" if utf8 else "ascii"
        mail = [
            b"MAIL",
            b"FROM:<" + request.sender.encode(encoding) + b">",
            *mail_params(
                self.smtp,
                size=request.size,
                body="8BITMIME" if request.eight_bit else None,
                smtputf8=utf8,
                ret=request.ret,
                envid=request.envid,
                requiretls=request.require_tls,
            ),
        ]
        rcpts = [
            [
                b"RCPT",
                b"TO:<" + recipient.address.encode(encoding) + b">",
                *rcpt_params(self.smtp, notify=recipient.notify, orcpt=recipient.orcpt),
            ]
            for recipient in request.recipients
        ]
        transaction = _Transaction(len(rcpts), self.where, lmtp=self.endpoint.lmtp)
        self.clean = False
        try:
            if self.smtp.supports_extension("pipelining"):
                await self._pipelined(transaction, mail, rcpts, body)
            else:
                await self._step_by_step(transaction, mail, rcpts, body)
        except _SESSION_ERRORS as exc:
            self.unanswered = transaction.replies == 0
            self.abort()
            stage = transaction.stage
            during = "sending the message" if stage == "end of DATA" else f"sending {stage}"
            return transaction.answers(_lost(exc, self.where, during))
        self.clean = transaction.complete
        return transaction.answers(None)

    async def _step_by_step(
        self,
        transaction: _Transaction,
        mail: list[bytes],
        rcpts: list[list[bytes]],
        body: MessageFile,
    ) -> None:
        """One command, one reply, as RFC 5321 has it without PIPELINING."""
        smtp = self.smtp
        timeout = self.options.command_timeout
        transaction.stage = "MAIL FROM"
        if not transaction.mail(await smtp.execute_command(*mail, timeout=timeout)):
            return
        transaction.stage = "RCPT TO"
        for index, rcpt in enumerate(rcpts):
            transaction.rcpt(index, await smtp.execute_command(*rcpt, timeout=timeout))
        if not transaction.accepted:
            return  # the open transaction is reset (RSET) before the next one
        transaction.stage = "DATA"
        if not transaction.data(await smtp.execute_command(b"DATA", timeout=timeout)):
            return
        # aiosmtplib's protocol reads one reply per command: smtpclient's reads LMTP's
        # reply per recipient, and streams the file instead of wanting it as bytes.
        async with borrowed_transport(smtp, self.options.data_timeout) as (transport, receiver):
            await _message(transaction, transport, receiver, body)

    async def _pipelined(
        self,
        transaction: _Transaction,
        mail: list[bytes],
        rcpts: list[list[bytes]],
        body: MessageFile,
    ) -> None:
        """MAIL, every RCPT and DATA in one write, then their replies (RFC 2920 3.1:
        DATA ends the group); the message follows if DATA got its 354."""
        timeout = self.options.command_timeout
        borrowed = borrowed_transport(self.smtp, self.options.data_timeout)
        async with borrowed as (transport, receiver):
            transport.write(b"".join(_line(c) for c in (mail, *rcpts, [b"DATA"])))
            async with asyncio.timeout(timeout):
                transaction.stage = "MAIL FROM"
                mail_accepted = transaction.mail(await receiver.reply())
                transaction.stage = "RCPT TO"
                for index in range(len(rcpts)):
                    reply = await receiver.reply()
                    if mail_accepted:
                        transaction.rcpt(index, reply)
                transaction.stage = "DATA"
                data = await receiver.reply()
            if not (mail_accepted and transaction.accepted):
                if data.code == 354:
                    # DATA should have been refused without recipients; end the message
                    # at once (RFC 2920 3.1), which the server then refuses.
                    transport.write(b".\r\n")
                    async with asyncio.timeout(timeout):
                        await receiver.reply()
                return
            if not transaction.data(data):
                return
            await _message(transaction, transport, receiver, body)

    def _cannot_take(self, request: DeliveryRequest) -> Answer | None:
        """A permanent reason this server cannot take the message, found before MAIL."""
        smtp = self.smtp
        needs_utf8 = request.smtputf8 or not _all_ascii(request)
        if needs_utf8 and not smtp.supports_extension("smtputf8"):
            return Answer(
                Outcome.FAILED,
                "5.6.7",
                f"SMTPUTF8 is required, but was not offered by host {self.where}",
            )
        limit = smtp.esmtp_extensions.get("size", "").strip()
        if limit.isdigit() and int(limit) > 0 and request.size > int(limit):
            return Answer(
                Outcome.FAILED,
                "5.3.4",
                f"message size {request.size} exceeds size limit {limit} of server {self.where}",
            )
        return None


class _Transaction:
    """The answers of one transaction as its replies come in (shared by the pipelined
    and the step-by-step dialogue). ``stage`` names the command last waited for."""

    def __init__(self, count: int, where: str, *, lmtp: bool) -> None:
        self._answers: list[Answer | None] = [None] * count
        self.accepted: list[int] = []
        self.where = where
        self.lmtp = lmtp
        self.stage = "MAIL FROM"
        #: Replies read so far.
        self.replies = 0
        #: Every reply to the message was read: the transaction is over.
        self.complete = False

    @property
    def final_replies(self) -> int:
        """Replies to the message: one per accepted recipient for LMTP (RFC 2033 4.2)."""
        return len(self.accepted) if self.lmtp else 1

    def mail(self, reply: SMTPResponse) -> bool:
        self.replies += 1
        if reply.code == 250:
            return True
        answer = _not_success(answer_from_reply(reply, self.where, "MAIL FROM"))
        self._answers = [answer] * len(self._answers)
        return False

    def rcpt(self, index: int, reply: SMTPResponse) -> None:
        self.replies += 1
        if reply.code in (250, 251):
            self.accepted.append(index)
        else:
            self._answers[index] = _not_success(answer_from_reply(reply, self.where, "RCPT TO"))

    def data(self, reply: SMTPResponse) -> bool:
        self.replies += 1
        if reply.code == 354:
            return True
        answer = _not_success(answer_from_reply(reply, self.where, "DATA"))
        for index in self.accepted:
            self._answers[index] = answer
        return False

    def final(self, number: int, reply: SMTPResponse) -> None:
        """The ``number``-th reply to the message: LMTP's is for the ``number``-th
        accepted recipient, recorded at once so a session lost halfway keeps it;
        SMTP's one reply is for every accepted recipient."""
        self.replies += 1
        answer = answer_from_reply(reply, self.where, "end of DATA")
        for index in [self.accepted[number]] if self.lmtp else self.accepted:
            self._answers[index] = answer

    def answers(self, rest: Answer | None) -> list[Answer]:
        """Every recipient's answer; ``rest`` for those without one (a lost session)."""
        out: list[Answer] = []
        for answer in self._answers:
            answer = answer or rest
            if answer is None:
                raise AssertionError("a recipient was left without an answer")
            out.append(answer)
        return out


def _not_success(answer: Answer) -> Answer:
    """A 2xx where a refusal or 354 was expected is no success: try again later."""
    if answer.outcome is not Outcome.DELIVERED:
        return answer
    return Answer(Outcome.DEFERRED, "4.0.0", answer.diagnostic, answer.reply)


async def _message(
    transaction: _Transaction,
    transport: asyncio.Transport,
    receiver: BodyProtocol,
    body: MessageFile,
) -> None:
    """The message after DATA's 354, and the replies to it as they come."""
    transaction.stage = "end of DATA"
    await send_message(transport, receiver, body)
    for number in range(transaction.final_replies):
        transaction.final(number, await receiver.reply())
    transaction.complete = True


def _line(command: list[bytes]) -> bytes:
    return b" ".join(command) + b"\r\n"


# --- opening a session ---------------------------------------------------------------------


async def open_session(
    endpoint: Endpoint, options: OutboundOptions, *, plaintext: bool = False
) -> Session:
    """Connect, read the greeting, EHLO/LHLO, STARTTLS by the policy (not at all when
    ``plaintext``: a handshake with this host failed lately), AUTH when the endpoint has
    credentials. Raises :class:`HostFailure` when no usable session results."""
    where = f"{endpoint.host}[{endpoint.address}]:{endpoint.port}"
    try:
        sock = await _connect(endpoint.address, endpoint.port, options)
    except TimeoutError:
        raise HostFailure(
            Outcome.DEFERRED, "4.4.1", f"connect to {where}: Connection timed out"
        ) from None
    except OSError as exc:
        raise HostFailure(
            Outcome.DEFERRED, "4.4.1", f"connect to {where}: {exc.strerror or exc}"
        ) from None
    try:
        smtp = aiosmtplib.SMTP(
            hostname=endpoint.host,
            sock=sock,
            use_tls=endpoint.implicit_tls,
            start_tls=False,  # decided below, by the policy
            tls_context=opportunistic_context(),
            local_hostname=options.helo,
            timeout=options.command_timeout,
        )
    except BaseException:
        sock.close()
        raise
    # From here on the socket belongs to the transport aiosmtplib makes of it: closing
    # it here as well could close a descriptor number the loop has given to another
    # socket (uvloop closes the descriptor itself), so only ``smtp.close()``.
    stage = "receiving the initial server greeting"
    try:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _refused(SMTPResponse(exc.code, exc.message), where, "initial greeting") from None
        stage = "sending EHLO" if not endpoint.lmtp else "sending LHLO"
        await _greet(smtp, endpoint, where)
        if endpoint.relay and _server_name(smtp) == options.helo.lower():
            # An MX that is this server (Postfix: "mail for ... loops back to myself").
            raise HostFailure(
                Outcome.FAILED,
                "5.4.6",
                f"mail for {endpoint.host} loops back to myself: host {where} greets as "
                f"{options.helo}",
            )
        if not endpoint.implicit_tls and endpoint.tls.mode != "none":
            stage = "performing the TLS handshake"
            await _starttls(smtp, endpoint, where, plaintext)
        stage = "checking the server's certificate"
        tls = await _tls_info(smtp, endpoint, where)
        if endpoint.username is not None:
            stage = "authenticating"
            await _login(smtp, endpoint, where, options, tls is not None)
    except HostFailure:
        smtp.close()
        raise
    except _SESSION_ERRORS as exc:
        smtp.close()
        if stage == "performing the TLS handshake" or (
            endpoint.implicit_tls and ssl_error(exc) is not None
        ):
            raise HostFailure(
                Outcome.DEFERRED,
                "4.7.5",
                f"TLS handshake with {where} failed: {_describe(exc)}",
                starttls_failed=not endpoint.implicit_tls,
            ) from None
        lost = _lost(exc, where, stage)
        raise HostFailure(lost.outcome, lost.status, lost.diagnostic) from None
    except BaseException:
        smtp.close()
        raise
    return Session(smtp, endpoint, tls, options)


async def _connect(address: str, port: int, options: OutboundOptions) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        source = options.source_address
        if source is not None and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
        async with asyncio.timeout(options.connect_timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _greet(smtp: aiosmtplib.SMTP, endpoint: Endpoint, where: str) -> None:
    """EHLO (HELO if it is refused with 5xx), or LHLO for LMTP."""
    if endpoint.lmtp:
        response = await lhlo(smtp)
        if response.code != 250:
            raise _refused(response, where, "LHLO")
        return
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if not 500 <= exc.code <= 599:
            raise _refused(SMTPResponse(exc.code, exc.message), where, "EHLO") from None
        try:
            await smtp.helo()
        except aiosmtplib.SMTPHeloError as exc:
            raise _refused(SMTPResponse(exc.code, exc.message), where, "HELO") from None


async def _starttls(smtp: aiosmtplib.SMTP, endpoint: Endpoint, where: str, plaintext: bool) -> None:
    requirement = endpoint.tls
    if plaintext and requirement.mode == "may":
        return
    if not smtp.supports_extension("starttls"):
        if requirement.encryption_required:
            raise HostFailure(
                Outcome.DEFERRED,
                "4.7.4",
                f"TLS is required, but was not offered by host {where}",
            )
        if requirement.report_only:
            warn_once(
                f"no-starttls:{endpoint.host}:{requirement.reason}",
                "%s: no STARTTLS offered; %s would require TLS (testing: delivered anyway)",
                where,
                requirement.reason or requirement.label,
            )
        return
    try:
        await smtp.starttls(server_hostname=endpoint.host, tls_context=opportunistic_context())
    except aiosmtplib.SMTPResponseException as exc:
        if type(exc) is not aiosmtplib.SMTPResponseException or not smtp.is_connected:
            raise  # a handshake or connection failure, not a reply
        if requirement.encryption_required:
            answer = answer_from_reply(SMTPResponse(exc.code, exc.message), where, "STARTTLS")
            raise HostFailure(Outcome.DEFERRED, "4.7.4", answer.diagnostic, answer.reply) from None
        return  # STARTTLS refused: the session goes on in plain text (RFC 3207 4)
    await _greet(smtp, endpoint, where)  # RFC 3207 4.2: forget what was said before TLS


async def _tls_info(smtp: aiosmtplib.SMTP, endpoint: Endpoint, where: str) -> TLSInfo | None:
    """The session's TLS, its certificate judged by the requirement's matcher; a
    ``verify`` requirement that it fails ends the session (the host is skipped, the
    mail deferred if no other host does better: never plain text)."""
    ssl_object = smtp.get_transport_info("ssl_object") if smtp.is_connected else None
    if ssl_object is None:
        return None
    requirement = endpoint.tls
    check = await requirement.matcher.check(peer_chain(ssl_object), endpoint.host)
    cipher = ssl_object.cipher()
    info = TLSInfo(
        version=str(ssl_object.version() or "TLS"),
        cipher=str(cipher[0]) if cipher else None,
        verified=check.verified,
        method=check.method,
        detail=check.detail,
    )
    if not check.verified:
        if requirement.verification_required:
            # Postfix: "Server certificate not verified"; a 4xx: the next host, or later.
            await quit_politely(smtp, 5.0)
            raise HostFailure(
                Outcome.DEFERRED,
                "4.7.5",
                f"Server certificate not verified: host {where}: {check.detail}",
            )
        if requirement.report_only:
            warn_once(
                f"certificate:{endpoint.host}:{requirement.reason}",
                "%s: %s; %s would refuse it (testing: delivered anyway)",
                where,
                check.detail,
                requirement.reason or requirement.label,
            )
    return info


async def _login(
    smtp: aiosmtplib.SMTP,
    endpoint: Endpoint,
    where: str,
    options: OutboundOptions,
    encrypted: bool,
) -> None:
    if not encrypted and not options.allow_plaintext_auth:
        raise HostFailure(
            Outcome.DEFERRED,
            "4.7.0",
            f"will not send credentials to {where} without TLS (allow_plaintext_auth is off)",
        )
    if not smtp.supports_extension("auth") or not smtp.supported_auth_methods:
        raise HostFailure(
            Outcome.DEFERRED, "4.7.0", f"host {where} offers no usable AUTH mechanism"
        )
    try:
        await smtp.login(endpoint.username or "", endpoint.password or "")
    except aiosmtplib.SMTPAuthenticationError as exc:
        answer = answer_from_reply(SMTPResponse(exc.code, exc.message), where, "AUTH")
        # Wrong credentials are the operator's to fix: defer, never bounce.
        raise HostFailure(
            Outcome.DEFERRED,
            "4.7.0",
            f"SASL authentication failed; {answer.diagnostic}",
            answer.reply,
        ) from None


# --- helpers -------------------------------------------------------------------------------


def _server_name(smtp: aiosmtplib.SMTP) -> str:
    """The name the server gave in its EHLO (or HELO) reply, lower-case."""
    response = smtp.last_ehlo_response or smtp.last_helo_response
    words = response.message.split(None, 1) if response is not None else []
    return words[0].lower() if words else ""


def _refused(response: SMTPResponse, where: str, stage: str) -> HostFailure:
    """A refusal of the session (greeting, EHLO, LHLO): permanent only for a 5xx."""
    answer = answer_from_reply(response, where, stage)
    diagnostic = answer.diagnostic.replace(" said: ", " refused to talk to me: ", 1)
    if answer.outcome is Outcome.FAILED:
        return HostFailure(Outcome.FAILED, answer.status, diagnostic, answer.reply)
    status = answer.status if answer.outcome is Outcome.DEFERRED else "4.0.0"
    return HostFailure(Outcome.DEFERRED, status, diagnostic, answer.reply)


def _lost(exc: BaseException, where: str, stage: str) -> Answer:
    """The session broke (closed, timed out, garbled) while ``stage``: try later."""
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        text = f"conversation with {where} timed out while {stage}"
    else:
        text = f"lost connection with {where} while {stage}: {_describe(exc)}"
    return Answer(Outcome.DEFERRED, "4.4.2", text)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _all_ascii(request: DeliveryRequest) -> bool:
    return request.sender.isascii() and all(r.address.isascii() for r in request.recipients)
