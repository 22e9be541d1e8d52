"""Submission listeners (RFC 6409, RFC 8314): AUTH before MAIL, only the user's own
senders, plain listeners unchanged; the [senders] table and the sender_map callback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import smtplib
import ssl
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from argon2 import PasswordHasher
from tests.server.harness import Certs, make_certs

from mailgate.cli import build_parser
from mailgate.composition.builtins import policy_plugins
from mailgate.composition.server import Server
from mailgate.config import ConfigError, build_honeypot_options, build_options
from mailgate.hooks import Address, Envelope, Reject, Session, TempFail
from mailgate.plugins.policy import DECISIONS, PolicyConfigError
from mailgate.plugins.submission import SenderTable, Submission
from mailgate.server.options import ListenAddress, PolicySection, ServerOptions
from mailgate.server.tls import DEV_CERT_NAME
from mailgate.testing import RunningServer, running_server

T = TypeVar("T")

MESSAGE = b"Subject: submission test\r\n\r\nhello\r\n"
SENDERS = {"alice": ["alice@example.com", "*@alice.example.com"], "app": ["*", "<>"]}


def session(*, submission: bool = True, user: str | None = None) -> Session:
    s = Session(id="t", peer_host="192.0.2.7", peer_port=1, local_host="127.0.0.1", local_port=587)
    s.submission = submission
    s.user = user
    return s


def mail(plugin: Submission, s: Session, sender: str) -> None:
    asyncio.run(plugin.on_mail(s, Envelope(), Address(sender)))


def refused(plugin: Submission, s: Session, sender: str) -> tuple[int, str | None, str]:
    with pytest.raises(Reject) as caught:
        mail(plugin, s, sender)
    reply = caught.value.reply("mail")
    return reply.code, reply.status, reply.lines[0]


# --- the rules, without sockets ---------------------------------------------------------


def test_plain_listeners_are_not_affected() -> None:
    plugin = Submission(SenderTable(SENDERS))
    mail(plugin, session(submission=False), "anyone@anywhere.test")
    mail(plugin, session(submission=False, user="alice"), "bob@example.com")


def test_mail_before_auth_is_refused_with_530() -> None:
    before = DECISIONS[("submission", "reject")]
    assert refused(Submission(), session(), "alice@example.com") == (
        530,
        "5.7.0",
        "Authentication required",
    )
    assert DECISIONS[("submission", "reject")] == before + 1


def test_only_the_users_own_senders() -> None:
    plugin = Submission(SenderTable(SENDERS))
    alice = session(user="alice")
    mail(plugin, alice, "alice@example.com")
    mail(plugin, alice, "Alice@EXAMPLE.com")  # addresses compare without case
    mail(plugin, alice, "news@alice.example.com")
    assert refused(plugin, alice, "bob@example.com") == (
        553,
        "5.7.1",
        "<bob@example.com>: Sender address rejected: not owned by user alice",
    )
    assert refused(plugin, alice, "x@sub.alice.example.com")[0] == 553  # *@domain: not subdomains
    # The null sender only when listed.
    assert refused(plugin, alice, "")[2] == "<>: Sender address rejected: not owned by user alice"
    mail(plugin, session(user="app"), "")
    mail(plugin, session(user="app"), "whoever@wherever.test")
    # A user missing from the table owns nothing.
    assert refused(plugin, session(user="mallory"), "mallory@example.com")[0] == 553


def test_without_a_map_any_sender_once_authenticated() -> None:
    mail(Submission(), session(user="alice"), "anyone@anywhere.test")


def test_sender_map_callback_sync_and_async() -> None:
    calls: list[str] = []

    def lookup(user: str) -> Iterable[str] | None:
        calls.append(user)
        return ["*@example.org"] if user == "carol" else None

    async def async_lookup(user: str) -> Iterable[str] | None:
        await asyncio.sleep(0)
        return "carol@example.net" if user == "carol" else None  # one pattern as a string

    mail(Submission(sender_map=lookup), session(user="carol"), "c@example.org")
    assert refused(Submission(sender_map=lookup), session(user="dave"), "d@example.org")[0] == 553
    assert calls == ["carol", "dave"]
    mail(Submission(sender_map=async_lookup), session(user="carol"), "carol@example.net")
    assert refused(Submission(sender_map=async_lookup), session(user="carol"), "x@example.net")[
        0
    ] == (553)
    # Table and callback together: either may grant an address.
    both = Submission(SenderTable({"carol": ["carol@example.com"]}), sender_map=lookup)
    mail(both, session(user="carol"), "carol@example.com")
    mail(both, session(user="carol"), "other@example.org")


def test_a_bad_pattern_from_the_callback_is_a_temporary_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = Submission(sender_map=lambda user: ["not a pattern"])
    with caplog.at_level(logging.ERROR, logger="mailgate.policy"), pytest.raises(TempFail):
        mail(plugin, session(user="alice"), "alice@example.com")
    assert "sender_map for user 'alice'" in caplog.text


def section(values: dict[str, object]) -> PolicySection:
    return PolicySection("senders", values, None, "mailgate.toml [senders]")


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"alice": 3}, r"mailgate.toml \[senders\] alice: expected a list of strings, got 3"),
        ({"alice": []}, r"\[senders\] alice: no sender address"),
        ({"alice": ["alice"]}, r"\[senders\] alice: 'alice' is not a pattern"),
        ({"alice": ["*@exa mple.com"]}, r"\[senders\] alice: .* is not a domain"),
        ({"alice": ["alice@*.example.com"]}, r"\[senders\] alice: .*for whole domains"),
    ],
)
def test_table_errors_name_file_table_and_user(values: dict[str, object], problem: str) -> None:
    with pytest.raises(PolicyConfigError, match=problem):
        SenderTable.from_section(section(values))


# --- from the configuration file -------------------------------------------------------------


def build(*argv: str) -> ServerOptions:
    return build_options(build_parser().parse_args(["serve", *argv]))


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mailgate.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_listen_settings_from_file_and_flags(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        """
        [server]
        listen = ["127.0.0.1:25"]
        submission_listen = ["127.0.0.1:587", "[::1]:587"]
        submissions_listen = "127.0.0.1:465"

        [senders]
        alice = ["alice@example.com", "*@alice.example.com"]
        "app@example.com" = "<>"
        """,
    )
    options = build("--config", path)
    assert options.listen == (
        ListenAddress("127.0.0.1", 25),
        ListenAddress("127.0.0.1", 587, submission=True),
        ListenAddress("::1", 587, submission=True),
        ListenAddress("127.0.0.1", 465, implicit_tls=True, submission=True),
    )
    [senders] = [s for s in options.policy if s.name == "senders"]
    assert senders.source == f"{path} [senders]"
    # A flag replaces the file's list, as for listen.
    flagged = build("--config", path, "--submission-listen", "127.0.0.1:2587")
    assert ListenAddress("127.0.0.1", 2587, submission=True) in flagged.listen
    assert ListenAddress("127.0.0.1", 587, submission=True) not in flagged.listen
    # Only a submission listener: no default plain one.
    assert build("--submissions-listen", "127.0.0.1:465").listen == (
        ListenAddress("127.0.0.1", 465, implicit_tls=True, submission=True),
    )


def test_the_same_address_for_plain_and_submission_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:587 is already given \(in --listen\)"):
        build("--listen", "127.0.0.1:587", "--submission-listen", "127.0.0.1:587")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[senders]\nalice = "alice"\n',
            r"mailgate.toml \[senders\] alice: 'alice' is not a pattern",
        ),
        (
            "[senders]\nalice = [1]\n",
            r"mailgate.toml \[senders\] alice: expected a list of strings",
        ),
        ("[sender]\nalice = []\n", r"unknown table \[sender\] \(did you mean \[senders\]\?\)"),
        ("[[senders]]\nalice = []\n", r"senders must be one table"),
        (
            "[server]\nsubmision_listen = []\n",
            r"unknown key 'submision_listen' in \[server\] \(did you mean 'submission_listen'\?\)",
        ),
        ('[server]\nsubmission_listen = ["587"]\n', r"submission_listen: '587' is not HOST:PORT"),
    ],
)
def test_configuration_errors(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build("--config", config_file(tmp_path, text))


def test_submission_listeners_are_refused_in_honeypot_mode(tmp_path: Path) -> None:
    path = config_file(
        tmp_path, '[server]\nmode = "honeypot"\nsubmission_listen = ["127.0.0.1:587"]\n'
    )
    with pytest.raises(ConfigError, match="submission_listen: not for honeypot mode"):
        build_honeypot_options(build_parser().parse_args(["honeypot", "--config", path]))


# --- a real server: a plain listener and a submission listener ---------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_file))


def ports(srv: RunningServer) -> dict[str, int]:
    """The bound port of each kind of listener."""
    found: dict[str, int] = {}
    for address, (_, port) in srv.server.listening:
        kind = (
            ("submissions" if address.implicit_tls else "submission")
            if address.submission
            else "plain"
        )
        found[kind] = port
    return found


def submission_server(certs: Certs, **settings: object) -> RunningServer:
    return RunningServer(
        **{
            "listen": "127.0.0.1:0",
            "submission_listen": "127.0.0.1:0",
            "submissions_listen": "127.0.0.1:0",
            "local_domains": ["example.com"],
            "relay_networks": [],
            "auth_users": ["alice:wonderland", "bob:builder"],
            "tls_cert": certs.cert,
            "tls_key": certs.key,
            "senders": SENDERS,
            **settings,
        }
    )


def test_plain_and_submission_listeners(certs: Certs) -> None:
    seen: list[tuple[int, bool]] = []

    def configure(server: Server) -> None:
        @server.on_connect
        def note(s: Session) -> None:  # what a plugin learns at connect
            seen.append((s.local_port, s.submission))

    with submission_server(certs, configure=configure) as srv:
        port = ports(srv)
        # The plain listener behaves as before: mail for a local domain from anyone.
        with smtplib.SMTP("127.0.0.1", port["plain"], timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail("someone@remote.test")[0] == 250
            assert client.rcpt("user@example.com")[0] == 250
        # The submission listener: not even for a local domain without AUTH.
        with smtplib.SMTP("127.0.0.1", port["submission"], timeout=10) as client:
            client.ehlo("client.test")
            code, text = client.mail("someone@remote.test")
            assert (code, text) == (530, b"5.7.0 Authentication required")
            # AUTH over STARTTLS, then an owned sender and a foreign one.
            client.starttls(context=client_context(certs))
            client.ehlo("client.test")
            client.login("alice", "wonderland")
            code, text = client.mail("bob@example.com")
            assert code == 553
            assert (
                text == b"5.7.1 <bob@example.com>: Sender address rejected: not owned by user alice"
            )
            assert client.mail("alice@example.com")[0] == 250
            # Authenticated: may relay, like any authenticated client.
            assert client.rcpt("friend@elsewhere.test")[0] == 250
            assert client.data(MESSAGE)[0] == 250
        [message] = srv.messages.wait(1)
        assert message.envelope.sender == "alice@example.com"
        assert message.rcpt_tos == ["friend@elsewhere.test"]
        assert message.session.submission and message.session.user == "alice"
    assert (port["plain"], False) in seen and (port["submission"], True) in seen


def test_implicit_tls_submissions_listener(certs: Certs) -> None:
    with submission_server(certs) as srv:
        port = ports(srv)["submissions"]
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=client_context(certs), timeout=10
        ) as client:
            client.ehlo("client.test")
            assert client.mail("alice@example.com")[0] == 530
            client.login("alice", "wonderland")
            assert client.mail("x@elsewhere.test")[0] == 553
            refused = client.sendmail("news@alice.example.com", ["user@example.com"], MESSAGE)
            assert refused == {}
        [message] = srv.messages.wait(1)
        assert message.session.submission and message.session.tls is not None


def test_sender_map_callback_given_in_code(certs: Certs) -> None:
    asked: list[str] = []

    async def owned(user: str) -> list[str] | None:
        asked.append(user)
        return [f"{user}@example.org"] if user == "bob" else None

    with submission_server(certs, senders=None, sender_map=owned) as srv:
        port = ports(srv)["submissions"]
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=client_context(certs), timeout=10
        ) as client:
            client.login("bob", "builder")
            assert client.mail("alice@example.com")[0] == 553
            assert client.mail("bob@example.org")[0] == 250
    assert asked == ["bob", "bob"]


def test_senders_map_from_a_config_file_drives_the_server(tmp_path: Path, certs: Certs) -> None:
    path = config_file(
        tmp_path,
        f"""
        [server]
        listen = ["127.0.0.1:0"]
        submissions_listen = ["127.0.0.1:0"]
        auth_users = ["alice:wonderland"]
        tls_cert = "{certs.cert}"
        tls_key = "{certs.key}"
        sink = true

        [senders]
        alice = ["*@alice.example.com"]
        """,
    )
    options = build("--config", path, "--state-dir", str(tmp_path / "state"))

    def client(port: int) -> tuple[int, int]:
        context = client_context(certs)
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as client:
            client.login("alice", "wonderland")
            return client.mail("alice@example.com")[0], client.mail("me@alice.example.com")[0]

    async def main() -> tuple[int, int]:
        async with Server(options) as server:
            [port] = [bound[1] for address, bound in server.listening if address.submission]
            return await asyncio.to_thread(client, port)

    assert asyncio.run(main()) == (553, 250)


def test_a_submission_listener_without_auth_backend_warns(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mailgate.server"):
        with submission_server(certs, auth_users=[]) as srv:
            assert "submission" in srv.server.hooks.names()
    assert "every MAIL there will be refused with 530" in caplog.text


def test_no_submission_listener_no_plugin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailgate.policy"):
        with running_server(senders={"alice": ["alice@example.com"]}) as srv:
            assert "submission" not in srv.server.hooks.names()
    assert "no submission listener" in caplog.text


def test_lmtp_with_submission_listeners_does_not_start() -> None:
    with pytest.raises(Exception, match="submission listeners speak SMTP, not LMTP"):
        with running_server(lmtp=True, submission_listen="127.0.0.1:0"):
            pass


# --- the examples of docs/user-guide.md ----------------------------------------------------------

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def guide_example(language: str) -> str:
    section = GUIDE.read_text().split("## Submission (port 587/465)\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match is not None, f"no {language} example in the Submission section"
    return match.group(1)


def on_port_zero(options: ServerOptions, tmp_path: Path) -> ServerOptions:
    """The same server on free loopback ports, with its state in ``tmp_path``."""
    listen = tuple(dataclasses.replace(a, host="127.0.0.1", port=0) for a in options.listen)
    return dataclasses.replace(options, listen=listen, state_dir=tmp_path / "state")


def serve(server: Server, client: Callable[[dict[str, int]], T]) -> T:
    """Run ``server`` and ``client(ports by kind)`` in a thread beside it."""

    async def main() -> T:
        async with server:
            found: dict[str, int] = {}
            for address, (_, port) in server.listening:
                kind = "plain"
                if address.submission:
                    kind = "submissions" if address.implicit_tls else "submission"
                found[kind] = port
            return await asyncio.to_thread(client, found)

    return asyncio.run(main())


def test_the_guide_toml_example(tmp_path: Path, certs: Certs) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{PasswordHasher().hash('wonderland')}\n")
    text = guide_example("toml").replace("/etc/mailgate/users", str(users))
    options = build("--config", config_file(tmp_path, text), "--sink")
    assert [(a.port, a.implicit_tls, a.submission) for a in options.listen] == [
        (25, False, False),
        (587, False, True),
        (465, True, True),
    ]
    # In the chain after the lists (none here) and before relay control.
    assert [plugin.name for plugin in policy_plugins(options)][:2] == ["submission", "relay"]
    options = dataclasses.replace(
        on_port_zero(options, tmp_path), tls_cert=certs.cert, tls_key=certs.key
    )

    def client(port: dict[str, int]) -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", port["plain"], timeout=10) as mx:
            mx.ehlo("client.test")
            codes.append(mx.mail("x@remote.test")[0])  # port 25: no AUTH asked
        with smtplib.SMTP("127.0.0.1", port["submission"], timeout=10) as submit:
            submit.starttls(context=client_context(certs))
            submit.ehlo("client.test")
            codes.append(submit.mail("alice@example.com")[0])
            submit.login("alice", "wonderland")
            codes.append(submit.mail("bob@example.com")[0])
            codes.append(submit.mail("news@alice.example.com")[0])
        return codes

    assert serve(Server(options), client) == [250, 530, 553, 250]


def test_the_guide_python_example(tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(guide_example("python"), f"{GUIDE} (Submission)", "exec"), namespace)
    example: Server = namespace["server"]
    assert example.options.listen == (ListenAddress("127.0.0.1", 5870, submission=True),)
    server = Server(on_port_zero(example.options, tmp_path))

    def client(port: dict[str, int]) -> list[int]:
        context = ssl.create_default_context(cafile=str(tmp_path / "state" / DEV_CERT_NAME))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", port["submission"], timeout=10) as submit:
            submit.starttls(context=context)
            submit.login("shop", "s3cret")
            codes = [submit.mail("alice@example.com")[0]]
            codes.append(submit.mail("")[0])  # MAIL FROM:<>, listed for this user
            submit.rset()
            codes.append(submit.mail("orders@shop.example")[0])
        return codes

    assert serve(server, client) == [553, 250, 250]


def test_sender_map_is_given_to_server_beside_settings_or_options(tmp_path: Path) -> None:
    def lookup(user: str) -> list[str]:
        return [f"{user}@example.com"]

    from_settings = Server(submission_listen="127.0.0.1:0", sender_map=lookup)
    assert from_settings.options.sender_map is lookup
    from_options = Server(on_port_zero(from_settings.options, tmp_path), sender_map=lookup)
    assert from_options.options.sender_map is lookup
    with pytest.raises(TypeError, match="sender_map must be a callable"):
        Server(sender_map={"alice": ["alice@example.com"]})  # type: ignore[arg-type]
