"""``mailgate users add|remove|list``: manage the users file of the ``users-file`` backend.

Every change is a read-modify-write under a lock on the file's directory, written to a
temporary file that is fsynced and renamed over the old one: a server reading the file
at the same time sees the old version or the new one, never half of one. Passwords and
hashes are never printed. Problems end the command with one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

DEFAULT_FILE = "users"
EXIT_ERROR = 2

_EPILOG = """\
The file holds one user per line, "name:$argon2id$...", made with argon2-cffi's default
parameters; lines starting with '#' are comments. A running server (--users-file)
notices changes within a second, without a restart.
"""


class UsersCommandError(Exception):
    """A problem to report in one line."""


def add_users_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``users`` and its subcommands to the ``mailgate`` parser."""
    users = commands.add_parser(
        "users",
        help="manage the users file for AUTH (--users-file)",
        description="Add, remove and list the users of a users file (argon2 hashes).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    file_help = f"the users file (default: ./{DEFAULT_FILE})"

    add = actions.add_parser(
        "add",
        help="add a user, or set a new password for one",
        description="Add USER with a password, or replace the password of an existing USER. "
        "The password is asked twice on the terminal, or read as one line from stdin with "
        "--password-stdin. The file is created (mode 0600) if it does not exist.",
    )
    add.add_argument("user", metavar="USER", help="the user name (no ':', spaces or controls)")
    add.add_argument("--file", default=DEFAULT_FILE, metavar="FILE", help=file_help)
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )

    remove = actions.add_parser("remove", help="remove a user", description="Remove USER.")
    remove.add_argument("user", metavar="USER", help="the user name")
    remove.add_argument("--file", default=DEFAULT_FILE, metavar="FILE", help=file_help)

    list_ = actions.add_parser(
        "list", help="list the user names", description="Print the user names, one per line."
    )
    list_.add_argument("--file", default=DEFAULT_FILE, metavar="FILE", help=file_help)


def run_users(args: argparse.Namespace) -> int:
    """Run ``mailgate users ...``; the exit status."""
    try:
        if args.users_command == "add":
            return _add(args.user, Path(args.file), args.password_stdin)
        if args.users_command == "remove":
            return _remove(args.user, Path(args.file))
        return _list(Path(args.file))
    except UsersCommandError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing changed")


def _add(user: str, path: Path, from_stdin: bool) -> int:
    from mailgate.plugins import users_file as uf

    _check_user(user)
    target = uf.real_path(path)
    try:
        # A broken file is reported before anybody types a password for nothing.
        uf.read_document(target, missing_ok=True)
    except uf.UsersFileError as exc:
        raise UsersCommandError(f"mailgate users: {exc}") from None
    password = _read_password(user, from_stdin)
    # Hashed before taking the lock: argon2 takes a while and the lock should not.
    from argon2 import PasswordHasher

    hashed = PasswordHasher().hash(password)
    try:
        with uf.locked_directory(target):
            doc = uf.read_document(target, missing_ok=True)
            updated = doc.set(user, hashed)
            uf.write_document(target, doc)
    except uf.UsersFileError as exc:
        raise UsersCommandError(f"mailgate users: {exc}") from None
    except OSError as exc:
        raise UsersCommandError(f"mailgate users: cannot write {path}: {_reason(exc)}") from None
    print(f"updated user {user} in {path}" if updated else f"added user {user} to {path}")
    return 0


def _remove(user: str, path: Path) -> int:
    from mailgate.plugins import users_file as uf

    target = uf.real_path(path)
    try:
        with uf.locked_directory(target):
            doc = uf.read_document(target)
            if not doc.remove(user):
                raise UsersCommandError(f"mailgate users: no user {user!r} in {path}")
            uf.write_document(target, doc)
    except uf.UsersFileError as exc:
        raise UsersCommandError(f"mailgate users: {exc}") from None
    except OSError as exc:
        raise UsersCommandError(f"mailgate users: cannot write {path}: {_reason(exc)}") from None
    print(f"removed user {user} from {path}")
    return 0


def _list(path: Path) -> int:
    from mailgate.plugins import users_file as uf

    try:
        doc = uf.read_document(path)
    except uf.UsersFileError as exc:
        raise UsersCommandError(f"mailgate users: {exc}") from None
    for user in doc.index:
        print(user)
    return 0


def _check_user(user: str) -> None:
    from mailgate.plugins.users_file import check_username

    try:
        check_username(user)
    except ValueError as exc:
        raise UsersCommandError(f"mailgate users: bad user name {user!r}: {exc}") from None


def _read_password(user: str, from_stdin: bool) -> str:
    if from_stdin:
        try:
            line = sys.stdin.readline()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersCommandError(f"mailgate users: cannot read the password: {exc}") from None
        password = line.removesuffix("\n").removesuffix("\r")
        if not line:
            raise UsersCommandError("mailgate users: no password on stdin")
    elif sys.stdin is not None and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if password and getpass.getpass("Repeat the password: ") != password:
            raise UsersCommandError("mailgate users: the passwords do not match; nothing changed")
    else:
        raise UsersCommandError(
            "mailgate users: stdin is not a terminal; give --password-stdin to read the "
            "password from it"
        )
    if not password:
        raise UsersCommandError("mailgate users: empty password; nothing changed")
    return password


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _fail(message: str) -> int:
    # Keep it to one line, whatever the user name contained.
    print(" ".join(message.splitlines()), file=sys.stderr)
    return EXIT_ERROR
