"""``mailgate honeypot``: run a honeypot, and report on what it captured.

::

    mailgate honeypot --persona exim --listen 0.0.0.0:25 --data-dir /var/lib/honeypot
    mailgate honeypot report --data-dir /var/lib/honeypot --since 24h
    mailgate honeypot sessions --data-dir /var/lib/honeypot --ip 192.0.2.7
    mailgate honeypot show SESSION --data-dir /var/lib/honeypot
    mailgate honeypot persona generate --base postfix --llm-url http://127.0.0.1:11434/v1 \
        --model llama3.1 --out site.toml

Problems with the command line, the configuration or the data directory end the command
with one line on stderr and exit status 2, like ``mailgate serve``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mailgate.config import (
    HONEYPOT_SETTINGS,
    SERVER_SETTINGS,
    ConfigError,
    build_honeypot_options,
)
from mailgate.honeypot.settings import GROUPS as HONEYPOT_GROUPS
from mailgate.honeypot.settings import (
    MAX_LLM_TIMEOUT,
    PERSONA_CHOICES,
    REFUSED_FLAGS,
    SERVER_FLAGS,
    env_name_setting,
    llm_url_setting,
    model_name_setting,
)
from mailgate.server.errors import StartupError
from mailgate.server.options import GROUPS
from mailgate.settings.flags import HiddenFlagsFormatter, add_config_flag, add_flags

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

_EPILOG = """\
safe defaults:
  The honeypot accepts mail for every domain from anyone but never relays or delivers
  it: each message is stored in the data directory with its SHA-256, URLs and
  attachments, and the client gets the persona's "queued" reply. AUTH is offered before
  TLS too (a honeypot wants the credentials); STARTTLS works, with a certificate made in
  the data directory unless --tls-cert/--tls-key are given. Everything (capture
  database, raw messages, certificate, spool) stays under --data-dir.

configuration file:
  Every flag can also be set in a TOML file given with --config: the [server] keys of
  'mailgate serve --help' that make sense for a honeypot, and a [honeypot] table with
  the honeypot flags' names (underscores for dashes). With mode = "honeypot" in [server]
  the same file also runs with 'mailgate serve --config FILE'. Example:

    [server]
    mode = "honeypot"
    listen = ["0.0.0.0:25", "0.0.0.0:587"]
    hostname = "mx1.example.com"

    [honeypot]
    persona = "exchange"
    data_dir = "/var/lib/mailgate-honeypot"
    auth_outcome = "accept-after:3"
    tarpit = 0.5
    connections_per_ip = "30/10m"

    [lists]                     # the full policy tables work too
    block_networks_file = "blocked.txt"

reports (run them while the honeypot runs, too):
  mailgate honeypot report --data-dir DIR [--since 24h] [--format table|json|csv]
  mailgate honeypot sessions --data-dir DIR [--since 1h] [--ip ADDRESS|CIDR] [--limit N]
  mailgate honeypot show SESSION --data-dir DIR

generated identities (needs the openai package: pip install 'mailgate[genai]'):
  mailgate honeypot persona generate --base postfix --llm-url URL --model NAME --out FILE
  mailgate honeypot --generate-identity --llm-url URL --model NAME --data-dir DIR
