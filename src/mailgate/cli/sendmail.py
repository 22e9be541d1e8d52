"""``mailgate sendmail``: the sendmail command line that cron, PHP and scripts use.

::

    mailgate sendmail [-f SENDER] [-t] [-i|-oi] [-F NAME] [--config FILE] RECIPIENT...

Reads a message on stdin (at most ``max_size``), completes its header (``Received``,
and ``From``, ``Date`` and ``Message-ID`` when missing; ``Bcc`` removed) and routes each
recipient with the configuration's ``[[routes]]``:

* every recipient routed ``relay`` or ``forward``: the message is written straight into
  the queue. When the command exits with 0 it is durably queued; a running server
  delivers it (it notices the new message within a second), and one started later does.
* a recipient routed ``deliver`` (local delivery: Maildir, mbox, LMTP..., and every
  recipient of a configuration without ``[[routes]]``): local delivery happens inside
  the server, so the whole message is handed to the running server over SMTP, at its
  first listener (a wildcard address is reached on loopback), in one transaction; the
  server routes each recipient itself. Without a running server that is a temporary
  failure (75), and nothing is sent.
* a recipient refused by a ``reject`` rule: the whole message is refused, nothing
  queued or sent. All or nothing is deliberate: a caller retrying after a partial
  success would send the rest twice.

Exit statuses are sendmail's (sysexits.h): 0 queued; 64 (EX_USAGE) a wrong command line
or address; 65 (EX_DATAERR) a message too large or with unusable recipient headers; 67
(EX_NOUSER) a recipient refused by a reject rule; 69 (EX_UNAVAILABLE) the server
refused the message with a 5xx reply; 75 (EX_TEMPFAIL) the queue or the server could not
take the message now (try again), or a reject rule with a 4xx reply; 78 (EX_CONFIG) the
configuration is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import getpass
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from mailgate.cli.queue import (
    QueueCommandError,
    QueueLocation,
    locate_queue,
    open_queue,
    store_errors,
)
from mailgate.server.options import ServerOptions

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78

#: The environment variable that names the configuration file when --config is not given
#: (a program that only knows "sendmail -t -i" can still find the queue).
CONFIG_ENVIRONMENT = "MAILGATE_CONFIG"
#: The client address recipients are routed for: the message comes from this machine,
#: as if over SMTP from a local, unauthenticated client (which any local user can be).
LOCAL_CLIENT = "127.0.0.1"

_COMMAND = "mailgate sendmail"
_READ_BLOCK = 65536
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_LINE_END = re.compile(rb"\r?\n")

_EPILOG = f"""\
what it does:
  The message on stdin gets a Received field, and From, Date and Message-ID when it has
  none; Bcc fields are removed. Each recipient is routed by the [[routes]] of the
  configuration as mail from this machine (client {LOCAL_CLIENT}, not authenticated).
  When every recipient is routed relay or forward, the message is written into the
  queue (durable when this exits with 0). When one is routed to local delivery
  (deliver, or no [[routes]] at all), the whole message is handed to the running
  server over SMTP at its first listener. A recipient refused by a reject rule makes
  the whole message refused. A recipient without a domain gets @HOSTNAME (the
  server's hostname) added.

  With -t the recipients are those of To, Cc and Bcc, plus any given as arguments.
  Without -i a line holding only "." ends the message, as in sendmail.

configuration:
  --config FILE, else the file named by ${CONFIG_ENVIRONMENT}, else the defaults of
  'mailgate serve'. Queueing needs write access to the queue directory: run it as the
  server's user, or as root (it becomes the queue's owner); see docs/operations.md.

exit status (sysexits.h):
  0 queued (or taken by the server); 64 wrong command line or address; 65 message too
  large or bad recipient fields; 67 refused by a reject rule; 69 refused by the server
  (5xx); 75 try again later (the queue is busy or full, the server is not running or
  answered 4xx, or a 4xx reject rule); 78 configuration error.
