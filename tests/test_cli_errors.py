"""What a new user meets first (issue 17): every mistake at start is one line naming the
flag or the file and key, exit status 2, and nothing else on stderr.

Each case runs ``python -m mailgate`` as its own process, as a user would, in a
temporary working directory.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate import cli

SRC = Path(cli.__file__).resolve().parents[2]  # src/, ahead of an installed mailgate
ROOT = SRC.parent
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def mailgate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "XDG_STATE_HOME": str(cwd / "xdg-state"),
    }
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr of a command that failed with status 2."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("not a directory\n")
    return tmp_path


SERVE = ("serve", "--listen", "127.0.0.1:0")


# -- 2, 3, 4: paths the server writes to -------------------------------------------------


def test_state_dir_that_is_a_file(cwd: Path) -> None:
    line = one_line_error(mailgate(cwd, *SERVE, "--state-dir", "afile"))
    assert line == "mailgate: error: --state-dir afile: exists and is not a directory"


def test_maildir_that_is_a_file(cwd: Path) -> None:
    line = one_line_error(mailgate(cwd, *SERVE, "--maildir", "afile"))
    assert line == "mailgate: error: --maildir afile: exists and is not a directory"
    assert "Errno" not in line


def test_maildir_with_a_file_for_tmp(cwd: Path) -> None:
    (cwd / "md").mkdir()
    (cwd / "md" / "tmp").write_text("")
    line = one_line_error(mailgate(cwd, *SERVE, "--maildir", "md"))
    assert line == "mailgate: error: --maildir md: tmp is not a directory"


def test_maildir_under_a_file(cwd: Path) -> None:
    line = one_line_error(mailgate(cwd, *SERVE, "--maildir", "afile/mail"))
    assert (
        line
        == "mailgate: error: --maildir afile/mail: cannot be created, "
        + str(cwd / "afile")
        + " is not a directory"
    )


def test_mbox_in_a_missing_directory(cwd: Path) -> None:
    line = one_line_error(mailgate(cwd, *SERVE, "--mbox", "/nonexistent-mailgate/all.mbox"))
    assert line == (
        "mailgate: error: --mbox /nonexistent-mailgate/all.mbox: "
        "directory /nonexistent-mailgate does not exist"
    )


def test_mbox_that_is_a_directory(cwd: Path) -> None:
    (cwd / "box").mkdir()
    line = one_line_error(mailgate(cwd, *SERVE, "--mbox", "box"))
    assert line == "mailgate: error: --mbox box: not a regular file"


def test_path_errors_from_a_file_name_the_file_and_key(cwd: Path) -> None:
    (cwd / "m.toml").write_text('[server]\nmbox = "missing/all.mbox"\n')
    line = one_line_error(mailgate(cwd, "serve", "--config", "m.toml"))
    assert line == (
        f"mailgate: error: m.toml: mbox missing/all.mbox: directory {cwd / 'missing'} "
        "does not exist"
    )


# -- 5: serve-only flags given to the honeypot ------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--maildir", "x"),
            "mailgate: error: --maildir: not for honeypot mode: a honeypot never delivers "
            "or hands on mail (everything stays in its data_dir)",
        ),
        (("--workers", "2"), "mailgate: error: --workers: honeypot mode runs in one process; remove workers"),
    ],
)  # fmt: skip
def test_honeypot_refuses_serve_only_flags_by_name(
    cwd: Path, args: tuple[str, ...], expected: str
) -> None:
    assert one_line_error(mailgate(cwd, "honeypot", "--data-dir", "d", *args)) == expected
    assert one_line_error(mailgate(cwd, "honeypot", *args)) == expected


# -- 6: policy tables, unknown flags, the honeypot's start -------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[limits]\nmesages_per_ip = '10/1h'\n",
         "[limits]: unknown key 'mesages_per_ip' (did you mean 'messages_per_ip'?)"),
        ("[greylisting]\ndelai = '5m'\n",
         "[greylisting]: unknown key 'delai' (did you mean 'delay'?)"),
        ("[lists]\nblock_network = ['10.0.0.0/8']\n",
         "[lists]: unknown key 'block_network' (did you mean 'block_networks'?)"),
    ],
)  # fmt: skip
def test_policy_table_typo_is_one_line_like_a_server_typo(
    cwd: Path, table: str, expected: str
) -> None:
    (cwd / "m.toml").write_text(table)
    # No log line ("no local_domains: ...") comes before it: the table is read first.
    assert one_line_error(mailgate(cwd, *SERVE, "--config", "m.toml")) == (
        f"mailgate: error: m.toml {expected}"
    )
    (cwd / "s.toml").write_text("[server]\nmax_sise = 1\n")
    server_typo = one_line_error(mailgate(cwd, *SERVE, "--config", "s.toml"))
    assert server_typo.startswith("mailgate: error: s.toml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("serve", "--lisen", "127.0.0.1:25"),
         "mailgate serve: error: unrecognized arguments: --lisen (did you mean --listen?) "
         "(see mailgate serve --help)"),
        (("serve", "--maildir=m", "--max-sise=1"),
         "mailgate serve: error: unrecognized arguments: --max-sise (did you mean --max-size?) "
         "(see mailgate serve --help)"),
        (("honeypot", "--lisen", "127.0.0.1:25"),
         "mailgate honeypot: error: unrecognized arguments: --lisen (did you mean --listen?) "
         "(see mailgate honeypot --help)"),
        (("honeypot", "report", "--dat-dir", "d"),
         "mailgate honeypot report: error: unrecognized arguments: --dat-dir "
         "(did you mean --data-dir?) (see mailgate honeypot report --help)"),
        (("check-config", "--confg", "m.toml"),
         "mailgate check-config: error: unrecognized arguments: --confg (did you mean --config?) "
         "(see mailgate check-config --help)"),
        (("serve", "--frobnicate"),
         "mailgate serve: error: unrecognized arguments: --frobnicate (see mailgate serve --help)"),
    ],
)  # fmt: skip
def test_unknown_flags_name_the_subcommand_and_a_close_flag(
    cwd: Path, args: tuple[str, ...], expected: str
) -> None:
    assert one_line_error(mailgate(cwd, *args)) == expected


def test_known_flags_abbreviations_and_negative_numbers_still_parse() -> None:
    # The check must not refuse what argparse accepts: a unique prefix, -vq, --x=value,
    # a negative number as a value (refused later, by the setting, naming it).
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--verb", "--max-size=1M", "--listen", "127.0.0.1:0"])
    assert args.verbose is True and args.max_size == "1M"
    args = parser.parse_args(["serve", "--max-size", "-1"])
    assert args.max_size == "-1"
    args = parser.parse_args(["honeypot", "report", "--data-dir", "d", "--top", "3"])
    assert args.honeypot_command == "report" and args.top == 3


def test_honeypot_port_in_use_is_a_cannot_start_line(cwd: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mailgate(cwd, "honeypot", "--data-dir", "d", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert lines == [
        f"mailgate: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


# -- 8: small things ---------------------------------------------------------------------


def test_state_directory_is_git_ignored_and_the_docs_say_so() -> None:
    assert ".mailgate/" in (ROOT / ".gitignore").read_text().splitlines()
    guide = " ".join((ROOT / "docs" / "user-guide.md").read_text().split())
    assert "add `.mailgate/` to your `.gitignore`" in guide


def test_auth_user_help_names_the_mechanisms_offered(capsys: pytest.CaptureFixture[str]) -> None:
    from mailgate.plugins.static_auth import StaticUsers

    assert cli.main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]  # not usage
    section = text.split("--auth-user USER:PASSWORD", 1)[1].split(" --", 1)[0]
    for mechanism in StaticUsers.auth_mechanisms:
        assert mechanism in section, (mechanism, section)
