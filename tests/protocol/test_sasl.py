"""SASL mechanisms of the sans-IO core: decoding client lines and extracting credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocol import replies
from mailgate.protocol.events import AuthCredentials
from mailgate.protocol.sasl import (
    MECHANISMS,
    Challenge,
    CramMD5,
    Login,
    Mechanism,
    Plain,
    SaslError,
    XOAuth2,
    cram_md5_matches,
    decode_response,
    encode_challenge,
    xoauth2_error_challenge,
)

HOST = "mx.example"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def exchange(name: str, initial: bytes | None, *responses: bytes) -> list[object]:
    """Drive a mechanism the way the connection does: every client line goes through
    decode_response, every challenge through encode_challenge. Returns what the server
    would send (encoded challenges) followed by the final credentials."""
    mech = MECHANISMS[name](HOST)
    out: list[object] = []
    first = None if initial is None else decode_response(initial, allow_empty_marker=True)
    result = mech.start(first)
    lines = iter(responses)
    while isinstance(result, Challenge):
        out.append(encode_challenge(result.data))
        result = mech.step(decode_response(next(lines), allow_empty_marker=False))
    out.append(result)
    assert next(lines, None) is None, "exchange ended before all responses were used"
    return out


def assert_malformed(exc: pytest.ExceptionInfo[SaslError]) -> None:
    assert exc.value.reply.code == 501
    assert exc.value.reply.status == "5.5.2"


# --- decode_response / encode_challenge ------------------------------------------------


def test_decode_plain_base64() -> None:
    assert decode_response(b64(b"hello\x00world"), allow_empty_marker=False) == b"hello\x00world"


def test_decode_empty_line_is_empty_response() -> None:
    assert decode_response(b"", allow_empty_marker=False) == b""


def test_equals_means_empty_only_on_auth_line() -> None:
    assert decode_response(b"=", allow_empty_marker=True) == b""
    with pytest.raises(SaslError) as exc:
        decode_response(b"=", allow_empty_marker=False)
    assert exc.value.reply is replies.AUTH_BAD_BASE64


@pytest.mark.parametrize("allow", [True, False])
def test_star_cancels(allow: bool) -> None:
    with pytest.raises(SaslError) as exc:
        decode_response(b"*", allow_empty_marker=allow)
    assert exc.value.reply is replies.AUTH_CANCELLED
    assert (exc.value.reply.code, exc.value.reply.status) == (501, "5.7.0")


@pytest.mark.parametrize(
    "line",
    [
        b"YWJjZA",  # padding missing
        b"YWJjZA=",  # padding short
        b"YWJjZA===",  # padding too long
        b"YWJj=",  # padding where none belongs
        b"Y",  # impossible length
        b"YW=Jj",  # padding in the middle
        b"YWJjZA==YWJj",  # data after padding
        b"YW Jj",  # space inside
        b"YWJj\t",  # tab
        b"YWJj\r",  # stray CR left by the line splitter
        b"YWJj\n",
        b" YWJj",
        b"YWJj-_==",  # URL-safe alphabet
        b"YWJj\xff",  # not ASCII
        b"QR==",  # non-zero trailing bits: 'A' spelled non-canonically
        b"**",
        b"=",  # only allowed on the AUTH line
        b"==",
    ],
)
def test_bad_base64_is_refused(line: bytes) -> None:
    with pytest.raises(SaslError) as exc:
        decode_response(line, allow_empty_marker=False)
    assert exc.value.reply is replies.AUTH_BAD_BASE64
    assert (exc.value.reply.code, exc.value.reply.status) == (501, "5.5.2")


def test_encode_challenge() -> None:
    assert encode_challenge(b"") == b""
    assert encode_challenge(b"Username:") == b"VXNlcm5hbWU6"
    long = bytes(range(256)) * 2  # long enough that encodebytes would wrap lines
    encoded = encode_challenge(long)
    assert b"\n" not in encoded
    assert decode_response(encoded, allow_empty_marker=False) == long


def test_sasl_error_is_value_error_with_reply() -> None:
    err = SaslError(replies.AUTH_CANCELLED)
    assert isinstance(err, ValueError)
    assert err.reply is replies.AUTH_CANCELLED
    assert "5.7.0" in str(err)


@given(st.binary(), st.booleans())
def test_decode_never_raises_anything_but_sasl_error(line: bytes, allow: bool) -> None:
    try:
        result = decode_response(line, allow_empty_marker=allow)
    except SaslError:
        return
    assert isinstance(result, bytes)


@given(st.binary())
def test_encode_decode_round_trip(data: bytes) -> None:
    assert decode_response(encode_challenge(data), allow_empty_marker=False) == data


# --- registry -----------------------------------------------------------------------


def test_registry() -> None:
    assert set(MECHANISMS) == {"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "DIGEST-MD5"}
    for key, cls in MECHANISMS.items():
        assert cls.name == key == key.upper()
        assert issubclass(cls, Mechanism)
    assert MECHANISMS["PLAIN"].requires_tls
    assert MECHANISMS["LOGIN"].requires_tls
    assert MECHANISMS["XOAUTH2"].requires_tls
    assert not MECHANISMS["CRAM-MD5"].requires_tls
    # DIGEST-MD5 never succeeds (no rspauth without the password): capture only.
    assert [n for n, c in MECHANISMS.items() if c.capture_only] == ["DIGEST-MD5"]


# --- PLAIN ----------------------------------------------------------------------------


def test_plain_initial_response_without_authzid() -> None:
    [creds] = exchange("PLAIN", b64(b"\x00alice\x00s3cret"))
    assert creds == AuthCredentials("PLAIN", None, "alice", password="s3cret")


def test_plain_initial_response_with_authzid() -> None:
    [creds] = exchange("PLAIN", b64(b"admin\x00alice\x00s3cret"))
    assert creds == AuthCredentials("PLAIN", "admin", "alice", password="s3cret")


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    challenge, creds = exchange("PLAIN", None, b64(b"\x00alice\x00s3cret"))
    assert challenge == b""  # the connection writes "334 " and nothing after it
    assert creds == AuthCredentials("PLAIN", None, "alice", password="s3cret")


def test_plain_utf8() -> None:
    message = "zoë\x00jürgen@exämple.de\x00pässwörd ✓".encode()
    [creds] = exchange("PLAIN", b64(message))
    assert creds == AuthCredentials("PLAIN", "zoë", "jürgen@exämple.de", password="pässwörd ✓")


def test_plain_password_may_contain_spaces_and_be_empty() -> None:
    [creds] = exchange("PLAIN", b64(b"\x00alice\x00 a b "))
    assert isinstance(creds, AuthCredentials) and creds.password == " a b "
    # An empty password is not a syntax error; the checker refuses it with 535.
    [creds] = exchange("PLAIN", b64(b"\x00alice\x00"))
    assert isinstance(creds, AuthCredentials) and creds.password == ""


@pytest.mark.parametrize(
    "message",
    [
        b"",  # "=" on the AUTH line
        b"alice",
        b"alice\x00s3cret",  # one NUL
        b"\x00alice\x00s3cret\x00",  # three NULs
        b"a\x00b\x00c\x00d",
        b"\x00\x00s3cret",  # empty authcid
        b"admin\x00\x00s3cret",
        b"\x00al\xffice\x00s3cret",  # invalid UTF-8 in authcid
        b"\x00alice\x00s3\xc3cret",  # truncated UTF-8 sequence in passwd
        b"\xed\xa0\x80\x00alice\x00pw",  # encoded surrogate in authzid
    ],
)
def test_plain_malformed(message: bytes) -> None:
    with pytest.raises(SaslError) as exc:
        Plain(HOST).start(message)
    assert_malformed(exc)
    mech = Plain(HOST)
    assert mech.start(None) == Challenge(b"")
    with pytest.raises(SaslError) as exc:
        mech.step(message)
    assert_malformed(exc)


def test_plain_equals_marker_on_auth_line_is_malformed() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("PLAIN", b"=")
    assert_malformed(exc)


def test_plain_cancel_and_bad_base64_in_continuation() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("PLAIN", None, b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED
    with pytest.raises(SaslError) as exc:
        exchange("PLAIN", None, b"AGFsaWNlAHMzY3JldA")  # padding stripped
    assert exc.value.reply is replies.AUTH_BAD_BASE64
    with pytest.raises(SaslError) as exc:
        exchange("PLAIN", b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED


@given(
    st.text().filter(lambda s: "\x00" not in s),
    st.text(min_size=1).filter(lambda s: "\x00" not in s),
    st.text().filter(lambda s: "\x00" not in s),
)
def test_plain_round_trip(authzid: str, authcid: str, passwd: str) -> None:
    message = f"{authzid}\x00{authcid}\x00{passwd}".encode()
    creds = Plain(HOST).start(message)
    assert creds == AuthCredentials("PLAIN", authzid or None, authcid, password=passwd)


# --- LOGIN ----------------------------------------------------------------------------


def test_login_two_challenges() -> None:
    out = exchange("LOGIN", None, b64(b"alice"), b64(b"s3cret"))
    assert out == [
        b64(b"Username:"),
        b64(b"Password:"),
        AuthCredentials("LOGIN", None, "alice", password="s3cret"),
    ]


def test_login_initial_response_is_username() -> None:
    out = exchange("LOGIN", b64(b"alice"), b64(b"s3cret"))
    assert out == [b64(b"Password:"), AuthCredentials("LOGIN", None, "alice", password="s3cret")]


def test_login_utf8_and_empty_password() -> None:
    out = exchange("LOGIN", None, b64("jürgen".encode()), b64("пароль".encode()))
    assert out[-1] == AuthCredentials("LOGIN", None, "jürgen", password="пароль")
    out = exchange("LOGIN", b64(b"alice"), b"")
    assert out[-1] == AuthCredentials("LOGIN", None, "alice", password="")


def test_login_empty_username_is_malformed() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("LOGIN", b"=")
    assert_malformed(exc)
    with pytest.raises(SaslError) as exc:
        exchange("LOGIN", None, b"")
    assert_malformed(exc)


def test_login_invalid_utf8() -> None:
    with pytest.raises(SaslError) as exc:
        Login(HOST).start(b"al\xffice")
    assert_malformed(exc)
    mech = Login(HOST)
    mech.start(b"alice")
    with pytest.raises(SaslError) as exc:
        mech.step(b"\x80")
    assert_malformed(exc)


def test_login_cancel_at_each_step() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("LOGIN", None, b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED
    with pytest.raises(SaslError) as exc:
        exchange("LOGIN", None, b64(b"alice"), b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED


# --- CRAM-MD5 -------------------------------------------------------------------------


def cram_digest(challenge: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()


def test_cram_md5_challenge_format_and_uniqueness() -> None:
    first = CramMD5(HOST).start(None)
    second = CramMD5(HOST).start(None)
    assert isinstance(first, Challenge) and isinstance(second, Challenge)
    assert re.fullmatch(rb"<\d+\.\d+@mx\.example>", first.data)
    assert first.data != second.data


def test_cram_md5_end_to_end() -> None:
    mech = CramMD5(HOST)
    challenge = mech.start(None)
    assert isinstance(challenge, Challenge)
    # Client side as RFC 2195 describes it: base64 of "user SP hex-digest".
    response = b64(b"alice " + cram_digest(challenge.data, "tanstaaf").encode())
    creds = mech.step(decode_response(response, allow_empty_marker=False))
    assert isinstance(creds, AuthCredentials)
    assert (creds.mechanism, creds.authzid, creds.username) == ("CRAM-MD5", None, "alice")
    assert creds.challenge == challenge.data
    assert creds.password is None and creds.token is None
    assert creds.verify_cram_md5("tanstaaf")
    assert not creds.verify_cram_md5("tanstaafl")


def test_cram_md5_rfc2195_example() -> None:
    # The exchange printed in RFC 2195 section 2, wire lines as given there.
    challenge = decode_response(
        b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+", allow_empty_marker=False
    )
    assert challenge == b"<1896.697170952@postoffice.reston.mci.net>"
    mech = CramMD5(HOST)
    mech.start(None)
    creds = mech.step(
        decode_response(
            b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw", allow_empty_marker=False
        )
    )
    assert isinstance(creds, AuthCredentials)
    assert (creds.username, creds.digest) == ("tim", "b913a602c7eda7a495b4e6e7334d3890")
    secret = "tanstaaftanstaaf"
    assert cram_md5_matches(challenge, "b913a602c7eda7a495b4e6e7334d3890", secret)
    assert cram_md5_matches(challenge, "B913A602C7EDA7A495B4E6E7334D3890", secret)
    assert not cram_md5_matches(challenge, "b913a602c7eda7a495b4e6e7334d3891", secret)
    assert not cram_md5_matches(challenge, "b913a602c7eda7a495b4e6e7334d3890", "other")
    assert not cram_md5_matches(challenge, "b913a602", secret)
    assert not cram_md5_matches(challenge, "\u00df" * 32, secret)
    # KELVIN SIGN lowers to ASCII "k"; non-ASCII input must not reach compare_digest.
    assert not cram_md5_matches(challenge, "\u212a" * 32, secret)


def test_cram_md5_utf8_user_secret_and_upper_case_digest() -> None:
    mech = CramMD5(HOST)
    challenge = mech.start(None)
    assert isinstance(challenge, Challenge)
    digest = cram_digest(challenge.data, "gëheim").upper()
    creds = mech.step(f"jür gen {digest}".encode())
    assert isinstance(creds, AuthCredentials)
    assert creds.username == "jür gen"  # the digest is after the last space
    assert creds.digest == digest.lower()
    assert creds.verify_cram_md5("gëheim")


@pytest.mark.parametrize("initial", [b"", b"alice 0123456789abcdef0123456789abcdef"])
def test_cram_md5_refuses_initial_response(initial: bytes) -> None:
    with pytest.raises(SaslError) as exc:
        CramMD5(HOST).start(initial)
    assert exc.value.reply.code == 501


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"alice",
        b"0123456789abcdef0123456789abcdef",  # no user
        b" 0123456789abcdef0123456789abcdef",  # empty user
        b"alice 0123456789abcdef0123456789abcde",  # 31 digits
        b"alice 0123456789abcdef0123456789abcdef0",  # 33 digits
        b"alice 0123456789abcdef0123456789abcdeg",  # not hex
        b"alice 0123456789abcdef0123456789abcdef ",  # trailing space
        b"al\xffice 0123456789abcdef0123456789abcdef",  # invalid UTF-8
        "alice \uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19abcdef0123456789abcdef".encode(),  # full-width digits
    ],
)
def test_cram_md5_malformed(response: bytes) -> None:
    mech = CramMD5(HOST)
    mech.start(None)
    with pytest.raises(SaslError) as exc:
        mech.step(response)
    assert_malformed(exc)


def test_cram_md5_cancel() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("CRAM-MD5", None, b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED


def test_cram_md5_step_before_start_is_a_caller_bug() -> None:
    with pytest.raises(RuntimeError):
        CramMD5(HOST).step(b"alice 0123456789abcdef0123456789abcdef")


def test_verify_cram_md5_without_challenge_is_false() -> None:
    assert not AuthCredentials("PLAIN", None, "alice", password="x").verify_cram_md5("x")


# --- XOAUTH2 --------------------------------------------------------------------------


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def test_xoauth2_initial_response() -> None:
    [creds] = exchange("XOAUTH2", b64(xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2")))
    assert creds == AuthCredentials(
        "XOAUTH2", None, "someuser@example.com", token="ya29.vF9dft4qmTc2"
    )


def test_xoauth2_without_initial_response() -> None:
    challenge, creds = exchange("XOAUTH2", None, b64(xoauth2("bob", "tok")))
    assert challenge == b""
    assert creds == AuthCredentials("XOAUTH2", None, "bob", token="tok")


def test_xoauth2_lenient_details() -> None:
    # Scheme names are case-insensitive; unknown keys are tolerated; '=' in values kept.
    message = b"host=mx\x01user=a=b@example.com\x01auth=bearer t0k3n==\x01\x01"
    creds = XOAuth2(HOST).start(message)
    assert creds == AuthCredentials("XOAUTH2", None, "a=b@example.com", token="t0k3n==")


def test_xoauth2_utf8_user() -> None:
    creds = XOAuth2(HOST).start(xoauth2("jürgen@exämple.de", "abc"))
    assert isinstance(creds, AuthCredentials) and creds.username == "jürgen@exämple.de"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"user=bob\x01auth=Bearer tok",  # no terminator
        b"user=bob\x01auth=Bearer tok\x01",  # half a terminator
        b"auth=Bearer tok\x01\x01",  # no user
        b"user=bob\x01\x01",  # no auth
        b"user=\x01auth=Bearer tok\x01\x01",  # empty user
        b"user=bob\x01auth=Basic tok\x01\x01",  # wrong scheme
        b"user=bob\x01auth=Bearer \x01\x01",  # empty token
        b"user=bob\x01auth=Bearer\x01\x01",  # no token at all
        b"user=bob\x01user=eve\x01auth=Bearer tok\x01\x01",  # duplicate key
        b"user=bob\x01junk\x01auth=Bearer tok\x01\x01",  # item without '='
        b"user=bob\x01\x01auth=Bearer tok\x01\x01",  # empty item
        b"user=b\xffob\x01auth=Bearer tok\x01\x01",  # invalid UTF-8
    ],
)
def test_xoauth2_malformed(message: bytes) -> None:
    with pytest.raises(SaslError) as exc:
        XOAuth2(HOST).start(message)
    assert_malformed(exc)


def test_xoauth2_cancel() -> None:
    with pytest.raises(SaslError) as exc:
        exchange("XOAUTH2", None, b"*")
    assert exc.value.reply is replies.AUTH_CANCELLED


def test_xoauth2_error_challenge() -> None:
    document = xoauth2_error_challenge()
    assert document == b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
    custom = xoauth2_error_challenge("400", "bearer mac", "https://mail.example/")
    assert json.loads(custom) == {
        "status": "400",
        "schemes": "bearer mac",
        "scope": "https://mail.example/",
    }
    # It travels in a 334 line, so it must survive the challenge encoding.
    assert decode_response(encode_challenge(document), allow_empty_marker=False) == document


# --- robustness -----------------------------------------------------------------------


@given(st.sampled_from(sorted(MECHANISMS)), st.binary(), st.lists(st.binary(), max_size=3))
def test_mechanisms_raise_only_sasl_error(name: str, first: bytes, rest: list[bytes]) -> None:
    """Whatever bytes arrive, as initial response or as continuation lines, the only
    exception is SaslError (which the connection turns into a reply)."""
    for initial in (first, None):
        mech = MECHANISMS[name](HOST)
        lines = iter([first, *rest] if initial is None else rest)
        try:
            result = mech.start(initial)
            for line in lines:
                if not isinstance(result, Challenge):
                    break
                result = mech.step(line)
        except SaslError:
            continue
        assert isinstance(result, Challenge | AuthCredentials)
