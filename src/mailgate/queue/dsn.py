"""Delivery status notifications (RFC 3464): the bounce, delay warning and success
report mailgate sends back to a message's sender.

:func:`build_dsn` takes the facts of the message (:class:`MessageFacts`), one
:class:`RecipientResult` per recipient to report and the original message (a path or
bytes), and gives the bytes of a ``multipart/report; report-type=delivery-status``
message ready to be queued with the null reverse-path ``<>``:

1. a human-readable ``text/plain`` part;
2. a ``message/delivery-status`` part: the per-message fields (Reporting-MTA,
   Original-Envelope-Id, Received-From-MTA, Arrival-Date) and one group per recipient
   (Original-Recipient, Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
   Last-Attempt-Date, Will-Retry-Until);
3. the original message: its header only (``text/rfc822-headers``) or all of it
   (``message/rfc822``), as RET asked (RFC 3461 4.3). Only a failure report returns the
   whole message, and only up to ``max_full_size`` bytes: past that, and for delay and
   success reports, the header is returned (a bounce of a 40 MB message must not be a
   40 MB message; Postfix's ``bounce_size_limit`` is the same idea).

Addresses with non-ASCII characters (SMTPUTF8) are written with the ``utf-8`` address
type of RFC 6533. By default the report stays 7-bit clean where it can: such addresses are
written as ``utf-8-addr-xtext`` (``\\x{HEX}`` escapes) in a ``message/delivery-status``
part, so the report can go over any path. When the report's own recipient (the original
sender) is a UTF-8 address, the report can only travel over SMTPUTF8 anyway: then (or
with ``utf8=True``) it is an RFC 6533 ``global`` report, with
``message/global-delivery-status`` and ``message/global-headers``/``message/global`` and
raw UTF-8, and it must be sent with SMTPUTF8. A report that carries the original message's
8-bit content needs 8BITMIME: see :func:`needs_8bitmime`.

Built with the stdlib ``email`` package. The delivery-status groups are written out as
text first and then parsed by ``email`` into the header blocks that package uses for
``message/delivery-status``: the field values are exactly what is written here (folding
included), never re-encoded as RFC 2047 words, which a DSN parser would not decode.
"""

from __future__ import annotations

import email.policy
import email.utils
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import EmailPolicy
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Final, Literal, Protocol

#: Largest original message returned whole in a failure report (bytes); above it, only
#: its header. The same default as Postfix's bounce_size_limit.
DEFAULT_MAX_FULL_SIZE: Final = 50_000
#: Largest original header returned (bytes): a header that never ends (no empty line) is
#: cut here.
MAX_HEADER_SIZE: Final = 256 * 1024
MAILER_DAEMON: Final = "MAILER-DAEMON"
_MAX_LINE: Final = 998  # octets, without CRLF (RFC 5322 2.1.1)


class Action(StrEnum):
    """The Action field (RFC 3464 2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


# The class of Status each action goes with (RFC 3464 2.3.3, 2.3.4).
_STATUS_CLASS: Final = {
    Action.FAILED: "5",
    Action.DELAYED: "4",
    Action.DELIVERED: "2",
    Action.RELAYED: "2",
    Action.EXPANDED: "2",
}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")

Timestamp = datetime | float
"""A moment: an aware datetime, or seconds since the epoch (what the queue stores)."""


class Reply(Protocol):
    """An SMTP reply: ``code``, ``enhanced`` status and ``text`` (the queue's
    ``RemoteReply`` and :class:`Diagnostic` both are)."""

    @property
    def code(self) -> int: ...

    @property
    def enhanced(self) -> str | None: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """The reply that decided a recipient's fate (the remote server's, or the one mailgate
    made up, e.g. ``550 5.1.10`` for a null MX): the Diagnostic-Code field."""

    code: int
    enhanced: str | None
    text: str


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient. ``address`` is the Final-Recipient; ``orcpt`` the
    ORCPT parameter as mailgate's parser keeps it (``"rfc822;user@example.com"``,
    ``"utf-8;user@exämple.com"``: type, ``;``, the decoded address); ``status`` the RFC
    3463 code (``5.1.1``); ``remote_mta`` the host name (or address) of the server that
    answered; ``will_retry_until`` only for delays."""

    address: str
    action: Action
    status: str
    orcpt: str | None = None
    remote_mta: str | None = None
    diagnostic: Reply | None = None
    last_attempt: Timestamp | None = None
    will_retry_until: Timestamp | None = None


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """The message a report is about. ``sender`` is its reverse-path, the report's
    recipient (never ``<>``: a message from the null sender gets no report);
    ``reporting_mta`` this server's host name; ``envid`` and ``ret`` the ENVID and RET of
    its MAIL command; ``received_from`` the client's name (Received-From-MTA)."""

    sender: str
    reporting_mta: str
    arrival_date: Timestamp | None = None
    envid: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    received_from: str | None = None
    queue_id: str | None = None


