"""RFC 5321 4.1.2 paths and RFC 6531 internationalized addresses."""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from .replies import SMTPUTF8_REQUIRED, Reply


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox from a reverse- or forward-path.

    ``local_part`` is kept exactly as sent (a quoted local part keeps its quotes), so
    ``str(address)`` round-trips to the wire form without the angle brackets. ``domain``
    is a domain name or an address literal such as ``[192.0.2.1]`` or ``[IPv6:::1]``; it is
    ``""`` only for the bare ``<Postmaster>`` recipient RFC 5321 4.5.1 allows.
    """

    local_part: str
    domain: str

    # Made twice per message: an __init__ mypyc compiles (see the note in events.py).
    def __init__(self, local_part: str, domain: str) -> None:
        object.__setattr__(self, "local_part", local_part)
        object.__setattr__(self, "domain", domain)

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_utf8(self) -> bool:
        # The parts, not str(self): no string is made for a check done at every command.
        return not (self.local_part.isascii() and self.domain.isascii())


class AddressError(ValueError):
    """A path the server refuses; ``reply`` is what to answer the MAIL or RCPT with;
    ``kind`` what was wrong, for a persona that words each kind apart: "unterminated"
    (no closing ``>``), "local_part", "domain", "unqualified" (no ``@domain``),
    "too_long", "null" (``<>`` as a recipient), or "" (anything else)."""

    reply: Reply
    kind: str

    def __init__(self, reply: Reply, message: str = "", kind: str = "") -> None:
        super().__init__(message or reply.text)
        self.reply = reply
        self.kind = kind


# Controls have no place in an address and would corrupt logs and headers downstream.
# Lone surrogates are not UTF-8 at all; U+2028/U+2029 are line breaks to str.splitlines().
_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

_MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3, octets including "<", ">" and separators
_MAX_LOCAL: Final = 64  # RFC 5321 4.5.3.1.1
_MAX_DOMAIN: Final = 255  # RFC 5321 4.5.3.1.2
_MAX_LABEL: Final = 63  # RFC 1035 2.3.4

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# RFC 6531 3.3 adds UTF8-non-ascii to atext; controls were refused before this is used.
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_SNUM4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_GENERAL_LITERAL = re.compile(r"([A-Za-z0-9-]*[A-Za-z0-9]):([\x21-\x5a\x5e-\x7e]+)")
_IPV6_HEX = re.compile(r"[0-9A-Fa-f]{1,4}")
# What IDNA2008 builds its valid code points from (RFC 5892 2.1, LetterDigits).
_U_LABEL_CATEGORIES = frozenset({"Ll", "Lu", "Lo", "Lm", "Mn", "Mc", "Nd"})


@dataclass(frozen=True, slots=True)
class _Role:
    name: str  # "sender" / "recipient", for reply texts
    status: str  # RFC 3463: 5.1.7 bad sender syntax, 5.1.3 bad destination syntax


_SENDER = _Role("sender", "5.1.7")
_RECIPIENT = _Role("recipient", "5.1.3")


class _Syntax(Exception):
    """Internal: which rule a path broke; turned into an AddressError for its role."""


#: The parser's details by AddressError.kind.
_KINDS = {
    "invalid local part": "local_part",
    "invalid quoted local part": "local_part",
    "unterminated quoted local part": "local_part",
    "missing @domain": "unqualified",
    "local part too long": "too_long",
    "path too long": "too_long",
    "domain too long": "too_long",
    "missing domain": "domain",
    "invalid domain": "domain",
    "invalid address literal": "domain",
    "invalid IPv6 address literal": "domain",
    "invalid IPv4 address literal": "domain",
}


def _refuse(role: _Role, detail: str, path: str) -> AddressError:
    return AddressError(
        Reply(501, role.status, (f"Bad {role.name} address syntax: {detail}",)),
        f"{detail}: {path!r}",
        _KINDS.get(detail, ""),
    )


def split_path_and_params(argument: str) -> tuple[str, str]:
    """Split what follows ``MAIL FROM:`` or ``RCPT TO:`` into the path, angle brackets
    included, and the parameter text (stripped).

    Spaces before the path are tolerated (``MAIL FROM: <a@b>`` is common). The path ends at
    the first ``>`` outside a quoted local part and outside an address literal, so
    ``<"a>b"@c>`` is one path.
    """
    text = argument.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError(
            Reply(501, "5.5.2", ("Syntax error: address must be enclosed in <>",)),
            f"no <path> in {argument!r}",
        )
    end = closing_bracket(text)
    if end < 0:
        raise AddressError(
            Reply(501, "5.5.2", ("Syntax error: unterminated <address>",)),
            f"no closing '>' in {argument!r}",
            "unterminated",
        )
    path, rest = text[: end + 1], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError(
            Reply(501, "5.5.2", ("Syntax error: expected a space after the address",)),
            f"text glued to the path in {argument!r}",
        )
    return path, rest.strip(" ")


#: The path nearly every client writes: ``<dot-atom@host.name>`` after optional spaces, ASCII,
#: no quoted local part, source route or address literal. Labels are 1-63 LDH characters.
#: Whatever this takes, the full parser (split_path_and_params, then parse_reverse_path or
#: parse_forward_path) takes too, as the same Address; only the lengths are left to check.
#: Possessive repeats and a label written as 1-63 LDH characters neither starting (look-ahead)
#: nor ending (look-behind) with a hyphen: the same language as the textbook
#: ``(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]...`` (kept in the tests as
#: the reference), without its backtracking (a label matched twice, the last one thrice),
#: about half the cost of a MAIL or RCPT path. Nothing needs giving back: the local part
#: is followed by "@", not atext or ".", and each label by "." or ">".
_PLAIN_PATH: Final = re.compile(
    rf" *(<([{_ATEXT}]++(?:\.[{_ATEXT}]++)*+)@"
    r"((?!-)[A-Za-z0-9-]{1,63}+(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}+(?<!-))*+)>)"
)


def parse_plain_path(
    argument: str, long_local_parts: bool, start: int = 0
) -> tuple[Address, str, str] | None:
    """The fast way through what follows ``MAIL FROM:`` or ``RCPT TO:`` for a path of the
    common shape (``_PLAIN_PATH``): ``(address, path, parameter text)``, as
    :func:`split_path_and_params` and the path parsers give them. None for anything else
    (including every path they refuse): the caller then takes the full way, which gives
    the same answer for every path this accepts and the right refusal for the rest.
    ``start``: where in ``argument`` that text begins (the command's argument is read in
    place, after its ``FROM:`` or ``TO:``)."""
    match = _PLAIN_PATH.match(argument, start)
    if match is None:
        return None
    end = match.end()
    path, local, domain = match.groups()
    if (
        len(path) > _MAX_PATH
        or len(local) > (_MAX_PATH if long_local_parts else _MAX_LOCAL)
        or len(domain) > _MAX_DOMAIN
    ):
        return None  # too long: the full way says which limit
    if end == len(argument):
        return Address(local, domain), path, ""  # no parameters: the common MAIL and RCPT
    if argument[end] != " ":
        return None  # text glued to the path: the full way refuses it
    return Address(local, domain), path, argument[end:].strip(" ")


def closing_bracket(text: str) -> int:
    """Index of the ``>`` that closes the path starting at ``text[0]``, or -1 (``>``
    inside a quoted local part or an address literal does not close it)."""
    if '"' not in text and "[" not in text:
        return text.find(">", 1)  # nothing to step over: the first ">" closes it
    quoted = literal = escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif quoted:
            if c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif literal:
            if c == "]":
                literal = False
        elif c == '"':
            quoted = True
        elif c == "[":
            literal = True
        elif c == ">":
            return i
    return -1


def parse_reverse_path(
    path: str, *, smtputf8: bool, long_local_parts: bool = False
) -> Address | None:
    """Parse the path of MAIL FROM (brackets included). ``<>`` is the null reverse-path
    and gives ``None``; anything else must be a mailbox. ``long_local_parts``: a local
    part may be longer than RFC 5321's 64 octets (the path still fits its 256)."""
    _screen(path, _SENDER, smtputf8)
    if path == "<>":
        return None
    return _parse_path(path, _SENDER, smtputf8, long_local_parts)


