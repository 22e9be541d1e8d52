"""What Sendmail's EHLO advertises, answered the way Sendmail answers it, sans-IO: EXPN,
VERB and DELIVERBY listed only by a persona that names them, SIZE without a number
(behaviour ``size_without_number``), AUTH DIGEST-MD5 taken and always refused (the
credentials reach the policy for capture), and ``unknown_parameter`` with ``{keyword}``."""

from __future__ import annotations

import base64
import dataclasses
import re

from mailgate.protocol import AuthCredentials, Persona, ProtocolConfig, Reply
from mailgate.protocol.behaviour import Behaviour
from mailgate.protocol.persona import OPT_IN_KEYWORDS

from .session import Session

BASE = ProtocolConfig(
    hostname="mx.test",
    starttls=True,
    auth_mechanisms=("DIGEST-MD5", "PLAIN"),
    max_message_size=1000,
    auth_requires_tls=False,
)
SENDMAIL_LIKE = Persona(
    capability_order=("PIPELINING", "EXPN", "VERB", "8BITMIME", "SIZE", "AUTH", "DELIVERBY"),
    hidden_capabilities=("SMTPUTF8",),
    behaviour=Behaviour(size_without_number=True),
    replies={"unknown_parameter": "{keyword} parameter unrecognized"},
)
SENDMAIL = dataclasses.replace(BASE, persona=SENDMAIL_LIKE)


def ehlo_lines(config: ProtocolConfig) -> list[str]:
    s = Session.start(config)
    s.feed(b"EHLO c.test\r\n")
    return [line[4:] for line in s.take_output().decode().splitlines()[1:]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_sendmail_keywords_are_offered_only_when_listed() -> None:
    assert {"VERB", "DELIVERBY"} <= OPT_IN_KEYWORDS
    plain = ehlo_lines(BASE)
    assert "SIZE 1000" in plain
    assert not {"EXPN", "VERB", "DELIVERBY"} & set(plain)
    listed = ehlo_lines(SENDMAIL)
    assert listed[:7] == [
        "PIPELINING",
        "EXPN",
        "VERB",
        "8BITMIME",
        "SIZE",
        "AUTH DIGEST-MD5 PLAIN",
        "DELIVERBY",
    ]


def test_size_without_number_still_enforces_the_limit() -> None:
    s = Session.start(SENDMAIL)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> SIZE=5000") == 552


def test_verb_is_unknown_unless_offered_and_acknowledged_when_it_is() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.send(b"VERB\r\n") == [(500, "5.5.2 Command not recognized")]
    s = Session.start(SENDMAIL)
    assert s.send(b"VERB\r\n") == [(250, "2.0.0 Verbose mode")]  # before HELO too
    s.cmd("EHLO c.test")
    s.cmd("MAIL FROM:<a@b.test>")
    assert s.cmd("VERB x") == 250  # the argument is ignored, the transaction goes on
    assert s.cmd("RCPT TO:<x@y.test>") == 250


def test_deliverby_parameter() -> None:
    s = Session.start(BASE)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> BY=60;R") == 555  # DELIVERBY not offered
    s = Session.start(SENDMAIL)
    s.cmd("EHLO c.test")
    assert s.cmd("MAIL FROM:<a@b.test> BY=soon") == 501
    assert s.cmd("MAIL FROM:<a@b.test> BY=0;R") == 555  # R needs a positive time
    assert s.cmd("MAIL FROM:<a@b.test> BY=-30;NT") == 250
    s.cmd("RSET")
    assert s.cmd("MAIL FROM:<a@b.test> BY=120;r") == 250


def test_unknown_parameter_names_the_keyword() -> None:
    s = Session.start(SENDMAIL)
    s.cmd("EHLO c.test")
    assert s.send(b"MAIL FROM:<a@b.test> FOO=BAR\r\n") == [
        (555, "5.5.4 FOO parameter unrecognized")
    ]
    assert s.send(b"MAIL FROM:<a@b.test> SMTPUTF8\r\n") == [
        (555, "5.5.4 SMTPUTF8 parameter unrecognized")
    ]
    # A bad value of a known parameter is not "unrecognized".
    assert s.send(b"MAIL FROM:<a@b.test> BODY=9BIT\r\n")[0][1] != (
        "5.5.4 BODY parameter unrecognized"
    )


def digest_response(challenge: str, **fields: str) -> str:
    nonce = re.search(r'nonce="([^"]+)"', challenge)
    assert nonce is not None
    values = {
        "username": '"alice"',
        "realm": '"mx.test"',
        "nonce": f'"{nonce.group(1)}"',
        "cnonce": '"OA6MHXh6VqTrRk"',
        "nc": "00000001",
        "qop": "auth",
        "digest-uri": '"smtp/mx.test"',
        "response": "d388dad90d4bbd760a152321f2143af7",
        **fields,
    }
    return ",".join(f"{key}={value}" for key, value in values.items())


def test_digest_md5_is_captured_and_always_refused() -> None:
    seen: list[AuthCredentials] = []

    def accept_everything(point: object) -> Reply | None:
        if isinstance(point, AuthCredentials):
            seen.append(point)
        return None  # the policy says yes; DIGEST-MD5 still cannot succeed

    s = Session.start(SENDMAIL, answer=accept_everything)
    s.cmd("EHLO c.test")
    ((code, text),) = s.send(b"AUTH DIGEST-MD5\r\n")
    assert code == 334
    challenge = base64.b64decode(text).decode()
    assert 'realm="mx.test"' in challenge and 'qop="auth"' in challenge
    assert s.cmd(b64(digest_response(challenge).encode())) == 535
    assert s.conn.authenticated_as is None
    (creds,) = seen
    assert creds.mechanism == "DIGEST-MD5" and creds.username == "alice"
    assert creds.digest == "d388dad90d4bbd760a152321f2143af7"
    assert creds.token is not None and "cnonce=" in creds.token


def test_digest_md5_errors() -> None:
    s = Session.start(SENDMAIL)
    s.cmd("EHLO c.test")
    assert s.cmd("AUTH DIGEST-MD5 " + b64(b"x")) == 501  # the server speaks first
    ((_, text),) = s.send(b"AUTH DIGEST-MD5\r\n")
    challenge = base64.b64decode(text).decode()
    # A response to another challenge (replayed nonce) is malformed, not checked.
    replayed = digest_response(challenge, nonce='"not-this-one"')
    assert s.cmd(b64(replayed.encode())) == 501
    s.send(b"AUTH DIGEST-MD5\r\n")
    assert s.cmd("*") == 501  # cancelled