def status_for(action: Action, reply: Reply | None = None) -> str:
    """The Status for a recipient: the reply's enhanced code when it has one of the
    action's class, else the class's generic code (``5.0.0``, ``4.0.0``, ``2.0.0``) --
    what a queue that kept only the last reply has to go on."""
    expected = _STATUS_CLASS[Action(action)]
    enhanced = reply.enhanced if reply is not None else None
    if enhanced and enhanced[0] == expected and _STATUS.fullmatch(enhanced):
        return enhanced
    return f"{expected}.0.0"


# --- encoding field values -------------------------------------------------------------------

# RFC 6533 3: QCHAR is printable ASCII except "+", "=" and "\"; everything else is \x{HEX}.
_NOT_QCHAR = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Nothing that could end a field or a line, whatever the source says.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# White space of any kind in an address: not one a report can be written to (email's
# header writer drops it).
_SPACES = re.compile(r"\s")


def utf8_addr_xtext(address: str) -> str:
    """An address as RFC 6533 ``utf-8-addr-xtext``: ASCII, with ``\\x{HEX}`` escapes."""
    return _NOT_QCHAR.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", address)


def _escape_non_ascii(text: str) -> str:
    """Free text for a 7-bit delivery-status field: non-ASCII as ``\\x{HEX}`` (readable,
    and nothing is lost)."""
    return _NON_ASCII.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", text)


def _one_line(text: str) -> str:
    """A value from elsewhere (a remote server's reply text, an ENVID) on one line."""
    return " ".join(_CONTROLS.sub(" ", text).split())


