"""Block and allow lists: matching, list files and their reload, the stages as a session
meets them, configuration errors, and real clients against a running server."""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import random
import re
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailgate import Server
from mailgate.cli import build_parser
from mailgate.config import build_options, options_from_settings
from mailgate.hooks import Address, Envelope, Reject, Session
from mailgate.plugins.lists import (
    AddressList,
    HeloList,
    Lists,
    NetworkList,
    _glob_regex,
    parse_address_entry,
    plugins_from_options,
)
from mailgate.plugins.policy import (
    ALLOWLISTED,
    DECISIONS,
    PolicyConfigError,
    PolicyEnv,
    allowlisted,
    mark_allowlisted,
)
from mailgate.server.errors import StartupError
from mailgate.server.options import PolicySection
from mailgate.testing import async_running_server, running_server

# --- matching ----------------------------------------------------------------------------------


def test_networks_ipv4_ipv6_and_mapped_peers() -> None:
    networks = NetworkList(["192.0.2.0/24", "198.51.100.7", "2001:db8::/32", "10.0.0.0/8"])
    assert networks.match("192.0.2.200") == ipaddress.ip_network("192.0.2.0/24")
    assert networks.match("198.51.100.7") == ipaddress.ip_network("198.51.100.7/32")
    assert networks.match("198.51.100.8") is None
    assert networks.match("2001:db8:ffff::1") == ipaddress.ip_network("2001:db8::/32")
    assert networks.match("2001:db9::1") is None
    # An IPv4 client seen on a dual-stack socket matches the IPv4 entries.
    assert networks.match("::ffff:192.0.2.1") == ipaddress.ip_network("192.0.2.0/24")
    assert networks.match("::ffff:203.0.113.1") is None
    assert networks.match("9.255.255.255") is None
    assert networks.match("11.0.0.0") is None
    assert networks.match("not an address") is None
    assert networks.match("") is None


def test_networks_are_merged_and_mapped_entries_are_ipv4() -> None:
    networks = NetworkList(
        [
            "10.0.0.0/8",
            "10.20.0.0/16",  # inside the /8
            "192.0.2.0/25",
            "192.0.2.128/25",  # with the one before: 192.0.2.0/24
            "::ffff:203.0.113.0/120",  # an IPv4-mapped network is the IPv4 one
            ipaddress.ip_network("2001:db8::/48"),
        ]
    )
    assert [str(n) for n in networks.networks] == [
        "10.0.0.0/8",
        "192.0.2.0/24",
        "203.0.113.0/24",
        "2001:db8::/48",
    ]
    assert networks.match("203.0.113.9") == ipaddress.ip_network("203.0.113.0/24")
    assert networks.match("::ffff:203.0.113.9") == ipaddress.ip_network("203.0.113.0/24")


def test_a_long_network_list_matches_by_bisection() -> None:
    # 65536 separate /32s (every other address of 10.0.0.0/15): a bisection finds each.
    networks = NetworkList(ipaddress.IPv4Network((0x0A000000 + 2 * i, 32)) for i in range(65536))
    assert len(networks) == 65536
    assert networks.match("10.0.0.0") is not None
    assert networks.match("10.0.0.1") is None
    assert networks.match("10.1.255.254") is not None
    assert networks.match("10.1.255.255") is None
    assert networks.match("10.2.0.0") is None


@pytest.mark.parametrize(
    ("entry", "matches", "does_not_match"),
    [
        (
            "user@example.com",
            ["user@example.com", "USER@Example.COM", '"user"@example.com'],
            ["user@sub.example.com", "other@example.com", "user@example.org"],
        ),
        (
            "example.com",
            ["a@example.com", "B@EXAMPLE.COM", "x@example.com."],
            ["a@sub.example.com", "a@badexample.com"],
        ),
        ("@example.com", ["a@example.com"], ["a@sub.example.com"]),
        (
            "*.example.com",
            ["a@sub.example.com", "a@a.b.example.com"],
            ["a@example.com", "a@badexample.com"],
        ),
        (".example.com", ["a@sub.example.com"], ["a@example.com"]),
        ("@*.example.com", ["a@sub.example.com"], ["a@example.com"]),
        ("noreply@", ["noreply@example.com", "NoReply@other.org"], ["reply@example.com"]),
        ("<spam@example.com>", ["spam@example.com"], ["ham@example.com"]),
        ("bücher.example", ["a@xn--bcher-kva.example", "a@BÜCHER.example"], ["a@bucher.example"]),
        ("[192.0.2.1]", ["a@[192.0.2.1]"], ["a@[192.0.2.2]"]),
    ],
)
def test_address_entries(entry: str, matches: list[str], does_not_match: list[str]) -> None:
    addresses = AddressList([entry])
    for address in matches:
        assert addresses.match(Address(address)) is not None, address
    for address in does_not_match:
        assert addresses.match(Address(address)) is None, address