def parse_forward_path(path: str, *, smtputf8: bool, long_local_parts: bool = False) -> Address:
    """Parse the path of RCPT TO (brackets included). ``<>`` is refused; the bare
    ``<Postmaster>`` of RFC 5321 4.5.1 (any case) gives an Address with an empty domain.
    ``long_local_parts`` as for :func:`parse_reverse_path`."""
    _screen(path, _RECIPIENT, smtputf8)
    if path == "<>":
        raise AddressError(
            Reply(501, _RECIPIENT.status, ("Null recipient address not allowed",)),
            "'<>' as a forward-path",
            "null",
        )
    if path.isascii() and path.lower() == "<postmaster>":
        return Address(path[1:-1], "")
    return _parse_path(path, _RECIPIENT, smtputf8, long_local_parts)


def _screen(path: str, role: _Role, smtputf8: bool) -> None:
    """Refusals that do not depend on the grammar: characters and overall length."""
    if _FORBIDDEN.search(path):
        raise _refuse(role, "control characters not allowed", path)
    if not path.isascii() and not smtputf8:
        raise AddressError(SMTPUTF8_REQUIRED, f"non-ASCII path without SMTPUTF8: {path!r}")
    if len(path.encode("utf-8")) > _MAX_PATH:
        raise _refuse(role, "path too long", path)


