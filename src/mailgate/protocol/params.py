"""ESMTP parameters of MAIL and RCPT (RFC 5321 4.1.2 ``esmtp-param``).

Each known parameter has a :class:`ParamSpec`: the verb it belongs to, the EHLO keywords
that make it available, whether it takes a value, and a validator that returns the value
normalized (keywords upper-cased, xtext decoded). Token syntax errors answer 501; anything
the grammar allows but this server cannot honour answers 555 (RFC 5321 4.1.1.11), except a
declared size over the limit, which is 552 (RFC 1870).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .replies import MESSAGE_TOO_BIG, SIZE_SYNTAX, Reply
from .xtext import XtextError, xtext_decode

Verb = Literal["MAIL", "RCPT"]


@dataclass(frozen=True, slots=True)
class ParamContext:
    verb: Verb
    #: EHLO keywords currently advertised, upper case.
    extensions: frozenset[str]
    #: Largest message accepted, in octets; ``None`` or 0 means unlimited.
    max_size: int | None
    #: The transaction's MAIL carried SMTPUTF8 (RFC 6531): UTF-8 allowed in RCPT values.
    smtputf8: bool = False
    #: EHLO keywords this server offers only once the session is encrypted, and not yet
    #: now (REQUIRETLS before STARTTLS): their parameters are refused with 530.
    after_tls: frozenset[str] = frozenset()

    # Made twice per message: an __init__ mypyc compiles (see the note in events.py).
    def __init__(
        self,
        verb: Verb,
        extensions: frozenset[str],
        max_size: int | None,
        smtputf8: bool = False,
        after_tls: frozenset[str] = frozenset(),
    ) -> None:
        object.__setattr__(self, "verb", verb)
        object.__setattr__(self, "extensions", extensions)
        object.__setattr__(self, "max_size", max_size)
        object.__setattr__(self, "smtputf8", smtputf8)
        object.__setattr__(self, "after_tls", after_tls)


class ParamError(ValueError):
    """A parameter the server refuses; ``reply`` is what to answer the command with."""

    reply: Reply

    def __init__(self, reply: Reply, message: str = "") -> None:
        super().__init__(message or reply.text)
        self.reply = reply
        #: The parameter at fault as sent (``FOO=BAR``), for a persona's {parameter}.
        self.parameter: str | None = None
        #: Its keyword alone (``FOO``), for a persona's {keyword}.
        self.keyword: str | None = None
        #: The keyword is unknown, or its extension is not offered (not a bad value).
        self.unknown = False
        #: Of those: a keyword mailgate knows whose extension this session did not offer.
        self.not_offered = False


Validator = Callable[[str, ParamContext, bool], str]
"""``(value, context, utf8_allowed) -> normalized value``; raises ParamError."""


@dataclass(frozen=True, slots=True)
class ParamSpec:
    verb: Verb
    #: The parameter is available when any one of these EHLO keywords is advertised.
    extensions: frozenset[str]
    #: True: ``KEY=VALUE`` is required; False: a bare ``KEY`` is required.
    has_value: bool
    validate: Validator | None = None
    #: Only over TLS: before it, 530 5.7.10 instead of "not supported" (RFC 8689 2:
    #: REQUIRETLS is offered only in an encrypted session).
    tls_only: bool = False


# Same set address.py refuses: controls, lone surrogates, Unicode line separators.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_SIZE = re.compile(r"[0-9]{1,20}")
# RFC 822 atom, the addr-type of ORCPT (RFC 3461 4.2): "rfc822", "utf-8", "x400", ...
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_ASCII_RUNS = re.compile(r"[\x00-\x7f]+|[^\x00-\x7f]+")
_EMBEDDED_UNICODE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")

_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2
_MAX_SHOWN = 32  # keywords echoed in reply texts are cut to this length


def _syntax(text: str) -> ParamError:
    return ParamError(Reply(501, "5.5.4", (text,)))


def _invalid(text: str) -> ParamError:
    return ParamError(Reply(555, "5.5.4", (text,)))


def _unknown(text: str) -> ParamError:
    error = _invalid(text)
    error.unknown = True
    return error


def _shown(key: str) -> str:
    return key if len(key) <= _MAX_SHOWN else key[:_MAX_SHOWN] + "..."


def split_params(text: str) -> list[tuple[str, str | None]]:
    """The syntax half of :func:`parse_params`: ``[("KEY", "value"), ("KEY2", None)]``.

    Only token syntax is checked here (501 errors), so a caller can refuse a malformed
    command before looking at the session state, and judge the parameters (555) after.
    Keywords are upper-cased; runs of spaces between parameters are tolerated.
    """
    return [_split_token(token) for token in text.split(" ") if token]


def parse_params(
    text: str | Sequence[tuple[str, str | None]], ctx: ParamContext
) -> dict[str, str | None]:
    """Parse ``KEY=VALUE KEY2 ...`` into ``{"KEY": "value", "KEY2": None}``.

    ``text`` may also be the pairs :func:`split_params` returned. Keywords are upper-cased;
    values keep their case unless the parameter defines a normalization. Empty text gives
    ``{}``. Raises ParamError.
    """
    pairs = split_params(text) if isinstance(text, str) else text
    # MAIL's own SMTPUTF8 switches UTF-8 on for the values next to it (RFC 6531 3.4).
    utf8 = ctx.smtputf8 or (
        ctx.verb == "MAIL"
        and "SMTPUTF8" in ctx.extensions
        and any(key == "SMTPUTF8" for key, _ in pairs)
    )
    result: dict[str, str | None] = {}
    for key, value in pairs:
        try:
            result[key] = _check_param(key, value, ctx, utf8, seen=result)
        except ParamError as exc:
            exc.parameter = key if value is None else f"{key}={value}"
            exc.keyword = key
            raise
    return result


def _split_token(token: str) -> tuple[str, str | None]:
    if _FORBIDDEN.search(token):
        raise _syntax("Control characters not allowed in parameters")
    key, sep, value = token.partition("=")
    if not key:
        raise _syntax("Missing parameter keyword")
    if not _KEYWORD.fullmatch(key):
        raise _syntax("Malformed parameter keyword")
    if sep and not value:
        raise _syntax(f"Empty value for parameter {_shown(key.upper())}")
    if "=" in value:
        raise _syntax(f"Malformed value for parameter {_shown(key.upper())}")
    return key.upper(), (value if sep else None)


def _check_param(
    key: str, value: str | None, ctx: ParamContext, utf8: bool, seen: Mapping[str, object]
) -> str | None:
    spec = PARAMETERS.get(key)
    name = _shown(key)
    if spec is None:
        raise _unknown(f"Unknown parameter {name}")
    if spec.verb != ctx.verb:
        raise _unknown(f"Parameter {name} is not valid for {ctx.verb}")
    if not spec.extensions & ctx.extensions:
        if spec.tls_only and spec.extensions & ctx.after_tls:
            raise ParamError(
                Reply(530, "5.7.10", (f"Parameter {name} requires a TLS-protected session",))
            )
        error = _unknown(f"Parameter {name} is not supported")
        error.not_offered = True
        raise error
    if key in seen:
        raise _invalid(f"Duplicate parameter {name}")
    if value is None:
        if spec.has_value:
            raise _invalid(f"Parameter {name} requires a value")
        return None
    if not spec.has_value:
        raise _invalid(f"Parameter {name} takes no value")
    if not utf8 and not value.isascii():
        raise _invalid(f"Non-ASCII value for {name} requires SMTPUTF8")
    return spec.validate(value, ctx, utf8) if spec.validate else value


# --- value helpers ---------------------------------------------------------------------


def _upper_ascii(value: str) -> str:
    # str.upper() maps some non-ASCII letters to ASCII (dotless i -> "I"); never match those.
    return value.upper() if value.isascii() else ""


def _decode_xtext(value: str, key: str) -> str:
    """xtext (RFC 3461 4) to text. ``+HH`` escapes are octets, so the octets are decoded
    as UTF-8 together; raw UTF-8 (allowed under SMTPUTF8, RFC 6531 3.3) passes through."""
    octets = bytearray()
    try:
        for run in _ASCII_RUNS.findall(value):
            if run.isascii():
                octets += xtext_decode(run).encode("utf-8")
            else:
                octets += run.encode("utf-8")
        decoded = octets.decode("utf-8")
    except (XtextError, UnicodeError):
        raise _invalid(f"Invalid {key} value") from None
    return _clean(decoded, key)


def _decode_utf8_addr(value: str, key: str) -> str:
    """utf-8-addr-xtext / utf-8-addr-unitext (RFC 6533 3): ``\\x{HEX}`` escapes, raw UTF-8."""
    if any(c in "+\\" for c in _EMBEDDED_UNICODE.sub("", value)):
        raise _invalid(f"Invalid {key} value")

    def codepoint(m: re.Match[str]) -> str:
        n = int(m.group(1), 16)
        if n > 0x10FFFF or 0xD800 <= n <= 0xDFFF:
            raise _invalid(f"Invalid {key} value")
        return chr(n)

    return _clean(_EMBEDDED_UNICODE.sub(codepoint, value), key)


def _clean(decoded: str, key: str) -> str:
    # Decoded values end up in DSNs, Received headers and logs: no controls there.
    if not decoded or _FORBIDDEN.search(decoded):
        raise _invalid(f"Invalid {key} value")
    return decoded


# --- validators ------------------------------------------------------------------------


def _size(value: str, ctx: ParamContext, utf8: bool) -> str:
    if not _SIZE.fullmatch(value):
        raise ParamError(SIZE_SYNTAX)
    size = int(value)
    if ctx.max_size and size > ctx.max_size:
        raise ParamError(MESSAGE_TOO_BIG, f"declared SIZE {size} > {ctx.max_size}")
    return str(size)


def _body(value: str, ctx: ParamContext, utf8: bool) -> str:
    body = _upper_ascii(value)
    if body not in ("7BIT", "8BITMIME", "BINARYMIME"):
        raise _invalid("Invalid BODY value")
    if body != "7BIT" and body not in ctx.extensions:
        raise _invalid(f"BODY={body} is not supported")
    return body


def _auth(value: str, ctx: ParamContext, utf8: bool) -> str:
    # RFC 4954 5: "<>" means the submitter is not known or not trusted; it must be accepted.
    identity = _decode_xtext(value, "AUTH")
    if identity == "<>":
        return identity
    local, at, domain = identity.rpartition("@")
    if not (at and local and domain):
        raise _invalid("Invalid AUTH value")
    return identity


def _ret(value: str, ctx: ParamContext, utf8: bool) -> str:
    ret = _upper_ascii(value)
    if ret not in ("FULL", "HDRS"):
        raise _invalid("Invalid RET value")
    return ret


def _envid(value: str, ctx: ParamContext, utf8: bool) -> str:
    envid = _decode_xtext(value, "ENVID")
    if len(envid) > _MAX_ENVID:
        raise _invalid("ENVID value too long")
    return envid


def _notify(value: str, ctx: ParamContext, utf8: bool) -> str:
    items = _upper_ascii(value).split(",")
    if items == ["NEVER"]:
        return "NEVER"
    if len(set(items)) != len(items) or not set(items) <= {"SUCCESS", "FAILURE", "DELAY"}:
        raise _invalid("Invalid NOTIFY value")
    return ",".join(items)


def _orcpt(value: str, ctx: ParamContext, utf8: bool) -> str:
    if len(value) > _MAX_ORCPT:
        raise _invalid("ORCPT value too long")
    addr_type, sep, address = value.partition(";")
    if not (sep and address and _ATOM.fullmatch(addr_type)):
        raise _invalid("Invalid ORCPT value")
    if addr_type.lower() == "utf-8":
        if not utf8:
            raise _invalid("ORCPT address type utf-8 requires SMTPUTF8")
        decoded = _decode_utf8_addr(address, "ORCPT")
    else:
        decoded = _decode_xtext(address, "ORCPT")
    return f"{addr_type};{decoded}"


# RFC 2852 4: by-time ";" by-mode [by-trace]; by-time is [+-] and up to 9 digits.
_BY = re.compile(r"([+-]?[0-9]{1,9});([NnRr])([Tt]?)")


def _by(value: str, ctx: ParamContext, utf8: bool) -> str:
    """DELIVERBY's ``BY=`` (RFC 2852), offered only by a persona that lists DELIVERBY
    (Sendmail). Checked and kept; nothing here delivers, so no deadline is acted on."""
    match = _BY.fullmatch(value)
    if match is None:
        raise _syntax("Syntax error in BY parameter")
    seconds, mode, trace = match.groups()
    if mode.upper() == "R" and int(seconds) <= 0:
        # RFC 2852 4: with R the time must be positive.
        raise _invalid("BY time must be positive for return mode")
    return f"{int(seconds)};{mode.upper()}{trace.upper()}"


def _spec(
    verb: Verb,
    extensions: str,
    has_value: bool,
    validate: Validator | None = None,
    *,
    tls_only: bool = False,
) -> ParamSpec:
    return ParamSpec(verb, frozenset(extensions.split()), has_value, validate, tls_only)


#: Every parameter mailgate understands, by upper-case keyword.
PARAMETERS: Mapping[str, ParamSpec] = MappingProxyType(
    {
        "SIZE": _spec("MAIL", "SIZE", True, _size),  # RFC 1870
        "BODY": _spec("MAIL", "8BITMIME BINARYMIME", True, _body),  # RFC 6152, RFC 3030
        "SMTPUTF8": _spec("MAIL", "SMTPUTF8", False),  # RFC 6531
        "PRDR": _spec("MAIL", "PRDR", False),  # draft-hall-prdr-00
        "BY": _spec("MAIL", "DELIVERBY", True, _by),  # RFC 2852
        "AUTH": _spec("MAIL", "AUTH", True, _auth),  # RFC 4954 5
        "RET": _spec("MAIL", "DSN", True, _ret),  # RFC 3461 4.3
        "ENVID": _spec("MAIL", "DSN", True, _envid),  # RFC 3461 4.4
        "REQUIRETLS": _spec("MAIL", "REQUIRETLS", False, tls_only=True),  # RFC 8689
        "NOTIFY": _spec("RCPT", "DSN", True, _notify),  # RFC 3461 4.1
        "ORCPT": _spec("RCPT", "DSN", True, _orcpt),  # RFC 3461 4.2, RFC 6533
    }
)
