"""The programs that receive mail (examples/ and the embedding examples of README.md and
docs/user-guide.md) accept it from a client outside ``relay_networks``, as an MX must.

The example tests send from 127.0.0.1, which relay control lets send anywhere
(``relay_networks`` is loopback by default); a client on the internet is not. Here each
program runs in this process with ``Server.run`` replaced: the server starts with no
relay networks at all (so 127.0.0.1 is treated like any outside client), takes one RCPT
and stops. Without ``local_domains`` that RCPT gets ``554 5.7.1 Relay access denied``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import runpy
import smtplib
import sys
from pathlib import Path

import pytest

from mailgate.composition.server import Server
from mailgate.server.options import ListenAddress

ROOT = Path(__file__).resolve().parents[2]


def rcpt_reply(address: tuple[str, int], recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("outside.example.net")
        client.mail("sender@example.net")
        return client.rcpt(recipient)


def run_as_seen_from_outside(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recipient: str
) -> list[tuple[int, bytes]]:
    """Replace Server.run; the replies the programs' servers gave to one RCPT each."""
    replies: list[tuple[int, bytes]] = []
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)

    def run(self: Server) -> int:
        self.options = dataclasses.replace(
            self.options, relay_networks=(), listen=(ListenAddress("127.0.0.1", 0),)
        )

        async def main() -> None:
            await self.start()
            try:
                replies.append(await asyncio.to_thread(rcpt_reply, self.address, recipient))
            finally:
                await self.stop()

        asyncio.run(main())
        return 0

    monkeypatch.setattr(Server, "run", run)
    return replies


@pytest.mark.parametrize(
    ("example", "recipient"),
    [
        ("receive_to_app.py", "you@example.com"),
        ("aiosmtpd_handler.py", "alice@example.com"),
        ("plugin_chain.py", "alice@example.com"),
        ("webhook_relay.py", "support@example.com"),
    ],
)
def test_examples_accept_mail_from_outside(
    example: str, recipient: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    replies = run_as_seen_from_outside(monkeypatch, tmp_path, recipient)
    path = ROOT / "examples" / example
    monkeypatch.setattr(sys, "argv", [str(path), "--listen", "127.0.0.1:0"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(path), run_name="__main__")
    assert ended.value.code == 0
    [(code, text)] = replies
    assert code == 250, text


def embedding_block(doc: str) -> str:
    """The Python block of ``doc`` that embeds a server (imports Server, registers hooks)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.DOTALL)
    [block] = [b for b in blocks if "import" in b and "Server(" in b and "on_rcpt" in b]
    return block


@pytest.mark.parametrize("doc", ["README.md", "docs/user-guide.md"])
def test_embedding_examples_accept_mail_from_outside(
    doc: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    replies = run_as_seen_from_outside(monkeypatch, tmp_path, "bob@example.com")
    code = compile(embedding_block(doc), doc, "exec")
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit as ended:
        assert ended.code == 0
    [(status, text)] = replies
    assert status == 250, text


def test_without_local_domains_an_outside_client_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What the test above guards against, and what the docs say happens.
    replies = run_as_seen_from_outside(monkeypatch, tmp_path, "bob@example.com")
    Server(hostname="mx.example.com", listen="127.0.0.1:0").run()
    [(status, text)] = replies
    assert status == 554 and b"Relay access denied" in text
