"""``mailgate users add|remove|list``: the file it writes, its errors, and what it never
prints."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailgate import cli
from mailgate.plugins.users_file import (
    locked_directory,
    read_document,
    write_document,
)

PASSWORD = "tr0ub4dor&3"


def run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    stdin: str | None = None,
) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = cli.main(["users", *args])
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and "$argon2" not in out + err, "secrets printed"
    assert "Traceback" not in err
    return status, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return tmp_path / "users"


def test_add_list_update_remove(
    users: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = ("--file", str(users))
    status, out, err = run(
        capsys, monkeypatch, "add", "alice", *file, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert (status, out, err) == (0, f"added user alice to {users}\n", "")
    assert users.stat().st_mode & 0o777 == 0o600
    first = read_document(users).users()["alice"]
    assert first.startswith("$argon2id$")
    assert PasswordHasher().verify(first, PASSWORD)

    run(capsys, monkeypatch, "add", "bob@example.com", *file, "--password-stdin", stdin="x\r\n")
    status, out, _ = run(capsys, monkeypatch, "list", *file)
    assert (status, out) == (0, "alice\nbob@example.com\n")
    assert PasswordHasher().verify(read_document(users).users()["bob@example.com"], "x")

    # A new password for alice: replaced in place, reported as an update.
    status, out, _ = run(
        capsys, monkeypatch, "add", "alice", *file, "--password-stdin", stdin=PASSWORD + "!\n"
    )
    assert (status, out) == (0, f"updated user alice in {users}\n")
    second = read_document(users).users()["alice"]
    assert second != first and PasswordHasher().verify(second, PASSWORD + "!")
    assert [line.partition(":")[0] for line in users.read_text().splitlines()] == [
        "alice",
        "bob@example.com",
    ]

    status, out, _ = run(capsys, monkeypatch, "remove", "alice", *file)
    assert (status, out) == (0, f"removed user alice from {users}\n")
    assert run(capsys, monkeypatch, "list", *file)[1] == "bob@example.com\n"
    assert [p.name for p in users.parent.iterdir()] == ["users"], "temporary files left"


def test_default_file_is_users_in_the_current_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(capsys, monkeypatch, "add", "alice", "--password-stdin", stdin="pw\n")[0] == 0
    assert list(read_document(tmp_path / "users").index) == ["alice"]
    assert run(capsys, monkeypatch, "list")[1] == "alice\n"


def test_rewrites_keep_comments_mode_and_symlinks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "etc" / "users"
    real.parent.mkdir()
    hasher = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    real.write_text(f"# who may send\n\ncarol:{hasher.hash('c')}\n# end\n")
    real.chmod(0o640)
    link = tmp_path / "users-link"
    link.symlink_to(real)

    run(capsys, monkeypatch, "add", "dave", "--file", str(link), "--password-stdin", stdin="d\n")
    run(capsys, monkeypatch, "remove", "carol", "--file", str(link))
    assert link.is_symlink(), "the link was replaced by a file"
    lines = real.read_text().splitlines()
    assert lines[:3] == ["# who may send", "", "# end"]
    assert lines[3].startswith("dave:$argon2id$")
    assert real.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("a:b", "cannot contain ':'"),
        ("a b", "white space"),
        ("a\tb", "white space"),
        ("a\x7fb", "control characters"),
        ("a\udcffb", "control characters"),  # an undecodable byte in argv
        ("#admin", "cannot start with '#'"),
        ("", "empty"),
    ],
)
def test_bad_user_names(
    users: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    user: str,
    reason: str,
) -> None:
    status, out, err = run(
        capsys, monkeypatch, "add", user, "--file", str(users), "--password-stdin", stdin="pw\n"
    )
    assert (status, out) == (2, "")
    one_line_error(err, "mailgate users: bad user name", reason)
    assert not users.exists()


def test_password_input(
    users: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    add = ("add", "alice", "--file", str(users))
    # Not a terminal and no --password-stdin: refuse rather than read a secret silently.
    status, _, err = run(capsys, monkeypatch, *add, stdin="pw\n")
    assert status == 2
    one_line_error(err, "stdin is not a terminal", "--password-stdin")
    for stdin in ("", "\n"):
        status, _, err = run(capsys, monkeypatch, *add, "--password-stdin", stdin=stdin)
        assert status == 2
        one_line_error(err, "password")
    assert not users.exists()

    # A terminal: asked twice with getpass; the two must match.
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []
    answers: list[str] = []

    def getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("getpass.getpass", getpass)
    monkeypatch.setattr(sys, "stdin", Terminal())
    answers[:] = [PASSWORD, PASSWORD + "x"]
    status, _, err = run(capsys, monkeypatch, *add)
    assert status == 2
    one_line_error(err, "do not match")
    assert not users.exists()

    answers[:] = [PASSWORD, PASSWORD]
    status, out, _ = run(capsys, monkeypatch, *add)
    assert (status, out) == (0, f"added user alice to {users}\n")
    assert prompts[-2:] == ["Password for alice: ", "Repeat the password: "]
    assert PasswordHasher().verify(read_document(users).users()["alice"], PASSWORD)


def test_file_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing"
    for command in (["list"], ["remove", "alice"]):
        status, out, err = run(capsys, monkeypatch, *command, "--file", str(missing))
        assert (status, out) == (2, "")
        one_line_error(err, f"users file {missing} does not exist")

    no_dir = tmp_path / "no" / "users"
    status, _, err = run(
        capsys, monkeypatch, "add", "alice", "--file", str(no_dir), "--password-stdin", stdin="p\n"
    )
    assert status == 2
    one_line_error(err, f"cannot write {no_dir}", "No such file or directory")

    # A broken file is reported, never overwritten.
    broken = tmp_path / "broken"
    broken.write_text("alice:plaintext-password\n")
    commands: list[list[str]] = [["list"], ["remove", "alice"], ["add", "bob", "--password-stdin"]]
    for command in commands:
        status, out, err = run(capsys, monkeypatch, *command, "--file", str(broken), stdin="p\n")
        assert (status, out) == (2, "")
        one_line_error(err, "line 1: not an argon2 hash")
        assert "plaintext-password" not in err
    assert broken.read_text() == "alice:plaintext-password\n"

    users = tmp_path / "users"
    run(capsys, monkeypatch, "add", "alice", "--file", str(users), "--password-stdin", stdin="p\n")
    status, _, err = run(capsys, monkeypatch, "remove", "bob", "--file", str(users))
    assert status == 2
    one_line_error(err, f"no user 'bob' in {users}")


def test_usage_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for args in ((), ("add",), ("frobnicate",)):
        status, _, err = run(capsys, monkeypatch, *args)
        assert status == 2
        one_line_error(err, "mailgate users")


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """The directory lock serialises read-modify-write: every writer's user survives."""
    users = tmp_path / "users"
    hashed = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash("pw")

    def add(name: str) -> None:
        with locked_directory(users):
            doc = read_document(users, missing_ok=True)
            doc.set(name, hashed)
            write_document(users, doc)

    threads = [threading.Thread(target=add, args=(f"user{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(read_document(users).index) == sorted(f"user{i}" for i in range(16))


def test_as_a_command(tmp_path: Path) -> None:
    """The real entry point, with the password on a pipe."""
    users = tmp_path / "users"
    command = [sys.executable, "-m", "mailgate", "users"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    added = subprocess.run(
        [*command, "add", "alice", "--file", str(users), "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (added.returncode, added.stdout, added.stderr) == (
        0,
        f"added user alice to {users}\n",
        "",
    )
    listed = subprocess.run(
        [*command, "list", "--file", str(users)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert (listed.returncode, listed.stdout) == (0, "alice\n")
    assert PasswordHasher().verify(read_document(users).users()["alice"], PASSWORD)