"""


class SendmailError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def add_sendmail_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``sendmail`` to the ``mailgate`` parser."""
    parser = commands.add_parser(
        "sendmail",
        help="queue a message read on stdin (the sendmail command line)",
        description="Queue the message on stdin for RECIPIENT..., as sendmail does.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sendmail_arguments(parser)


def add_sendmail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"the server's configuration file (default: ${CONFIG_ENVIRONMENT})",
    )
    parser.add_argument(
        "-f",
        dest="sender",
        metavar="SENDER",
        help="the envelope sender (default: your user name @ the server's hostname; "
        "'<>' for the null sender)",
    )
    parser.add_argument("-F", dest="full_name", metavar="NAME", help="your full name, for From")
    parser.add_argument(
        "-t",
        dest="from_headers",
        action="store_true",
        help="take the recipients from the To, Cc and Bcc fields too",
    )
    parser.add_argument(
        "-i",
        dest="ignore_dots",
        action="store_true",
        help='a line with only "." does not end the message',
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTION",
        help="sendmail -oX options: -oi is -i; others (-oem, -odi...) are accepted and ignored",
    )
    parser.add_argument(
        "-B", dest="body_type", metavar="TYPE", help="7BIT or 8BITMIME (default: found by reading)"
    )
    parser.add_argument(
        "-N", dest="notify", metavar="DSN", help="when to report: never, or success,delay,failure"
    )
    parser.add_argument("-R", dest="ret", metavar="RET", help="what a report returns: hdrs or full")
    parser.add_argument("-V", dest="envid", metavar="ENVID", help="an envelope id for reports")
    parser.add_argument(
        "-b", dest="mode", metavar="MODE", help="only -bm (read a message on stdin, the default)"
    )
    parser.add_argument(
        "-v", dest="verbose", action="store_true", help="print the queue id on stderr"
    )
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="recipient addresses")


