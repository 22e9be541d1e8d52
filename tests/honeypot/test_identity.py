"""Generated site identities (mailgate.honeypot.identity) against a local chat-completions
server (tests/honeypot/llm_server.py) spoken to with the real openai client, and the
personas' timing jitter.

The server gives canned answers -- good, malformed JSON, banners with invalid placeholders
or CR/LF, a version the product does not ship, slow, HTTP 401/500, a refused connection --
and records each request, so the tests check both what mailgate asks and what it makes of
the answer: a profile file and a honeypot wearing it, or the base persona and one warning
line, never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from tests.honeypot import test_attacker as attacker
from tests.honeypot.llm_server import Answer, fake_llm, good, refusing_port
from tests.honeypot.test_plugin import honeypot as plugin_honeypot

from mailgate import cli
from mailgate.config import build_honeypot_options
from mailgate.honeypot import identity
from mailgate.honeypot.identity import IDENTITY_FILE, check_identity, generate, parse_answer
from mailgate.honeypot.personas import (
    PERSONAS,
    ProfileError,
    dump_profile,
    load_profile,
    profile_from_mapping,
)

POSTFIX_SITE: dict[str, Any] = {
    "hostname": "mx1.harbourview-dental.co.uk",
    "banner": "{hostname} ESMTP {software} (Ubuntu)",
    "version": "",
    "description": "Harbourview Dental Practice, Bristol",
    "local_users": ["reception", "j.patel", "accounts", "info"],
    "rejected_text": "Your network is not welcome here, see postmaster",
    "banner_delay": [0.0, 0.0],
    "reply_delay": [0.0, 0.0],
}
EXIM_SITE: dict[str, Any] = {
    "hostname": "mail.kestrel-freight.de",
    "banner": "{hostname} ESMTP {software} {date_padded}",
    "version": "4.94.2",
    "description": "Kestrel Freight GmbH",
    "local_users": ["dispatch", "m.keller", "buchhaltung"],
    "rejected_text": "Relaying from your network is not permitted",
    "banner_delay": [0.0, 0.02],
    "reply_delay": [0.0, 0.01],
}
KEY = "sk-test-4f2a31c0d8"


def run_cli(*argv: str) -> int:
    return cli.main(["honeypot", "persona", "generate", *argv])


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# --- what is asked -----------------------------------------------------------------------------


def test_the_request_is_a_chat_completion_with_the_conventions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GENAI_TEST_KEY", KEY)
    with fake_llm(good(EXIM_SITE)) as llm:
        result = generate(
            "exim",
            url=llm.url,
            model="llama3.1:8b",
            api_key=identity.api_key_from_env("GENAI_TEST_KEY"),
            timeout=5,
        )
    assert result.generated and result.attempts == 1
    [request] = llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"].startswith("application/json")
    body = request.body
    assert body["model"] == "llama3.1:8b"
    assert body["response_format"] == {"type": "json_object"}
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user"]
    prompt = body["messages"][1]["content"]
    # The product's conventions: the banner variant, the real versions, its system users.
    assert "{hostname} ESMTP {software} {date_padded}" in prompt
    assert '"4.94.2"' in prompt and '"4.96"' in prompt
    assert "Debian-exim" in prompt


def test_postfix_is_told_it_shows_no_version() -> None:
    with fake_llm(good(POSTFIX_SITE)) as llm:
        generate("postfix", url=llm.url, model="m", timeout=5)
    prompt = llm.requests[0].body["messages"][1]["content"]
    assert '"version": "" (Postfix shows no version)' in prompt
    assert "Postfix shows no version by default" in prompt


def test_no_key_variable_sends_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    with fake_llm(good(POSTFIX_SITE)) as llm:
        assert generate("postfix", url=llm.url, model="m", timeout=5).generated
    assert "sk-must-not-leak" not in llm.requests[0].headers.get("authorization", "")


# --- good answers --------------------------------------------------------------------------------


def test_generate_writes_a_profile_and_a_honeypot_wears_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENAI_TEST_KEY", KEY)
    out = tmp_path / "site.toml"
    with fake_llm(good(POSTFIX_SITE)) as llm:
        status = run_cli(
            "--base", "postfix", "--llm-url", llm.url, "--model", "gpt-test",
            "--api-key-env", "GENAI_TEST_KEY", "--out", str(out),
        )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0, err
    assert "220 mx1.harbourview-dental.co.uk ESMTP Postfix (Ubuntu)" in err
    assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    text = out.read_text()
    assert KEY not in text
    data = tomllib.loads(text)
    assert data["base"] == "postfix" and data["hostname"] == "mx1.harbourview-dental.co.uk"
    profile = load_profile(out)  # the same loader and checks as a hand-written profile
    assert profile.hostname == "mx1.harbourview-dental.co.uk"

    with attacker.running_honeypot(tmp_path, "postfix", profile=profile) as hp:
        with attacker.connect(hp, "127.0.0.3") as smtp:
            code, ehlo = smtp.ehlo("look.example")
            assert code == 250
            assert ehlo.decode().splitlines()[0] == "mx1.harbourview-dental.co.uk"
        line = attacker.raw_session(hp, b"QUIT\r\n").split(b"\r\n")[0]
        assert line == b"220 mx1.harbourview-dental.co.uk ESMTP Postfix (Ubuntu)"


def test_the_generated_local_users_are_the_honeypot_s_recipients(tmp_path: Path) -> None:
    with fake_llm(good(POSTFIX_SITE)) as llm:
        result = generate("postfix", url=llm.url, model="m", timeout=5)
    with (
        attacker.running_honeypot(tmp_path, "postfix", profile=result.profile) as hp,
        attacker.connect(hp, "127.0.0.8") as smtp,
    ):
        smtp.ehlo("client.example")
        assert smtp.mail("someone@client.example")[0] == 250
        # The site's invented users and the base's system users exist at its domain...
        for user in ("j.patel", "reception", "postmaster", "postfix"):
            code, text = smtp.rcpt(f"{user}@harbourview-dental.co.uk")
            assert code == 250, (user, text)
        # ...others are unknown, in Postfix's words, and other domains are relaying.
        code, text = smtp.rcpt("nobody.here@harbourview-dental.co.uk")
        assert (code, text.decode()) == (
            550,
            "5.1.1 <nobody.here@harbourview-dental.co.uk>: Recipient address rejected: "
            "User unknown in local recipient table",
        )
        assert smtp.rcpt("victim@elsewhere.example")[0] == 454


def test_the_site_text_words_refusals(tmp_path: Path) -> None:
    with fake_llm(good(POSTFIX_SITE)) as llm:
        result = generate("postfix", url=llm.url, model="m", timeout=5)
    with attacker.running_honeypot(
        tmp_path,
        "postfix",
        profile=result.profile,
        block_networks=(ipaddress.ip_network("127.0.0.66/32"),),
    ) as hp:
        with socket.create_connection(
            ("127.0.0.1", hp.port), timeout=5, source_address=("127.0.0.66", 0)
        ) as sock:
            refusal = sock.recv(1024)
    # (No enhanced status code before EHLO, as RFC 2034 has it.)
    assert refusal == (
        b"554 <unknown[127.0.0.66]>: Client host rejected: Your network is not "
        b"welcome here, see postmaster\r\n"
    )


def test_versions_change_every_text_that_shows_them() -> None:
    with fake_llm(good(EXIM_SITE)) as llm:
        exim = generate("exim", url=llm.url, model="m", timeout=5)
    assert exim.profile.software == "Exim 4.94.2"
    assert identity.rendered_banner(exim.profile).startswith(
        "220 mail.kestrel-freight.de ESMTP Exim 4.94.2 "
    )
    sendmail_site = {
        **EXIM_SITE,
        "banner": "{hostname} ESMTP {software}; {date}",
        "version": "8.15.2",
    }
    with fake_llm(good(sendmail_site)) as llm:
        sendmail = generate("sendmail", url=llm.url, model="m", timeout=5)
    assert sendmail.generated, sendmail.problems
    assert "ESMTP Sendmail 8.15.2/8.15.2; " in identity.rendered_banner(sendmail.profile)
    assert sendmail.profile.persona.reply("help").lines[0] == "This is sendmail version 8.15.2"
    assert sendmail.profile.persona.reply("help").code == 214


def test_a_model_that_fills_in_the_template_is_understood() -> None:
    answer = {**POSTFIX_SITE, "banner": "mx1.harbourview-dental.co.uk ESMTP Postfix (Ubuntu)"}
    found = check_identity(answer, "postfix")
    assert found.banner == "{hostname} ESMTP {software} (Ubuntu)"
    # Answers wrapped in prose, code fences or an outer object.
    fenced = "Sure! Here it is:\n```json\n" + json.dumps(POSTFIX_SITE) + "\n```\n"
    assert parse_answer(fenced)["hostname"] == POSTFIX_SITE["hostname"]
    assert parse_answer(json.dumps({"identity": POSTFIX_SITE}))["hostname"]


@pytest.mark.parametrize("base", list(identity.PRODUCTS))
def test_every_convention_makes_a_valid_profile(base: str) -> None:
    """Each banner variant with each version (and filled in, as models do) is a profile
    the loader takes, its banner the product's."""
    conv = identity.PRODUCTS[base]
    for banner in conv.banners:
        for version in conv.versions or ("",):
            answer = {**POSTFIX_SITE, "banner": banner, "version": version}
            profile = identity.identity_profile(check_identity(answer, base))
            line = identity.rendered_banner(profile)
            assert line.startswith("220 mx1.harbourview-dental.co.uk "), line
            assert conv.software(version) in line or "{software}" not in banner
            filled = line.removeprefix("220 ")
            if "{date" not in banner:  # a model that wrote the banner out in full
                assert check_identity({**answer, "banner": filled}, base).banner == banner