def test_the_match_names_the_entry() -> None:
    addresses = AddressList(["a@example.com", "example.org", "*.example.net", "abuse@", "<>"])
    assert addresses.match("A@Example.com") == "a@example.com"
    assert addresses.match("x@example.org") == "example.org"
    assert addresses.match("x@deep.sub.example.net") == "*.example.net"
    assert addresses.match("abuse@anywhere.test") == "abuse@"
    assert addresses.match("") == "<>"
    assert len(addresses) == 5


def test_the_null_sender_matches_only_an_explicit_entry() -> None:
    assert AddressList(["example.com", "*.example.com", "postmaster@"]).match("") is None
    assert AddressList(["<>"]).match("") == "<>"
    assert AddressList(["<>"]).match("someone@example.com") is None
    with pytest.raises(ValueError, match="only makes sense in a sender list"):
        AddressList(["<>"], null=False)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("", "empty entry"),
        ("a b@example.com", "cannot contain spaces"),
        ("*@example.com", "wildcards are only for domains"),
        ("user@*.example.com", "only for whole domains"),
        ("exa*mple.com", r"'\*' may only start a domain"),
        ("example..com", "is not an address or domain"),
        ("@", "is not an address or domain"),
    ],
)
def test_bad_address_entries(entry: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_address_entry(entry)


@pytest.mark.parametrize(
    ("pattern", "matches", "does_not_match"),
    [
        (
            "localhost",
            ["localhost", "LOCALHOST", "localhost."],
            ["localhost.example", "xlocalhost"],
        ),
        (
            "*.dynamic.*",
            ["1-2-3-4.dynamic.isp.example", "a.DYNAMIC.b"],
            ["dynamic.isp.example", "static.isp.example"],
        ),
        ("*.example.com", ["mx.example.com", "a.b.example.com"], ["example.com"]),
        ("host-??.example", ["host-12.example"], ["host-1.example", "host-123.example"]),
        ("[192.0.2.1]", ["[192.0.2.1]"], ["1", "[192.0.2.2]"]),  # brackets are literal
        ("dsl*", ["dsl-pool-7.example", "dsl"], ["adsl.example"]),
    ],
)
def test_helo_patterns(pattern: str, matches: list[str], does_not_match: list[str]) -> None:
    helo = HeloList([pattern])
    for name in matches:
        assert helo.match(name) is not None, name
    for name in does_not_match:
        assert helo.match(name) is None, name


def test_helo_match_names_the_pattern() -> None:
    helo = HeloList(["localhost", "*.dynamic.*", "*.dsl.*", "unknown"])
    assert helo.match("a.dsl.example") == "*.dsl.*"
    assert helo.match("a.dynamic.example") == "*.dynamic.*"
    assert helo.match("Unknown") == "unknown"
    assert helo.match("mx.example.com") is None


def test_bad_helo_patterns() -> None:
    with pytest.raises(ValueError, match="would match every name"):
        HeloList(["*"])
    with pytest.raises(ValueError, match="empty entry"):
        HeloList([" "])


def test_globs_match_like_fnmatch_without_backtracking() -> None:
    rng = random.Random(5)
    for _ in range(5000):
        pattern = "".join(rng.choice("ab*?.") for _ in range(rng.randint(1, 7)))
        name = "".join(rng.choice("ab.") for _ in range(rng.randint(0, 9)))
        expected = fnmatch.fnmatchcase(name, pattern)
        assert bool(re.fullmatch(_glob_regex(pattern), name)) == expected, (pattern, name)
    # A pattern that makes a backtracking matcher take exponential time on a long name.
    helo = HeloList(["*a*a*a*a*a*a*a*a*b"])
    started = time.perf_counter()
    assert helo.match("a" * 500) is None
    assert time.perf_counter() - started < 0.5


# --- list files --------------------------------------------------------------------------------


def test_list_files_with_comments(tmp_path: Path) -> None:
    networks = tmp_path / "block.txt"
    networks.write_bytes(
        "\ufeff# blocked networks\r\n"
        "\n"
        "192.0.2.0/24   # a comment after the entry\r\n"
        "  2001:db8::/32\n"
        "198.51.100.0/24 ; SBL12345 (Spamhaus DROP format)\n"
        "; a whole line in DROP format\n".encode()
    )
    senders = tmp_path / "senders.txt"
    senders.write_text("# spammers\nuser#tag@example.com\nspam.example # whole domain\n")
    plugin = Lists(block_networks_file=networks, block_senders_file=str(senders))
    assert [str(n) for n in plugin.block_networks.networks] == [
        "192.0.2.0/24",
        "198.51.100.0/24",
        "2001:db8::/32",
    ]
    # "#" inside an entry is part of it (a valid address character).
    assert plugin.block_senders.match("user#tag@example.com") == "user#tag@example.com"
    assert plugin.block_senders.match("x@spam.example") == "spam.example"


def test_inline_entries_and_a_file_make_one_list(tmp_path: Path) -> None:
    path = tmp_path / "helo.txt"
    path.write_text("*.dynamic.*\n")
    plugin = Lists(block_helo=["localhost"], block_helo_file=path)
    assert plugin.block_helo.match("localhost") == "localhost"
    assert plugin.block_helo.match("a.dynamic.b") == "*.dynamic.*"


@pytest.mark.parametrize(
    ("key", "content", "problem"),
    [
        ("block_networks_file", "192.0.2.0/24\n\n300.1.2.3\n", "'300.1.2.3' is not an IP"),
        ("allow_networks_file", "# ok\n192.0.2.1 REJECT\n", "expected one entry per line"),
        ("block_senders_file", "ok@example.com\n*@example.com\n", "wildcards are only"),
        ("block_recipients_file", "a@example.com\n<>\n", "only makes sense in a sender"),
        ("block_helo_file", "ok\n*\n", "would match every name"),
    ],
)
def test_a_bad_line_names_the_file_and_line(
    tmp_path: Path, key: str, content: str, problem: str
) -> None:
    path = tmp_path / "list.txt"
    path.write_text(content)
    bad_line = content.count("\n")
    with pytest.raises(PolicyConfigError) as caught:
        Lists(**{key: path})
    message = str(caught.value)
    assert message.startswith(f"{key}: {path}:{bad_line}: ")
    assert re.search(problem, message)


def test_a_missing_or_binary_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match=r"block_networks_file: cannot read .*missing"):
        Lists(block_networks_file=tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"192.0.2.1\n\xff\xfe\n")
    with pytest.raises(PolicyConfigError, match=r"not UTF-8 text \(byte 10\)"):
        Lists(block_senders_file=binary)