def run_sendmail(args: argparse.Namespace, stdin: BinaryIO | None = None) -> int:
    """Run ``mailgate sendmail ...`` reading ``stdin`` (default: the process's); the exit
    status (sysexits)."""
    try:
        outcome, count = _sendmail(args, stdin if stdin is not None else sys.stdin.buffer)
    except SendmailError as exc:
        print(" ".join(str(exc).splitlines()), file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{_COMMAND}: interrupted; nothing queued", file=sys.stderr)
        return EX_TEMPFAIL
    if args.verbose:
        print(f"{_COMMAND}: {outcome} for {count} recipient(s)", file=sys.stderr)
    return EX_OK


@dataclass(frozen=True, slots=True)
class _Envelope:
    sender: str
    recipients: tuple[str, ...]


def _sendmail(args: argparse.Namespace, stdin: BinaryIO) -> tuple[str, int]:
    from mailgate.plugins.routing import RouteTable
    from mailgate.plugins.routing.rules import Action
    from mailgate.queue import ClientInfo, NewMessage, NewRecipient, parse_notify

    if args.mode is not None and args.mode != "m":
        raise SendmailError(
            f"{_COMMAND}: -b{args.mode} is not supported; only -bm (read a message on stdin)",
            EX_USAGE,
        )
    ignore_dots = args.ignore_dots or "i" in args.options
    try:
        notify = parse_notify(args.notify.upper()) if args.notify else None
    except ValueError:
        raise SendmailError(
            f"{_COMMAND}: -N {args.notify!r}: give never, or success, delay, failure joined by commas",
            EX_USAGE,
        ) from None
    ret = _choice(args.ret, ("FULL", "HDRS"), "-R")
    body_type = _choice(args.body_type, ("7BIT", "8BITMIME"), "-B")
    config = args.config if args.config is not None else os.environ.get(CONFIG_ENVIRONMENT) or None
    try:
        location = locate_queue(config, _COMMAND)
    except QueueCommandError as exc:
        raise SendmailError(str(exc), EX_CONFIG) from None
    options = location.options
    hostname = options.hostname
    login = _login()

    sender = _sender(args.sender, login, hostname)
    data = read_message(stdin, options.max_size, ignore_dots)
    header, body = split_header(data)
    recipients = list(_command_line_recipients(args.recipients, hostname))
    if args.from_headers:
        recipients.extend(_header_recipients(header, hostname))
    recipients = list(dict.fromkeys(recipients))  # the first of duplicates
    if not recipients:
        raise SendmailError(
            f"{_COMMAND}: no recipients: give them as arguments"
            + ("" if args.from_headers else ", or -t to read To, Cc and Bcc"),
            EX_USAGE,
        )
    message = complete_message(
        header,
        body,
        sender=sender,
        login=login,
        full_name=args.full_name,
        hostname=hostname,
    )

    from mailgate.plugins.policy import PolicyConfigError

    try:
        # Checked with the rest of the configuration already; this cannot fail then.
        table = RouteTable.from_sections(options.policy)
    except PolicyConfigError as exc:
        raise SendmailError(f"{_COMMAND}: error: {exc}", EX_CONFIG) from None
    queued: list[NewRecipient] = []
    local: list[str] = []
    for recipient in recipients:
        decision = table.match(recipient, sender, LOCAL_CLIENT, False)
        rule = f"rule {decision.route.label}" if decision.route is not None else "no rule"
        if decision.action is Action.REJECT:
            reply = decision.reply
            status = EX_TEMPFAIL if reply is not None and not reply.permanent else EX_NOUSER
            raise SendmailError(
                f"{_COMMAND}: {recipient}: refused by {rule}: {decision.destination}; "
                "nothing queued",
                status,
            )
        if decision.action is Action.DELIVER:
            local.append(f"{recipient} ({rule})")
        else:
            queued.append(NewRecipient(recipient, decision.destination, notify=notify))
    smtputf8 = not (sender.isascii() and all(item.isascii() for item in recipients)) or not (
        header.isascii()
    )
    if body_type is None and not message.isascii():
        body_type = "8BITMIME"
    envelope = Submission(
        sender=sender,
        recipients=tuple(recipients),
        notify=args.notify.upper() if args.notify else None,
        ret=ret,
        envid=args.envid,
        smtputf8=smtputf8,
        body_type=body_type,
    )
    if local:
        # Local delivery happens inside the server: the whole message goes to it, which
        # routes every recipient itself (queueing the others), in one transaction.
        answer = submit_over_smtp(options, envelope, message, local)
        host, port, _ = _server_address(options)
        return f"handed to the server at {host} port {port} ({answer})", len(recipients)
    new = NewMessage(
        sender,
        queued,
        envid=args.envid,
        ret=ret,  # type: ignore[arg-type]  # checked by _choice
        smtputf8=smtputf8,
        body_type=body_type,
        client=ClientInfo(auth_user=login, listener="sendmail"),
    )
    signed = _signed(options, message, login)
    return f"queued as {asyncio.run(_enqueue(location, new, signed))}", len(queued)


def _signed(options: ServerOptions, message: bytes, login: str) -> bytes:
    """``message`` with the ``[[dkim_sign]]`` signatures that match it: sendmail queues
    it itself, so it signs as the server does for mail it queues (once: a retry sends
    these bytes). The keys are read here, so the user running sendmail (the queue's
    owner, or root) must be able to read them."""
    if not any(section.name == "dkim_sign" for section in options.policy):
        return message
    from mailgate.config import ConfigError
    from mailgate.queue.signing import message_signer

    try:
        signer = message_signer(
            options.policy, hostname=options.hostname, relay_networks=options.relay_networks
        )
    except ConfigError as exc:
        raise SendmailError(f"{_COMMAND}: error: {exc}; nothing queued", EX_CONFIG) from None
    if signer is None:
        return message
    try:
        added, _ = signer.sign_local(message, login)
    except Exception as exc:  # dkimpy's errors for a header it cannot parse
        print(f"{_COMMAND}: warning: not DKIM-signed: {exc}", file=sys.stderr)
        return message
    return added + message


@dataclass(frozen=True, slots=True)
class Submission:
    """The envelope of a message handed to the running server over SMTP."""

    sender: str
    recipients: tuple[str, ...]
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    body_type: str | None = None


#: How long the hand-off to the local server may take at each step.
SMTP_TIMEOUT = 60.0


def _server_address(options: ServerOptions) -> tuple[str, int, bool]:
    """Where to reach the server from this machine: its first listener, a wildcard
    address replaced by loopback."""
    if not options.listen:
        raise SendmailError(
            f"{_COMMAND}: local delivery needs the server's listener, and the configuration "
            "has none (listen)",
            EX_CONFIG,
        )
    listener = options.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listener.host, listener.host)
    return host, listener.port, listener.implicit_tls


