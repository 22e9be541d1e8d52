"""docs/outbound.md's "Make Gmail accept your mail" walkthrough works as written: its
``mailgate dkim keygen`` commands run, the records they print are published (in the test
DNS zone), its configuration passes ``mailgate check-config`` and, served with test ports,
signs a message that a receiver verifies against those records; its SPF and DMARC records
are well formed and name the signing domain. Paths under /etc/mailgate become a temporary
directory; listen addresses, DNS and the MX port are the test's."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RR
from tests.dns_server import DNSTestServer
from tests.outbound.dkim_helpers import VerifyingReceiver, dkim_signatures, txt_lookup
from tests.outbound.helpers import new_domain, publish_mx, run
from tests.queue.e2e import Client, serving, settings, wait_for, wait_until_empty

from mailgate import cli, config
from mailgate.queue.signing import message_signer
from mailgate.server.options import PolicySection

DOC = Path(__file__).resolve().parents[2] / "docs" / "outbound.md"


def blocks(language: str, section: str = "") -> list[str]:
    """The fenced blocks in ``language`` ("" for plain ones), of the part of the page
    after the heading ``section`` when given."""
    text = DOC.read_text(encoding="utf-8")
    if section:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found: list[str] = []
    current: list[str] | None = None
    current_language = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, current_language = [], line[3:].strip()
            else:
                if current_language == language:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


WALKTHROUGH = "Make Gmail accept your mail"


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


def commands(tmp_path: Path, program: str) -> list[list[str]]:
    """The walkthrough's shell commands of ``mailgate <program>``, paths moved."""
    found = []
    for block in blocks("sh", WALKTHROUGH):
        for line in block.splitlines():
            words = shlex.split(line.replace("/etc/mailgate", str(tmp_path / "etc")))
            if words[:2] == ["mailgate", program]:
                found.append(words[1:])
    return found


def test_the_walkthrough_signs_mail_that_verifies(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    dns_server: DNSTestServer,
    mx_port: int,
) -> None:
    # 2. The keys, and the records they print, published as printed.
    keygens = [words for words in commands(tmp_path, "dkim") if words[1] == "keygen"]
    assert len(keygens) == 2
    printed = []
    for words in keygens:
        assert cli.main(words) == 0
        out = capsys.readouterr().out
        printed.append(out)
        dns_server.add(out.splitlines()[-1] + "\n")
    # The sample output on the page has the shape of the real one.
    [sample] = [b for b in blocks("", WALKTHROUGH) if b.startswith("Private key:")]
    shape = re.compile(r"p=[A-Za-z0-9+/=]+")
    ed25519 = printed[1].replace(str(tmp_path / "etc"), "/etc/mailgate")
    assert shape.sub("p=KEY", sample) == shape.sub("p=KEY", ed25519)

    # 3. The configuration, with the keys where keygen wrote them.
    [toml_text] = [b for b in blocks("toml", WALKTHROUGH) if "[[dkim_sign]]" in b]
    toml_text = toml_text.replace("/etc/mailgate", str(tmp_path / "etc"))
    config_file = tmp_path / "etc" / "mailgate.toml"
    config_file.write_text(
        toml_text.replace(
            "[server]\n", f'[server]\nstate_dir = "{tmp_path / "state"}"\nsink = true\n', 1
        ),
        encoding="utf-8",
    )
    [check] = commands(tmp_path, "check-config")
    assert cli.main(check) == 0, capsys.readouterr()
    capsys.readouterr()
    document: dict[str, Any] = tomllib.loads(toml_text)
    domain = document["dkim_sign"][0]["domain"]

    # Served with the test's ports and DNS, a message of the domain is signed with both
    # keys, and the receiver verifies both against the published records.
    theirs = new_domain("gmail")
    publish_mx(dns_server, theirs, (10, "mx", "127.0.0.35"))
    values = settings(
        tmp_path,
        dns_server,
        mx_port,
        document["routes"],
        hostname=document["server"]["hostname"],
        dkim_sign=document["dkim_sign"],
    )

    async def main() -> bytes:
        with VerifyingReceiver("127.0.0.35", mx_port, dns_server) as receiver:
            async with serving(**values) as server:
                data = (
                    f"From: Alice <alice@{domain}>\r\nTo: <bob@{theirs}>\r\n"
                    "Subject: walkthrough\r\n\r\nHello.\r\n"
                ).encode()
                _, final = await Client(server).send(f"alice@{domain}", [f"bob@{theirs}"], data)
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 1, what="the signed message")
                await wait_until_empty(server)
        return receiver.messages[0].data

    received = run(main())
    signatures = dkim_signatures(received, txt_lookup(dns_server))
    assert [(s.domain, s.selector, s.algorithm, s.valid) for s in signatures] == [
        (domain, "s2026", "rsa-sha256", True),
        (domain, "e2026", "ed25519-sha256", True),
    ]

    # 1. and 4. SPF and DMARC: well-formed zone lines for the signing domain.
    records = [RR.fromZone(block)[0] for block in blocks("dns", WALKTHROUGH)]
    assert [(str(r.rname), QTYPE[r.rtype]) for r in records] == [
        (f"{domain}.", "TXT"),
        (f"_dmarc.{domain}.", "TXT"),
    ]
    spf, dmarc = (b"".join(r.rdata.data).decode() for r in records)
    assert spf.startswith("v=spf1 ") and spf.endswith(" -all")
    assert dmarc.startswith("v=DMARC1; p=")


def test_the_arc_example_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    [example] = blocks("toml", "ARC sealing: `[arc_seal]`")
    example = example.replace("/etc/mailgate", str(tmp_path / "etc"))
    document = tomllib.loads(example)
    arc = document["arc_seal"]
    command = ["dkim", "keygen", "--domain", arc["domain"], "--selector", arc["selector"],
               "--out", str(Path(arc["key_file"]).parent)]  # fmt: skip
    assert cli.main(command) == 0
    capsys.readouterr()
    sections = [
        PolicySection(name, document[name], None, f"outbound.md [{name}]")
        for name in ("mail_auth", "arc_seal")
    ]
    signer = message_signer(sections, hostname="mx.example.com")
    assert signer is not None and signer.arc is not None
    assert signer.arc.authserv_id == "mx.example.com"