def test_optional_fields_may_be_left_out_or_null() -> None:
    found = check_identity(
        {"hostname": "mx.example-site.org", "banner": "{hostname} ESMTP {software}",
         "version": None, "description": None, "reply_delay": None},
        "postfix",
    )  # fmt: skip
    assert found.version == "" and found.description == "Postfix at mx.example-site.org"
    assert found.banner_delay == found.reply_delay == (0.0, 0.0)
    assert found.rejected_text == "Access denied"
    with pytest.raises(identity.IdentityError, match='"version" is missing'):
        check_identity({**EXIM_SITE, "version": None}, "exim")


def test_system_users_are_always_local_users() -> None:
    found = check_identity(POSTFIX_SITE, "postfix")
    assert found.local_users[:4] == ("root", "postmaster", "postfix", "mailer-daemon")
    assert "j.patel" in found.local_users
    # The profile keeps the base's users (system users, aliases) and adds the site's.
    profile = identity.identity_profile(found)
    base_users = PERSONAS["postfix"].local_users
    assert profile.local_users[: len(base_users)] == base_users
    assert {"reception", "j.patel", "accounts", "info"} <= set(profile.local_users)
    exim = identity.identity_profile(check_identity(EXIM_SITE, "exim"))
    assert {"debian-exim", "dispatch", "m.keller"} <= set(exim.local_users)


