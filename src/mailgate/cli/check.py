"""``mailgate check-config``: check a configuration the way ``mailgate serve`` would use
it, without starting anything (Postfix's ``postfix check``).

::

    mailgate check-config --config /etc/mailgate/mailgate.toml [serve's flags]

Reads the file and the flags as ``serve`` does, builds every plugin they ask for and looks
at every path the server would write to; binds no port and writes nothing. Prints ``ok``
and what would run (exit status 0), or every problem found, one line each (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mailgate.config import SERVER_SETTINGS, check_configuration
from mailgate.server.options import GROUPS, ServerOptions
from mailgate.settings import ConfigError
from mailgate.settings.flags import HiddenFlagsFormatter, add_config_flag, add_flags

EXIT_PROBLEMS = 2

_EPILOG = """\
Takes the flags of 'mailgate serve' (see 'mailgate serve --help'), so that a command line
can be checked as it would run. Checked: every setting and policy table ([lists],
[limits], [[dnsbl]], [client_checks], [greylisting], [mail_auth], [[routes]], [queue],
[outbound]), the files they name (lists, users file, TLS certificate and key, and whether
they match), the directories the server writes to (state directory, Maildir, mbox, queue)
and the DNS settings. Not checked: whether the listen ports are free (nothing is bound).
"""


def add_check_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``check-config`` to the ``mailgate`` parser."""
    parser = commands.add_parser(
        "check-config",
        help="check the configuration as 'serve' would use it, without starting",
        description="Check a configuration file and flags as 'mailgate serve' would use "
        "them, without binding a port or writing anything: print 'ok' and what would run, "
        "or every problem found.",
        epilog=_EPILOG,
        formatter_class=HiddenFlagsFormatter,
    )
    add_config_flag(parser)
    add_flags(parser, SERVER_SETTINGS, GROUPS)


def run_check(args: argparse.Namespace) -> int:
    """Run ``mailgate check-config``; the exit status."""
    checked = check_configuration(args)
    problems = list(checked.problems)
    summary: list[str] = []
    warnings: list[str] = []
    if checked.options is not None:
        # Imported here, as serve does: the plugins are needed only once the settings read.
        from mailgate.composition.check import preflight

        found = preflight(checked.options, checked.where)
        problems.extend(found.problems)
        warnings = found.warnings
        summary = _summary(checked.options, found.policies, found.routes)
    # The routing tables are read by the configuration reader and again by their plugin.
    problems = list(dict.fromkeys(problems))
    if problems:
        for problem in problems:
            print("mailgate: error: " + " ".join(problem.splitlines()), file=sys.stderr)
        count = len(problems)
        print(
            f"mailgate check-config: {count} problem{'s' if count != 1 else ''} found",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    print("ok")
    for line in summary:
        print("  " + line)
    for line in warnings:
        print("warning: " + " ".join(line.splitlines()))
    return 0


def _summary(options: ServerOptions, policies: list[str], routes: int) -> list[str]:
    """What ``mailgate serve`` would run with these options, a few lines."""
    kind = "LMTP" if options.lmtp else "SMTP"
    listeners = ", ".join(
        f"{address} ({'SMTPS' if address.implicit_tls else kind})" for address in options.listen
    )
    workers = f"{options.workers} worker process{'es' if options.workers != 1 else ''}"
    if options.tls_cert is not None:
        tls = f"certificate {options.tls_cert}"
    else:
        tls = f"a self-signed development certificate in {options.state_dir}"
    deliveries = [
        {
            "maildir": f"Maildir {options.maildir}",
            "mbox": f"mbox {options.mbox}",
            "sink": "sink (accepted mail is thrown away)",
            "capture": f"capture {options.capture} (the console's inbox)",
        }.get(options.delivery, str(options.delivery))
    ]
    deliveries += [f"forward {url}" for url in options.forward]
    deliveries += [f"webhook {url}" for url in options.webhook]
    auth = []
    if options.auth_users:
        auth.append(f"{len(options.auth_users)} --auth-user")
    if options.users_file is not None:
        auth.append(f"users file {options.users_file}")
    if options.auth_capture is not None:
        auth.append(f"capture ({options.auth_capture})")
    for certificate in options.tls_certificates:
        tls += f"; {certificate.cert} for {', '.join(certificate.names)}"
    domains = ", ".join(options.local_domains) or "none (only relay_networks may send)"
    return [
        f"listen: {listeners}; {workers}",
        f"hostname: {options.hostname}",
        f"TLS: {tls}",
        f"delivery: {'; '.join(deliveries)}",
        f"auth: {', '.join(auth) or 'not offered'}",
        f"local domains: {domains}",
        f"policies: {', '.join(policies) or 'none'}",
        f"routes: {routes} rule{'s' if routes != 1 else ''}",
        f"state directory: {options.state_dir}",
        *_shared_state(options),
    ]


def _shared_state(options: ServerOptions) -> list[str]:
    """Where policy state is shared, when [state] says Redis (nothing is sent to it)."""
    from mailgate.plugins.state import redacted_url, state_settings

    try:
        settings = state_settings(options.policy)
    except ConfigError:
        return []  # reported with the other problems
    if settings.backend != "redis" or settings.url is None:
        return []
    return [
        f"shared state: Redis at {redacted_url(settings.url)} (timeout {settings.timeout:g} s,"
        f" fails {settings.on_error})"
    ]