"""


def add_honeypot_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``honeypot`` (run) and its ``report``, ``sessions`` and ``show`` subcommands to
    the ``mailgate`` parser."""
    honeypot = commands.add_parser(
        "honeypot",
        help="run an SMTP honeypot with a product persona, and report on what it captured",
        description="Run an SMTP honeypot until interrupted (SIGINT or SIGTERM): mailgate's "
        "real SMTP engine wearing the persona of Postfix, Exim, Exchange, Sendmail or a "
        "generic ESMTP server, capturing every session, credential and message.",
        epilog=_EPILOG,
        formatter_class=HiddenFlagsFormatter,
    )
    _add_run_arguments(honeypot)
    reports = honeypot.add_subparsers(
        dest="honeypot_command", metavar="COMMAND", required=False, title="reports and personas"
    )
    data_dir_help = "the honeypot's data directory"

    report = reports.add_parser(
        "report",
        help="summary: sessions, IPs, credentials, commands, messages, URLs",
        description="Summarise what the honeypot captured: sessions, unique IPs, AUTH "
        "attempts, messages, and the top IPs, user names, passwords, commands, HELO names, "
        "senders, URLs and attachments.",
    )
    report.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=data_dir_help)
    report.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    report.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="(default: table)"
    )
    report.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="entries per top list (default: 10)"
    )

    listing = reports.add_parser(
        "sessions",
        help="list sessions, newest first",
        description="List the captured sessions, newest first.",
    )
    listing.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=data_dir_help)
    listing.add_argument("--since", metavar="WHEN", help=_SINCE_HELP)
    listing.add_argument(
        "--ip", metavar="ADDRESS|CIDR", help="only clients with this address or in this network"
    )
    listing.add_argument(
        "--limit", type=_positive, default=50, metavar="N", help="at most N sessions (default: 50)"
    )
    listing.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="(default: table)"
    )

    show = reports.add_parser(
        "show",
        help="one session's transcript",
        description="Print one session: client, TLS, each command and reply with its time, "
        "the AUTH attempts and the messages with their URLs and attachments.",
    )
    show.add_argument("session", metavar="SESSION", help="the session id (or a unique prefix)")
    show.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS, help=data_dir_help)
    show.add_argument("--format", choices=("text", "json"), default="text", help="(default: text)")

    persona = reports.add_parser(
        "persona",
        help="persona profiles: generate a site identity with a language model",
        description="Work with persona profiles.",
    )
    persona_commands = persona.add_subparsers(
        dest="persona_command", metavar="COMMAND", required=True
    )
    generate = persona_commands.add_parser(
        "generate",
        help="ask a language model for a site identity and write it as a profile file",
        description="Ask an OpenAI-compatible chat-completions API (OpenAI, Ollama, "
        "llama.cpp's server, vLLM) to invent a plausible site identity within the "
        "product's conventions -- host name, banner variant, a version the product really "
        "ships, local users, the site's refusal text, timing jitter -- and write it as a "
        "persona profile file (use it with --profile). The answer is checked like a "
        "hand-written profile; an unusable one is asked again (at most 3 requests), then "
        "the base persona is written with a warning. Exit status: 0 generated, 1 the base "
        "persona written instead, 2 a usage error. Needs the openai package: pip install "
        "'mailgate[genai]'.",
    )
    generate.add_argument(
        "--base", required=True, choices=PERSONA_CHOICES, help="the built-in persona"
    )
    generate.add_argument(
        "--llm-url",
        required=True,
        metavar="URL",
        help="base URL of the API, e.g. https://api.openai.com/v1, http://127.0.0.1:11434/v1",
    )
    generate.add_argument("--model", required=True, metavar="NAME", help="the model to ask")
    generate.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the API key (default: no key)",
    )
    generate.add_argument(
        "--domain",
        metavar="DOMAIN",
        help="put the host name under this domain (default: the model invents one)",
    )
    generate.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds one request may take (default: 60)",
    )
    generate.add_argument(
        "--out", required=True, metavar="FILE|-", help="the profile file to write (- for stdout)"
    )


_SINCE_HELP = (
    "only what happened since then: a duration back from now (30m, 24h, 7d) or a date or "
    "time in ISO 8601, UTC unless it says otherwise (default: everything)"
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_LLM_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_LLM_TIMEOUT:g}, got {text}"
        )
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flag(parser)
    add_flags(parser, HONEYPOT_SETTINGS, HONEYPOT_GROUPS)
    # The serve settings a honeypot offers, from serve's table; those it refuses are
    # parsed too (but not shown), so that the error says why rather than "unrecognized".
    add_flags(
        parser,
        [item for item in SERVER_SETTINGS if item.key in SERVER_FLAGS or item.key in REFUSED_FLAGS],
        GROUPS,
        one_group="server (as for 'mailgate serve')",
        default_texts={key: text for key, text in SERVER_FLAGS.items() if text is not None},
        hidden=REFUSED_FLAGS,
    )


