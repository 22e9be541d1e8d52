"""Honeypot personas: each built-in against its product's expected transcript, queue ids,
server-layer texts, and TOML profile files (every error class)."""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tests.protocol.session import Session

from mailgate.honeypot.personas import (
    PERSONAS,
    PROFILE_KEYS,
    QUEUE_ID_STYLES,
    PersonaProfile,
    ProfileError,
    dump_profile,
    format_reply,
    load_profile,
    parse_reply,
    profile_from_mapping,
)
from mailgate.protocol import DataComplete, PolicyPoint, Reply
from mailgate.protocol.persona import PLACEHOLDERS, REPLY_NAMES, PersonaError, placeholders_in
from mailgate.protocol.sasl import MECHANISMS

TRANSCRIPTS = Path(__file__).parent / "transcripts"
DOC = Path(__file__).resolve().parents[2] / "docs" / "honeypot.md"
CLOCK = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)  # Tue, 1 Dec 2026
CLIENT_IP = "192.0.2.10"


# --- transcripts -----------------------------------------------------------------------------


def read_transcript(path: Path) -> tuple[list[str], list[str]]:
    """(client lines, the server lines mailgate must send) from a transcript file: the S:
    lines, except where !: lines replace those since the last C: line."""
    client: list[str] = []
    expected: list[str] = []
    real: list[str] = []  # S: lines of the current exchange
    instead: list[str] | None = None  # !: lines of the current exchange

    def close_exchange() -> None:
        expected.extend(real if instead is None else instead)

    for raw in path.read_text().splitlines():
        if not raw or raw.startswith("#"):
            continue
        kind, _, line = raw.partition(": ")
        if raw in ("C:", "S:", "!:"):  # an empty line after the prefix
            kind, line = raw[:1], ""
        if kind == "C":
            if real or instead is not None:
                close_exchange()
                real, instead = [], None
            client.append(line)
        elif kind == "S":
            real.append(line)
        elif kind == "!":
            instead = [*(instead or []), line]
        else:
            raise AssertionError(f"{path.name}: bad line {raw!r}")
    close_exchange()
    return client, expected


def line_pattern(line: str, profile: PersonaProfile) -> re.Pattern[str]:
    parts = re.split(r"(\{queue_id\}|\{message_id\})", line)
    regex = ""
    for part in parts:
        if part == "{queue_id}":
            regex += profile.queue_id_pattern
        elif part == "{message_id}":
            regex += r"[0-9a-f]{32}@" + re.escape(profile.hostname)
        else:
            regex += re.escape(part)
    return re.compile(regex)


def run_script(profile: PersonaProfile, client_lines: list[str]) -> list[str]:
    """Drive a sans-IO connection with the persona through ``client_lines`` and return
    every line the server wrote."""
    config = profile.protocol_config(starttls=True, auth_requires_tls=False, clock=lambda: CLOCK)

    def answer(point: PolicyPoint) -> Reply | None:
        if isinstance(point, DataComplete):
            return profile.queued_reply(hostname=config.hostname, client_ip=CLIENT_IP)
        return None  # everything else: the protocol's (the persona's) own reply

    session = Session.start(config, answer=answer, greet=False, client_ip=CLIENT_IP)
    session.pump()
    for line in client_lines:
        session.feed(line.encode("utf-8") + b"\r\n")
    output = session.take_output().decode("utf-8")
    assert output.endswith("\r\n")
    return output[:-2].split("\r\n")


@pytest.mark.parametrize("name", sorted(PERSONAS))
def test_persona_matches_product_transcript(name: str) -> None:
    profile = PERSONAS[name]
    client, expected = read_transcript(TRANSCRIPTS / f"{name}.txt")
    got = run_script(profile, client)
    for index, (want, line) in enumerate(zip(expected, got, strict=False)):
        assert line_pattern(want, profile).fullmatch(line), (
            f"{name}: server line {index + 1}: expected {want!r}, got {line!r}"
        )
    assert len(got) == len(expected), f"{name}: got {len(got)} lines: {got[len(expected) :]}"


