"""``mailgate routes test``: which ``[[routes]]`` rule routes each recipient, and why.

The work is :func:`mailgate.plugins.routing.routes_test`; this is its command line. Exit
statuses are its own: 0 every recipient was routed (a reject rule is an answer too), 1 a
recipient, the sender or the client address given is not one, 2 the file or its rules
are wrong.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_EPILOG = """\
exit status:
  0 every recipient was routed (a reject rule is an answer too); 1 a recipient, the
  sender or the client address given is not one; 2 the file or its rules are wrong.

docs/routing.md explains the rules and this command's output.
"""


def add_routes_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``routes`` and its ``test`` subcommand to the ``mailgate`` parser."""
    routes = commands.add_parser(
        "routes",
        help="try the [[routes]] rules of a configuration",
        description="Work with the [[routes]] rules of a configuration file.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = routes.add_subparsers(dest="routes_command", metavar="ACTION", required=True)
    test = actions.add_parser(
        "test",
        help="print the rule and action for each recipient",
        description="Print, for each recipient, the rule that matches, what it does, the "
        "patterns that made it match and the earlier rules that were passed over.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    test.add_argument("--config", required=True, metavar="FILE", help="the configuration file")
    test.add_argument(
        "--sender", metavar="ADDRESS", help="the envelope sender (<> for the null sender)"
    )
    test.add_argument("--client", metavar="IP", help="the client's IP address")
    test.add_argument(
        "--authenticated", action="store_true", help="as if the client had authenticated"
    )
    test.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="recipient addresses")


def run_routes(args: argparse.Namespace) -> int:
    """Run ``mailgate routes test ...``; the exit status."""
    from mailgate.plugins.routing import routes_test

    text, status = routes_test(
        args.config,
        args.recipients,
        sender=args.sender,
        client=args.client,
        authenticated=args.authenticated,
    )
    print(text, file=sys.stdout if status == 0 else sys.stderr)
    return status
