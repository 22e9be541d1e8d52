"""The postfix persona behaves like Postfix 3.7 with Debian's defaults, over real sockets
against the honeypot server: the replies below were recorded from a private Postfix 3.7.11
(Debian 12 package, Debian's main.cf, a client outside mynetworks), host names aside.
Also the recipient and relay settings, and early talkers."""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import time
from pathlib import Path

import pytest

from mailgate.honeypot.personas import profile_from_mapping

from .test_attacker import Honeypot, running_honeypot

CLIENT_IP = "127.0.0.21"


class Client:
    """A raw SMTP client: one line out, one complete reply in."""

    def __init__(self, hp: Honeypot, *, early: bytes = b"", ip: str = CLIENT_IP) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", hp.port), timeout=5, source_address=(ip, 0)
        )
        self.buf = b""
        if early:
            self.sock.sendall(early)
        self.banner = self.reply()

    def reply(self) -> list[str]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = self.buf.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[index + 1 :])
                    return [raw.decode() for raw in lines[: index + 1]]
            chunk = self.sock.recv(65536)
            if not chunk:
                return [raw.decode() for raw in self.buf.split(b"\r\n") if raw] + ["<closed>"]
            self.buf += chunk
        raise AssertionError(f"no complete reply: {self.buf!r}")

    def cmd(self, line: str | bytes) -> str:
        data = line if isinstance(line, bytes) else line.encode() + b"\r\n"
        self.sock.sendall(data)
        return self.reply()[-1]

    def close(self) -> None:
        self.sock.close()