def test_every_persona_has_a_transcript() -> None:
    files = {p.stem for p in TRANSCRIPTS.glob("*.txt")} - {"README"}
    assert files == set(PERSONAS)


def test_helo_greeting_per_persona() -> None:
    expected = {
        "postfix": "250 mail.example.com",
        "exim": "250 mail.example.com Hello client.example.net [192.0.2.10]",
        "exchange": "250 EXCH01.example.com Hello [192.0.2.10]",
        "sendmail": "250 mx.example.com Hello [192.0.2.10], pleased to meet you",
        "generic": "250 mail.example.com Hello client.example.net [192.0.2.10]",
    }
    for name, line in expected.items():
        assert run_script(PERSONAS[name], ["HELO client.example.net"])[1] == line


def test_exim_banner_pads_the_day_like_tod_full() -> None:
    # Exim's $tod_full writes "Tue, 01 Dec 2026"; the other personas keep RFC 5322's
    # one-digit day.
    assert PERSONAS["exim"].persona.banner.endswith("{date_padded}")
    banner = run_script(PERSONAS["exim"], [])[0]
    assert banner.endswith(" Tue, 01 Dec 2026 10:00:00 +0000")
    assert run_script(PERSONAS["exchange"], [])[0].endswith(" Tue, 1 Dec 2026 10:00:00 +0000")


@pytest.mark.parametrize(
    ("name", "verbs", "line", "reply"),
    [
        ("exim", {"VRFY", "ETRN"}, "VRFY root@example.com", ["252 Administrative prohibition"]),
        ("exim", {"VRFY", "ETRN"}, "ETRN example.com", ["458 Administrative prohibition"]),
        ("sendmail", {"VRFY"}, "VRFY root", [str(PERSONAS["sendmail"].vrfy)]),
        ("exchange", {"VRFY", "HELP"}, "VRFY root", ["252 2.1.5 Cannot VRFY user"]),
        (
            "exchange",
            {"VRFY", "HELP"},
            "HELP",
            [
                "214-This server supports the following commands:",
                "214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT",
            ],
        ),
    ],
)
def test_unadvertised_verbs_are_answered(
    name: str, verbs: set[str], line: str, reply: list[str]
) -> None:
    # The product answers these verbs without listing them in EHLO.
    persona = PERSONAS[name].persona
    assert persona.unadvertised_capabilities == verbs
    assert not persona.hidden_capabilities & verbs
    lines = run_script(PERSONAS[name], ["EHLO x.example", line])
    ehlo = lines[1 : -len(reply)]
    assert ehlo and not {entry[4:] for entry in ehlo} & verbs
    assert lines[-len(reply) :] == reply


def test_sendmail_echoes_the_null_sender() -> None:
    lines = run_script(PERSONAS["sendmail"], ["EHLO x.example", "MAIL FROM:<>"])
    assert lines[-1] == "250 2.1.0 <>... Sender ok"


def test_exim_has_no_enhanced_status_codes_anywhere() -> None:
    lines = run_script(
        PERSONAS["exim"],
        ["EHLO x.example", "MAIL FROM:<a@example.net>", "MAIL FROM:<b@example.net>", "QUIT"],
    )
    assert "ENHANCEDSTATUSCODES" not in "\n".join(lines)
    assert lines[-2:] == ["503 sender already given", "221 mail.example.com closing connection"]


# --- profile values ----------------------------------------------------------------------------


def test_builtins_offer_only_what_mailgate_implements() -> None:
    for profile in PERSONAS.values():
        assert profile.queue_id_style in QUEUE_ID_STYLES
        assert profile.auth_mechanisms
        # DIGEST-MD5 (Sendmail's) is capture only: offered, always refused.
        assert set(profile.auth_mechanisms) <= set(MECHANISMS)
        assert "{software}" not in profile.persona.banner  # filled in at load


def test_capture_only_mechanisms_are_for_personas_not_server_settings() -> None:
    from mailgate.settings import AUTH_MECHANISMS

    assert "DIGEST-MD5" in MECHANISMS and "DIGEST-MD5" not in AUTH_MECHANISMS