def submit_over_smtp(
    options: ServerOptions, envelope: Submission, data: bytes, local: Sequence[str]
) -> str:
    """Hand the message to the running server's first listener; its reply to the data
    ("250 2.0.0 queued as ..."). All recipients or none: a refused RCPT ends the
    transaction before any data is sent."""
    import smtplib
    import ssl

    host, port, implicit_tls = _server_address(options)
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    why = f"{local[0]} is delivered locally, by the server at {where}"
    # The server is this machine's own: its certificate (often the self-signed
    # development one) proves nothing more than the connection to loopback does.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client: smtplib.SMTP
    try:
        if implicit_tls:
            client = smtplib.SMTP_SSL(host, port, timeout=SMTP_TIMEOUT, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT)
    except (OSError, smtplib.SMTPException) as exc:
        raise SendmailError(
            f"{_COMMAND}: {why}, which cannot be reached: {_smtp_reason(exc)}; nothing sent",
            EX_TEMPFAIL,
        ) from None
    try:
        with client:
            client.ehlo(options.hostname)
            mail_options: list[str] = []
            if envelope.smtputf8 and client.has_extn("smtputf8"):
                mail_options.append("SMTPUTF8")
            if envelope.body_type == "8BITMIME" and client.has_extn("8bitmime"):
                mail_options.append("BODY=8BITMIME")
            dsn = client.has_extn("dsn")
            if dsn and envelope.ret:
                mail_options.append(f"RET={envelope.ret}")
            if dsn and envelope.envid:
                mail_options.append(f"ENVID={_xtext(envelope.envid)}")
            _expect(client.mail(envelope.sender, mail_options), "MAIL FROM", why)
            rcpt_options = [f"NOTIFY={envelope.notify}"] if dsn and envelope.notify else []
            for recipient in envelope.recipients:
                _expect(client.rcpt(recipient, rcpt_options), f"RCPT TO:<{recipient}>", why)
            code, reply = client.data(data)
            _expect((code, reply), "the message", why)
            return f"{code} {' '.join(reply.decode('utf-8', 'replace').split())}"
    except SendmailError:
        raise
    except (OSError, smtplib.SMTPException) as exc:
        raise SendmailError(
            f"{_COMMAND}: {why}, which failed: {_smtp_reason(exc)}; nothing sent", EX_TEMPFAIL
        ) from None


def _expect(answer: tuple[int, bytes], what: str, why: str) -> None:
    code, text = answer
    if 200 <= code < 400:
        return
    reply = f"{code} {text.decode('utf-8', 'replace')}"
    # A data reply other than 250 means the message was not taken; nothing was delivered.
    raise SendmailError(
        f"{_COMMAND}: {why}, which refused {what}: {' '.join(reply.split())}; nothing sent",
        EX_TEMPFAIL if code < 500 else EX_UNAVAILABLE,
    )


