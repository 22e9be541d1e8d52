"""SASL mechanisms for AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5, XOAUTH2 and DIGEST-MD5
(capture only: see :class:`DigestMD5`).

Each mechanism only turns the client's lines into :class:`AuthCredentials`; whether
they are any good is the caller's decision. The connection owns the wire side: it
decodes every client line with :func:`decode_response`, feeds the bytes to
:meth:`Mechanism.start` / :meth:`Mechanism.step`, sends each :class:`Challenge` as
``334 <base64>`` (see :func:`encode_challenge`) and turns :class:`SaslError` into its
reply.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import ClassVar

# cram_md5_matches lives with the credentials it checks (events imports nothing of sasl).
from .events import AuthCredentials, cram_md5_matches
from .replies import AUTH_BAD_BASE64, AUTH_CANCELLED, Reply

__all__ = [
    "MECHANISMS",
    "Challenge",
    "CramMD5",
    "DigestMD5",
    "Login",
    "Mechanism",
    "Plain",
    "SaslError",
    "XOAuth2",
    "cram_md5_matches",
    "decode_response",
    "encode_challenge",
    "xoauth2_error_challenge",
]


class SaslError(ValueError):
    """The exchange is over and failed; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Challenge:
    """A server challenge, raw; the connection base64-encodes it into ``334 ...``."""

    data: bytes


def decode_response(line: bytes, *, allow_empty_marker: bool) -> bytes:
    """Decode one client SASL line (without CRLF).

    ``*`` cancels the exchange. ``=`` stands for an empty initial response, but only on
    the AUTH line itself (``allow_empty_marker``); an empty continuation line is simply
    the base64 of nothing. Anything that is not canonical base64 is refused: the round
    trip check also catches stray padding and non-zero trailing bits, which no real
    client produces and which would let two spellings stand for one secret.
    """
    if line == b"*":
        raise SaslError(AUTH_CANCELLED)
    if allow_empty_marker and line == b"=":
        return b""
    try:
        decoded = base64.b64decode(line, validate=True)
    except binascii.Error:
        raise SaslError(AUTH_BAD_BASE64) from None
    if base64.b64encode(decoded) != line:
        raise SaslError(AUTH_BAD_BASE64)
    return decoded


def encode_challenge(data: bytes) -> bytes:
    """Base64 for a ``334`` line; an empty challenge stays empty (RFC 4954 4)."""
    return base64.b64encode(data)


def xoauth2_error_challenge(
    status: str = "401", schemes: str = "bearer", scope: str = "https://mail.google.com/"
) -> bytes:
    """The JSON error document sent (base64-encoded, in a 334) after a refused token.

    The client answers it with an empty line and then gets the final 535. Compact
    separators, as in Google's documentation, which is what clients were written against.
    """
    document = {"status": status, "schemes": schemes, "scope": scope}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _malformed(mechanism: str) -> SaslError:
    return SaslError(Reply(501, "5.5.2", (f"Malformed {mechanism} response",)))