def test_builtin_auth_mechanisms_in_product_order() -> None:
    assert PERSONAS["postfix"].auth_mechanisms == ("PLAIN", "LOGIN")
    assert PERSONAS["exim"].auth_mechanisms == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert PERSONAS["exchange"].auth_mechanisms == ("LOGIN",)
    assert PERSONAS["sendmail"].auth_mechanisms == ("DIGEST-MD5", "CRAM-MD5", "LOGIN", "PLAIN")


@pytest.mark.parametrize("style", sorted(QUEUE_ID_STYLES))
def test_queue_ids_match_their_pattern(style: str) -> None:
    pattern = re.compile(QUEUE_ID_STYLES[style].pattern)
    rng = random.Random(7)
    for step in range(300):
        now = 1_700_000_000 + step * 7919.123457
        queue_id = QUEUE_ID_STYLES[style].make(now, rng)
        assert pattern.fullmatch(queue_id), (style, queue_id)


def test_queue_ids_carry_the_time_like_the_products() -> None:
    now = time.mktime((2026, 12, 1, 10, 5, 30, 0, 0, -1)) + 0.25
    rng = random.Random(1)
    sendmail = PERSONAS["sendmail"].new_queue_id(now=now, rng=rng)
    # year 126 % 60 = 6, month 11 -> B, day 1, hour 10 -> A, minute 5, second 30 -> U
    assert sendmail[:6] == "6B1A5U"
    exim = PERSONAS["exim"].new_queue_id(now=now, rng=rng)
    seconds = 0
    for char in exim[:6]:
        seconds = (
            seconds * 62
            + "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".index(char)
        )
    assert seconds == int(now)
    postfix = PERSONAS["postfix"].new_queue_id(now=now, rng=rng)
    assert postfix.startswith("3D090")  # 250000 microseconds
    assert PERSONAS["postfix"].new_queue_id() != PERSONAS["postfix"].new_queue_id()


def test_server_layer_texts() -> None:
    postfix = PERSONAS["postfix"]
    denied = postfix.format("relay_denied", address="x@elsewhere.example", client_ip=CLIENT_IP)
    assert str(denied) == "454 4.7.1 <x@elsewhere.example>: Relay access denied"
    busy = postfix.format("too_many_connections", hostname="mx.test", client_ip=CLIENT_IP)
    assert str(busy) == "421 4.7.0 mx.test Error: too many connections from 192.0.2.10"
    rejected = postfix.format("rejected", client_ip=CLIENT_IP)
    assert rejected.text.startswith(f"<unknown[{CLIENT_IP}]>: Client host rejected")
    # Values are cleaned: no CR/LF can reach the wire through a placeholder.
    sneaky = PERSONAS["sendmail"].format("relay_denied", address="a\r\n250 ok")
    assert "\r" not in sneaky.text and "\n" not in sneaky.text
    assert str(PERSONAS["exim"].format("relay_denied")) == "550 relay not permitted"
    # Protocol names go to the persona.
    assert str(postfix.format("bye")) == "221 2.0.0 Bye"
    assert str(PERSONAS["exim"].format("bye", hostname="mx.test")) == (
        "221 mx.test closing connection"
    )
    with pytest.raises(KeyError):
        postfix.format("no_such_reply")


def test_queued_reply_per_persona() -> None:
    rng = random.Random(3)
    exchange = PERSONAS["exchange"].queued_reply(
        hostname="EX1.example.com", queue_id="1234567890123", message_id="abc@example.net"
    )
    assert str(exchange) == (
        "250 2.6.0 <abc@example.net> [InternalId=1234567890123, Hostname=EX1.example.com] "
        "Queued mail for delivery"
    )
    made_up = PERSONAS["exchange"].queued_reply(hostname="EX1.example.com", rng=rng)
    assert re.fullmatch(
        r"<[0-9a-f]{32}@EX1\.example\.com> \[InternalId=[0-9]{13}, .*", made_up.text
    )
    sendmail = PERSONAS["sendmail"].queued_reply(hostname="mx", queue_id="6B1A5U00012345")
    assert str(sendmail) == "250 2.0.0 6B1A5U00012345 Message accepted for delivery"
    # Personas whose queued text fits the protocol also set the protocol's message_queued.
    assert PERSONAS["postfix"].persona.format("message_queued", queue_id="ABC").text == (
        "Ok: queued as ABC"
    )
    assert "message_queued" not in PERSONAS["exchange"].persona.overridden


