"""`nmap -sV` names the product each honeypot persona imitates.

nmap's service detection is what most scanners (and Shodan-like surveys) use to label an
SMTP server; a persona that nmap does not recognise gives the honeypot away at once. The
real products' labels, recorded against the Debian 12 packages by scripts/record-personas,
are in the transcripts' metadata (tests/honeypot/recorded/*.json, ``meta.nmap``) and are
checked here too, so a persona and its product get the same product name.

nmap comes from scripts/install-test-deps (Debian's package); without it the test skips
with that hint.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.honeypot.test_persona_replay import RECORDED_DIR, RECORDINGS, running_honeypot

#: Persona -> the product (and version, where nmap shows one) nmap must report.
EXPECTED = {
    "postfix": "Postfix smtpd",
    "exim": "Exim smtpd 4.96",
    "sendmail": "Sendmail 8.17.1",
    "exchange": "Microsoft Exchange smtpd",
}
NMAP = shutil.which("nmap")


def service_line(output: str, port: int) -> str:
    match = re.search(rf"^{port}/tcp\s+open\s+(.*)$", output, re.M)
    assert match, f"nmap found no open port {port}:\n{output}"
    return match[1]


@pytest.mark.slow
@pytest.mark.skipif(NMAP is None, reason="nmap is not installed: run scripts/install-test-deps")
@pytest.mark.parametrize("persona", sorted(EXPECTED))
def test_nmap_names_the_persona_product(persona: str, tmp_path: Path) -> None:
    assert NMAP is not None
    with running_honeypot(tmp_path, persona) as server:
        port = server.address[1]
        run = subprocess.run(
            [NMAP, "-sV", "-Pn", "-n", "--max-retries", "1", "-p", str(port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 0, run.stderr
    line = service_line(run.stdout, port)
    assert EXPECTED[persona] in line, f"nmap says {line!r} for persona {persona}"


@pytest.mark.parametrize("persona", sorted(RECORDINGS))
def test_the_real_product_got_the_same_name(persona: str) -> None:
    meta = json.loads((RECORDED_DIR / RECORDINGS[persona]).read_text())["meta"]
    assert EXPECTED[persona] in meta["nmap"], meta["nmap"]