def _smtp_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _xtext(value: str) -> str:
    """RFC 3461 xtext: "+" and "=", controls and non-ASCII as +XX."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=" else f"+{ord(char):02X}" for char in value
    )


async def _enqueue(location: QueueLocation, message: Any, data: bytes) -> str:

    try:
        # Like serve: the schema is created or updated when [queue] migrate = "auto".
        async with open_queue(location, create=True, migrate=None, command=_COMMAND) as store:
            assert store is not None  # create=True always opens
            return await store.enqueue(message, data)
    except QueueCommandError as exc:
        raise SendmailError(f"{exc}; nothing queued", EX_TEMPFAIL) from None
    except store_errors() as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SendmailError(
            f"{_COMMAND}: cannot queue the message in {location.directory}: {reason}; "
            "nothing queued",
            EX_TEMPFAIL,
        ) from None


def _choice(value: str | None, allowed: Sequence[str], flag: str) -> str | None:
    if value is None:
        return None
    upper = value.upper()
    if upper not in allowed:
        raise SendmailError(
            f"{_COMMAND}: {flag} {value!r}: give one of {', '.join(a.lower() for a in allowed)}",
            EX_USAGE,
        )
    return upper


def _login() -> str:
    """The name of the user running the command (for From and the Received field)."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        try:
            return getpass.getuser()
        except OSError:
            return "nobody"


def _sender(given: str | None, login: str, hostname: str) -> str:
    from mailgate.protocol import AddressError
    from mailgate.protocol.address import parse_reverse_path

    if given is None:
        return f"{login}@{hostname}"
    text = given.strip()
    if text in ("", "<>"):
        return ""
    inner = text.removeprefix("<").removesuffix(">")
    if "@" not in inner:
        inner = f"{inner}@{hostname}"
    try:
        parse_reverse_path(f"<{inner}>", smtputf8=True)
    except AddressError as exc:
        raise SendmailError(
            f"{_COMMAND}: -f {given!r} is not an address: {exc}", EX_USAGE
        ) from None
    return inner


def _qualified(address: str, hostname: str) -> str:
    return address if "@" in address else f"{address}@{hostname}"


def _checked(addresses: Iterable[str], hostname: str, where: str, status: int) -> list[str]:
    from mailgate.protocol import AddressError
    from mailgate.protocol.address import parse_forward_path

    result: list[str] = []
    for raw in addresses:
        address = _qualified(raw.strip().removeprefix("<").removesuffix(">"), hostname)
        try:
            parse_forward_path(f"<{address}>", smtputf8=True)
        except AddressError as exc:
            raise SendmailError(
                f"{_COMMAND}: {where} {raw!r} is not an address: {exc}", status
            ) from None
        result.append(address)
    return result


def _address_list(value: str, where: str, status: int) -> list[str]:
    """The addresses of an address list ("Name <a@x>, b@y", groups too), by the stdlib's
    RFC 5322 parser; anything it cannot read as addresses is refused."""
    import email.policy

    try:
        field = email.policy.default.header_factory("To", value)
    except Exception:
        # The stdlib's parser trips (IndexError, ValueError...) over some malformed lists.
        raise SendmailError(
            f"{_COMMAND}: {where} {value!r} is not a list of addresses", status
        ) from None
    for defect in getattr(field, "defects", ()):
        # A bare user name ("root") is fine: it gets @hostname.
        if "invalid address" in str(defect):
            raise SendmailError(f"{_COMMAND}: {where} {value!r} is not a list of addresses", status)
    return [address.addr_spec for address in getattr(field, "addresses", ())]


def _command_line_recipients(arguments: Sequence[str], hostname: str) -> list[str]:
    # sendmail accepts "a@x, b@y" and "Name <a@x>" in one argument too.
    found: list[str] = []
    for argument in arguments:
        addresses = _address_list(argument, "recipient", EX_USAGE)
        if not addresses:
            raise SendmailError(f"{_COMMAND}: {argument!r} is not an address", EX_USAGE)
        found.extend(addresses)
    return _checked(found, hostname, "recipient", EX_USAGE)