# (command, the last line of Postfix's reply), as recorded: two sessions, since Postfix
# hangs up at its 20th error.
POSTFIX_SESSIONS = [
    [
        ("RCPT TO:<root@mail.example.com>", "503 5.5.1 Error: need MAIL command"),
        ("DATA", "503 5.5.1 Error: need RCPT command"),
        ("DATA x", "503 5.5.1 Error: need RCPT command"),
        ("MAIL FROM:user@host.example", "250 2.1.0 Ok"),  # no HELO, no brackets
        ("DATA", "554 5.5.1 Error: no valid recipients"),
        ("MAIL FROM:<a@b.example>", "503 5.5.1 Error: nested MAIL command"),
        ("RCPT TO:<root@mail.example.com>", "250 2.1.5 Ok"),
        ("RCPT TO:root", "250 2.1.5 Ok"),
        ("RCPT TO:<Postmaster>", "250 2.1.5 Ok"),
        ("RCPT TO:<root+tag@example.com>", "250 2.1.5 Ok"),
        ("RCPT TO: <root@localhost>", "250 2.1.5 Ok"),
        (
            "RCPT TO:<nosuch@mail.example.com>",
            "550 5.1.1 <nosuch@mail.example.com>: Recipient address rejected: "
            "User unknown in local recipient table",
        ),
        (
            "RCPT TO:nosuch",
            "550 5.1.1 <nosuch>: Recipient address rejected: User unknown in local recipient table",
        ),
        ("RCPT TO:<x@other.org>", "454 4.7.1 <x@other.org>: Relay access denied"),
        ("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
        ("ETRN example.org", "503 Error: MAIL transaction in progress"),
        ("RSET", "250 2.0.0 Ok"),
        ("QUIT", "221 2.0.0 Bye"),
    ],
    [
        ("", "500 5.5.2 Error: bad syntax"),
        ("XYZZY", "500 5.5.2 Error: command not recognized"),
        ("HELP", "500 5.5.2 Error: command not recognized"),
        ("EXPN root", "500 5.5.2 Error: command not recognized"),
        ("VRFY root", "252 2.0.0 root"),
        (
            "VRFY nosuch",
            "550 5.1.1 <nosuch>: Recipient address rejected: User unknown in local recipient table",
        ),
        ("VRFY x@other.org", "454 4.7.1 <x@other.org>: Relay access denied"),
        ("VRFY", "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"),
        ("ETRN", "500 Syntax: ETRN domain"),
        ("ETRN example.org", "459 <example.org>: service unavailable"),
        ("HELO", "501 Syntax: HELO hostname"),
        ("EHLO a b", "250 CHUNKING"),
        ("EHLO " + "a" * 3000, "250 CHUNKING"),  # cut at 2048, the rest skipped
        ("STARTTLS x", "501 5.5.4 Syntax: STARTTLS"),
        ("RSET x", "501 5.5.4 Syntax: RSET"),
        ("NOOP x", "250 2.0.0 Ok"),
        ("MAIL FROM:<a@b.example> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
        ("QUIT x", "221 2.0.0 Bye"),
    ],
]


@pytest.mark.parametrize("script", POSTFIX_SESSIONS, ids=["transaction", "verbs"])
def test_postfix_session_as_recorded(script: list[tuple[str, str]], tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix") as hp:
        client = Client(hp)
        assert client.banner == ["220 mail.example.com ESMTP Postfix (Debian/GNU)"]
        got = [(line, client.cmd(line)) for line, _ in script]
        client.close()
    assert got == script


def test_postfix_ehlo_offers_etrn_in_postfix_order(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix") as hp:
        client = Client(hp)
        client.sock.sendall(b"EHLO client.example\r\n")
        keywords = [line[4:].split(" ")[0] for line in client.reply()[1:]]
        client.close()
    assert keywords[:5] == ["PIPELINING", "SIZE", "VRFY", "ETRN", "STARTTLS"]


def test_postfix_closes_after_twenty_errors(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix") as hp:
        client = Client(hp)
        for _ in range(19):
            assert client.cmd("XYZZY").startswith("500 ")
        client.sock.sendall(b"XYZZY\r\n")
        assert client.reply() == ["500 5.5.2 Error: command not recognized"]
        assert client.reply() == ["421 4.7.0 mail.example.com Error: too many errors"]
        client.close()


def test_postfix_greets_an_early_talker(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix") as hp:
        client = Client(hp, early=b"EHLO early.example\r\n")
        assert client.banner[0].startswith("220 mail.example.com")
        assert client.reply()[0] == "250-mail.example.com"
        client.close()


def test_a_greeting_delay_still_refuses_early_talkers(tmp_path: Path) -> None:
    # --greeting-delay exists to catch clients that talk first: it wins over the persona.
    with running_honeypot(tmp_path, "postfix", server_settings={"greeting_delay": 1.0}) as hp:
        with socket.create_connection(
            ("127.0.0.1", hp.port), timeout=5, source_address=(CLIENT_IP, 0)
        ) as sock:
            sock.sendall(b"EHLO early.example\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    assert data.startswith(b"554 ")


@pytest.mark.parametrize("persona", ["postfix", "exim", "exchange", "sendmail", "generic"])
def test_relay_refused_and_unknown_users_refused_by_default(persona: str, tmp_path: Path) -> None:
    with running_honeypot(tmp_path, persona) as hp:
        profile = hp.profile
        client = Client(hp)
        client.cmd("EHLO client.example")
        assert client.cmd("MAIL FROM:<a@b.example>").startswith("250")
        host = hp.server.options.hostname
        # postmaster (RFC 5321 4.5.1) exists wherever the product's stock install has it;
        # Debian's sendmail creates no /etc/aliases, so there root is the known user.
        known = "postmaster" if "postmaster" in profile.local_users else "root"
        assert client.cmd(f"RCPT TO:<{known}@{host}>").startswith("250")
        enhanced = profile.persona.enhanced_status_codes

        def wire(name: str, address: str) -> str:
            reply = profile.format(
                name, address=address, path=f"<{address}>", hostname=host, client_ip=CLIENT_IP
            )
            return reply.render(enhanced).decode().rstrip("\r\n")

        assert client.cmd("RCPT TO:<victim@gmail.com>") == wire("relay_denied", "victim@gmail.com")
        unknown = client.cmd(f"RCPT TO:<nosuch@{host}>")
        assert unknown == wire("unknown_user", f"nosuch@{host}")
        client.close()


def test_relay_pretend_accepts_and_captures(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix", relay="pretend", local_users=("alice",)) as hp:
        client = Client(hp)
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<spam@b.example>")
        assert client.cmd("RCPT TO:<victim@gmail.com>") == "250 2.1.5 Ok"
        assert client.cmd("RCPT TO:<alice@mail.example.com>") == "250 2.1.5 Ok"
        # local_users replaces the persona's list: root is unknown now.
        assert client.cmd("RCPT TO:<root@mail.example.com>").startswith("550 5.1.1 ")
        assert client.cmd("DATA").startswith("354")
        queued = client.cmd(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert queued.startswith("250 2.0.0 Ok: queued as ")
        client.cmd("QUIT")
        client.close()
        hp.wait_all_closed()
        rows = hp.query("SELECT rcpt_tos FROM messages")
    assert len(rows) == 1 and "victim@gmail.com" in rows[0][0]
    assert hp.outbound == []  # nothing was relayed


def test_an_authenticated_client_may_relay(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix", auth_outcome="accept") as hp:
        client = Client(hp)
        client.cmd("EHLO client.example")
        token = base64.b64encode(b"\0admin\0hunter2").decode()
        assert client.cmd(f"AUTH PLAIN {token}").startswith("235")
        client.cmd("MAIL FROM:<a@b.example>")
        assert client.cmd("RCPT TO:<victim@gmail.com>") == "250 2.1.5 Ok"
        client.close()


def test_server_refusals_in_postfix_words(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix", server_settings={"max_clients_per_ip": 1}) as hp:
        first = Client(hp)
        second = Client(hp)
        assert second.banner == [
            f"421 4.7.0 mail.example.com Error: too many connections from {CLIENT_IP}"
        ]
        first.close()
        second.close()


def test_bad_proxy_header_in_postfix_words(tmp_path: Path) -> None:
    networks = (ipaddress.ip_network("127.0.0.0/8"),)
    with running_honeypot(tmp_path, "postfix", server_settings={"proxy_protocol": networks}) as hp:
        client = Client(hp, early=b"PROXY NONSENSE\r\n")
        assert client.banner == ["421 4.3.0 mail.example.com Server local error"]
        client.close()


def test_postfix_limits_come_from_the_persona(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "postfix") as hp:
        assert hp.server.options.max_recipients == 1000
        assert hp.server.options.max_auth_failures == 20
    # A setting given wins over the persona's.
    with running_honeypot(
        tmp_path / "given", "postfix", server_settings={"max_recipients": 5}
    ) as hp:
        assert hp.server.options.max_recipients == 5


def test_exim_refuses_restricted_local_parts_first(tmp_path: Path) -> None:
    # Debian's Exim ACL: "%", "!", "/", "|", "@" in a local part at its own domains, and
    # "%", "!", "@" (or a leading "./|") elsewhere, before users or relaying.
    with running_honeypot(tmp_path, "exim", relay="pretend") as hp:
        client = Client(hp)
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@b.example>")
        host = hp.server.options.hostname
        restricted = "550 restricted characters in address"
        assert client.cmd(f"RCPT TO:<victim%example.org@{host}>") == restricted
        assert client.cmd(f"RCPT TO:<root|x@{host}>") == restricted
        assert client.cmd(f"RCPT TO:<a/b@{host}>") == restricted
        assert client.cmd("RCPT TO:<a!b@gmail.com>") == restricted
        # "/" is refused only at its own domains; relay = "pretend" takes the rest.
        assert client.cmd("RCPT TO:<a/b@gmail.com>") == "250 Accepted"
        assert client.cmd(f"RCPT TO:<root@{host}>") == "250 Accepted"
        client.close()


def test_exim_words_the_final_reply_of_a_prdr_message(tmp_path: Path) -> None:
    with running_honeypot(tmp_path, "exim") as hp:
        client = Client(hp)
        client.cmd("EHLO client.example")
        host = hp.server.options.hostname
        assert client.cmd("MAIL FROM:<a@b.example> PRDR") == "250 OK, PRDR Requested"
        assert client.cmd(f"RCPT TO:<root@{host}>") == "250 Accepted"
        assert client.cmd("DATA").startswith("354")
        # The per-recipient replies, then Exim's own final reply for PRDR.
        client.sock.sendall(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        lines = [client.reply()[-1] for _ in range(3)]
        assert lines[0] == "353 PRDR content analysis beginning"
        assert lines[1] == f"250 PRDR R=<root@{host}> acceptance"
        assert re.fullmatch(r"250 id=\S+ message accepted", lines[2]), lines[2]
        # Without PRDR: the usual queued line.
        client.cmd("MAIL FROM:<a@b.example>")
        client.cmd(f"RCPT TO:<root@{host}>")
        client.cmd("DATA")
        assert client.cmd(b"Subject: hi\r\n\r\nbody\r\n.\r\n").startswith("250 OK id=")
        client.close()


def test_refusal_texts_echo_the_path_as_written(tmp_path: Path) -> None:
    profile = profile_from_mapping(
        {
            "name": "echoing",
            "behaviour": {"lenient_paths": True},
            "replies": {
                "relay_denied": "550 5.7.1 {path}... Relaying denied",
                "unknown_user": "550 5.1.1 {path}... User unknown ({address})",
            },
        },
        base="postfix",
    )
    with running_honeypot(tmp_path, "postfix", profile=profile) as hp:
        client = Client(hp)
        client.cmd("EHLO client.example")
        client.cmd("MAIL FROM:<a@b.example>")
        host = hp.server.options.hostname
        # The source route as sent (the address drops it), and a bare path as sent.
        assert client.cmd("RCPT TO:<@relay.example:victim@gmail.com>") == (
            "550 5.7.1 <@relay.example:victim@gmail.com>... Relaying denied"
        )
        assert (
            client.cmd("RCPT TO:victim@gmail.com")
            == "550 5.7.1 victim@gmail.com... Relaying denied"
        )
        assert client.cmd(f"RCPT TO:<NoSuch@{host}>") == (
            f"550 5.1.1 <NoSuch@{host}>... User unknown (NoSuch@{host})"
        )
        client.close()
