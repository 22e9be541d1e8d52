"""Arguments of Postfix's XCLIENT and XFORWARD commands.

Both carry ``NAME=value`` pairs from a trusted upstream: XCLIENT replaces the client
identity the server sees (for policy), XFORWARD only what it logs. Names are matched
without regard to case and returned in upper case; values are xtext (RFC 3461) and are
returned decoded. ``[UNAVAILABLE]`` and ``[TEMPUNAVAIL]`` become ``None``.

Choices where the Postfix documents leave room:

- A repeated attribute overrides the earlier one, as Postfix does when it applies the
  pairs in order, so ``XCLIENT ADDR=192.0.2.1 ADDR=192.0.2.2`` yields the second.
- An empty value (``NAME=``) is a syntax error; ``[UNAVAILABLE]`` is how to say "none".
- Values are checked after decoding; control characters are refused in every
  attribute, because the values end up in logs and ``Received:`` headers.
- XFORWARD ``PROTO`` accepts any protocol token, not only SMTP and ESMTP: Postfix
  forwards whatever protocol the original client used, and refusing it would make the
  upstream defer the mail over a field that is only logged.

Whether the peer is allowed to send these commands is policy, decided elsewhere.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from .replies import Reply
from .xtext import XtextError, xtext_decode

__all__ = [
    "XCLIENT_ATTRIBUTES",
    "XFORWARD_ATTRIBUTES",
    "XclientError",
    "parse_xclient",
    "parse_xforward",
]

XCLIENT_ATTRIBUTES = frozenset(
    {"NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"}
)
XFORWARD_ATTRIBUTES = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"})

_UNAVAILABLE = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
_MAX_VALUE = 255  # the longest domain name; nothing legitimate here is longer
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_TOKEN = re.compile(r"[\x21-\x7e]+")
_PROTOCOL_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class XclientError(ValueError):
    """An XCLIENT or XFORWARD argument was refused; ``reply`` is the answer to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _BadValue(ValueError):
    pass


def parse_xclient(argument: str) -> dict[str, str | None]:
    """Parse the argument of ``XCLIENT``; raises :class:`XclientError` (501 5.5.4)."""
    return _parse("XCLIENT", argument, _XCLIENT_CHECKS)


def parse_xforward(argument: str) -> dict[str, str | None]:
    """Parse the argument of ``XFORWARD``; raises :class:`XclientError` (501 5.5.4)."""
    return _parse("XFORWARD", argument, _XFORWARD_CHECKS)


def _parse(
    command: str, argument: str, checks: dict[str, Callable[[str], str]]
) -> dict[str, str | None]:
    # Only SP separates pairs; a tab or other whitespace is left for xtext to refuse.
    pairs = [pair for pair in argument.split(" ") if pair]
    if not pairs:
        raise _error(f"Syntax: {command} attribute=value ...")
    result: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name or not raw:
            raise _error(f"Bad {command} syntax, attribute=value expected: {_shown(pair)}")
        name = name.upper()
        check = checks.get(name)
        if check is None:
            raise _error(f"Bad {command} attribute name: {_shown(name)}")
        try:
            value = xtext_decode(raw)
        except XtextError:
            raise _error(f"Bad {command} {name} value, not xtext: {_shown(raw)}") from None
        if value.upper() in _UNAVAILABLE:
            result[name] = None
            continue
        try:
            if len(value) > _MAX_VALUE or _CONTROL.search(value):
                raise _BadValue
            result[name] = check(value)
        except _BadValue:
            raise _error(f"Bad {command} {name} value: {_shown(raw)}") from None
    return result


def _error(text: str) -> XclientError:
    return XclientError(Reply(501, "5.5.4", (text,)))


def _shown(text: str) -> str:
    """Echo client input safely: printable ASCII only, and not too much of it."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[:64])
    return shown + "..." if len(text) > 64 else shown


# --- Value checks: each returns the normalised value or raises _BadValue.


def _address(value: str) -> str:
    try:
        if value[:5].upper() == "IPV6:":
            if "%" in value:  # a scope ID means nothing to the receiving host
                raise _BadValue
            return str(ipaddress.IPv6Address(value[5:]))
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise _BadValue from None


def _port(value: str) -> str:
    if not (value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535):
        raise _BadValue
    return str(int(value))


def _hostname(value: str) -> str:
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _BadValue
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return value
    raise _BadValue  # an address in a name field is a classic spoofing trick


def _token(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise _BadValue
    return value


def _text(value: str) -> str:
    # Already free of control characters; a SASL login name may well contain spaces.
    return value


def _smtp_proto(value: str) -> str:
    if value.upper() not in ("SMTP", "ESMTP"):
        raise _BadValue
    return value.upper()


def _any_proto(value: str) -> str:
    if not _PROTOCOL_TOKEN.fullmatch(value):
        raise _BadValue
    return value.upper()


def _source(value: str) -> str:
    if value.upper() not in ("LOCAL", "REMOTE"):
        raise _BadValue
    return value.upper()


_XCLIENT_CHECKS: dict[str, Callable[[str], str]] = {
    "NAME": _hostname,
    "ADDR": _address,
    "PORT": _port,
    "PROTO": _smtp_proto,
    "HELO": _token,
    "LOGIN": _text,
    "DESTADDR": _address,
    "DESTPORT": _port,
}
_XFORWARD_CHECKS: dict[str, Callable[[str], str]] = {
    # Upstream names need not resolve or be well formed; they are only logged.
    "NAME": _token,
    "ADDR": _address,
    "PORT": _port,
    "PROTO": _any_proto,
    "HELO": _token,
    "IDENT": _token,
    "SOURCE": _source,
}