def test_reload_reads_changed_files(tmp_path: Path) -> None:
    networks = tmp_path / "block.txt"
    networks.write_text("192.0.2.0/24\n")
    plugin = Lists(block_networks=["203.0.113.0/24"], block_networks_file=networks)
    assert plugin.block_networks.match("198.51.100.1") is None
    networks.write_text("198.51.100.0/24\n")
    plugin.reload()
    assert plugin.block_networks.match("198.51.100.1") is not None
    assert plugin.block_networks.match("192.0.2.1") is None  # gone from the file
    assert plugin.block_networks.match("203.0.113.1") is not None  # inline entries stay


def test_reload_keeps_the_old_list_of_a_broken_file(tmp_path: Path) -> None:
    networks = tmp_path / "block.txt"
    networks.write_text("192.0.2.0/24\n")
    senders = tmp_path / "senders.txt"
    senders.write_text("old.example\n")
    plugin = Lists(block_networks_file=networks, block_senders_file=senders)

    networks.write_text("198.51.100.0/24\nnonsense\n")
    senders.write_text("new.example\n")
    with pytest.raises(PolicyConfigError) as caught:
        plugin.reload()
    assert f"{networks}:2: 'nonsense' is not an IP address" in str(caught.value)
    assert "keeping the list loaded before" in str(caught.value)
    assert plugin.block_networks.match("192.0.2.1") is not None  # the old list
    assert plugin.block_networks.match("198.51.100.1") is None
    assert plugin.block_senders.match("a@new.example") == "new.example"  # reloaded anyway

    networks.unlink()
    with pytest.raises(PolicyConfigError, match="cannot read"):
        plugin.reload()
    assert plugin.block_networks.match("192.0.2.1") is not None


