"""docs/user-guide.md, "Run an MX on the internet": its configuration and the commands
that can run here.

The configuration block is taken from the guide as written, with only what differs on
this machine replaced: the paths under /var and /etc (a temporary directory), the
certificate (one from a test CA for mx.example.com), and, as flags that override the
file, the listen address (a free loopback port) and the name server (the suite's DNS
server, so no query leaves the machine). ``mailgate check-config`` must say ok; then
``mailgate serve`` runs it and the guide's swaks and ls commands are run against it.
Steps that need root, systemd, certbot or the internet are checked elsewhere
(tests/test_deploy.py) or not at all: the DNS records, certbot, systemctl.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trustme
from tests.dns_server import DNSTestServer
from tests.server.harness import CLIServer

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "user-guide.md"
INSTALLED = "/opt/mailgate/bin/mailgate"


def section() -> str:
    text = GUIDE.read_text()
    start = text.index("## Run an MX on the internet")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def config_block() -> str:
    part = section()
    marker = part.index("<!-- mx-config")
    match = re.compile(r"```toml\n(.*?)```", re.DOTALL).search(part, marker)
    assert match is not None
    return match.group(1)


def shell_lines() -> list[str]:
    """The lines of the section's ``sh`` blocks (comments after # dropped)."""
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section(), re.DOTALL):
        for line in block.splitlines():
            lines.append(line.split("  #", 1)[0].rstrip())
    return lines


class Host:
    """The guide's paths, moved under a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc" / "mailgate"
        self.tls = self.etc / "tls"
        self.state = root / "var" / "lib" / "mailgate"
        self.mail = root / "var" / "mail" / "mailgate"
        for directory in (self.tls, self.state.parent, self.mail.parent):
            directory.mkdir(parents=True, exist_ok=True)

    def local(self, text: str) -> str:
        return (
            text.replace("/etc/mailgate", str(self.etc))
            .replace("/var/lib/mailgate", str(self.state))
            .replace("/var/mail/mailgate", str(self.mail))
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    host = Host(tmp_path)
    leaf = trustme.CA().issue_cert("mx.example.com")
    leaf.private_key_pem.write_to_path(str(host.tls / "privkey.pem"))
    (host.tls / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (host.etc / "mailgate.toml").write_text(host.local(config_block()))
    return host


def mailgate(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_config_is_what_the_guide_explains() -> None:
    config = tomllib.loads(config_block())
    server = config["server"]
    assert server["local_domains"] == ["example.com"] and server["relay_networks"] == []
    assert server["tls_cert"] and server["tls_key"] and "0.0.0.0:25" in server["listen"]
    assert {"lists", "limits", "dnsbl", "client_checks", "greylisting", "mail_auth"} <= set(config)


def test_check_config_says_ok(host: Host, dns_server: DNSTestServer) -> None:
    line = f"{INSTALLED} check-config --config /etc/mailgate/mailgate.toml"
    assert line in shell_lines()
    assert "touch /etc/mailgate/blocked-networks.txt" in shell_lines()
    missing = mailgate(["check-config", "--config", str(host.etc / "mailgate.toml")], host.root)
    assert missing.returncode == 2 and "blocked-networks.txt" in missing.stdout + missing.stderr

    (host.etc / "blocked-networks.txt").touch()  # the guide's touch
    program, *args = shlex.split(host.local(line))
    assert program == INSTALLED
    done = mailgate([*args, "--dns-nameservers", dns_server.address], host.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok"), done.stdout
    assert "example.com" in done.stdout


def test_the_guide_commands_against_the_running_server(
    host: Host, dns_server: DNSTestServer
) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (scripts/install-test-deps installs it)")
    lines = shell_lines()
    delivered = "swaks --server 127.0.0.1 --to postmaster@example.com -tls"
    refused = "swaks --server 127.0.0.1 --to someone@elsewhere.example"
    listing = "ls /var/mail/mailgate/new/"
    for line in (delivered, refused, listing):
        assert line in lines, line
    assert (ROOT / "deploy" / "mailgate.service").exists()  # the guide's cp source

    (host.etc / "blocked-networks.txt").touch()
    server = CLIServer(
        [
            "--config", str(host.etc / "mailgate.toml"),
            "--listen", "127.0.0.1:0",
            "--dns-nameservers", dns_server.address,
        ],
        host.root,
    ).start()  # fmt: skip
    try:

        def run(line: str) -> subprocess.CompletedProcess[str]:
            command = host.local(line).replace("127.0.0.1", f"127.0.0.1:{server.port}")
            return subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=60, check=False
            )

        sent = run(delivered)
        assert sent.returncode == 0, sent.stdout + server.text()
        assert "STARTTLS" in sent.stdout and "250 2.0.0" in sent.stdout
        denied = run(refused)
        assert denied.returncode != 0 and "554 5.7.1" in denied.stdout, denied.stdout
        listed = run(listing)
        assert listed.returncode == 0 and len(listed.stdout.split()) == 1
        (stored,) = (host.mail / "new").iterdir()
        head = stored.read_bytes().split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"Authentication-Results: mx.example.com;")
        assert server.stop() == 0
    finally:
        server.kill()
