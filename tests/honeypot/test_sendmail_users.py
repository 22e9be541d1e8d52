"""VRFY and EXPN answered from the persona's users, full names and aliases (Sendmail's
password file and /etc/aliases), the aliases as recipients, the sender domain check on
address literals, and the profile keys that carry them (full_names, aliases,
vrfy_answers_users, literal_senders_refused, help_topics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.config import ConfigError
from mailgate.honeypot.personas import (
    PERSONAS,
    ProfileError,
    dump_profile,
    load_profile,
)
from mailgate.honeypot.recipients import RecipientPolicy
from mailgate.hooks import Address, Session
from mailgate.protocol import Reply

from .test_attacker import running_honeypot
from .test_behaviour import Client
from .test_cli import build


def session() -> Session:
    return Session(
        id="s1", peer_host="192.0.2.9", peer_port=1000, local_host="127.0.0.1", local_port=25
    )


def user_line(_: Session, user: str, full_name: str) -> Reply:
    return Reply(250, "2.1.5", (f"{full_name} <{user}@host>".lstrip(),))


def unknown(_: Session, address: str) -> Reply:
    return Reply(550, "5.1.1", (f"{address}... User unknown",))


def policy(**kwargs: object) -> RecipientPolicy:
    return RecipientPolicy.build(
        domains=("example.com",),
        users=("root", "alice", "bob"),
        relay="refuse",
        unknown_user=lambda s, a: Reply(550, "5.1.1", (f"<{a}>... User unknown",)),
        relay_denied=lambda s, a: Reply(550, "5.7.1", (f"<{a}>... Relaying denied",)),
        **kwargs,  # type: ignore[arg-type]
    )


def answer(p: RecipientPolicy, argument: str, expand: bool = False) -> Reply | None:
    return p.answer_verify(session(), argument, expand, user_line=user_line, unknown=unknown)


def test_verify_answers_from_the_users_and_their_full_names() -> None:
    p = policy(full_names={"root": "Charlie Root"})
    assert answer(p, "root") == Reply(250, "2.1.5", ("Charlie Root <root@host>",))
    assert answer(p, "<alice@example.com>") == Reply(250, "2.1.5", ("<alice@host>",))
    assert answer(p, "ALICE") == Reply(250, "2.1.5", ("<alice@host>",))
    assert answer(p, "alice+tag@example.com") == Reply(250, "2.1.5", ("<alice@host>",))
    assert answer(p, "nosuchuser") == Reply(550, "5.1.1", ("nosuchuser... User unknown",))
    assert answer(p, "<nobody@example.com>") == Reply(
        550, "5.1.1", ("<nobody@example.com>... User unknown",)
    )
    # The argument is echoed as every echo is: printable ASCII, bounded.
    assert answer(p, "j\u00f6rg") == Reply(550, "5.1.1", ("j?rg... User unknown",))
    long = answer(p, "x" * 1000)
    assert long is not None and len(long.lines[0]) < 450
    # Not a local name: the persona's usual answer.
    assert answer(p, "x@elsewhere.example") is None
    assert answer(p, "two words") is None


def test_aliases_are_verified_as_themselves_and_expanded_by_expn() -> None:
    p = policy(
        full_names={"root": "root"},
        aliases={
            "postmaster": ["root"],
            "staff": ["alice", "bob", "postmaster", "ext@partner.example", "ghost"],
            "loop": ["loop2"],
            "loop2": ["loop", "alice"],
            "empty": ["ghost"],
        },
    )
    assert answer(p, "postmaster") == Reply(250, "2.1.5", ("<postmaster@host>",))
    assert answer(p, "postmaster", expand=True) == Reply(250, "2.1.5", ("root <root@host>",))
    assert answer(p, "staff", expand=True) == Reply(
        250,
        "2.1.5",
        ("<alice@host>", "<bob@host>", "root <root@host>", "<ext@partner.example@host>"),
    )
    # A loop ends; a target that is no user is left out; nothing left is unknown.
    assert answer(p, "loop", expand=True) == Reply(250, "2.1.5", ("<alice@host>",))
    assert answer(p, "empty", expand=True) == Reply(550, "5.1.1", ("empty... User unknown",))
    # An alias is a recipient.
    assert p.judge(session(), Address("staff@example.com")) is None
    assert p.judge(session(), Address("nobody@example.com")) is not None


def test_expansion_is_bounded() -> None:
    many = {f"a{i}": [f"a{i + 1}", "alice"] for i in range(50)}
    wide = {"wide": [f"u{i}@x.example" for i in range(500)]}
    p = policy(aliases={**many, **wide})
    got = answer(p, "a0", expand=True)
    assert got is not None and got.lines == ("<alice@host>",)
    got = answer(p, "wide", expand=True)
    assert got is not None and len(got.lines) == 100


def sender_unknown(_: Session, address: str, sender: str) -> Reply:
    return Reply(
        553, "5.1.8", (f"<{address}>... Domain of sender address {sender} does not exist",)
    )


def test_literal_senders_refused_after_the_user_lookup() -> None:
    p = policy(literal_senders_refused=True, sender_domain_unknown=sender_unknown)
    literal = Address("attacker@[203.0.113.5]")
    refusal = p.judge(session(), Address("alice@example.com"), literal)
    assert refusal is not None and refusal.code == 553
    assert refusal.lines == (
        "<alice@example.com>... Domain of sender address attacker@[203.0.113.5] does not exist",
    )
    unknown_user = p.judge(session(), Address("nobody@example.com"), literal)
    assert unknown_user is not None and unknown_user.code == 550  # the user lookup first
    relay = p.judge(session(), Address("victim@example.org"), literal)
    assert relay is not None and relay.code == 553
    assert p.judge(session(), Address("alice@example.com"), Address("a@b.example")) is None
    assert p.judge(session(), Address("alice@example.com"), None) is None
    # Off by default.
    assert policy().judge(session(), Address("alice@example.com"), literal) is None
    with pytest.raises(ValueError, match="sender_domain_unknown"):
        policy(literal_senders_refused=True)


def test_sendmail_persona_data() -> None:
    profile = PERSONAS["sendmail"]
    assert profile.vrfy_answers_users and profile.literal_senders_refused
    assert profile.full_names["smmta"] == "Mail Transfer Agent"
    assert "postmaster" not in profile.local_users and not profile.aliases
    assert profile.persona.help_topic("MAIL") is not None
    assert profile.persona.help_topic("xyzzy") is None
    # Other personas keep their behaviour.
    for name in ("postfix", "exim", "exchange", "generic"):
        other = PERSONAS[name]
        assert not other.vrfy_answers_users and not other.literal_senders_refused
        assert not other.persona.help_topics


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_profile_tables_add_to_the_base_and_survive_a_dump(tmp_path: Path) -> None:
    profile = load_profile(
        write(
            tmp_path,
            'base = "sendmail"\n'
            "[full_names]\n"
            'alice = "Alice Liddell"\n'
            "[aliases]\n"
            'postmaster = ["root"]\n'
            'abuse = ["postmaster", "soc@partner.example"]\n'
            "[help_topics]\n"
            'xyzzy = ["Nothing happens."]\n',
        )
    )
    assert profile.full_names["alice"] == "Alice Liddell"
    assert profile.full_names["root"] == "root"  # the base's stay
    assert profile.aliases["abuse"] == ("postmaster", "soc@partner.example")
    assert profile.persona.help_topic("xyzzy") == ("Nothing happens.",)
    assert profile.persona.help_topic("mail") is not None
    again = load_profile(write(tmp_path, dump_profile(profile)))
    assert again.full_names == profile.full_names
    assert again.aliases == profile.aliases
    assert dict(again.persona.help_topics) == dict(profile.persona.help_topics)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[full_names]\nalice = "Alice, Room 4"\n', "full_names.alice"),
        ('[full_names]\n"a b" = "Alice"\n', "full_names.a b"),
        ("[aliases]\npostmaster = []\n", "aliases.postmaster"),
        ('[aliases]\npostmaster = ["a b"]\n', "aliases.postmaster"),
        ('[help_topics]\nMail = ["x"]\n', "help_topics"),
        ('[help_topics]\ndsn = ["RET={ FULL }"]\n', "help_topics"),
        ("full_names = 3\n", "full_names"),
        ("vrfy_answers_users = 1\n", "vrfy_answers_users"),
        ('[replies]\nvrfy_user = "550 5.1.1 no"\n', "replies.vrfy_user"),
        ('[replies]\nvrfy_unknown_user = "550 5.1.1 {adress}"\n', "replies.vrfy_unknown_user"),
        ('[behaviour]\nallowed_before_hello = ["RCPT"]\n', "behaviour.allowed_before_hello"),
        ('[behaviour]\nlong_lines = "hangup"\n', "behaviour.long_lines"),
    ],
)
def test_profile_mistakes_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile(write(tmp_path, 'base = "sendmail"\n' + text))
    assert caught.value.key == key, caught.value


def test_sendmail_answers_vrfy_and_expn_like_debian(tmp_path: Path) -> None:
    with running_honeypot(
        tmp_path, "sendmail", local_users=(*PERSONAS["sendmail"].local_users, "alice")
    ) as hp:
        host = hp.server.options.hostname
        client = Client(hp)
        client.cmd("EHLO client.example")
        assert client.cmd("VRFY root") == f"250 2.1.5 root <root@{host}>"
        assert client.cmd("VRFY alice") == f"250 2.1.5 <alice@{host}>"
        assert client.cmd("VRFY <smmta@example.com>") == (
            f"250 2.1.5 Mail Transfer Agent <smmta@{host}>"
        )
        assert client.cmd("VRFY nosuchuser") == "550 5.1.1 nosuchuser... User unknown"
        assert client.cmd("EXPN postmaster") == "550 5.1.1 postmaster... User unknown"
        assert client.cmd("EXPN root") == f"250 2.1.5 root <root@{host}>"
        assert client.cmd("MAIL FROM:<attacker@[203.0.113.5]>").startswith("250")
        assert client.cmd("RCPT TO:<alice@example.com>") == (
            "553 5.1.8 <alice@example.com>... Domain of sender address "
            "attacker@[203.0.113.5] does not exist"
        )
        assert client.cmd("RCPT TO:<postmaster@example.com>") == (
            "550 5.1.1 <postmaster@example.com>... User unknown"
        )
        client.close()


def test_settings_add_full_names_and_aliases(tmp_path: Path) -> None:
    _, hp = build(
        "--data-dir",
        str(tmp_path),
        "--persona",
        "sendmail",
        "--full-names",
        "alice: Alice Liddell",
        "--aliases",
        "postmaster: root",
        "--aliases",
        "staff: alice, bob@partner.example",
    )
    assert hp.full_names == (("alice", "Alice Liddell"),)
    assert hp.aliases == (("postmaster", ("root",)), ("staff", ("alice", "bob@partner.example")))
    for flag, value, problem in (
        ("--full-names", "alice", "USER: Full Name"),
        ("--full-names", "alice: Liddell, Alice", "full name"),
        ("--aliases", "staff:", "ALIAS: TARGET"),
        ("--aliases", "staff: a b", "not a user name or an address"),
    ):
        with pytest.raises(ConfigError, match=problem):
            build("--data-dir", str(tmp_path), flag, value)
    with running_honeypot(
        tmp_path,
        "sendmail",
        local_users=("root", "alice"),
        full_names=hp.full_names,
        aliases=hp.aliases,
    ) as server:
        host = server.server.options.hostname
        client = Client(server)
        client.cmd("EHLO client.example")
        assert client.cmd("VRFY alice") == f"250 2.1.5 Alice Liddell <alice@{host}>"
        assert client.cmd("VRFY root") == f"250 2.1.5 root <root@{host}>"  # the persona's
        assert client.cmd("EXPN postmaster") == f"250 2.1.5 root <root@{host}>"
        client.sock.sendall(b"EXPN staff\r\n")
        assert client.reply() == [
            f"250-2.1.5 Alice Liddell <alice@{host}>",
            "250 2.1.5 <bob@partner.example>",
        ]
        client.cmd("MAIL FROM:<a@b.example>")
        assert client.cmd("RCPT TO:<postmaster@example.com>").startswith("250")
        client.close()
