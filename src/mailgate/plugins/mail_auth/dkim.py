"""DKIM (RFC 6376): verification of every signature of a message with dkimpy, key
lookups through the caller's :data:`~mailgate.plugins.mail_auth.domains.Lookup`; the
validation of an ARC chain (RFC 8617) the same way; and the message's header fields as
dkimpy parses them."""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim as dkimpy  # type: ignore[import-untyped]

from mailgate.dns import DNSTempError

from .domains import Lookup
from .header import resinfo_text

#: DKIM signatures verified per message; more are ignored (each costs a DNS lookup).
MAX_SIGNATURES = 5


@dataclass(frozen=True, slots=True)
class DKIMResult:
    """One DKIM signature: ``result`` is pass, fail, neutral, policy, temperror or
    permerror (RFC 8601 2.7.1); ``domain``/``selector`` from d= and s=; ``b`` the first
    characters of b= (RFC 6008, to tell signatures apart)."""

    result: str
    domain: str = ""
    selector: str = ""
    b: str = ""
    comment: str = ""

    def resinfo(self) -> str:
        props = [("header.d", self.domain), ("header.s", self.selector), ("header.b", self.b)]
        return resinfo_text("dkim", self.result, self.comment, props)


class _DKIMTempError(Exception):
    """Raised through dkimpy (which does not catch it) for a temporary DNS error."""


def _dkim_dnsfunc(lookup: Lookup) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            answers = lookup(text.rstrip("."), "TXT")
        except DNSTempError as exc:
            raise _DKIMTempError(str(exc)) from None
        if not answers:
            return None
        # RFC 6376 3.6.2.2: several records are not expected; prefer one with a key.
        keys = [a for a in answers if "p=" in a]
        return (keys or answers)[0].encode("utf-8")

    return dnsfunc


def _dkim_logger() -> logging.Logger:
    # dkimpy logs key problems at ERROR; they are results here, not errors of ours.
    return logging.getLogger("mailgate.policy.mail_auth.dkimpy")


def verify_dkim(lookup: Lookup, message: bytes) -> list[DKIMResult]:
    """Verify every DKIM-Signature of ``message`` (up to MAX_SIGNATURES; blocking)."""
    try:
        verifier = dkimpy.DKIM(message, logger=_dkim_logger(), minkey=1024)
    except dkimpy.DKIMException as exc:
        return [DKIMResult("permerror", comment=f"unparseable message: {exc}")]
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    dnsfunc = _dkim_dnsfunc(lookup)
    return [_verify_one(verifier, index, dnsfunc) for index in range(min(count, MAX_SIGNATURES))]


def _verify_one(verifier: Any, index: int, dnsfunc: Callable[..., bytes | None]) -> DKIMResult:
    raw = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
    domain, selector, b = signature_ids(raw)
    try:
        prep = verifier.verify_headerprep(index)
    except Exception as exc:  # MessageFormatError, ValidationError, odd values
        return DKIMResult("neutral", domain, selector, b, f"bad signature: {exc}")
    if not prep:
        return DKIMResult("neutral", domain, selector, b, "bad signature")
    sig, include_headers, sig_headers = prep
    name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
    try:
        key = dkimpy.load_pk_from_dns(name, dnsfunc, timeout=5)
    except _DKIMTempError as exc:
        return DKIMResult("temperror", domain, selector, b, f"key lookup: {exc}")
    except dkimpy.KeyFormatError as exc:
        text = str(exc)
        problem = "no key for signature" if "missing public key" in text else f"bad key: {text}"
        return DKIMResult("permerror", domain, selector, b, problem)
    except (dkimpy.DKIMException, binascii.Error, ValueError) as exc:
        return DKIMResult("neutral", domain, selector, b, f"unusable key: {exc}")
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = key
    try:
        good = verifier.verify_sig_process(sig, include_headers, sig_headers[index], dnsfunc)
    except dkimpy.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return DKIMResult("fail", domain, selector, b, "body hash mismatch")
        return DKIMResult("neutral", domain, selector, b, str(exc))
    except dkimpy.KeyFormatError as exc:
        return DKIMResult("permerror", domain, selector, b, str(exc))
    except Exception as exc:  # dkimpy raises assorted errors for odd input
        return DKIMResult("neutral", domain, selector, b, f"cannot verify: {exc}")
    if good:
        return DKIMResult("pass", domain, selector, b)
    return DKIMResult("fail", domain, selector, b, "signature does not verify")


@dataclass(frozen=True, slots=True)
class ARCResult:
    """The chain validation of the ARC sets a message arrived with (RFC 8617 5.2):
    ``pass`` or ``fail``, the ``arc`` method of Authentication-Results. Sealing the
    message again (``[arc_seal]``) carries it on as the new set's ``cv=``."""

    result: str
    comment: str = ""

    def resinfo(self) -> str:
        return resinfo_text("arc", self.result, self.comment, ())


def verify_arc(lookup: Lookup, message: bytes) -> ARCResult | None:
    """Validate the ARC chain of ``message`` (blocking); None when a key lookup failed
    for now: no result then, rather than a ``fail`` that every later hop would carry
    on (RFC 8617 has no temporary error)."""
    try:
        cv, _sets, reason = dkimpy.arc_verify(
            message, logger=_dkim_logger(), dnsfunc=_dkim_dnsfunc(lookup), minkey=1024
        )
    except _DKIMTempError as exc:
        _dkim_logger().info("ARC chain not validated: key lookup: %s", exc)
        return None
    except Exception as exc:  # dkimpy raises assorted errors for odd input
        return ARCResult("fail", f"cannot validate: {exc}")
    result = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    if result == "pass":
        return ARCResult("pass")
    return ARCResult("fail", str(reason or "").strip()[:200])


def signature_ids(raw: bytes) -> tuple[str, str, str]:
    """d=, s= and the start of b= from a DKIM-Signature value, leniently."""
    tags: dict[str, str] = {}
    for part in raw.decode("utf-8", "replace").split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), "".join(value.split()))
    return tags.get("d", "").lower(), tags.get("s", ""), tags.get("b", "")[:8]


def header_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a message (its header section only is parsed)."""
    end = re.search(rb"\r?\n\r?\n", data)
    head = data[: end.end()] if end else data + b"\r\n"
    try:
        headers, _body = dkimpy.rfc822_parse(head)
    except dkimpy.DKIMException:
        return []
    return [(bytes(n), bytes(v)) for n, v in headers]


__all__ = [
    "MAX_SIGNATURES",
    "ARCResult",
    "DKIMResult",
    "header_fields",
    "signature_ids",
    "verify_arc",
    "verify_dkim",
]
