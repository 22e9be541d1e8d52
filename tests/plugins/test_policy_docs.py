"""The configuration shown at the top of docs/policy.md is valid and switches on every
built-in policy, in the documented order."""

from __future__ import annotations

import re
from pathlib import Path

from mailgate.cli import build_parser
from mailgate.composition.builtins import policy_plugins
from mailgate.config import build_options

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def test_policy_doc_example_builds_every_policy_in_order(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert example is not None
    config = tmp_path / "mailgate.toml"
    config.write_text(example.group(1))
    (tmp_path / "blocked-networks.txt").write_text("192.0.2.0/24\n")
    options = build_options(build_parser().parse_args(["serve", "--config", str(config)]))
    names = [plugin.name for plugin in policy_plugins(options)]
    assert names == [
        "lists",
        "relay",
        "rate-limits",
        "dnsbl",
        "client-checks",
        "greylist",
        "mail-auth",
    ]