def _parse_path(path: str, role: _Role, smtputf8: bool, long_local_parts: bool) -> Address:
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise _refuse(role, "address must be enclosed in <>", path)
    try:
        return _parse_mailbox(path[1:-1], smtputf8, _MAX_PATH if long_local_parts else _MAX_LOCAL)
    except _Syntax as exc:
        raise _refuse(role, str(exc), path) from None


def _parse_mailbox(inner: str, smtputf8: bool, max_local: int = _MAX_LOCAL) -> Address:
    pos = _skip_source_route(inner) if inner.startswith("@") else 0
    if inner.startswith('"', pos):
        at = _end_of_quoted_string(inner, pos, smtputf8)
        local = inner[pos:at]
    else:
        at = inner.find("@", pos)
        if at < 0:
            raise _Syntax("missing @domain")
        local = inner[pos:at]
        pattern = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING_ASCII
        if not pattern.fullmatch(local):
            raise _Syntax("invalid local part")
    if at >= len(inner) or inner[at] != "@":
        raise _Syntax("missing @domain")
    if len(local.encode("utf-8")) > max_local:
        raise _Syntax("local part too long")
    domain = inner[at + 1 :]
    _check_domain_or_literal(domain, smtputf8)
    return Address(local, domain)


def _skip_source_route(inner: str) -> int:
    """Validate ``@dom1,@dom2:`` and return the index just after the ``:``.

    RFC 5321 4.1.2 and appendix C: servers accept source routes and ignore them. RFC 821
    allowed address literals as route elements, so they are accepted here too.
    """
    pos = 0
    while True:
        if not inner.startswith("@", pos):
            raise _Syntax("invalid source route")
        start = pos + 1
        if inner.startswith("[", start):
            close = inner.find("]", start)
            end = close + 1 if close >= 0 else -1
        else:
            ends = [i for i in (inner.find(",", start), inner.find(":", start)) if i >= 0]
            end = min(ends) if ends else -1
        if end < 0 or end >= len(inner) or inner[end] not in ",:":
            raise _Syntax("invalid source route")
        try:
            _check_domain_or_literal(inner[start:end], smtputf8=False)
        except _Syntax:
            raise _Syntax("invalid source route") from None
        if inner[end] == ":":
            return end + 1
        pos = end + 1