def _typed_address(address: str, utf8: bool) -> str:
    """``rfc822; a@b`` for an ASCII address, ``utf-8; ...`` otherwise (RFC 6533)."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else utf8_addr_xtext(address)}"


def _original_recipient(orcpt: str, utf8: bool) -> str:
    addr_type, _, address = orcpt.partition(";")
    addr_type = addr_type.strip().lower() or "rfc822"
    address = _one_line(address)
    if addr_type == "rfc822" and not address.isascii():
        addr_type = "utf-8"
    if addr_type == "utf-8":
        return f"utf-8; {address if utf8 else utf8_addr_xtext(address)}"
    return f"{addr_type}; {address if utf8 else _escape_non_ascii(address)}"


def _date(moment: Timestamp) -> str:
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    elif moment.tzinfo is None:
        raise ValueError(f"a naive datetime is ambiguous in a DSN: {moment!r}")
    return email.utils.format_datetime(moment)


def _field(name: str, value: str, width: int = 78) -> str:
    """``Name: value`` folded at spaces to about ``width`` characters (RFC 5322 2.2.3):
    remote reply texts can be long. A run without spaces stays whole on its line (an
    address must not be cut), unless it would pass the 998-octet limit of a line: only
    then is it cut into pieces, joined by the folding white space."""
    hard = _MAX_LINE - len(name) - 2
    words: list[str] = []
    for word in value.split(" "):
        while len(word) > hard:
            words.append(word[:hard])
            word = word[hard:]
        words.append(word)
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current != f"{name}:":
            lines.append(current)
            current = f" {word}"
        else:
            current = f"{current} {word}"
    lines.append(current)
    return "\r\n".join(lines)


def _diagnostic(reply: Reply, utf8: bool) -> str:
    text = _one_line(reply.text)
    if not utf8:
        text = _escape_non_ascii(text)
    parts = [str(reply.code), reply.enhanced or "", text]
    return "smtp; " + " ".join(part for part in parts if part)


# --- the report --------------------------------------------------------------------------


def build_dsn(
    facts: MessageFacts,
    results: Sequence[RecipientResult],
    original: bytes | str | Path,
    *,
    max_full_size: int = DEFAULT_MAX_FULL_SIZE,
    utf8: bool | None = None,
    now: Timestamp | None = None,
) -> bytes:
    """The report, as bytes (CRLF line ends) ready to queue from ``<>`` to
    ``facts.sender``. ``original`` is the message the report is about (a path to read,
    or its bytes). ``utf8``: None decides from the sender's address (see the module
    text). Raises ValueError for a report that must not be sent (null sender, no
    recipients) or facts that do not fit together (an Action with the wrong Status
    class, Will-Retry-Until on a failure)."""
    sender = facts.sender.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if not sender:
        raise ValueError("no report is sent to the null sender <>")
    local, _, domain = sender.rpartition("@")
    if not local or not domain or _CONTROLS.search(sender) or _SPACES.search(sender):
        raise ValueError(f"{sender!r} is not an address to send a report to")
    if not results:
        raise ValueError("a report needs at least one recipient")
    for result in results:
        _check(result)
    if utf8 is None:
        utf8 = not sender.isascii()
    elif not utf8 and not sender.isascii():
        raise ValueError(f"{sender!r} is a UTF-8 address: its report must be a UTF-8 one")
    hostname = _host_name(facts.reporting_mta)
    moment = datetime.now(UTC) if now is None else now
    actions = {Action(result.action) for result in results}
    failed = Action.FAILED in actions

    # What of the original goes back: all of it only in a failure report, when allowed.
    want_full = failed and facts.ret != "HDRS"
    content, full = _read_original(original, want_full, max_full_size)
    truncated = want_full and not full

    # SMTP's CRLF; UTF-8 header fields only in a UTF-8 report; refold_source="none": the
    # returned original's header fields go back as they came, never refolded or
    # re-encoded (the report's own fields are folded by email all the same).
    policy: EmailPolicy[EmailMessage] = EmailPolicy(
        linesep="\r\n", utf8=utf8, refold_source="none", message_factory=EmailMessage
    )
    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <{MAILER_DAEMON}@{hostname}>"
    # Built from its parts, not parsed: email's address parser takes odd local parts
    # (":;", quotes, dots) for header syntax; this way they are quoted as needed.
    report["To"] = HeaderAddress(username=local, domain=domain)
    report["Subject"] = _subject(actions)
    report["Date"] = _date(moment)
    report["Message-ID"] = f"<{uuid.uuid4().hex}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no automatic answer to this
    human = _human_text(facts, results, hostname, actions, full, truncated, max_full_size)
    # 7-bit clean unless the report is a UTF-8 one anyway: quoted-printable for non-ASCII
    # text (a remote server's reply may have some); otherwise email picks (7bit, or
    # quoted-printable for over-long lines).
    report.set_content(human, cte=None if utf8 or human.isascii() else "quoted-printable")
    report.make_mixed()
    report.set_type("multipart/report")
    report.set_param("report-type", "global-delivery-status" if utf8 else "delivery-status")
    report.attach(_status_part(facts, results, hostname, utf8, policy))
    report.attach(_original_part(content, full, utf8, policy))
    return report.as_bytes()


def _host_name(name: str) -> str:
    """The reporting host as an A-label name: it appears in From, Message-ID and
    Reporting-MTA ("dns; ..."), all of which want ASCII."""
    name = _one_line(name).rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{name!r} is not a host name") from None


def needs_8bitmime(report: bytes) -> bool:
    """Whether the report has 8-bit content (the original's, or a UTF-8 report's): then
    it must be sent with BODY=8BITMIME (and SMTPUTF8 for a UTF-8 report)."""
    return not report.isascii()


def _check(result: RecipientResult) -> None:
    action = Action(result.action)
    if not _STATUS.fullmatch(result.status):
        raise ValueError(f"{result.address}: {result.status!r} is not a status code (5.1.1)")
    if result.status[0] != _STATUS_CLASS[action]:
        raise ValueError(f"{result.address}: status {result.status} does not fit action {action}")
    if result.will_retry_until is not None and action is not Action.DELAYED:
        raise ValueError(f"{result.address}: Will-Retry-Until is only for delayed recipients")


def _subject(actions: set[Action]) -> str:
    if Action.FAILED in actions:
        return "Undelivered Mail Returned to Sender"
    if Action.DELAYED in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _human_text(
    facts: MessageFacts,
    results: Sequence[RecipientResult],
    hostname: str,
    actions: set[Action],
    full: bool,
    truncated: bool,
    max_full_size: int,
) -> str:
    lines = [f"This is the mail system at {hostname}.", ""]
    if Action.FAILED in actions:
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "The mail system gave up; it will not try again.",
        ]
    if Action.DELAYED in actions:
        retry = [r.will_retry_until for r in results if r.will_retry_until is not None]
        until = f" until {_date(max(retry, key=_epoch))}" if retry else ""
        lines += [
            "Your message has not been delivered yet to one or more recipients.",
            f"The mail system will keep trying{until}; you need not send it again.",
        ]
    if actions & {Action.DELIVERED, Action.RELAYED, Action.EXPANDED}:
        lines += ["Your message was delivered to one or more recipients, as you asked to be told."]
    lines.append("")
    for result in results:
        action = Action(result.action)
        line = f"<{_one_line(result.address)}>: {_ACTION_WORDS[action]}"
        if result.diagnostic is not None:
            where = f"{_one_line(result.remote_mta)} said" if result.remote_mta else "reason"
            diagnostic = result.diagnostic
            reply = " ".join(
                str(p)
                for p in (diagnostic.code, diagnostic.enhanced, _one_line(diagnostic.text))
                if p
            )
            line += f"; {where}: {reply}"
        elif result.remote_mta:
            line += f" (by {_one_line(result.remote_mta)})"
        lines.append(line)
    lines.append("")
    if full:
        lines.append("Your message is attached below.")
    elif truncated:
        lines.append(
            f"Your message was larger than {max_full_size} bytes: only its header is attached."
        )
    else:
        lines.append("The header of your message is attached below.")
    return "\n".join(lines) + "\n"


_ACTION_WORDS: Final = {
    Action.FAILED: "delivery failed",
    Action.DELAYED: "delivery delayed",
    Action.DELIVERED: "delivered",
    Action.RELAYED: "relayed to a system that does not report delivery",
    Action.EXPANDED: "delivered and expanded to further recipients",
}


def _epoch(moment: Timestamp) -> float:
    return moment if isinstance(moment, int | float) else moment.timestamp()


def _status_part(
    facts: MessageFacts,
    results: Sequence[RecipientResult],
    hostname: str,
    utf8: bool,
    policy: EmailPolicy[EmailMessage],
) -> EmailMessage:
    def text(value: str) -> str:
        value = _one_line(value)
        return value if utf8 else _escape_non_ascii(value)

    per_message = [_field("Reporting-MTA", f"dns; {hostname}")]
    if facts.queue_id:
        per_message.append(_field("X-Mailgate-Queue-ID", text(facts.queue_id)))
    if facts.envid:
        per_message.append(_field("Original-Envelope-Id", text(facts.envid)))
    if facts.received_from:
        per_message.append(_field("Received-From-MTA", f"dns; {text(facts.received_from)}"))
    if facts.arrival_date is not None:
        per_message.append(_field("Arrival-Date", _date(facts.arrival_date)))
    groups = ["\r\n".join(per_message)]
    for result in results:
        fields = []
        if result.orcpt:
            fields.append(_field("Original-Recipient", _original_recipient(result.orcpt, utf8)))
        fields.append(_field("Final-Recipient", _typed_address(result.address, utf8)))
        fields.append(_field("Action", Action(result.action).value))
        fields.append(_field("Status", result.status))
        if result.remote_mta:
            fields.append(_field("Remote-MTA", f"dns; {text(result.remote_mta)}"))
        if result.diagnostic is not None:
            fields.append(_field("Diagnostic-Code", _diagnostic(result.diagnostic, utf8)))
        if result.last_attempt is not None:
            fields.append(_field("Last-Attempt-Date", _date(result.last_attempt)))
        if result.will_retry_until is not None:
            fields.append(_field("Will-Retry-Until", _date(result.will_retry_until)))
        groups.append("\r\n".join(fields))
    subtype = "global-delivery-status" if utf8 else "delivery-status"
    head = f"Content-Type: message/{subtype}\r\n"
    if utf8:
        head += "Content-Transfer-Encoding: 8bit\r\n"
    body = "\r\n\r\n".join(groups) + "\r\n"
    # Parsed by email into its header blocks (what it builds for a DSN it reads).
    return _parsed_part((head + "\r\n" + body).encode(), policy)


def _original_part(
    content: bytes, full: bool, utf8: bool, policy: EmailPolicy[EmailMessage]
) -> EmailMessage:
    if full:
        subtype = "message/global" if utf8 else "message/rfc822"
    else:
        subtype = "message/global-headers" if utf8 else "text/rfc822-headers"
    head = f"Content-Type: {subtype}\r\n"
    if not content.isascii():
        head += "Content-Transfer-Encoding: 8bit\r\n"
    if not full and not content.endswith(b"\n"):
        content += b"\r\n"
    return _parsed_part(head.encode() + b"\r\n" + content, policy)


def _parsed_part(data: bytes, policy: EmailPolicy[EmailMessage]) -> EmailMessage:
    """A MIME part from its bytes. email keeps parsed field values as their source text
    (folding and 8-bit octets included) and, with ``refold_source="none"``, writes them
    back as they are."""
    return BytesParser(EmailMessage, policy=policy).parsebytes(data)


# --- reading the original --------------------------------------------------------------------


def _read_original(original: bytes | str | Path, want_full: bool, cap: int) -> tuple[bytes, bool]:
    """``(content, full)``: the whole message when wanted and at most ``cap`` bytes,
    else its header (up to the empty line, at most MAX_HEADER_SIZE bytes). A file is read
    only as far as needed."""
    if isinstance(original, bytes):
        if want_full and len(original) <= cap:
            return _crlf(original), True
        return _crlf(_header_of(original)), False
    path = Path(original)
    with path.open("rb") as file:
        if want_full and path.stat().st_size <= cap:
            data = file.read(cap + 1)
            if len(data) <= cap:  # it did not grow in between
                return _crlf(data), True
            file.seek(0)
        return _crlf(_read_header(file)), False


def _header_of(data: bytes) -> bytes:
    """The header of a message in memory: up to and including the empty line."""
    match = re.search(rb"\r?\n\r?\n", data[: MAX_HEADER_SIZE + 4])
    if match is None:
        return data[:MAX_HEADER_SIZE]
    return data[: match.end()]


def _read_header(file: BinaryIO) -> bytes:
    lines = []
    size = 0
    for line in file:
        lines.append(line)
        size += len(line)
        if line in (b"\r\n", b"\n") or size >= MAX_HEADER_SIZE:
            break
    return b"".join(lines)[: MAX_HEADER_SIZE + 2]


def _crlf(data: bytes) -> bytes:
    """CRLF line ends throughout (a spool file may have bare LF)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


__all__ = [
    "DEFAULT_MAX_FULL_SIZE",
    "MAILER_DAEMON",
    "MAX_HEADER_SIZE",
    "Action",
    "Diagnostic",
    "MessageFacts",
    "RecipientResult",
    "Reply",
    "Timestamp",
    "build_dsn",
    "needs_8bitmime",
    "status_for",
    "utf8_addr_xtext",
]