# --- the stages, without sockets ---------------------------------------------------------------


def session(ip: str = "192.0.2.1") -> Session:
    return Session(id="t", peer_host=ip, peer_port=1, local_host="127.0.0.1", local_port=25)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def refusal(call: Callable[[], Any]) -> Reject:
    with pytest.raises(Reject) as caught:
        run(call())
    return caught.value


def test_a_blocked_client_gets_the_banner_refusal() -> None:
    plugin = Lists(block_networks=["192.0.2.0/24"])
    before = DECISIONS[("lists", "reject")]
    s = session("192.0.2.9")
    reject = refusal(lambda: plugin.on_connect(s))
    assert reject.code == 554
    assert reject.disconnect
    assert reject.text == "Client host [192.0.2.9] rejected: Access denied"
    assert DECISIONS[("lists", "reject")] == before + 1
    assert run(plugin.on_connect(session("198.51.100.1"))) is None


def test_an_allowed_client_is_allow_listed_and_allow_beats_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = Lists(block_networks=["192.0.2.0/24"], allow_networks=["192.0.2.8/29"])
    s = session("192.0.2.9")
    with caplog.at_level(logging.INFO, logger="mailgate.policy"):
        assert run(plugin.on_connect(s)) is None
    assert allowlisted(s) == "allow_networks 192.0.2.8/29"
    [record] = [r for r in caplog.records if getattr(r, "policy", None) == "lists"]
    assert record.getMessage() == (
        "session t: policy lists: accept (client 192.0.2.9 in allow_networks 192.0.2.8/29 "
        "(also in block_networks 192.0.2.0/24))"
    )
    assert record.__dict__["verdict"] == "accept"
    assert record.__dict__["entry"] == "192.0.2.8/29"


def test_helo_block_and_the_allow_listed_client() -> None:
    plugin = Lists(block_helo=["*.dynamic.*"], allow_networks=["198.51.100.0/24"])
    s = session()
    run(plugin.on_connect(s))
    reject = refusal(lambda: plugin.on_helo(s, "1-2-3-4.dynamic.example"))
    assert (reject.code, reject.enhanced, reject.disconnect) == (550, "5.7.1", False)
    assert reject.text == "<1-2-3-4.dynamic.example>: Helo command rejected: Access denied"
    assert run(plugin.on_helo(s, "mx.example.com")) is None  # a second try is fine

    trusted = session("198.51.100.5")
    run(plugin.on_connect(trusted))
    skipped = DECISIONS[("lists", "skip")]
    assert run(plugin.on_helo(trusted, "1-2-3-4.dynamic.example")) is None
    assert DECISIONS[("lists", "skip")] == skipped + 1


def test_sender_lists() -> None:
    plugin = Lists(block_senders=["spam.example", "<>"], allow_senders=["boss@spam.example"])
    s = session()
    run(plugin.on_connect(s))
    reject = refusal(lambda: plugin.on_mail(s, Envelope(), Address("x@Spam.Example")))
    assert (reject.code, reject.enhanced) == (550, "5.7.1")
    assert reject.text == "<x@Spam.Example>: Sender address rejected: Access denied"
    reject = refusal(lambda: plugin.on_mail(s, Envelope(), Address("")))
    assert reject.text == "<>: Sender address rejected: Access denied"
    # allow beats block: the allow-listed sender passes, and so skips later checks
    assert run(plugin.on_mail(s, Envelope(), Address("boss@spam.example"))) is None
    assert allowlisted(s) == "allow_senders boss@spam.example"