def _end_of_quoted_string(inner: str, start: int, smtputf8: bool) -> int:
    """Index just after the closing quote of the Quoted-string at ``inner[start]``."""
    i = start + 1
    while i < len(inner):
        c = inner[i]
        if c == '"':
            return i + 1
        if c == "\\":
            # quoted-pairSMTP is ASCII only (RFC 6531 extends qtextSMTP, not quoted-pair).
            if i + 1 >= len(inner) or not " " <= inner[i + 1] <= "~":
                raise _Syntax("invalid quoted local part")
            i += 2
            continue
        if not (" " <= c <= "~" or (smtputf8 and c > "\x7f")):
            raise _Syntax("invalid quoted local part")
        i += 1
    raise _Syntax("unterminated quoted local part")


def _check_domain_or_literal(domain: str, smtputf8: bool) -> None:
    if domain.startswith("["):
        _check_address_literal(domain)
    else:
        _check_domain(domain, smtputf8)


def _check_domain(domain: str, smtputf8: bool) -> None:
    if not domain:
        raise _Syntax("missing domain")
    dns_length = len(domain)
    for label in domain.split("."):
        if label.isascii():
            if len(label) > _MAX_LABEL or not _LDH_LABEL.fullmatch(label):
                raise _Syntax("invalid domain")
        else:
            if not smtputf8 or not _is_u_label(label):
                raise _Syntax("invalid domain")
            # The DNS sees the A-label, so measure that instead of the UTF-8 form.
            dns_length += _a_label_length(label) - len(label)
    if dns_length > _MAX_DOMAIN:
        raise _Syntax("domain too long")


def _is_u_label(label: str) -> bool:
    """A principled approximation of an IDNA2008 U-label (RFC 5890/5891/5892).

    The stdlib ``idna`` codec implements IDNA2003 and refuses valid modern labels, so it is
    not used. Instead: only letters, marks and digits (the LetterDigits categories of
    RFC 5892 2.1) plus ASCII LDH; no hyphen at either end; no leading combining mark
    (RFC 5891 4.2.3.2); and an A-label that fits in 63 octets.
    """
    if label[0] == "-" or label[-1] == "-":
        return False
    if unicodedata.category(label[0]) in ("Mn", "Mc", "Me"):
        return False
    for c in label:
        if c.isascii():
            if not (c == "-" or "a" <= c.lower() <= "z" or "0" <= c <= "9"):
                return False
        elif unicodedata.category(c) not in _U_LABEL_CATEGORIES:
            return False
    return _a_label_length(label) <= _MAX_LABEL


def _a_label_length(label: str) -> int:
    return len("xn--") + len(label.lower().encode("punycode"))


def _check_address_literal(literal: str) -> None:
    if len(literal) < 3 or literal[-1] != "]" or not literal.isascii():
        raise _Syntax("invalid address literal")
    content = literal[1:-1]
    if content[:5].lower() == "ipv6:":
        if not _is_ipv6(content[5:]):
            raise _Syntax("invalid IPv6 address literal")
        return
    if ":" in content:
        # General-address-literal: Standardized-tag ":" 1*dcontent (RFC 5321 4.1.3).
        if not _GENERAL_LITERAL.fullmatch(content):
            raise _Syntax("invalid address literal")
        return
    m = _SNUM4.fullmatch(content)
    # Parsed by hand: RFC 5321 Snum allows leading zeros, which ipaddress refuses.
    if m is None or any(int(part) > 255 for part in m.groups()):
        raise _Syntax("invalid IPv4 address literal")


def _is_ipv6(text: str) -> bool:
    # ipaddress also accepts "%scope" suffixes, which RFC 5321 IPv6-addr does not.
    if "%" in text:
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    if "::" in text:
        # RFC 5321 4.1.3: at most 6 groups besides "::" (an IPv4 tail counts as two).
        groups = [g for g in text.split(":") if g]
        count = sum(1 if _IPV6_HEX.fullmatch(g) else 2 for g in groups)
        return count <= 6
    return True