def test_convenience_properties() -> None:
    sendmail = PERSONAS["sendmail"]
    assert sendmail.vrfy.code == 252
    assert sendmail.expn.text == "Sorry, we do not allow this operation"
    assert sendmail.auth_failed == Reply(535, "5.7.0", ("authentication failed",))
    assert PERSONAS["exchange"].timeout.text == "Timeout waiting for client input"
    assert PERSONAS["sendmail"].protocol_config().max_message_size is None


def test_reply_strings_round_trip() -> None:
    for text in ("250 2.1.0 Ok", "250 OK", "221 2.0.0", '354 Enter "x"', "500 5.5.1 a\tb"):
        assert format_reply(parse_reply(text)) == text
    multi = ["214-2.0.0 first", "214 2.0.0 second"]
    assert parse_reply(multi) == Reply(214, "2.0.0", ("first", "second"))
    assert format_reply(parse_reply(multi)) == multi
    assert parse_reply("221") == Reply(221, None, ("",))
    with pytest.raises(ValueError, match="last line"):
        parse_reply("250-2.0.0 x")
    with pytest.raises(ValueError, match="every line but the last"):
        parse_reply(["214 a", "214 b"])
    with pytest.raises(ValueError, match="at least one"):
        parse_reply([])


@pytest.mark.parametrize("name", sorted(PERSONAS))
def test_dump_profile_loads_back_equal(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_profile(PERSONAS[name]))
    assert load_profile(path) == PERSONAS[name]


# --- profile files -----------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "profile.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_profile_file_overrides_its_base(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
base = "postfix"
name = "ubuntu-postfix"
banner = "{hostname} ESMTP {software} (Ubuntu)"
capabilities = ["PIPELINING", "SIZE", "STARTTLS", "AUTH", "8BITMIME"]
hidden_capabilities = ["HELP", "EXPN", "CHUNKING", "SMTPUTF8", "VRFY"]
auth_mechanisms = ["LOGIN", "PLAIN"]
message_size_limit = 52428800