# --- bad answers ------------------------------------------------------------------------------------

BAD_ANSWERS = {
    "malformed JSON": Answer(content='{"hostname": "mx1.example-site.com", "banner": '),
    "no JSON at all": Answer(content="I cannot help with honeypots."),
    "invalid placeholder": good({**POSTFIX_SITE, "banner": "{hostname} ESMTP {product}"}),
    "CRLF in the banner": good(
        {**POSTFIX_SITE, "banner": "{hostname} ESMTP {software}\r\n250-AUTH PLAIN"}
    ),
    "LF in the host name": good({**POSTFIX_SITE, "hostname": "mx1.site.com\n250 OK"}),
    "braces in the site text": good({**POSTFIX_SITE, "rejected_text": "denied {client_ip}"}),
    "not a DNS name": good({**POSTFIX_SITE, "hostname": "mx_1..site.com"}),
    "a version Postfix does not show": good({**POSTFIX_SITE, "version": "3.7.11"}),
    "jitter out of bounds": good({**POSTFIX_SITE, "banner_delay": [0.5, 30]}),
    "a banner the product never shows": good(
        {**POSTFIX_SITE, "banner": "{hostname} Microsoft ESMTP MAIL Service ready at {date}"}
    ),
    "overlong text": good({**POSTFIX_SITE, "rejected_text": "x" * 500}),
    "no message": Answer(raw_body=b'{"id": "x", "object": "chat.completion", "choices": []}'),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_answers_are_retried_then_the_base_persona_is_written(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "site.toml"
    with fake_llm(BAD_ANSWERS[case]) as llm:
        status = run_cli(
            "--base", "postfix", "--llm-url", llm.url, "--model", "m", "--out", str(out)
        )  # fmt: skip
    captured = capsys.readouterr()
    no_traceback(captured.err + captured.out)
    assert status == 1
    assert len(llm.requests) == identity.MAX_ATTEMPTS
    [line] = captured.err.splitlines()
    assert line.startswith("mailgate honeypot persona generate: warning: no usable identity")
    assert "using the postfix persona as it is" in line
    # The reason is fed back to the model with its answer (when it gave one).
    retry = llm.requests[1].body["messages"]
    if case == "no message":
        assert [m["role"] for m in retry] == ["system", "user"]
    else:
        assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
        assert retry[3]["content"].startswith("That answer was refused: ")
    # What was written is the base persona: it loads, and it is postfix as built in.
    profile = load_profile(out)
    assert profile.persona == PERSONAS["postfix"].persona
    assert profile.hostname == PERSONAS["postfix"].hostname


def test_a_bad_answer_then_a_good_one() -> None:
    with fake_llm(Answer(content="not json"), good(POSTFIX_SITE)) as llm:
        result = generate("postfix", url=llm.url, model="m", timeout=5)
    assert result.generated and result.attempts == 2
    assert result.problems == ("attempt 1: the answer holds no JSON object",)
    assert "holds no JSON object" in llm.requests[1].body["messages"][3]["content"]


def test_a_server_without_response_format_is_asked_without_it() -> None:
    with fake_llm(Answer(status=400), good(POSTFIX_SITE)) as llm:
        result = generate("postfix", url=llm.url, model="m", timeout=5)
    assert result.generated and result.attempts == 1
    assert "response_format" in llm.requests[0].body
    assert "response_format" not in llm.requests[1].body


def test_slow_answers_are_bounded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "site.toml"
    started = time.monotonic()
    with fake_llm(Answer(content=json.dumps(POSTFIX_SITE), delay=5)) as llm:
        status = run_cli(
            "--base", "postfix", "--llm-url", llm.url, "--model", "m",
            "--timeout", "0.3", "--out", str(out),
        )  # fmt: skip
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    no_traceback(err)
    assert status == 1
    assert elapsed < 0.3 * identity.MAX_ATTEMPTS + 2.0
    assert "no answer within 0.3 s" in err
    assert load_profile(out).persona == PERSONAS["postfix"].persona


def test_a_trickling_answer_is_bounded_too() -> None:
    # Each byte comes before the client's read timeout: only the whole request's bound
    # (timeout, wall-clock) ends it.
    started = time.monotonic()
    with fake_llm(Answer(content=json.dumps(POSTFIX_SITE), trickle=0.1)) as llm:
        result = generate("postfix", url=llm.url, model="m", timeout=0.3)
    elapsed = time.monotonic() - started
    assert not result.generated and result.attempts == identity.MAX_ATTEMPTS
    assert all(p.startswith("no answer within 0.3 s") for p in result.problems), result.problems
    assert elapsed < (0.3 + 0.5) * identity.MAX_ATTEMPTS + 2.0


@pytest.mark.parametrize(("status", "requests"), [(401, 1), (403, 1), (500, 3), (503, 3)])
def test_http_errors(status: int, requests: int, capsys: pytest.CaptureFixture[str]) -> None:
    with fake_llm(Answer(status=status)) as llm:
        code = run_cli("--base", "exim", "--llm-url", llm.url, "--model", "m", "--out", "-")
    captured = capsys.readouterr()
    no_traceback(captured.err)
    assert code == 1
    # Authentication errors are not worth asking again; server errors are.
    assert len(llm.requests) == requests
    assert f"HTTP {status}: canned error {status}" in captured.err
    # The base persona on stdout, loadable.
    assert tomllib.loads(captured.out) == {"base": "exim", "name": "exim"}


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with refusing_port() as url:
        code = run_cli("--base", "sendmail", "--llm-url", url, "--model", "m", "--out", "-")
    err = capsys.readouterr().err
    no_traceback(err)
    assert code == 1
    assert f"cannot reach {url}" in err and "refused" in err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--api-key-env", "GENAI_SURELY_UNSET"], "GENAI_SURELY_UNSET (api key) is not set"),
        (["--api-key-env", "1BAD"], "--api-key-env: '1BAD' is not an environment variable"),
        (["--domain", "bad_domain..x"], "--domain: 'bad_domain..x' is not a valid host name"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with fake_llm(good(POSTFIX_SITE)) as llm:
        code = run_cli(
            "--base", "postfix", "--llm-url", llm.url, "--model", "m",
            "--out", str(tmp_path / "x.toml"), *argv,
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    [line] = err.splitlines()
    assert problem in line
    assert llm.requests == []


def test_the_domain_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    inside = {**POSTFIX_SITE, "hostname": "mail.honey.example.net"}
    with fake_llm(good(POSTFIX_SITE), good(inside)) as llm:
        result = generate("postfix", url=llm.url, model="m", domain="example.net", timeout=5)
    assert result.generated and result.attempts == 2
    assert "is not in the domain example.net" in result.problems[0]
    assert "in the domain example.net" in llm.requests[0].body["messages"][1]["content"]


def test_without_the_openai_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai: ImportError
    code = run_cli(
        "--base", "postfix", "--llm-url", "http://127.0.0.1:9/v1", "--model", "m",
        "--out", str(tmp_path / "x.toml"),
    )  # fmt: skip
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2
    assert "needs the openai package: pip install 'mailgate[genai]'" in line
    assert not (tmp_path / "x.toml").exists()
    data_dir = tmp_path / "data"
    code = cli.main(
        ["honeypot", "--data-dir", str(data_dir), "--generate-identity",
         "--llm-url", "http://127.0.0.1:9/v1", "--model", "m"]
    )  # fmt: skip
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and "pip install 'mailgate[genai]'" in line


# --- mailgate honeypot --generate-identity ----------------------------------------------------


def identity_settings(url: str, **more: Any) -> dict[str, Any]:
    return {"generate_identity": True, "llm_url": url, "llm_model": "m", **more}


def test_generated_once_and_kept_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENAI_TEST_KEY", KEY)
    settings = identity_settings("", llm_api_key_env="GENAI_TEST_KEY")
    with fake_llm(good(POSTFIX_SITE)) as llm:
        settings["llm_url"] = llm.url
        with attacker.running_honeypot(tmp_path, "postfix", **settings) as hp:
            first = attacker.raw_session(hp, b"QUIT\r\n").split(b"\r\n")[0]
        assert len(llm.requests) == 1
        assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
        stored = tmp_path / "data" / IDENTITY_FILE
        assert load_profile(stored).hostname == "mx1.harbourview-dental.co.uk"
        assert KEY not in stored.read_text()
        with attacker.running_honeypot(tmp_path, "postfix", **settings) as hp:
            second = attacker.raw_session(hp, b"QUIT\r\n").split(b"\r\n")[0]
            assert hp.server.options.hostname == "mx1.harbourview-dental.co.uk"
        assert len(llm.requests) == 1  # the second start asked nobody
    assert first == second == b"220 mx1.harbourview-dental.co.uk ESMTP Postfix (Ubuntu)"


@pytest.mark.slow
def test_the_command_generates_once_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mailgate honeypot --generate-identity`` as a process, started twice."""
    from tests.honeypot.test_cli import Process, banner

    monkeypatch.setenv("GENAI_TEST_KEY", KEY)  # the child inherits it
    data_dir = tmp_path / "data"
    seen: list[bytes] = []
    with fake_llm(good(POSTFIX_SITE)) as llm:
        argv = [
            "honeypot", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
            "--generate-identity", "--llm-url", llm.url, "--model", "llama3.1",
            "--api-key-env", "GENAI_TEST_KEY", "--llm-timeout", "10",
        ]  # fmt: skip
        for _ in range(2):
            process = Process(*argv, cwd=tmp_path)
            try:
                seen.append(banner(process.port, "127.0.0.1"))
                process.wait_for_log("persona postfix-generated as mx1.harbourview-dental.co.uk")
            finally:
                assert process.stop() == 0
            no_traceback("\n".join(process.log))
        assert len(llm.requests) == 1
        assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert seen == [b"220 mx1.harbourview-dental.co.uk ESMTP Postfix (Ubuntu)\r\n"] * 2


def test_an_identity_for_another_persona_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_llm(good(POSTFIX_SITE), good(EXIM_SITE)) as llm:
        settings = identity_settings(llm.url)
        with attacker.running_honeypot(tmp_path, "postfix", **settings):
            pass
        with (
            caplog.at_level(logging.WARNING, "mailgate.honeypot"),
            attacker.running_honeypot(tmp_path, "exim", **settings) as hp,
        ):
            assert hp.server.profile.software == "Exim 4.94.2"
        assert len(llm.requests) == 2
    assert "is an identity for persona postfix, not exim" in caplog.text
    assert tomllib.loads((tmp_path / "data" / IDENTITY_FILE).read_text())["base"] == "exim"


def test_a_failed_generation_starts_the_base_persona_and_tries_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_llm(Answer(status=500), good(POSTFIX_SITE)) as llm:
        settings = identity_settings(llm.url)
        # 500 three times: the persona as built in, with one warning.
        llm.answers = [Answer(status=500)]
        with (
            caplog.at_level(logging.WARNING, "mailgate.honeypot"),
            attacker.running_honeypot(tmp_path, "postfix", **settings) as hp,
        ):
            assert hp.server.profile is PERSONAS["postfix"]
            banner = attacker.raw_session(hp, b"QUIT\r\n")
        assert banner.startswith(b"220 mail.example.com ESMTP Postfix (Debian/GNU)\r\n")
        warnings = [r for r in caplog.records if "no usable identity" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].exc_info is None
        assert "the next start tries again" in warnings[0].getMessage()
        assert not (tmp_path / "data" / IDENTITY_FILE).exists()
        # The next start asks again, and keeps what it gets.
        llm.answers = [good(POSTFIX_SITE)]
        llm.requests.clear()
        with attacker.running_honeypot(tmp_path, "postfix", **settings) as hp:
            assert hp.server.profile.hostname == "mx1.harbourview-dental.co.uk"
        assert len(llm.requests) == 1


def test_settings_in_the_file_and_as_flags(tmp_path: Path) -> None:
    config = tmp_path / "honeypot.toml"
    config.write_text(
        "[honeypot]\n"
        'data_dir = "data"\n'
        "generate_identity = true\n"
        'llm_url = "http://127.0.0.1:11434/v1"\n'
        'llm_model = "llama3.1"\n'
        'llm_api_key_env = "OLLAMA_KEY"\n'
        "llm_timeout = 20\n"
        'identity_domain = "honey.example.net"\n'
    )
    args = cli.build_parser().parse_args(["honeypot", "--config", str(config)])
    _, hp = build_honeypot_options(args)
    assert hp.generate_identity and hp.llm_url == "http://127.0.0.1:11434/v1"
    assert (hp.llm_model, hp.llm_api_key_env, hp.llm_timeout) == ("llama3.1", "OLLAMA_KEY", 20.0)
    assert hp.identity_domain == "honey.example.net"
    args = cli.build_parser().parse_args(
        ["honeypot", "--config", str(config), "--model", "qwen2.5", "--no-generate-identity"]
    )
    _, hp = build_honeypot_options(args)
    assert hp.llm_model == "qwen2.5" and not hp.generate_identity


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--generate-identity"], "generate_identity needs llm_url (--llm-url URL)"),
        (
            ["--generate-identity", "--llm-url", "http://127.0.0.1:9/v1", "--model", "m",
             "--profile", "x.toml"],
            "give either profile (--profile) or generate_identity",
        ),
        (["--llm-url", "file:///etc/passwd"], "is not an http:// or https:// URL"),
        (["--llm-timeout", "9999"], "at most 600 seconds"),
    ],
)  # fmt: skip
def test_honeypot_setting_errors_are_one_line(
    argv: list[str], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["honeypot", "--data-dir", str(tmp_path / "d"), *argv])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2
    assert problem in line


# --- the attackers of issue 6 against a generated identity ----------------------------------


def test_scripted_attacker_against_a_generated_identity(tmp_path: Path) -> None:
    """A representative part of test_attacker's scripted attack (STARTTLS, the brute
    force, the relay probe, VRFY/EXPN, garbage and HTTP) against an exim persona loaded
    from a generated profile file, with its timing jitter on."""
    out = tmp_path / "site.toml"
    with fake_llm(good(EXIM_SITE)) as llm:
        assert (
            run_cli("--base", "exim", "--llm-url", llm.url, "--model", "m", "--out", str(out)) == 0
        )
    profile = load_profile(out)
    assert profile.reply_delay == (0.0, 0.01)
    sink = attacker.Sink()
    try:
        # As test_attacker does: relay = "pretend" for the open-relay probe, and its
        # local recipients added to the generated users.
        with attacker.running_honeypot(
            tmp_path,
            "exim",
            profile=profile,
            auth_outcome="accept-after:10",
            relay="pretend",
            local_users=(*profile.local_users, "relaytest", "sink"),
        ) as hp:
            with attacker.connect(hp, "127.0.0.3") as smtp:
                code, ehlo = smtp.ehlo("look.example")
                text = ehlo.decode()
                assert text.startswith("mail.kestrel-freight.de Hello look.example")
                assert "STARTTLS" in text and "AUTH PLAIN LOGIN CRAM-MD5" in text
                smtp.starttls()
                assert smtp.ehlo("look.example")[0] == 250
            attacker.brute_force(hp)
            queued = attacker.relay_probe(hp, sink)
            assert attacker.reply_pattern(profile, "message_queued").fullmatch(queued), queued
            for command, (code, _) in attacker.enumerate_users(hp).items():
                expected = profile.vrfy.code if command.startswith("VRFY") else profile.expn.code
                if command.startswith("VRFY") and "@" not in command:
                    # A bare name: the persona's vrfy_unqualified (Exim refuses it).
                    expected = profile.persona.reply("vrfy_unqualified").code
                if command == "VRFY nosuchuser" and profile.vrfy_checks_users:
                    expected = profile.unknown_user.code
                assert code == expected, command
            http = attacker.raw_session(hp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert http.startswith(b"220 mail.kestrel-freight.de ESMTP Exim 4.94.2 ")
            garbage = attacker.raw_session(hp, b"\x16\x03\x01\x00\xa5\x01\x00\r\n")
            assert garbage.startswith(b"220 ")
            hp.wait_all_closed()
            attempts = hp.query("SELECT outcome FROM auth_attempts ORDER BY id")
            assert [a[0] for a in attempts] == ["refused"] * 9 + ["accepted"]
            assert hp.query("SELECT count(*) FROM messages")[0][0] == 2
            lines = {row[0] for row in hp.query("SELECT line FROM events WHERE direction = 'c'")}
            assert "GET / HTTP/1.1" in lines
    finally:
        sink.close()
    assert sink.connections == 0 and hp.outbound == []


# --- timing jitter --------------------------------------------------------------------------------


def test_timing_table_in_profiles(tmp_path: Path) -> None:
    profile = profile_from_mapping(
        {"base": "postfix", "timing": {"banner_delay": [0.1, 0.4]}}, source="t"
    )
    assert profile.banner_delay == (0.1, 0.4) and profile.reply_delay == (0.0, 0.0)
    assert all(p.banner_delay == p.reply_delay == (0.0, 0.0) for p in PERSONAS.values())
    path = tmp_path / "dumped.toml"
    path.write_text(dump_profile(profile))
    assert load_profile(path).banner_delay == (0.1, 0.4)
    for timing, problem in [
        ({"banner_delay": [0.5, 0.1]}, "timing.banner_delay: expected 0 <= min <= max <= 5"),
        ({"reply_delay": [0, 3]}, "timing.reply_delay: expected 0 <= min <= max <= 2"),
        ({"reply_delay": "fast"}, "timing.reply_delay: expected [min, max]"),
        ({"reply_dely": [0, 1]}, "timing.reply_dely: unknown key (did you mean 'reply_delay'?)"),
    ]:
        with pytest.raises(ProfileError, match=re.escape(problem)):
            profile_from_mapping({"base": "postfix", "timing": timing}, source="t")


def timed(connect_to: tuple[str, int], ip: str, times: list[float]) -> None:
    started = time.monotonic()
    with socket.create_connection(connect_to, timeout=5, source_address=(ip, 0)) as sock:
        assert sock.recv(100).startswith(b"220")
        sock.sendall(b"EHLO x\r\n")
        got = sock.recv(1000)
        while not got.endswith(b"\r\n") or b"250 " not in got:
            got += sock.recv(1000)
    times.append(time.monotonic() - started)


def test_jitter_is_applied_without_holding_up_other_sessions(tmp_path: Path) -> None:
    with plugin_honeypot(tmp_path, banner_delay=(0.3, 0.3), reply_delay=(0.1, 0.1)) as (srv, _):
        times: list[float] = []
        clients = [
            threading.Thread(target=timed, args=((srv.host, srv.port), f"127.0.0.{i}", times))
            for i in range(2, 7)
        ]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(10)
        elapsed = time.monotonic() - started
    assert len(times) == 5
    # Each waited for its banner and its EHLO answer; the five together no longer than one.
    assert all(0.4 <= t < 1.2 for t in times), times
    assert elapsed < 1.5


@pytest.mark.parametrize("base", ["postfix", "exim", "sendmail", "exchange"])
def test_talking_during_the_banner_delay_is_the_persona_s_early_talking(
    base: str, tmp_path: Path
) -> None:
    """A banner delay from the identity's timing does not change how the persona treats
    an early talker: a persona whose product reads bytes sent before its banner
    (behaviour early_talkers = "greet": Postfix without postscreen, Exim with
    PIPECONNECT) greets after the delay and answers them; the others refuse at once."""
    profile = profile_from_mapping(
        {"base": base, "timing": {"banner_delay": [0.3, 0.3]}}, source="t"
    )
    greeted = profile.persona.behaviour.early_talkers == "greet"
    with attacker.running_honeypot(tmp_path, base, profile=profile) as hp:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
            sock.sendall(b"EHLO early.example\r\n")
            received = b""
            while received.count(b"\r\n") < 2:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
                if b"\r\n250 " in received:
                    break
        waited = time.monotonic() - started
    if greeted:
        assert waited >= 0.3
        first, _, rest = received.partition(b"\r\n")
        assert first.startswith(f"220 {profile.hostname} ESMTP ".encode()), first
        assert rest.startswith(b"250"), received
    else:  # refused at once with the persona's early-talker reply
        code = profile.persona.outside_reply("early_talker", client_ip="127.0.0.1").code
        assert received.startswith(b"%d " % code), received


def test_jitter_stays_below_the_hook_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "mailgate.honeypot"),
        plugin_honeypot(tmp_path, banner_delay=(0.0, 5.0), settings={"hook_timeout": 2.0}) as (
            srv,
            plugin,
        ),
    ):
        assert plugin.banner_delay == (0.0, 1.0)
        with smtplib.SMTP(srv.host, srv.port, timeout=5) as smtp:
            assert smtp.noop()[0] == 250
    assert "banner_delay lowered to at most 1.0 s" in caplog.text


# --- nmap still names the product ----------------------------------------------------------------

NMAP = shutil.which("nmap")
#: Base -> (an identity the model might give, what nmap -sV must say).
NMAP_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "postfix": (POSTFIX_SITE, "Postfix smtpd"),
    "exim": (EXIM_SITE, "Exim smtpd 4.94.2"),
    "sendmail": (
        {**EXIM_SITE, "banner": "{hostname} ESMTP {software}; {date}", "version": "8.15.2"},
        "Sendmail 8.15.2",
    ),
    "exchange": (
        {
            **POSTFIX_SITE,
            "hostname": "EX2019-02.corp.lindqvist-bygg.se",
            "banner": "{hostname} {software} ready at {date}",
        },
        "Microsoft Exchange smtpd",
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(NMAP is None, reason="nmap is not installed: run scripts/install-test-deps")
@pytest.mark.parametrize("base", sorted(NMAP_CASES))
def test_nmap_names_the_product_of_a_generated_identity(base: str, tmp_path: Path) -> None:
    assert NMAP is not None
    answer, expected = NMAP_CASES[base]
    profile = identity.identity_profile(check_identity(answer, base))
    with attacker.running_honeypot(tmp_path, base, profile=profile) as hp:
        port = hp.port
        run = subprocess.run(
            [NMAP, "-sV", "-Pn", "-n", "--max-retries", "1", "-p", str(port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert run.returncode == 0, run.stderr
    match = re.search(rf"^{port}/tcp\s+open\s+(.*)$", run.stdout, re.M)
    assert match, run.stdout
    assert expected in match[1], f"nmap says {match[1]!r} for a generated {base}"