def test_an_allowed_sender_allow_lists_only_its_transaction() -> None:
    plugin = Lists(allow_senders=["friend.example"])
    s = session()
    run(plugin.on_connect(s))
    run(plugin.on_mail(s, Envelope(), Address("a@friend.example")))
    assert allowlisted(s) == "allow_senders friend.example"
    run(plugin.on_mail(s, Envelope(), Address("a@stranger.example")))  # the next MAIL
    assert allowlisted(s) is None
    run(plugin.on_mail(s, Envelope(), Address("a@friend.example")))
    run(plugin.on_reset(s, Envelope(Address("a@friend.example"))))  # RSET
    assert allowlisted(s) is None
    run(plugin.on_mail(s, Envelope(), Address("a@friend.example")))
    run(plugin.on_helo(s, "mx.example"))  # EHLO again
    assert allowlisted(s) is None


def test_the_client_allow_mark_outlives_sender_marks() -> None:
    plugin = Lists(allow_networks=["192.0.2.0/24"], allow_senders=["friend.example"])
    s = session()
    run(plugin.on_connect(s))
    run(plugin.on_mail(s, Envelope(), Address("a@friend.example")))
    assert allowlisted(s) == "allow_networks 192.0.2.0/24"
    run(plugin.on_reset(s, Envelope()))
    assert allowlisted(s) == "allow_networks 192.0.2.0/24"


def test_another_plugins_mark_is_left_alone() -> None:
    plugin = Lists(allow_senders=["friend.example"])
    s = session()
    run(plugin.on_connect(s))
    mark_allowlisted(s, "the application's own")
    run(plugin.on_mail(s, Envelope(), Address("a@friend.example")))
    run(plugin.on_reset(s, Envelope()))
    assert allowlisted(s) == "the application's own"


def test_an_allow_listed_client_skips_sender_blocks_but_not_recipient_blocks() -> None:
    plugin = Lists(
        allow_networks=["192.0.2.0/24"],
        block_senders=["spam.example"],
        block_recipients=["retired@example.com", "*.old.example"],
    )
    s = session()
    run(plugin.on_connect(s))
    assert run(plugin.on_mail(s, Envelope(), Address("x@spam.example"))) is None
    reject = refusal(lambda: plugin.on_rcpt(s, Envelope(), Address("Retired@example.com")))
    assert (reject.code, reject.enhanced) == (550, "5.7.1")
    assert reject.text == "<Retired@example.com>: Recipient address rejected: Access denied"
    refusal(lambda: plugin.on_rcpt(s, Envelope(), Address("a@mail.old.example")))
    assert run(plugin.on_rcpt(s, Envelope(), Address("a@old.example"))) is None


def test_a_client_changed_by_xclient_is_checked_again() -> None:
    plugin = Lists(allow_networks=["192.0.2.10"], block_networks=["203.0.113.0/24"])
    s = session("192.0.2.10")  # the trusted front end
    run(plugin.on_connect(s))
    assert allowlisted(s) == "allow_networks 192.0.2.10/32"
    s.peer_host = "198.51.100.1"  # XCLIENT ADDR=...: a client it forwards
    run(plugin.on_helo(s, "client.example"))
    assert allowlisted(s) is None  # the front end's mark does not pass on
    s.peer_host = "203.0.113.5"
    reject = refusal(lambda: plugin.on_mail(s, Envelope(), Address("a@b.example")))
    assert (reject.code, reject.disconnect) == (554, True)


def test_empty_lists_decide_nothing() -> None:
    plugin = Lists()
    s = session()
    assert plugin.summary() == "no entries"
    run(plugin.on_connect(s))
    assert run(plugin.on_helo(s, "localhost")) is None
    assert run(plugin.on_mail(s, Envelope(), Address(""))) is None
    assert run(plugin.on_rcpt(s, Envelope(), Address("a@example.com"))) is None
    assert ALLOWLISTED not in s.notes


# --- configuration -----------------------------------------------------------------------------


def section(values: dict[str, Any], base: Path | None = None) -> PolicySection:
    return PolicySection("lists", values, base, "mailgate.toml [lists]")


