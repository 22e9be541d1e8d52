"""The ``mailgate`` command.

Every problem with the command line or the configuration ends the program with one line
on stderr and exit status 2; a server that cannot start (port in use, ...) exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mailgate import __version__
from mailgate.config import (
    AUTH_CAPTURE_CHOICES,
    AUTH_MECHANISMS,
    BARE_NEWLINE_CHOICES,
    DEFAULT_LISTEN,
    DEFAULTS,
    LOG_FORMAT_CHOICES,
    ConfigError,
    build_options,
    config_mode,
)
from mailgate.honeypot.cli import add_honeypot_parser, run_honeypot
from mailgate.server.options import ServerOptions
from mailgate.users_cli import add_users_parser, run_users

EXIT_CONFIG = 2
EXIT_STARTUP = 2  # the issue fixes it: start-up problems (port in use) exit 2 too
EXIT_INTERRUPTED = 130

_SERVE_EPILOG = """\
configuration file:
  Every flag can also be set in the TOML file given with --config, in a [server]
  table, under the flag's name with underscores ("auth_users" for --auth-user).
  Flags given on the command line override the file. Example:

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
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; one line is easier to spot in logs.
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailgate", description="An embeddable SMTP/LMTP server.")
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the SMTP/LMTP server",
        description="Run the SMTP/LMTP server until interrupted (SIGINT or SIGTERM).",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_serve_arguments(serve)
    add_users_parser(commands)
    add_honeypot_parser(commands)
    return parser


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    # Every default is None so that build_options can tell a flag that was given from one
    # that was not, and let the config file fill in the latter; the real defaults are
    # ServerOptions' and are only quoted in the help.
    d = DEFAULTS
    default_listen = ", ".join(str(address) for address in DEFAULT_LISTEN)
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file; flags override it (default: none)",
    )

    group = serve.add_argument_group("listening")
    group.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="listen for SMTP (STARTTLS offered) on this address; IPv6 as [::1]:25; "
        f"repeatable (default: {default_listen}, unless --smtps-listen is given)",
    )
    group.add_argument(
        "--smtps-listen",
        action="append",
        metavar="HOST:PORT",
        help="listen for SMTP over implicit TLS (port 465 style); repeatable (default: none)",
    )
    group.add_argument(
        "--workers",
        metavar="N",
        help=f"server processes sharing the ports (SO_REUSEPORT) (default: {d.workers})",
    )

    group = serve.add_argument_group("identity and TLS")
    group.add_argument(
        "--hostname",
        metavar="NAME",
        help="name in the greeting and Received headers "
        "(default: this machine's FQDN, from socket.getfqdn())",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate chain for STARTTLS and implicit TLS, leaf first; needs --tls-key "
        "(default: a self-signed certificate generated in --state-dir)",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        help="unencrypted private key of --tls-cert (default: generated with the certificate)",
    )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"directory for state such as the development certificate (default: ./{d.state_dir})",
    )

    group = serve.add_argument_group("delivery (choose one)")
    delivery = group.add_mutually_exclusive_group()
    delivery.add_argument(
        "--maildir",
        metavar="DIR",
        help=f"deliver accepted mail into this Maildir (default: ./{d.maildir})",
    )
    delivery.add_argument(
        "--mbox", metavar="FILE", help="append accepted mail to this mbox file (default: off)"
    )
    delivery.add_argument(
        "--sink",
        action="store_true",
        default=None,
        help="accept mail and throw it away, for testing (default: off)",
    )

    group = serve.add_argument_group("authentication")
    group.add_argument(
        "--auth-user",
        dest="auth_users",
        action="append",
        metavar="USER:PASSWORD",
        help="accept AUTH PLAIN/LOGIN for this user; repeatable; for development "
        "(default: none, AUTH not offered)",
    )
    group.add_argument(
        "--allow-insecure-auth",
        action="store_true",
        default=None,
        help="offer AUTH before TLS too, sending passwords in clear (default: off)",
    )
    group.add_argument(
        "--users-file",
        metavar="FILE",
        help="accept AUTH PLAIN/LOGIN for the users in this file of argon2 hashes, managed "
        "with 'mailgate users' (default: none)",
    )
    group.add_argument(
        "--auth-capture",
        choices=AUTH_CAPTURE_CHOICES,
        help="record every AUTH attempt (user, password) in the state directory and refuse "
        "or accept it, for honeypots (default: off)",
    )
    group.add_argument(
        "--auth-mechanisms",
        metavar="MECH[,MECH]",
        help=f"SASL mechanisms to offer, from {', '.join(AUTH_MECHANISMS)} "
        "(default: what the configured auth backends can check)",
    )
    group.add_argument(
        "--auth-failure-delay",
        metavar="SECONDS",
        help="wait this long before answering a failed AUTH, doubling with each further "
        f"failure (default: {d.auth_failure_delay:g})",
    )
    group.add_argument(
        "--max-auth-failures",
        metavar="N",
        help=f"close the connection after this many failed AUTH (default: {d.max_auth_failures})",
    )

    group = serve.add_argument_group(
        "policy (the [limits], [lists], [[dnsbl]], [client_checks], [greylisting] and "
        "[mail_auth] tables of the config file give every detail)"
    )
    group.add_argument(
        "--local-domains",
        action="append",
        metavar="DOMAIN[,DOMAIN]",
        help="domains to receive mail for (*.example.com for subdomains); mail for others is "
        "relaying, allowed only from authenticated users and --relay-networks; repeatable "
        "(default: none)",
    )
    group.add_argument(
        "--relay-networks",
        action="append",
        metavar="CIDR[,CIDR]",
        help="clients that may relay without authenticating; repeatable "
        "(default: 127.0.0.0/8, ::1/128)",
    )
    group.add_argument(
        "--open-relay",
        action="store_true",
        default=None,
        help="accept mail for every domain from anyone (capture servers and honeypots; "
        "warned at start) (default: off)",
    )
    group.add_argument(
        "--dnsbl",
        dest="dnsbl_zones",
        action="append",
        metavar="ZONE",
        help="refuse clients listed in this DNS blocklist at RCPT; repeatable (default: none)",
    )
    group.add_argument(
        "--greylist",
        action="store_true",
        default=None,
        help="greylist unknown (client, sender, recipient) triplets (default: off)",
    )
    group.add_argument(
        "--dns-nameservers",
        action="append",
        metavar="IP[:PORT]",
        help="name servers for policy lookups; repeatable (default: /etc/resolv.conf)",
    )
    group.add_argument(
        "--dns-timeout",
        metavar="SECONDS",
        help=f"give up on a DNS lookup after this long (default: {d.dns_timeout:g})",
    )

    group = serve.add_argument_group("hooks and further deliveries")
    group.add_argument(
        "--forward",
        action="append",
        metavar="URL",
        help="also hand every message to this server: smtp://HOST:PORT, smtps://HOST:PORT "
        "or lmtp://HOST:PORT; repeatable (default: none)",
    )
    group.add_argument(
        "--webhook",
        action="append",
        metavar="URL",
        help="also POST every message (raw, with the envelope as JSON) to this http(s) URL; "
        "repeatable (default: none)",
    )
    group.add_argument(
        "--aiosmtpd-handler",
        metavar="MODULE:CLASS",
        help="run this aiosmtpd handler class (handle_RCPT, handle_DATA, ...) unchanged "
        "(default: none)",
    )
    group.add_argument(
        "--hook-timeout",
        metavar="SECONDS",
        help=f"answer 451 when a stage's hooks take longer than this (default: {d.hook_timeout:g})",
    )
    group.add_argument(
        "--delivery-timeout",
        metavar="SECONDS",
        help=f"the same for the message stage and its deliveries (default: {d.delivery_timeout:g})",
    )

    group = serve.add_argument_group("limits")
    group.add_argument(
        "--max-size",
        metavar="BYTES",
        help="largest message accepted; suffixes K, M, G (1024-based, also KiB, MiB, GiB) "
        f"or KB, MB, GB (1000-based); 0 for no limit (default: {d.max_size}, i.e. 25M)",
    )
    group.add_argument(
        "--max-recipients",
        metavar="N",
        help=f"recipients per message (default: {d.max_recipients})",
    )
    group.add_argument(
        "--max-clients",
        metavar="N",
        help=f"simultaneous connections per process (default: {d.max_clients})",
    )
    group.add_argument(
        "--max-clients-per-ip",
        metavar="N",
        help=f"simultaneous connections from one IP address (default: {d.max_clients_per_ip})",
    )

    group = serve.add_argument_group("timeouts")
    group.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        help=f"close a connection that sends no command for this long "
        f"(default: {d.idle_timeout:g})",
    )
    group.add_argument(
        "--data-timeout",
        metavar="SECONDS",
        help=f"close a connection that stalls while sending a message (default: {d.data_timeout:g})",
    )
    group.add_argument(
        "--close-timeout",
        metavar="SECONDS",
        help="on shutdown, wait this long for connections to finish "
        f"(default: {d.close_timeout:g})",
    )
    group.add_argument(
        "--greeting-delay",
        metavar="SECONDS",
        help="wait this long before the 220 banner; clients that send before it are "
        f"refused with 554 as early talkers (default: {d.greeting_delay:g}, no wait)",
    )

    group = serve.add_argument_group("protocol")
    group.add_argument(
        "--lmtp",
        action="store_true",
        default=None,
        help="speak LMTP (RFC 2033) instead of SMTP (default: off)",
    )
    group.add_argument(
        "--no-received-header",
        action="store_true",
        default=None,
        help="do not add a Received: trace header to accepted mail (default: added)",
    )
    group.add_argument(
        "--bare-newline",
        choices=BARE_NEWLINE_CHOICES,
        help="bare CR/LF in message data: reject the smuggling pattern, strict: reject any, "
        f"normalize: rewrite as CRLF (default: {d.bare_newline.value})",
    )

    group = serve.add_argument_group("proxies and trusted peers")
    group.add_argument(
        "--proxy-protocol",
        action="append",
        metavar="CIDR[,CIDR]",
        help="expect a PROXY protocol header (v1 or v2) from these networks, e.g. a load "
        "balancer; repeatable (default: none)",
    )
    group.add_argument(
        "--trusted-networks",
        action="append",
        metavar="CIDR[,CIDR]",
        help="peers allowed to use XCLIENT and XFORWARD; repeatable (default: none)",
    )

    group = serve.add_argument_group("logging")
    group.add_argument(
        "--log-format",
        choices=LOG_FORMAT_CHOICES,
        help=f"log line format (default: {d.log_format})",
    )
    verbosity = group.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=None,
        help=f"log at DEBUG level, including each SMTP command (default: {d.log_level})",
    )
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=None,
        help=f"log only warnings and errors (default: {d.log_level})",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``mailgate`` command with ``argv`` (default: sys.argv[1:]); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except SystemExit as exc:  # --help and --version end here
        return exc.code if isinstance(exc.code, int) else 0
    if args.command == "users":
        return run_users(args)
    if args.command == "honeypot":
        return run_honeypot(args)
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
    from mailgate.composition.server import run
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
