"""curl's SMTP client against the real ``mailgate serve``: STARTTLS, AUTH, implicit TLS.

curl uploads the file as it is (dot-stuffing it on the wire), so the stored message must
be the file byte for byte. The URL path is the name curl sends in EHLO.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.server.harness import make_certs

from .conftest import (
    MESSAGE,
    PASSWORD,
    RECIPIENT,
    SENDER,
    USER,
    Mailgate,
    describe,
    require_tool,
    run_tool,
)

# curl's exit status for "peer certificate cannot be authenticated with given CA".
CURL_BAD_CERTIFICATE = 60


@pytest.fixture
def curl() -> str:
    return require_tool("curl")


def curl_args(curl: str, url: str, message_file: Path, ca_file: Path, *extra: str) -> list[str]:
    return [
        curl,
        "--silent", "--show-error", "--verbose",
        "--max-time", "20",
        url,
        "--mail-from", SENDER,
        "--mail-rcpt", RECIPIENT,
        "--upload-file", str(message_file),
        "--cacert", str(ca_file),
        *extra,
    ]  # fmt: skip


# curl picks the strongest mechanism offered (CRAM-MD5) unless told otherwise.
@pytest.mark.parametrize("mechanism", [None, "PLAIN", "LOGIN"])
def test_starttls_with_auth(
    curl: str, mailgate: Mailgate, message_file: Path, mechanism: str | None
) -> None:
    extra = ["--ssl-reqd", "--user", f"{USER}:{PASSWORD}"]
    if mechanism is not None:
        extra += ["--login-options", f"AUTH={mechanism}"]
    url = f"smtp://127.0.0.1:{mailgate.port}/curl.test"
    result = run_tool(curl_args(curl, url, message_file, mailgate.certs.ca_file, *extra))
    assert result.returncode == 0, describe(result)
    trace = result.stderr.decode()
    assert "> STARTTLS" in trace
    assert f"> AUTH {mechanism or 'CRAM-MD5'}" in trace
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"
    assert "from curl.test ([127.0.0.1])" in mailgate.received()


def test_starttls_without_auth(curl: str, mailgate: Mailgate, message_file: Path) -> None:
    url = f"smtp://127.0.0.1:{mailgate.port}/curl.test"
    result = run_tool(curl_args(curl, url, message_file, mailgate.certs.ca_file, "--ssl-reqd"))
    assert result.returncode == 0, describe(result)
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPS"


def test_smtps_implicit_tls(
    curl: str, mailgate: Mailgate, message_file: Path, tmp_path: Path
) -> None:
    url = f"smtps://127.0.0.1:{mailgate.smtps_port}/curl.test"
    auth = ["--user", f"{USER}:{PASSWORD}"]
    result = run_tool(curl_args(curl, url, message_file, mailgate.certs.ca_file, *auth))
    assert result.returncode == 0, describe(result)
    assert "> STARTTLS" not in result.stderr.decode()
    assert mailgate.only_message() == MESSAGE
    assert mailgate.with_protocol() == "ESMTPSA"

    # An unrelated CA must not verify the server: the run above really checked it.
    other = tmp_path / "other-ca"
    other.mkdir()
    result = run_tool(curl_args(curl, url, message_file, make_certs(other).ca_file, *auth))
    assert result.returncode == CURL_BAD_CERTIFICATE, describe(result)
    assert len(mailgate.messages()) == 1