def test_from_section_reads_every_key(tmp_path: Path) -> None:
    (tmp_path / "nets.txt").write_text("198.51.100.0/24\n")
    (tmp_path / "rcpts.txt").write_text("gone@example.com\n")
    plugin = Lists.from_section(
        section(
            {
                "block_networks": ["192.0.2.0/24, 203.0.113.0/24"],
                "allow_networks": "192.0.2.1",
                "allow_networks_file": "nets.txt",  # relative to the config file
                "block_senders": ["spam.example"],
                "allow_senders": ["friend.example"],
                "block_recipients_file": "rcpts.txt",
                "block_helo": ["localhost"],
            },
            base=tmp_path,
        )
    )
    assert len(plugin.block_networks) == 2
    assert plugin.allow_networks.match("198.51.100.9") is not None
    assert plugin.allow_networks.match("192.0.2.1") is not None
    assert plugin.block_recipients.match("gone@example.com") is not None
    assert plugin.summary() == (
        "block_networks 2, allow_networks 2, block_senders 1, allow_senders 1, "
        "block_recipients 1, block_helo 1"
    )


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (
            {"block_network": ["192.0.2.0/24"]},
            r"unknown key 'block_network' \(did you mean 'block_networks'\?\)",
        ),
        ({"block_networks": ["192.0.2.300"]}, "block_networks: '192.0.2.300' is not an IP network"),
        ({"block_senders": ["*@x.example"]}, "block_senders: '\\*@x.example': wildcards are only"),
        ({"block_recipients": ["<>"]}, "block_recipients: '<>' \\(the null sender\\)"),
        ({"block_helo": 3}, "block_helo: expected a list of strings"),
        ({"block_helo_file": "missing.txt"}, "block_helo_file: cannot read .*missing.txt"),
    ],
)
def test_configuration_errors_name_the_table_and_key(
    tmp_path: Path, values: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PolicyConfigError, match=f"^mailgate.toml \\[lists\\]:? {problem}"):
        Lists.from_section(section(values, base=tmp_path))


def test_constructed_in_code() -> None:
    plugin = Lists(
        block_networks=[ipaddress.ip_network("192.0.2.0/24"), "2001:db8::/32"],
        block_senders="one.example",  # a single string is one entry
    )
    assert plugin.block_networks.match("2001:db8::1") is not None
    assert plugin.block_senders.match("a@one.example") == "one.example"
    with pytest.raises(PolicyConfigError, match="block_senders: expected strings, got 3"):
        Lists(block_senders=[3])  # type: ignore[list-item]
    with pytest.raises(PolicyConfigError, match="allow_networks: 'x' is not an IP"):
        Lists(allow_networks=["x"])


def test_no_table_no_plugin() -> None:
    assert plugins_from_options(PolicyEnv(options_from_settings({}))) == []
    [plugin] = plugins_from_options(PolicyEnv(options_from_settings({"lists": {}})))
    assert isinstance(plugin, Lists)


