"""The settings table: every setting declared once, on its options field; flags, file
keys, help and docs/settings.md all come from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate import cli, config
from mailgate.config import HONEYPOT_SETTINGS, KEYS, SERVER_SETTINGS, build_options, flag_name
from mailgate.honeypot.settings import (
    HONEYPOT_REFUSED,
    REFUSED_FLAGS,
    SERVER_FLAGS,
    HoneypotOptions,
)
from mailgate.server.options import GROUPS, ServerOptions
from mailgate.settings import (
    CodeOnly,
    ConfigError,
    Derived,
    Setting,
    Value,
    build_fields,
    code_only,
    converters,
    describe,
    required,
    roles,
    setting,
    settings_of,
)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture(autouse=True)
def fixed_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "machine_fqdn", lambda: "fqdn.example.test")


def build(*argv: str) -> ServerOptions:
    return build_options(cli.build_parser().parse_args(["serve", *argv]))


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(body)
    return path


# -- declared once ----------------------------------------------------------------------------


@pytest.mark.parametrize("options_class", [ServerOptions, HoneypotOptions])
def test_every_field_is_covered_exactly_once(options_class: type) -> None:
    fields = [field.name for field in dataclasses.fields(options_class)]
    declared = roles(options_class)
    assert [name for name, _ in declared] == fields
    # A field is a setting, derived from input settings, or only set from code; never two.
    for name, role in declared:
        assert isinstance(role, Setting | Derived | CodeOnly), name
        if isinstance(role, CodeOnly):
            assert role.reason, name
        if isinstance(role, Derived):
            assert role.inputs, name
    keys = [item.key for item in settings_of(options_class)]
    assert len(keys) == len(set(keys))


def test_the_server_keys_are_the_tables() -> None:
    assert tuple(item.key for item in SERVER_SETTINGS) == KEYS
    setting_fields = {name for name, role in roles(ServerOptions) if isinstance(role, Setting)}
    inputs = {
        item.key
        for _, role in roles(ServerOptions)
        if isinstance(role, Derived)
        for item in role.inputs
    }
    # The keys that do not map one to one onto a field: each an input of a derived field.
    assert set(KEYS) - setting_fields == inputs
    assert inputs == {
        "listen",
        "smtps_listen",
        "submission_listen",
        "submissions_listen",
        "sink",
        "no_received_header",
        "verbose",
        "quiet",
    }
    for item in SERVER_SETTINGS:
        assert item.group in GROUPS, item.key
        assert item.help and not item.help.endswith("."), item.key


def test_a_field_without_a_declaration_is_an_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        declared: int = setting(1, convert=converters.count, help="a count", group="g")
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Options\.forgotten is declared with neither"):
        roles(Options)


def test_build_fields_converts_and_checks_required() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        where: Path = required(
            convert=converters.path,
            help="a place",
            group="g",
            metavar="DIR",
            missing="needs a place",
        )
        count: int = setting(3, convert=converters.count, help="how many", group="g")
        note: str = code_only("x", reason="code sets it")

    fields = build_fields(Options, {"where": Value("d", "--where")}, table="t")
    assert Options(**fields) == Options(where=Path("d"), count=3)
    with pytest.raises(ConfigError, match=r"^--count: must be at least 1, got 0$"):
        # A bad value is reported before the missing one.
        build_fields(Options, {"count": Value("0", "--count")}, table="t")
    with pytest.raises(ConfigError, match=r"^needs a place: --where DIR \(or where in \[t\]\)$"):
        build_fields(Options, {}, table="t")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "none"),
        (False, "off"),
        (True, "on"),
        (300.0, "300"),
        (0.5, "0.5"),
        (Path("maildir"), "./maildir"),
        (Path("/var/mail"), "/var/mail"),
        ((), "none"),
        (("a", "b"), "a, b"),
    ],
)
def test_describe(value: object, text: str) -> None:
    assert describe(value) == text


def test_size_text() -> None:
    assert converters.size_text(25 * 1024**2) == "26214400, i.e. 25M"
    assert converters.size_text(1024**3) == "1073741824, i.e. 1G"
    assert converters.size_text(1000) == "1000"


# -- flags ------------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    return commands.choices["serve"]  # type: ignore[no-any-return]


def test_every_setting_is_a_flag_with_its_spellings() -> None:
    actions = {action.dest: action for action in serve_parser()._actions}
    for item in SERVER_SETTINGS:
        action = actions[item.key]
        expected = [*item.option_strings]
        if item.off_option:
            expected.append(item.off_option)
        assert action.option_strings == expected, item.key
        assert action.default is None, item.key
        assert flag_name(item.key) == item.flag


@pytest.mark.parametrize(
    "key", [item.key for item in SERVER_SETTINGS if item.switch], ids=lambda key: key
)
def test_a_switch_on_in_the_file_is_turned_off_by_its_no_flag(tmp_path: Path, key: str) -> None:
    item = next(s for s in SERVER_SETTINGS if s.key == key)
    path = write(tmp_path, f"[server]\n{key} = true\n")
    assert item.off_option is not None
    assert build("--config", str(path)) != build()
    assert build("--config", str(path), item.off_option) == build()
    assert build("--config", str(path), item.flag) == build("--config", str(path))


def test_the_no_flags_by_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[server]\nlmtp = true\nno_received_header = true\nverbose = true\nsink = true\n",
    )
    options = build("--config", str(path))
    assert (options.lmtp, options.received_header, options.log_level, options.delivery) == (
        True,
        False,
        "DEBUG",
        "sink",
    )
    options = build(
        "--config", str(path), "--no-lmtp", "--received-header", "--no-verbose", "--no-sink"
    )
    assert (options.lmtp, options.received_header, options.log_level, options.delivery) == (
        False,
        True,
        "INFO",
        "maildir",
    )


def test_a_no_flag_leaves_the_other_choice_of_the_file(tmp_path: Path) -> None:
    # --no-sink turns off sink only; it does not choose another delivery over the file's.
    path = write(tmp_path, '[server]\nmbox = "all.mbox"\nquiet = true\n')
    options = build("--config", str(path), "--no-sink", "--no-verbose")
    assert options.delivery == "mbox" and options.log_level == "WARNING"
    # A positive flag replaces the file's choice, as before.
    assert build("--config", str(path), "-v").log_level == "DEBUG"


def test_honeypot_switch_can_be_turned_off(tmp_path: Path) -> None:
    path = write(tmp_path, "[honeypot]\ndata_dir = 'd'\ndrop_after_credentials = true\n")
    parse = cli.build_parser().parse_args
    _, hp = config.build_honeypot_options(parse(["honeypot", "--config", str(path)]))
    assert hp.drop_after_credentials is True
    _, hp = config.build_honeypot_options(
        parse(["honeypot", "--config", str(path), "--no-drop-after-credentials"])
    )
    assert hp.drop_after_credentials is False


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_lists_every_spelling_by_group(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "serve")
    for item in SERVER_SETTINGS:
        for flag in (*item.option_strings, item.off_option):
            if flag is not None:
                assert flag in text, flag
    positions = [text.index(f" {GROUPS[name]}: ") for name in GROUPS]
    assert positions == sorted(positions)


def test_the_honeypot_takes_its_server_flags_from_serves_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve = {action.dest: action for action in serve_parser()._actions}
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    honeypot = {action.dest: action for action in commands.choices["honeypot"]._actions}
    for key in (*SERVER_FLAGS, *REFUSED_FLAGS):
        assert honeypot[key].option_strings == serve[key].option_strings, key
        assert type(honeypot[key]) is type(serve[key]), key
    for item in HONEYPOT_SETTINGS:
        assert item.key in honeypot
    text = help_text(capsys, "honeypot")
    for key in SERVER_FLAGS:
        assert flag_name(key) in text
    # The refused ones are parsed but not offered.
    for key in REFUSED_FLAGS:
        assert flag_name(key) + " " not in text, key
    assert "(default: the persona's, e.g. mail.example.com)" in text


def refused_argv(key: str) -> list[str]:
    item = next(s for s in SERVER_SETTINGS if s.key == key)
    if item.switch:
        return [item.flag]
    return [item.flag, item.choices[0] if item.choices else "2"]


@pytest.mark.parametrize("key", REFUSED_FLAGS)
def test_honeypot_refuses_serve_only_flags_by_name(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["honeypot", "--data-dir", "d", *refused_argv(key)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    reason = HONEYPOT_REFUSED.get(key, "honeypot mode runs in one process")
    assert err.startswith(f"mailgate: error: {flag_name(key)}: ")
    assert reason in err


def test_honeypot_maildir_flag_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["honeypot", "--maildir", "x"]) == 2
    assert capsys.readouterr().err == (
        "mailgate: error: --maildir: not for honeypot mode: a honeypot never delivers or "
        "hands on mail (everything stays in its data_dir)\n"
    )


# -- the reference and the layers ------------------------------------------------------------


def test_docs_settings_md_is_current() -> None:
    # scripts/settings-doc writes it; run it after changing a setting.
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == config.settings_reference(), "docs/settings.md is stale"


def test_the_reference_names_every_setting() -> None:
    text = config.settings_reference()
    for item in (*SERVER_SETTINGS, *HONEYPOT_SETTINGS):
        assert f"| `{item.key}` | `" in text, item.key
        assert item.default_description().replace("|", "\\|") in text, item.key


def imported_modules(statement: str) -> set[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return {name for name in result.stdout.split() if name.startswith("mailgate")}


def test_the_settings_package_is_a_leaf() -> None:
    loaded = imported_modules(
        "import mailgate.settings, mailgate.settings.flags, mailgate.settings.doc"
    )
    # mailgate.version: the package root names the version.
    allowed = ("mailgate.settings", "mailgate.protocol", "mailgate.dns", "mailgate.version")
    outside = {
        name
        for name in loaded
        if name != "mailgate" and not any(name == a or name.startswith(a + ".") for a in allowed)
    }
    assert outside == set()


def test_reading_the_configuration_loads_no_plugin() -> None:
    loaded = imported_modules("import mailgate.config")
    assert "mailgate.honeypot.plugin" not in loaded
    assert not any(name.startswith("mailgate.plugins") for name in loaded)