def _header_recipients(header: bytes, hostname: str) -> list[str]:
    found: list[str] = []
    for name, value in header_fields(header):
        if name.lower() in ("to", "cc", "bcc"):
            # A group without members ("undisclosed-recipients:;") yields no address.
            found.extend(_address_list(value, f"{name}:", EX_DATAERR))
    return _checked(found, hostname, "header address", EX_DATAERR)


# --- the message --------------------------------------------------------------------------------


def read_message(stream: BinaryIO, max_size: int, ignore_dots: bool) -> bytes:
    """The message on ``stream`` with CRLF line ends, at most ``max_size`` bytes (0: no
    limit). Without ``ignore_dots`` a line holding only "." ends it, as in sendmail."""
    data = bytearray()
    at_line_start = True
    while True:
        try:
            line = stream.readline(_READ_BLOCK)
        except OSError as exc:
            raise SendmailError(f"{_COMMAND}: cannot read the message: {exc}", EX_DATAERR) from None
        if not line:
            break
        if not ignore_dots and at_line_start and line in (b".\n", b".\r\n", b"."):
            break
        at_line_start = line.endswith(b"\n")
        if line.endswith(b"\n"):
            line = line.removesuffix(b"\n").removesuffix(b"\r") + b"\r\n"
        data += line
        if max_size and len(data) > max_size:
            raise SendmailError(
                f"{_COMMAND}: the message is larger than max_size ({max_size} bytes); nothing queued",
                EX_DATAERR,
            )
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return bytes(data)


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """The header (each line with its CRLF, without the blank line) and the body. An mbox
    "From " line at the start is dropped; a message that does not start with a header
    field is all body."""
    if data.startswith(b"From "):
        data = data.partition(b"\r\n")[2]
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line == b"\r\n":
            return data[:position], data[end:]
        continuation = line[:1] in (b" ", b"\t") and position > 0
        if not continuation and _FIELD_NAME.match(line) is None:
            return data[:position], data[position:]  # the body began without a blank line
        position = end
    return data, b""


def header_fields(header: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of each field."""
    fields: list[tuple[str, str]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        text = line.decode("utf-8", "replace")
        if text[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
        else:
            name, _, value = text.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


def _without_fields(header: bytes, names: Iterable[str]) -> tuple[bytes, set[str]]:
    """The header without the fields named (folded lines too), and the lower-cased names
    of the fields it has."""
    drop = {name.lower() for name in names}
    kept: list[bytes] = []
    present: set[str] = set()
    dropping = False
    for line in header.split(b"\r\n")[:-1] if header else []:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.partition(b":")[0].strip().decode("utf-8", "replace").lower()
        present.add(name)
        dropping = name in drop
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept), present


def complete_message(
    header: bytes,
    body: bytes,
    *,
    sender: str,
    login: str,
    full_name: str | None,
    hostname: str,
) -> bytes:
    """The message as queued: a Received field first, Bcc removed, and From, Date and
    Message-ID added when missing."""
    kept, present = _without_fields(header, ("bcc",))
    date = email.utils.formatdate(localtime=True)
    uid = os.getuid() if hasattr(os, "getuid") else None
    by_user = f", from userid {uid}" if uid is not None else ""
    added = [f"Received: by {hostname} (mailgate sendmail{by_user});\r\n\t{date}"]
    fields = []
    if "from" not in present:
        address = sender or f"{login}@{hostname}"
        fields.append(f"From: {email.utils.formataddr((full_name or '', address))}")
    if "date" not in present:
        fields.append(f"Date: {date}")
    if "message-id" not in present:
        fields.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    top = "".join(f"{field}\r\n" for field in added).encode("utf-8")
    bottom = "".join(f"{field}\r\n" for field in fields).encode("utf-8")
    return top + kept + bottom + b"\r\n" + body