[replies]
sender_ok = "250 2.1.0 Sender looks fine"
relay_denied = "554 5.7.1 <{address}>: Relay access denied (from {client_ip})"
""",
    )
    profile = load_profile(path)
    assert profile.name == "ubuntu-postfix"
    assert profile.persona.banner == "{hostname} ESMTP Postfix (Ubuntu)"
    assert profile.persona.reply("sender_ok") == Reply(250, "2.1.0", ("Sender looks fine",))
    assert profile.persona.reply("bye") == Reply(221, "2.0.0", ("Bye",))  # inherited
    assert profile.auth_mechanisms == ("LOGIN", "PLAIN")
    assert profile.queue_id_style == "postfix"
    assert profile.format("relay_denied", address="a@b", client_ip="192.0.2.1").text == (
        "<a@b>: Relay access denied (from 192.0.2.1)"
    )
    lines = run_script(profile, ["EHLO x.example", "QUIT"])
    assert lines[0] == "220 mail.example.com ESMTP Postfix (Ubuntu)"
    assert lines[1:7] == [
        "250-mail.example.com",
        "250-PIPELINING",
        "250-SIZE 52428800",
        "250-STARTTLS",
        "250-AUTH LOGIN PLAIN",
        "250-8BITMIME",
    ]
    assert "CHUNKING" not in "\n".join(lines)


def test_profile_unadvertised_capabilities(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
base = "postfix"
unadvertised_capabilities = ["vrfy", "DSN"]
""",
    )
    profile = load_profile(path)
    assert profile.persona.unadvertised_capabilities == {"VRFY", "DSN"}
    script = ["EHLO x.example", "VRFY root", "MAIL FROM:<a@x.example> RET=HDRS"]
    lines = run_script(profile, script)
    ehlo = "\n".join(lines[1:-2])
    assert "VRFY" not in ehlo and "DSN" not in ehlo and "CHUNKING" in ehlo
    # The verb still works (a hidden VRFY would be an unknown command); the parameters of
    # an extension EHLO did not list are refused, as for a hidden one.
    assert lines[-2:] == ["252 2.0.0 root", "555 5.5.4 Unsupported option: RET=HDRS"]
    assert 'unadvertised_capabilities = ["DSN", "VRFY"]' in dump_profile(profile)
    # A file's list replaces the base's: exim with VRFY listed again.
    listed = load_profile(write(tmp_path, "unadvertised_capabilities = []\n"), base="exim")
    ehlo_lines = run_script(listed, ["EHLO x.example"])
    # After Exim's order, with ETRN (also unadvertised in Exim's own list).
    assert ehlo_lines[-2:] == ["250-VRFY", "250 ETRN"]
    # Hiding wins when a keyword is in both lists.
    both = write(tmp_path, 'hidden_capabilities = ["VRFY"]\n', "both.toml")
    hidden = run_script(load_profile(both, base="sendmail"), ["EHLO x.example", "VRFY root"])
    assert hidden[-1] == '500 5.5.1 Command unrecognized: "VRFY root"'


def test_profile_base_argument_and_default(tmp_path: Path) -> None:
    path = write(tmp_path, '[replies]\nbye = "221 2.0.0 See you"\n', "bye.toml")
    assert load_profile(path, base="exim").persona.reply("bye").text == "See you"
    assert load_profile(path, base="exim").persona.enhanced_status_codes is False
    assert load_profile(path, base=PERSONAS["sendmail"]).software.startswith("Sendmail")
    default = load_profile(path)
    assert default.name == "bye"  # the file name
    assert default.persona.banner == PERSONAS["generic"].persona.banner
    # The file's own base key wins over the argument.
    both = write(tmp_path, 'base = "exchange"\n', "both.toml")
    assert load_profile(both, base="postfix").software == "Microsoft ESMTP MAIL Service"


def test_reply_catalogue_only_file(tmp_path: Path) -> None:
    # The shape a generated catalogue takes: only a [replies] table, wire-format strings.
    path = write(
        tmp_path,
        """
[replies]
sender_ok = "250 2.1.0 Sender <{address}> OK"
unknown_command = "500 5.5.1 Unrecognized command '{verb}'"
help = ["214-2.0.0 Commands:", "214 2.0.0 {commands}"]
message_queued = "250 2.6.0 Queued as {queue_id}"
""",
    )
    profile = load_profile(path, base="generic")
    lines = run_script(profile, ["EHLO x.example", "MAIL FROM:<a@example.net>", "FOO", "HELP"])
    assert "250 2.1.0 Sender <a@example.net> OK" in lines
    assert "500 5.5.1 Unrecognized command 'FOO'" in lines
    assert lines[-2] == "214-2.0.0 Commands:"
    assert lines[-1].startswith("214 2.0.0 AUTH BDAT DATA")


