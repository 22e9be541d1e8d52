"""docs/outbound.md's "DANE" and "REQUIRETLS" sections are true: the example
configuration builds (and its commented trust anchor is mailgate's default), the replies
and statuses quoted are the ones mailgate gives."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.protocol.session import Session

from mailgate.dns.dnssec import ROOT_TRUST_ANCHOR
from mailgate.protocol import ProtocolConfig
from mailgate.queue.settings import outbound_options
from mailgate.server.options import PolicySection

DOC = Path(__file__).resolve().parents[2] / "docs" / "outbound.md"


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_dane_example_builds_and_names_the_default_anchor() -> None:
    text = section("DANE")
    [example] = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    document = tomllib.loads(example)
    options = outbound_options(
        [PolicySection("outbound", document["outbound"], None, "outbound.md [outbound]")],
        "mx.example.net",
    )
    assert (options.tls_policy, options.dnssec) == ("dane", "resolver")
    assert options.dnssec_trust_anchors == (ROOT_TRUST_ANCHOR,)
    commented = re.search(r'# dnssec_trust_anchors = \["([^"]+)"\]', example)
    assert commented is not None and commented.group(1) == ROOT_TRUST_ANCHOR
    local = dict(document["outbound"], dnssec="local")
    options = outbound_options(
        [PolicySection("outbound", local, None, "outbound.md [outbound]")], "mx.example.net"
    )
    assert options.dnssec == "local"


def test_the_requiretls_section_quotes_mailgates_reply_and_status() -> None:
    text = section("REQUIRETLS").replace("\n", " ")
    quoted = re.search(r"`(530 5\.7\.10 [^`]+)`", text)
    assert quoted is not None
    session = Session.start(ProtocolConfig(hostname="mx.test", starttls=True))
    session.feed(b"EHLO c.test\r\n")
    session.take_output()
    [(code, reply)] = session.send(b"MAIL FROM:<a@example.com> REQUIRETLS\r\n")
    assert f"{code} {reply}" == quoted.group(1)
    assert "`5.7.30`" in text
