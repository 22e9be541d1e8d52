"""The ``Received:`` trace field (RFC 5321 4.4) and its ``with`` protocol (RFC 3848, 6531).

Everything a client chose (its EHLO name, the recipient) is cleaned so that it can never
end the field early or add a line: no control characters, and comment text escaped.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["received_header", "with_protocol"]

_MAX_LINE = 78  # RFC 5322 2.1.1 "SHOULD"; longer words cannot be folded and stay long
_MAX_TEXT = 255  # caps client text; the protocol layer already limits command lines

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LITERAL = re.compile(r"\[(IPv6:)?([0-9A-Fa-f:.]+)\]")
# Controls (C0, DEL, C1) and the characters str.splitlines() also treats as line ends.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_COMMENT_SPECIAL = re.compile(r"([()\\])")
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]")
# RFC 5321 Mailbox (and the bare Postmaster), with RFC 6531 UTF-8 allowed; only a
# well-formed one is written, since a stray "(" or '"' would swallow the date.
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_MAILBOX = re.compile(
    rf"(?:{_ATOM}(?:\.{_ATOM})*|{_QUOTED})"
    rf"(?:@(?:{_ATOM}(?:\.{_ATOM})*|\[[\x21-\x5a\x5e-\x7e]+\]))?"
)


def with_protocol(*, lmtp: bool, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The registered ``with`` keyword: SMTP, ESMTP[S][A], LMTP[S][A], UTF8SMTP[S][A]...

    LMTP always uses LHLO, so ``esmtp`` does not change it. AUTH and SMTPUTF8 exist only
    after EHLO and imply it. HELO over implicit TLS has no registered name of its own
    and is plain ``SMTP``.
    """
    if lmtp:
        base = "UTF8LMTP" if utf8 else "LMTP"
    elif esmtp or auth or utf8:
        base = "UTF8SMTP" if utf8 else "ESMTP"
    else:
        return "SMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


def _clean(value: str, *, utf8: bool) -> str:
    value = _CONTROL.sub("?", value)[:_MAX_TEXT]
    return value if utf8 else _NON_ASCII.sub("?", value)


def _comment(value: str, *, utf8: bool) -> str:
    return "(" + _COMMENT_SPECIAL.sub(r"\\\1", _clean(value, utf8=utf8)) + ")"


def _domain(value: str | None) -> str | None:
    """``value`` as an RFC 5321 Domain (IDNs as A-labels), or None if it is not one."""
    if not value:
        return None
    if not value.isascii():
        try:
            value = value.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(value) > 253 or not _DOMAIN.fullmatch(value):
        return None
    return value


def _literal(value: str | None) -> str | None:
    """An address literal in the client's own spelling if it is well-formed."""
    match = _LITERAL.fullmatch(value or "")
    if match is None:
        return None
    try:
        address = ipaddress.ip_address(match[2])
    except ValueError:
        return None
    return value if (address.version == 6) == bool(match[1]) else None


def _address_literal(ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"[IPv6:{address.compressed}]"
        address = address.ipv4_mapped  # what a dual-stack socket reports for IPv4
    return f"[{address}]"


def _fold(segments: Sequence[str]) -> str:
    """One clause per line where they do not fit together (CRLF TAB between clauses);
    a clause too long for a line of its own is folded before one of its spaces."""
    lines: list[str] = []
    line = "Received:"
    for segment in segments:
        first, *rest = segment.split(" ")
        if len(line) + 1 + len(segment) > _MAX_LINE and line != "Received:":
            lines.append(line)
            line = "\t" + first
        else:
            line += " " + first
        for word in rest:
            if len(line) + 1 + len(word) > _MAX_LINE:
                lines.append(line)
                line = " " + word
            else:
                line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def received_header(
    *,
    helo: str | None,
    peer_host: str | None,
    peer_ip: str,
    peer_port: int | None,
    by_host: str,
    protocol: str,
    tls: str | None,
    queue_id: str,
    recipient: str | Sequence[str] | None,
    when: float | None = None,
) -> bytes:
    """A complete ``Received:`` field with its CRLF, ready to put before the message.

    ``recipient`` may be the envelope's recipient list: ``for <...>`` is written only
    when there is exactly one, since more would disclose Bcc recipients to each other.
    ``tls`` is a free text such as ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``. The date is
    in UTC.
    """
    utf8 = protocol.upper().startswith("UTF8")
    literal = _address_literal(peer_ip)
    helo_name = _domain(helo) or _literal(helo)
    host = _domain(peer_host)

    # RFC 5321: "from" names what the client said; an address literal stands in when
    # that is missing or no domain, and the bad name goes into a comment instead.
    from_clause = "from " + (helo_name or literal or "unknown")
    tcp_info = " ".join(part for part in (host, literal) if part)
    if tcp_info:
        from_clause += f" ({tcp_info})"
    segments = [from_clause]
    extra = []
    if peer_port is not None:
        extra.append(f"port {int(peer_port)}")
    if helo and not helo_name:
        extra.append("helo=" + helo)
    if extra:
        segments.append(_comment(" ".join(extra), utf8=utf8))

    by = _domain(by_host) or _NOT_ATEXT.sub("_", by_host) or "localhost"
    segments.append(f"by {by} (mailgate)")
    segments.append("with " + (_NOT_ATEXT.sub("_", protocol) or "SMTP"))
    queue = _NOT_ATEXT.sub("_", queue_id)
    if queue:
        segments.append("id " + queue)
    if tls:
        segments.append(_comment(tls, utf8=False))

    if isinstance(recipient, str):
        recipient = [recipient]
    if recipient is not None and len(recipient) == 1:
        address = _clean(recipient[0].strip(), utf8=utf8)
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        if _MAILBOX.fullmatch(address):
            segments.append(f"for <{address}>")

    segments[-1] += ";"
    stamp = time.time() if when is None else when
    segments.append(format_datetime(datetime.fromtimestamp(stamp, UTC)))
    return _fold(segments).encode("utf-8")