def test_software_placeholder_and_braces(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
software = "Odd{Mail}"
banner = "{hostname} ESMTP {software} {{ready}}"
help = ["{software} help"]
[replies]
bye = "221 2.0.0 {software} says {{bye}} ({hostname})"
""",
    )
    profile = load_profile(path)
    lines = run_script(profile, ["EHLO x.example", "HELP", "QUIT"])
    assert lines[0] == "220 mail.example.com ESMTP Odd{Mail} {ready}"
    assert "214 2.0.0 Odd{Mail} help" in lines
    assert lines[-1] == "221 2.0.0 Odd{Mail} says {bye} (mail.example.com)"


def test_profile_from_mapping_in_code() -> None:
    profile = profile_from_mapping(
        {"name": "mine", "replies": {"noop_ok": "250 2.0.0 Fine"}}, base="exchange"
    )
    assert profile.persona.reply("noop_ok").text == "Fine"
    assert profile.software == "Microsoft ESMTP MAIL Service"


def load_error(tmp_path: Path, text: str, **kwargs: object) -> ProfileError:
    path = write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path, **kwargs)  # type: ignore[arg-type]
    error = info.value
    assert str(path) in str(error)
    return error


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        # unknown keys, with a did-you-mean
        ('banerr = "x"', "banerr", ["unknown key", "'banner'"]),
        ('[replies]\nsender_okay = "250 ok"', "replies.sender_okay", ["'sender_ok'"]),
        ('[replies]\nrelay_deny = "554 no"', "replies.relay_deny", ["'relay_denied'"]),
        ('base = "postfx"', "base", ["unknown persona", "'postfix'"]),
        # malformed replies
        ('[replies]\nbye = "Bye"', "replies.bye", ["three-digit"]),
        ('[replies]\nbye = "221-"', "replies.bye", []),
        ('[replies]\nbye = "221 4.0.0 Bye"', "replies.bye", ["does not match"]),
        ('[replies]\nbye = "221 2.0.0 a\\nb"', "replies.bye", ["line break"]),
        ('[replies]\nhelp = ["214-a", "250 b"]', "replies.help", ["line 2 has code 250"]),
        ('[replies]\nhelp = ["214-2.0.0 a", "214 b"]', "replies.help", ["enhanced code"]),
        ("[replies]\nbye = 221", "replies.bye", ["reply string"]),
        ('[replies]\nbye = "221 2.0.0 Bye\u00e9"', "replies.bye", ["not allowed"]),
        # a reply of the wrong kind (the protocol's rules)
        ('[replies]\nstart_data = "250 Go ahead"', "replies.start_data", ["354"]),
        ('[replies]\nauth_failed = "235 2.7.0 Sure"', "replies.auth_failed", ["refusal"]),
        ('[replies]\nrelay_denied = "250 2.0.0 fine"', "replies.relay_denied", ["refusal"]),
        ('[replies]\nmessage_queued = "550 5.0.0 {queue_id}"', "replies.message_queued", ["2xx"]),
        # unknown placeholders
        ('[replies]\nbye = "221 2.0.0 Bye {adress}"', "replies.bye", ["{adress}", "{hostname}"]),
        ('[replies]\nsender_ok = "250 ok {adress}"', "replies.sender_ok", ["{address}"]),
        ('[replies]\nrelay_denied = "554 no {verb}"', "replies.relay_denied", ["{verb}"]),
        ('banner = "{hostname} {when}"', "banner", ["{when}"]),
        ('ehlo_greeting = "{hostname} {helo!r}"', "ehlo_greeting", ["format spec"]),
        ('banner = "{hostname} {"', "banner", ["braces"]),
        ('help = ["{verb}"]', "help", ["{verb}"]),
        # missing required placeholders
        ('banner = "ESMTP ready"', "banner", ["{hostname}"]),
        ('helo_greeting = "Hello {helo}"', "helo_greeting", ["{hostname}"]),
        (
            '[replies]\nmessage_queued = "250 2.0.0 Queued"',
            "replies.message_queued",
            ["{queue_id}"],
        ),
        # values of the wrong type or out of range
        ('capabilities = "SIZE"', "capabilities", ["list of strings"]),
        ('capabilities = ["X-EXPS"]', "capabilities", ["X-EXPS", "implements"]),
        ('hidden_capabilities = ["SIZ"]', "hidden_capabilities", ["'SIZE'"]),
        ('capabilities = ["SIZE", "size"]', "capabilities", ["twice"]),
        ('unadvertised_capabilities = ["VRFYY"]', "unadvertised_capabilities", ["'VRFY'"]),
        ('unadvertised_capabilities = "VRFY"', "unadvertised_capabilities", ["list of strings"]),
        ('unadvertised_capabilities = ["XUSR"]', "unadvertised_capabilities", ["implements"]),
        ('unadvertised_capabilities = ["HELP", "help"]', "unadvertised_capabilities", ["twice"]),
        ('enhanced_status_codes = "yes"', "enhanced_status_codes", ["true or false"]),
        ('auth_mechanisms = ["NTLM"]', "auth_mechanisms", ["NTLM", "implements"]),
        ('auth_mechanisms = ["PLAIN", "plain"]', "auth_mechanisms", ["twice"]),
        ('queue_id = "postfx"', "queue_id", ["'postfix'"]),
        ("message_size_limit = -1", "message_size_limit", ["whole number"]),
        ("help_code = 300", "help_code", ["200 to 299"]),
        ("help_code = 211", "help", ["HELP lines"]),
        ('hostname = "not a host"', "hostname", ["host name"]),
        ("replies = 3", "replies", ["table"]),
        ("name = 5", "name", ["string"]),
        ('help = ["x"]\n[replies]\nhelp = "214 y"', "replies.help", ["not both"]),
        ('restricted_local_parts = ["^[%"]', "restricted_local_parts", ["regular expression"]),
        ('restricted_remote_local_parts = "^x"', "restricted_remote_local_parts", ["list"]),
        (
            '[replies]\nrestricted_characters = "250 fine"',
            "replies.restricted_characters",
            ["refusal"],
        ),
        (
            '[replies]\nprdr_message_queued = "250 accepted"',
            "replies.prdr_message_queued",
            ["{queue_id}"],
        ),
        ('[replies]\nsender_ok = "250 {pth} ok"', "replies.sender_ok", ["{path}"]),
        ('[replies]\nnoop_ok = "250 {path}"', "replies.noop_ok", ["{path}", "{argument}"]),
    ],
)
def test_profile_errors_name_file_and_key(
    tmp_path: Path, text: str, key: str, words: list[str]
) -> None:
    error = load_error(tmp_path, text)
    assert error.key == key, str(error)
    assert f": {key}: " in str(error)
    for word in words:
        assert word in error.detail, str(error)


def test_profile_texts_are_checked_by_the_protocol_placeholder_check(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[replies]\nbye = "221 2.0.0 Bye {adress}"')
    with pytest.raises(PersonaError) as info:
        placeholders_in("Bye {adress}", PLACEHOLDERS["bye"] | {"software"})
    assert error.detail == str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    error = load_error(tmp_path, 'banner = "unterminated\n')
    assert "not valid TOML" in str(error) and error.key == ""
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(ProfileError, match="unknown persona"):
        load_profile(write(tmp_path, ""), base="qmail")


def test_profile_constructed_in_code_is_checked() -> None:
    base = PERSONAS["generic"]
    with pytest.raises(ProfileError, match="queue_id"):
        PersonaProfile(name="x", persona=base.persona, software="x", queue_id_style="nope")
    with pytest.raises(ProfileError, match="auth_mechanisms"):
        PersonaProfile(name="x", persona=base.persona, software="x", auth_mechanisms=("NTLM",))
    with pytest.raises(ProfileError, match="message_queued"):
        PersonaProfile(
            name="x",
            persona=base.persona,
            software="x",
            message_queued=Reply(250, None, ("queued",)),
        )


def test_profile_keys_and_reply_names_are_documented() -> None:
    doc = DOC.read_text()
    for key in PROFILE_KEYS:
        assert f"`{key}`" in doc, key
    for name in REPLY_NAMES | {"relay_denied", "rejected", "too_many_connections"}:
        assert f"`{name}`" in doc, name


def test_doc_example_profile_loads(tmp_path: Path) -> None:
    # The profile examples (the doc's other TOML block is a [server] configuration).
    blocks = [
        block
        for block in re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)
        if "[server]" not in block
    ]
    assert len(blocks) >= 2
    for index, block in enumerate(blocks):
        profile = load_profile(write(tmp_path, block, f"example{index}.toml"))
        run_script(profile, ["EHLO x.example", "HELP", "QUIT"])
