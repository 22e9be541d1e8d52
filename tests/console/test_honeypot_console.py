"""``mailgate honeypot --admin-listen``: the console beside a honeypot, with its figures."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tests.console.http import request
from tests.console.test_metrics import scrape, value
from tests.server.harness import wait_for


def test_honeypot_console_counts_sessions_and_credentials(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailgate",
            "honeypot",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--admin-listen",
            "127.0.0.1:0",
            "--auth-failure-delay",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        def ports() -> tuple[int, int] | None:
            text = "".join(log)
            smtp = re.search(r"listening on 127\.0\.0\.1 port (\d+)", text)
            console = re.search(r"console listening on http://127\.0\.0\.1:(\d+)", text)
            return (int(smtp[1]), int(console[1])) if smtp and console else None

        assert wait_for(lambda: ports() is not None, timeout=30), "".join(log)
        found = ports()
        assert found is not None
        smtp_port, console_port = found
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.ehlo("scanner.example")
            client.user, client.password = "admin", "hunter2"
            # Refused (the default auth_outcome): still a captured credential.
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("LOGIN", client.auth_login)
        assert wait_for(
            lambda: value(scrape(console_port), "mailgate_honeypot_captured_auth_attempts") == 1,
            timeout=20,
        ), request(console_port, "/metrics").text
        samples = scrape(console_port)
        assert value(samples, "mailgate_honeypot_captured_sessions") == 1
        assert value(samples, "mailgate_honeypot_captured_messages") == 0
        assert value(samples, "mailgate_auth_total", result="failure") == 1
        assert value(samples, "mailgate_connections_total") == 1
        assert request(console_port, "/readyz").status == 200
        _messages_and_timeline(smtp_port, console_port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        reader.join(5)


BAIT = (
    b"From: <x@example.test>\r\nTo: <victim@example.net>\r\nSubject: <b>bait</b>\r\n"
    b"\r\nclick http://phish.example/login\r\n"
)


def _messages_and_timeline(smtp_port: int, console_port: int) -> None:
    """A message sent to the honeypot shows in the messages API with its source, and the
    timeline counts both sessions in the current bucket."""
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
        # A local user: the personas refuse relaying as their products do.
        client.sendmail("x@example.test", ["postmaster@localhost"], BAIT)

    def listed() -> list[dict[str, object]]:
        found: list[dict[str, object]] = request(console_port, "/api/v1/honeypot/messages").json()[
            "messages"
        ]
        return found

    assert wait_for(lambda: len(listed()) == 1, timeout=20)
    [message] = listed()
    assert message["mail_from"] == "x@example.test"
    assert message["rcpt_tos"] == ["postmaster@localhost"]
    assert message["subject"] == "<b>bait</b>" and message["urls"] == 1 and message["kept"]
    raw = request(console_port, f"/api/v1/honeypot/messages/{message['id']}/raw")
    assert raw.status == 200 and raw.body.endswith(BAIT)
    # A download of text, never a page.
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.headers["content-disposition"].startswith("attachment")
    assert request(console_port, "/api/v1/honeypot/messages/nope/raw").status == 404

    timeline = request(console_port, "/api/v1/honeypot/timeline?bucket=60").json()
    assert timeline["bucket"] == 60 and len(timeline["points"]) == 25
    assert sum(point["sessions"] for point in timeline["points"]) == 2
    assert sum(point["messages"] for point in timeline["points"]) == 1
    assert sum(point["auth_attempts"] for point in timeline["points"]) == 1
    assert request(console_port, "/api/v1/honeypot/timeline?bucket=7").status == 400
