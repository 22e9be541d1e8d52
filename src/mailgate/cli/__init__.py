"""The ``mailgate`` command.

Every problem with the command line or the configuration ends the program with one line
on stderr and exit status 2, as does a server that cannot start (port in use, ...).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import mailgate.protocol as protocol
from mailgate.cli.check import add_check_parser, run_check
from mailgate.cli.dkim import add_dkim_parser, run_dkim
from mailgate.cli.honeypot import add_honeypot_parser, run_honeypot
from mailgate.cli.queue import add_queue_parser, run_queue
from mailgate.cli.routes import add_routes_parser, run_routes
from mailgate.cli.sendmail import EX_USAGE, add_sendmail_parser, run_sendmail
from mailgate.cli.users import add_users_parser, run_users
from mailgate.config import (
    SERVER_SETTINGS,
    ConfigError,
    build_options,
    config_mode,
    setting_sources,
)
from mailgate.server.options import GROUPS, ServerOptions
from mailgate.settings.flags import HiddenFlagsFormatter, add_config_flag, add_flags
from mailgate.version import __version__

EXIT_CONFIG = 2
EXIT_STARTUP = 2  # the issue fixes it: start-up problems (port in use) exit 2 too
EXIT_INTERRUPTED = 130

_SERVE_EPILOG = """\
configuration file:
  Every flag can also be set in the TOML file given with --config, in a [server]
  table, under the flag's name with underscores ("auth_users" for --auth-user).
  Flags given on the command line override the file; --no-X turns off a switch the
  file turns on. docs/settings.md lists every setting. Example:

    [server]
    listen = ["0.0.0.0:25", "[::]:25"]
    smtps_listen = ["0.0.0.0:465"]
    hostname = "mx.example.com"
    maildir = "/var/mail/incoming"
    tls_cert = "/etc/mailgate/cert.pem"
    tls_key = "/etc/mailgate/key.pem"
    max_size = "50M"
    proxy_protocol = ["10.0.0.0/8"]

  Relative paths in the file are relative to the file's directory.
  'mailgate check-config' takes the same flags and checks them without starting.
"""


class _UsageError(Exception):
    pass


_NUMBER = re.compile(r"-\d+(\.\d*)?|-\.\d+")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and unknown flags caught by the (sub)command they
    were given to, with a "did you mean" and that command's help named."""

    # argparse prints the whole usage before its error; one line is easier to spot in logs.
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A subcommand's parser is called with its own arguments: check them here, before
        # argparse takes an unknown flag's value for a positional ("invalid choice") or
        # leaves the flag to the top-level parser, which would name only "mailgate --help".
        self._refuse_unknown_flags(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_flags(self, args: list[str]) -> None:
        commands = self._subcommands()
        for token in args:
            if token == "--" or token in commands:
                return  # the rest is positional, or a subcommand's that checks it itself
            if not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token):
                continue
            name = token.split("=", 1)[0]
            if self._known_flag(name):
                continue
            known = sorted(s for s in self._option_string_actions if s.startswith("--"))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.error(f"unrecognized arguments: {name}{hint}")

    def _subcommands(self) -> frozenset[str]:
        names: set[str] = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                names.update(action.choices)
        return frozenset(names)

    def _known_flag(self, name: str) -> bool:
        if name in self._option_string_actions:
            return True
        if not name.startswith("--"):
            # -vq: a cluster of one-letter switches, or -xVALUE.
            return name[:2] in self._option_string_actions
        # argparse accepts a unique prefix of a long flag (--verb for --verbose).
        return any(known.startswith(name) for known in self._option_string_actions)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailgate", description="An embeddable SMTP/LMTP server.")
    # Which build runs (setup.py: the protocol and the server's hot path compiled, or none
    # of it): benchmarks and bug reports need to know.
    build = "compiled with mypyc" if protocol.COMPILED else "pure Python"
    parser.add_argument("--version", action="version", version=f"mailgate {__version__} ({build})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the SMTP/LMTP server",
        description="Run the SMTP/LMTP server until interrupted (SIGINT or SIGTERM).",
        epilog=_SERVE_EPILOG,
        formatter_class=HiddenFlagsFormatter,
    )
    _add_serve_arguments(serve)
    add_check_parser(commands)
    add_users_parser(commands)
    add_honeypot_parser(commands)
    add_queue_parser(commands)
    add_routes_parser(commands)
    add_dkim_parser(commands)
    add_sendmail_parser(commands)
    return parser


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    add_config_flag(serve)
    # Every setting's flag, from the settings table (mailgate.server.options).
    add_flags(serve, SERVER_SETTINGS, GROUPS)


def main(argv: list[str] | None = None) -> int:
    """Run the ``mailgate`` command with ``argv`` (default: sys.argv[1:]); the exit status."""
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]) == "sendmail":
            # Installed as /usr/sbin/sendmail (a link to mailgate): sendmail's arguments.
            argv = ["sendmail", *argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        # sendmail's callers expect sysexits: EX_USAGE for a wrong command line.
        return _fail(str(exc), EX_USAGE if argv[:1] == ["sendmail"] else EXIT_CONFIG)
    except SystemExit as exc:  # --help and --version end here
        return exc.code if isinstance(exc.code, int) else 0
    if args.command == "users":
        return run_users(args)
    if args.command == "honeypot":
        return run_honeypot(args)
    if args.command == "queue":
        return run_queue(args)
    if args.command == "routes":
        return run_routes(args)
    if args.command == "dkim":
        return run_dkim(args)
    if args.command == "sendmail":
        return run_sendmail(args)
    if args.command == "check-config":
        return run_check(args)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        if config_mode(args.config) == "honeypot":
            # mode = "honeypot" in the file: the same as mailgate honeypot --config FILE.
            return run_honeypot(args)
        options = build_options(args)
    except ConfigError as exc:
        return _fail(f"mailgate: error: {exc}", EXIT_CONFIG)

    # Imported here: the server pulls in asyncio and every delivery, which --help and
    # configuration errors do not need.
    from mailgate.composition.check import preflight
    from mailgate.composition.server import run

    # What the start would stumble on (a state directory that is a file, an mbox that
    # cannot be written, a typo in a policy table), said before the first log line. Auth
    # backends and deliveries are left to the start ("cannot start: ..."), as before.
    found = preflight(options, setting_sources(args), backends=False)
    if found.problems:
        return _fail(f"mailgate: error: {found.problems[0]}", EXIT_CONFIG)
    from mailgate.server.errors import StartupError

    def reload_options() -> ServerOptions:
        # SIGHUP: read the file again; the flags keep overriding it.
        return build_options(args)

    try:
        return run(options, reload_options=reload_options)
    except ConfigError as exc:
        return _fail(f"mailgate: error: {exc}", EXIT_CONFIG)
    except StartupError as exc:
        return _fail(f"mailgate: cannot start: {exc}", EXIT_STARTUP)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str, status: int) -> int:
    # A message quoting user input could contain line breaks; keep it to one line.
    print(" ".join(message.splitlines()), file=sys.stderr)
    return status
