"""A report goes over SMTP as it is: sent from <> to a real mailgate server, the copy the
server accepted is still a DSN that flufl.bounce and the stdlib read the same way."""

from __future__ import annotations

import email
import email.policy
import smtplib

import flufl.bounce

from mailgate.queue.dsn import (
    Action,
    Diagnostic,
    MessageFacts,
    RecipientResult,
    build_dsn,
    needs_8bitmime,
)
from mailgate.testing import running_server

ORIGINAL = (
    b"From: Ann <ann@example.com>\r\nTo: bob@x.test\r\nSubject: hi\r\n"
    b"Message-ID: <orig-7@example.com>\r\n\r\n.a line that starts with a dot\r\nbye\r\n"
)


def test_report_sent_from_the_null_sender_arrives_intact() -> None:
    results = [
        RecipientResult(
            "bob@x.test",
            Action.FAILED,
            "5.1.1",
            orcpt="rfc822;bob@x.test",
            remote_mta="mx.x.test",
            diagnostic=Diagnostic(550, "5.1.1", "no such user " + "z" * 300),
        ),
        RecipientResult("carol@y.test", Action.DELAYED, "4.4.1", will_retry_until=2e9),
    ]
    report = build_dsn(MessageFacts("ann@example.com", "mx.test"), results, ORIGINAL)
    assert not needs_8bitmime(report)
    with running_server(no_received_header=True) as srv:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as client:
            assert client.sendmail("<>", ["ann@example.com"], report) == {}
        [received] = srv.messages.wait(1)
    assert received.sender == ""
    assert received.content == report  # dot-stuffing undone, nothing rewritten
    message = email.message_from_bytes(received.content)
    assert flufl.bounce.all_failures(message) == (
        frozenset({b"carol@y.test"}),
        frozenset({b"bob@x.test"}),
    )
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-replied"
    returned = parsed.get_payload()[2].get_payload()[0]
    assert returned["Message-ID"] == "<orig-7@example.com>"
    assert ".a line that starts with a dot" in returned.get_content()