def _text(data: bytes, mechanism: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(mechanism) from None


class Mechanism(abc.ABC):
    """One SASL exchange on the server side. A fresh instance serves one AUTH command:
    ``start`` once, then ``step`` for every client line until one of them returns
    :class:`AuthCredentials` or raises :class:`SaslError`."""

    name: ClassVar[str]
    #: The mechanism shows the secret (or a bearer token) to anyone on the path.
    requires_tls: ClassVar[bool]
    #: The exchange can never end in success here: the credentials are handed to the
    #: policy (a honeypot records them) and the answer is always a refusal.
    capture_only: ClassVar[bool] = False

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    @abc.abstractmethod
    def start(self, initial: bytes | None) -> Challenge | AuthCredentials:
        """``initial``: the decoded initial response from the AUTH line (``None`` if
        absent, ``b""`` if ``=`` was sent)."""

    @abc.abstractmethod
    def step(self, response: bytes) -> Challenge | AuthCredentials:
        """``response``: one decoded client line."""


class _OneMessage(Mechanism):
    """A mechanism whose credentials come in one client message: the initial response,
    or the line after an empty challenge (PLAIN, XOAUTH2)."""

    def start(self, initial: bytes | None) -> Challenge | AuthCredentials:
        if initial is None:
            return Challenge(b"")
        return self._parse(initial)

    def step(self, response: bytes) -> Challenge | AuthCredentials:
        return self._parse(response)

    @abc.abstractmethod
    def _parse(self, message: bytes) -> AuthCredentials:
        """The credentials in ``message``, or SaslError."""


class Plain(_OneMessage):
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one message."""

    name: ClassVar[str] = "PLAIN"
    requires_tls: ClassVar[bool] = True

    def _parse(self, message: bytes) -> AuthCredentials:
        parts = _text(message, self.name).split("\x00")
        if len(parts) != 3:
            raise _malformed(self.name)
        authzid, authcid, passwd = parts
        if not authcid:
            raise _malformed(self.name)
        # An empty password is left for the checker to refuse with a 535, like a wrong one.
        return AuthCredentials(
            mechanism=self.name, authzid=authzid or None, username=authcid, password=passwd
        )


class Login(Mechanism):
    """The non-standard LOGIN mechanism: username and password in two round trips.

    An initial response on the AUTH line is the username (some clients send it there).
    """

    name: ClassVar[str] = "LOGIN"
    requires_tls: ClassVar[bool] = True

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._username: str | None = None

    def start(self, initial: bytes | None) -> Challenge | AuthCredentials:
        if initial is None:
            return Challenge(b"Username:")
        return self._take_username(initial)

    def step(self, response: bytes) -> Challenge | AuthCredentials:
        if self._username is None:
            return self._take_username(response)
        return AuthCredentials(
            mechanism=self.name,
            authzid=None,
            username=self._username,
            password=_text(response, self.name),
        )

    def _take_username(self, data: bytes) -> Challenge:
        username = _text(data, self.name)
        if not username:
            raise _malformed(self.name)
        self._username = username
        return Challenge(b"Password:")


class CramMD5(Mechanism):
    """RFC 2195. The server speaks first, so an initial response is a protocol error
    (RFC 4954 4). The credentials carry the challenge and digest; the checker calls
    :meth:`AuthCredentials.verify_cram_md5` with the stored clear-text secret."""

    name: ClassVar[str] = "CRAM-MD5"
    requires_tls: ClassVar[bool] = False

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._challenge: bytes | None = None

    def start(self, initial: bytes | None) -> Challenge | AuthCredentials:
        if initial is not None:
            raise SaslError(Reply(501, "5.5.2", ("CRAM-MD5 does not take an initial response",)))
        # The random part keeps challenges unique even within one clock tick, so a digest
        # recorded from one session is useless in the next.
        nonce = f"{secrets.randbelow(10**18):018d}.{int(time.time())}"
        self._challenge = f"<{nonce}@{self.hostname}>".encode()
        return Challenge(self._challenge)

    def step(self, response: bytes) -> Challenge | AuthCredentials:
        if self._challenge is None:
            # Credentials over a challenge that was never sent would be meaningless.
            raise RuntimeError("CRAM-MD5 step() called before start()")
        username, sep, digest = _text(response, self.name).rpartition(" ")
        if not sep or not username or not _is_hex_digest(digest):
            raise _malformed(self.name)
        return AuthCredentials(
            mechanism=self.name,
            authzid=None,
            username=username,
            challenge=self._challenge,
            digest=digest.lower(),
        )


# RFC 2831 2.1.2: a comma-separated list of key=value, values a token or a quoted string.
_DIGEST_PAIR = re.compile(r'\s*([A-Za-z0-9-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,"\s]*)\s*(?:,|$)')


def _digest_fields(text: str) -> dict[str, str] | None:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _DIGEST_PAIR.match(text, pos)
        if match is None or match.end() == pos:
            return None
        key, value = match.group(1).lower(), match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key in fields:
            return None  # RFC 2831: each directive at most once
        fields[key] = value
        pos = match.end()
    return fields


class DigestMD5(Mechanism):
    """RFC 2831, as far as a server that cannot check it goes: the challenge is sent,
    the client's digest-response is parsed and handed on as credentials (user name,
    realm, the response digest), and the exchange always ends in a refusal
    (``capture_only``). Success would need ``rspauth``, a digest of the real password,
    which mailgate never holds in clear for this; Sendmail's persona offers the
    mechanism because Sendmail does, and a honeypot keeps what the client sent."""

    name: ClassVar[str] = "DIGEST-MD5"
    requires_tls: ClassVar[bool] = False
    capture_only: ClassVar[bool] = True

    def __init__(self, hostname: str) -> None:
        super().__init__(hostname)
        self._nonce: str | None = None

    def start(self, initial: bytes | None) -> Challenge | AuthCredentials:
        if initial is not None:
            # The server speaks first (RFC 2831 2.1); RFC 4954 4: a protocol error.
            raise SaslError(Reply(501, "5.5.2", ("DIGEST-MD5 does not take an initial response",)))
        self._nonce = base64.b64encode(secrets.token_bytes(24)).decode("ascii")
        challenge = (
            f'realm="{self.hostname}",nonce="{self._nonce}",qop="auth",'
            "charset=utf-8,algorithm=md5-sess"
        )
        return Challenge(challenge.encode("ascii"))

    def step(self, response: bytes) -> Challenge | AuthCredentials:
        if self._nonce is None:
            raise RuntimeError("DIGEST-MD5 step() called before start()")
        text = _text(response, self.name)
        fields = _digest_fields(text)
        if (
            fields is None
            or not fields.get("username")
            or fields.get("nonce") != self._nonce
            or not fields.get("cnonce")
            or not _is_hex_digest(fields.get("response", ""))
        ):
            raise _malformed(self.name)
        return AuthCredentials(
            mechanism=self.name,
            authzid=fields.get("authzid") or None,
            username=fields["username"],
            # The whole digest-response: with the challenge's nonce in it, it is what an
            # offline password guess is checked against.
            token=text,
            digest=fields["response"].lower(),
        )


def _is_hex_digest(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value)


class XOAuth2(_OneMessage):
    """Google's XOAUTH2: ``user={user}^Aauth=Bearer {token}^A^A``.

    After a refused token the connection sends :func:`xoauth2_error_challenge` and waits
    for the client's empty line before the 535; that dance is not part of this class.
    """

    name: ClassVar[str] = "XOAUTH2"
    requires_tls: ClassVar[bool] = True

    def _parse(self, message: bytes) -> AuthCredentials:
        text = _text(message, self.name)
        if not text.endswith("\x01\x01"):
            raise _malformed(self.name)
        fields: dict[str, str] = {}
        for item in text[:-2].split("\x01"):
            key, sep, value = item.partition("=")
            if not sep or key in fields:
                raise _malformed(self.name)
            fields[key] = value
        user = fields.get("user", "")
        scheme, _, token = fields.get("auth", "").partition(" ")
        # Auth schemes are case-insensitive (RFC 7235 2.1).
        if not user or scheme.lower() != "bearer" or not token:
            raise _malformed(self.name)
        return AuthCredentials(mechanism=self.name, authzid=None, username=user, token=token)


MECHANISMS: dict[str, type[Mechanism]] = {
    mechanism.name: mechanism for mechanism in (Plain, Login, CramMD5, XOAuth2, DigestMD5)
}