def run_honeypot(args: argparse.Namespace) -> int:
    """Run ``mailgate honeypot ...`` (or ``mailgate serve`` with a honeypot file); the
    exit status."""
    command = getattr(args, "honeypot_command", None)
    try:
        if command == "persona":
            return _persona(args)
        if command is not None:
            return _report(command, args)
        return _run(args)
    except ConfigError as exc:
        return _fail(f"mailgate: error: {exc}")
    except StartupError as exc:
        return _fail(f"mailgate: cannot start: {exc}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    options, honeypot = build_honeypot_options(args)
    # Imported here: the server and the store are not needed for --help or a bad flag.
    from mailgate.honeypot.mode import HoneypotServer, Service, run

    def console(server: HoneypotServer) -> list[Service]:
        from mailgate.console import Console, ConsoleSources

        sources = ConsoleSources(honeypot_dir=honeypot.data_dir)
        found = Console.from_options(server, server.options, sources)
        return [found] if found is not None else []

    if options.admin_listen is None:
        return run(options, honeypot)
    return run(options, honeypot, console)


def _persona(args: argparse.Namespace) -> int:
    """``mailgate honeypot persona generate``: 0 generated, 1 the base persona written
    instead (with a warning), 2 a usage error."""
    # Imported here: neither the personas nor the openai package are needed otherwise.
    from pathlib import Path

    from mailgate.honeypot import identity
    from mailgate.settings import Value, converters

    where = "mailgate honeypot persona generate"
    try:
        url = llm_url_setting(Value(args.llm_url, "--llm-url"))
        model = model_name_setting(Value(args.model, "--model"))
        domain = (
            None if args.domain is None else converters.hostname(Value(args.domain, "--domain"))
        )
        variable = (
            None
            if args.api_key_env is None
            else env_name_setting(Value(args.api_key_env, "--api-key-env"))
        )
        result = identity.generate(
            args.base,
            url=url,
            model=model,
            api_key=identity.api_key_from_env(variable),
            timeout=args.timeout,
            domain=domain,
            header=identity.header_lines(args.base, model, url),
        )
    except (ConfigError, identity.GenAIUnavailable) as exc:
        return _fail(f"{where}: error: {exc}")
    if args.out == "-":
        sys.stdout.write(result.text)
        sys.stdout.flush()
    else:
        try:
            identity.write_profile(Path(args.out), result.text)
        except OSError as exc:
            return _fail(f"{where}: error: cannot write {args.out}: {exc.strerror or exc}")
    if not result.generated:
        print(
            " ".join(f"{where}: warning: {result.warning}; wrote it to {args.out}".split()),
            file=sys.stderr,
        )
        return 1
    plural = "s" if result.attempts != 1 else ""
    print(
        f"generated in {result.attempts} attempt{plural}: "
        f"{identity.rendered_banner(result.profile)} -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _report(command: str, args: argparse.Namespace) -> int:
    from mailgate.honeypot import report as capture_reports

    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        return _fail(f"mailgate honeypot {command}: error: --data-dir DIR is required")
    try:
        db = capture_reports.open_database(data_dir)
        try:
            if command == "report":
                since = capture_reports.parse_since(args.since)
                text = capture_reports.format_summary(
                    capture_reports.summary(db, since=since, top=args.top),
                    args.format,
                    source=str(data_dir),
                )
            elif command == "sessions":
                since = capture_reports.parse_since(args.since)
                rows = capture_reports.sessions(db, since=since, ip=args.ip, limit=args.limit)
                text = capture_reports.format_sessions(rows, args.format)
            else:
                text = capture_reports.format_session(
                    capture_reports.session_detail(db, args.session), args.format
                )
        finally:
            db.close()
    except capture_reports.ReportError as exc:
        return _fail(f"mailgate honeypot {command}: error: {exc}")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # piped into head: not an error
        pass
    return 0


def _fail(message: str) -> int:
    # Keep it to one line, whatever the message quotes.
    print(" ".join(message.splitlines()), file=sys.stderr)
    return EXIT_ERROR
