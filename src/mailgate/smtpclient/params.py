"""The ESMTP parameters of MAIL and RCPT a client passes on, as far as the server
understands them (RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 3030 BINARYMIME, RFC 6531
SMTPUTF8, RFC 3461 DSN, RFC 8689 REQUIRETLS). Values come in decoded, as mailgate's
parser keeps them."""

from __future__ import annotations

import aiosmtplib

from mailgate.protocol.xtext import xtext_encode

__all__ = ["mail_params", "rcpt_params"]


def mail_params(
    smtp: aiosmtplib.SMTP,
    *,
    size: int,
    body: str | None,
    smtputf8: bool,
    ret: str | None,
    envid: str | None,
    requiretls: bool = False,
) -> list[bytes]:
    """The MAIL parameters worth passing on that the server (after EHLO) understands.
    ``body``: ``BINARYMIME`` is always passed (only BDAT can send it; the caller has
    checked CHUNKING), ``8BITMIME`` where offered, anything else not at all.
    ``smtputf8``: the caller has decided to send SMTPUTF8. ``requiretls``: likewise
    REQUIRETLS (the caller has checked that the server offers it, over TLS)."""
    params: list[bytes] = []
    if smtp.supports_extension("size"):
        params.append(b"SIZE=%d" % size)
    if body == "BINARYMIME" or (body == "8BITMIME" and smtp.supports_extension("8bitmime")):
        params.append(b"BODY=" + body.encode())
    if smtputf8:
        params.append(b"SMTPUTF8")
    if requiretls:
        params.append(b"REQUIRETLS")
    if smtp.supports_extension("dsn"):
        if ret:
            params.append(b"RET=" + ret.encode("ascii", "replace"))
        if envid:
            params.append(b"ENVID=" + _xtext(envid))
    return params


def rcpt_params(smtp: aiosmtplib.SMTP, *, notify: str | None, orcpt: str | None) -> list[bytes]:
    """The DSN parameters of one RCPT where the server offers DSN: ``notify`` like
    ``"SUCCESS,FAILURE"``, ``orcpt`` like ``"rfc822;bob@example.org"`` (decoded)."""
    if not smtp.supports_extension("dsn"):
        return []
    params: list[bytes] = []
    if notify:
        params.append(b"NOTIFY=" + notify.encode("ascii", "replace"))
    if orcpt:
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


def _xtext(value: str) -> bytes:
    # xtext is ASCII by construction: '+', '=' and anything outside '!'..'~' become +XX.
    return xtext_encode(value).encode("ascii")