def test_a_bad_table_stops_the_server(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("192.0.2.1\n192.0.2.x\n")
    server = Server(listen="127.0.0.1:0", lists={"block_networks_file": str(bad)})
    with pytest.raises(StartupError, match=rf"setting \[lists\] block_networks_file: {bad}:2: "):
        run(server.start())


# --- a real server -----------------------------------------------------------------------------


def client(srv: Any, ip: str) -> smtplib.SMTP:
    return smtplib.SMTP(srv.host, srv.port, source_address=(ip, 0), timeout=10)


SETTINGS: dict[str, Any] = {"local_domains": ["example.com"], "relay_networks": []}


def test_server_blocked_and_allowed_clients() -> None:
    lists = {"block_networks": ["127.0.0.0/29"], "allow_networks": ["127.0.0.7"]}
    with running_server(lists=lists, **SETTINGS) as srv:
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            client(srv, "127.0.0.5")
        assert caught.value.smtp_code == 554
        assert caught.value.smtp_error == b"Client host [127.0.0.5] rejected: Access denied"

        with client(srv, "127.0.0.7") as smtp:  # in both lists: allowed
            smtp.sendmail("a@sender.example", ["b@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
        with client(srv, "127.0.0.9") as smtp:  # in neither
            smtp.sendmail("a@sender.example", ["b@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
        first, second = srv.messages.wait(2)
        assert first.session.notes[ALLOWLISTED] == "allow_networks 127.0.0.7/32"
        assert ALLOWLISTED not in second.session.notes


def test_server_sender_recipient_and_helo_blocks() -> None:
    lists = {
        "block_senders": ["spam.example"],
        "block_recipients": ["retired@example.com"],
        "block_helo": ["*.dynamic.*"],
    }
    with running_server(lists=lists, **SETTINGS) as srv:
        with client(srv, "127.0.0.10") as smtp:
            code, text = smtp.ehlo("1-2-3-4.dynamic.isp.example")
            assert (code, text) == (
                550,
                b"5.7.1 <1-2-3-4.dynamic.isp.example>: Helo command rejected: Access denied",
            )
            assert smtp.ehlo("mx.sender.example")[0] == 250  # the client may try again
            assert smtp.mail("x@spam.example") == (
                550,
                b"5.7.1 <x@spam.example>: Sender address rejected: Access denied",
            )
            assert smtp.mail("x@ham.example")[0] == 250
            assert smtp.rcpt("retired@example.com") == (
                550,
                b"5.7.1 <retired@example.com>: Recipient address rejected: Access denied",
            )
            assert smtp.rcpt("current@example.com")[0] == 250
            assert smtp.data(b"Subject: hi\r\n\r\nhi\r\n")[0] == 250
        [message] = srv.messages.wait(1)
        assert message.rcpt_tos == ["current@example.com"]


def send_from(host: str, port: int, ip: str) -> int:
    """Connect from ``ip`` and send one message; the banner's code if it was a refusal."""
    try:
        with smtplib.SMTP(host, port, source_address=(ip, 0), timeout=10) as smtp:
            smtp.sendmail("a@sender.example", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code
    return 250


def test_sighup_reload_changes_the_decision_for_new_connections(tmp_path: Path) -> None:
    networks = tmp_path / "block.txt"
    networks.write_text("# nothing blocked yet\n")

    async def main() -> None:
        async with async_running_server(
            lists={"block_networks_file": str(networks)}, **SETTINGS
        ) as srv:
            assert await asyncio.to_thread(send_from, srv.host, srv.port, "127.0.0.11") == 250
            networks.write_text("127.0.0.11\n")
            srv.server.reload(srv.server.options)  # what SIGHUP does
            assert await asyncio.to_thread(send_from, srv.host, srv.port, "127.0.0.11") == 554
            assert await asyncio.to_thread(send_from, srv.host, srv.port, "127.0.0.12") == 250

            networks.write_text("127.0.0.12\nbroken\n")  # a broken file: the old list stays
            srv.server.reload(srv.server.options)
            assert await asyncio.to_thread(send_from, srv.host, srv.port, "127.0.0.11") == 554
            assert await asyncio.to_thread(send_from, srv.host, srv.port, "127.0.0.12") == 250

    run(main())


def test_a_toml_config_file_with_a_lists_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "blocked-networks.txt").write_text("# from the config directory\n127.0.0.13\n")
    config = etc / "mailgate.toml"
    config.write_text(
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        'hostname = "mx.example.com"\n'
        "sink = true\n"
        'state_dir = "state"\n'
        'local_domains = ["example.com"]\n'
        "relay_networks = []\n"
        "\n"
        "[lists]\n"
        'block_networks_file = "blocked-networks.txt"\n'
        'block_recipients = ["retired@example.com"]\n'
    )
    monkeypatch.chdir(tmp_path)  # the relative path follows the file, not the cwd
    options = build_options(build_parser().parse_args(["serve", "--config", str(config)]))
    server = Server(options)
    accepted: list[str] = []

    @server.on_message
    def collect(session: Session, envelope: Envelope, message: Any) -> None:
        accepted.extend(envelope.rcpt_tos)

    def talk(host: str, port: int) -> None:
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP(host, port, source_address=("127.0.0.13", 0), timeout=10)
        with smtplib.SMTP(host, port, source_address=("127.0.0.14", 0), timeout=10) as smtp:
            refused = smtp.sendmail(
                "a@sender.example",
                ["retired@example.com", "b@example.com"],
                b"Subject: x\r\n\r\nx\r\n",
            )
        assert refused == {
            "retired@example.com": (
                550,
                b"5.7.1 <retired@example.com>: Recipient address rejected: Access denied",
            )
        }

    async def main() -> None:
        async with server:
            await asyncio.to_thread(talk, *server.address)

    run(main())
    assert accepted == ["b@example.com"]
