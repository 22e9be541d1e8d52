"""Everything the server needs to run, as one immutable value, and the settings table.

Each field of :class:`ServerOptions` declares its setting where its default is: the key
of the ``[server]`` table, the ``mailgate serve`` flag, the converter, the help text and
its --help section (mailgate.settings). mailgate.config reads files and flags through
this table; the command-line parsers and docs/settings.md are made from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mailgate.protocol.config import BareNewline
from mailgate.protocol.persona import Persona
from mailgate.settings import (
    AUTH_MECHANISMS,
    ConfigError,
    Network,
    Setting,
    Value,
    code_only,
    converters,
    derived,
    did_you_mean,
    setting,
)

__all__ = [
    "DEFAULT_LISTEN",
    "GROUPS",
    "LOOPBACK",
    "ListenAddress",
    "Network",
    "PolicySection",
    "SNICertificate",
    "SenderMap",
    "ServerOptions",
    "parse_listen_address",
]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # literal IP or name; IPv6 without brackets
    port: int
    implicit_tls: bool = False
    #: A message submission listener (RFC 6409): clients must authenticate before MAIL
    #: and may use only the sender addresses of their user (plugins.submission).
    submission: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PolicySection:
    """One policy table of the configuration (``[limits]``, one ``[[dnsbl]]`` entry...),
    unparsed: the plugin that owns it reads and checks it (``from_section``)."""

    name: str
    values: Mapping[str, Any]
    #: Directory relative paths in it are resolved against; None: the working directory.
    base: Path | None
    #: Where it came from, for error messages: "mailgate.toml [limits]" or "setting limits".
    source: str


#: Which sender addresses an authenticated user may use on a submission listener: called
#: with the user name, returns address patterns (``user@domain``, ``*@domain``...) or
#: None for a user it does not know; may be a coroutine function (plugins.submission).
SenderMap = Callable[[str], Iterable[str] | Awaitable[Iterable[str] | None] | None]


#: Loopback may relay by default: the quick start sends from the same machine.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
DEFAULT_LISTEN = (ListenAddress("127.0.0.1", 2525),)

#: The --help sections and reference headings of the settings, in their order.
GROUPS: Mapping[str, str] = {
    "listening": "listening",
    "identity": "identity and TLS",
    "delivery": "delivery (choose one)",
    "authentication": "authentication",
    "policy": "policy (the [limits], [lists], [[dnsbl]], [client_checks], [greylisting] and "
    "[mail_auth] tables of the config file give every detail)",
    "hooks": "hooks and further deliveries",
    "limits": "limits",
    "timeouts": "timeouts",
    "protocol": "protocol",
    "proxies": "proxies and trusted peers",
    "logging": "logging",
    "console": "operations console (metrics and the admin API)",
}


def parse_listen_address(text: str, value: Value | None = None) -> ListenAddress:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> ListenAddress (plain SMTP; IPv6 without brackets)."""
    where = value or Value(text, "listen address")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise where.error(f"{text!r} is not [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise where.error(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise where.error(
                f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:2525, [::1]:2525, 0.0.0.0:25)"
            )
        if ":" in host:
            raise where.error(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:2525")
        if not host:
            raise where.error(f"{text!r} has no host; use 0.0.0.0 or [::] for all addresses")
        if not converters.is_host_name(host):
            raise where.error(f"{host!r} in {text!r} is neither an IP address nor a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise where.error(f"{text!r} has no valid port number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        # 0 asks the system for a free port (logged at start); --workers needs a fixed one.
        raise where.error(f"port {port} in {text!r} is out of range (0-65535)")
    return ListenAddress(host, port)


# -- settings that do not map one to one onto a field, and how they combine ---------------

_LISTEN = Setting(
    "listen",
    converters.string_list,
    "listen for SMTP (STARTTLS offered) on this address; IPv6 as [::1]:25",
    "listening",
    metavar="HOST:PORT",
    repeatable=True,
    default=DEFAULT_LISTEN,
    default_text="{default}, unless another of the listen settings is given",
)
_SMTPS_LISTEN = Setting(
    "smtps_listen",
    converters.string_list,
    "listen for SMTP over implicit TLS (port 465 style)",
    "listening",
    metavar="HOST:PORT",
    repeatable=True,
    default=(),
)
_SUBMISSION_LISTEN = Setting(
    "submission_listen",
    converters.string_list,
    "listen for message submission (RFC 6409, STARTTLS offered; port 587 style): AUTH "
    "required before MAIL, senders limited to the user's own ([senders])",
    "listening",
    metavar="HOST:PORT",
    repeatable=True,
    default=(),
)
_SUBMISSIONS_LISTEN = Setting(
    "submissions_listen",
    converters.string_list,
    "listen for message submission over implicit TLS (RFC 8314, port 465 style), with "
    "the rules of --submission-listen",
    "listening",
    metavar="HOST:PORT",
    repeatable=True,
    default=(),
)
#: The listen settings: (key, implicit TLS, submission).
_LISTEN_KINDS = (
    ("listen", False, False),
    ("smtps_listen", True, False),
    ("submission_listen", False, True),
    ("submissions_listen", True, True),
)


@dataclass(frozen=True, slots=True)
class SNICertificate:
    """A certificate for the TLS clients that ask for one of ``names`` (SNI); a name may
    be a wildcard, ``*.example.com``, for any one label in its place."""

    names: tuple[str, ...]
    cert: Path
    key: Path


_SNI_KEYS = ("names", "cert", "key")


def _sni_names(value: Value) -> tuple[str, ...]:
    names: list[str] = []
    for text in converters.string_list(value):
        for name in (item.strip().lower().rstrip(".") for item in text.split(",")):
            bare = name.removeprefix("*.")
            if not name or "*" in bare or not converters.is_host_name(bare) or "." not in bare:
                raise value.error(f"{name!r} is not a host name or a wildcard like *.example.com")
            names.append(name)
    if not names:
        raise value.error("no names given")
    return tuple(names)


def sni_certificates(value: Value) -> tuple[SNICertificate, ...]:
    """``[[tls.certificates]]`` entries (tables with ``names``, ``cert`` and ``key``), or
    flag values ``NAMES:CERT:KEY`` (names separated by commas)."""
    raw = value.raw
    entries = raw if isinstance(raw, list | tuple) else [raw]
    result: list[SNICertificate] = []
    for number, entry in enumerate(entries, 1):
        where = f"{value.where} #{number}" if len(entries) > 1 else value.where
        if isinstance(entry, str):
            parts = entry.rsplit(":", 2)
            if len(parts) != 3 or not all(part.strip() for part in parts):
                raise ConfigError(
                    f"{where}: expected NAMES:CERT:KEY like "
                    f"'mx.example.com,*.example.com:cert.pem:key.pem', got {entry!r}"
                )
            entry = dict(zip(_SNI_KEYS, (part.strip() for part in parts), strict=True))
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table with names, cert and key")
        for key in entry:
            if key not in _SNI_KEYS:
                hint = did_you_mean(str(key), _SNI_KEYS)
                raise ConfigError(f"{where}: unknown key {key!r}{hint}; keys are names, cert, key")
        for key in _SNI_KEYS:
            if key not in entry:
                raise ConfigError(f"{where}: {key} is missing")
        result.append(
            SNICertificate(
                names=_sni_names(Value(entry["names"], f"{where} names")),
                cert=converters.path(Value(entry["cert"], f"{where} cert", value.base)),
                key=converters.path(Value(entry["key"], f"{where} key", value.base)),
            )
        )
    return tuple(result)


def _listen_addresses(
    values: Mapping[str, Value], default: tuple[ListenAddress, ...]
) -> tuple[ListenAddress, ...]:
    if all(values.get(key) is None for key, _, _ in _LISTEN_KINDS):
        return default
    addresses: list[ListenAddress] = []
    seen: dict[tuple[str, int], str] = {}
    for key, tls, submission in _LISTEN_KINDS:
        value = values.get(key)
        if value is None:
            continue
        for text in converters.string_list(value):
            address = replace(
                parse_listen_address(text, value), implicit_tls=tls, submission=submission
            )
            endpoint = (address.host, address.port)
            # Port 0 is a new free port for each listener (tests), never a duplicate.
            if address.port and endpoint in seen:
                raise value.error(f"{address} is already given (in {seen[endpoint]})")
            seen[endpoint] = value.where
            addresses.append(address)
    if not addresses:
        raise ConfigError(
            "no address to listen on: listen, smtps_listen, submission_listen and "
            "submissions_listen are all empty"
        )
    return tuple(addresses)


_SINK = Setting(
    "sink",
    converters.boolean,
    "accept mail and throw it away, for testing",
    "delivery",
    switch=True,
    exclusive="delivery",
    default=False,
)

Delivery = Literal["maildir", "mbox", "sink", "capture"]


def _delivery(values: Mapping[str, Value], default: Delivery) -> Delivery:
    # maildir, mbox, capture and sink exclude each other (checked before); mbox and
    # capture are always paths.
    if "mbox" in values:
        return "mbox"
    if "capture" in values:
        return "capture"
    sink = values.get("sink")
    if sink is not None and converters.boolean(sink):
        return "sink"
    return default


_NO_RECEIVED_HEADER = Setting(
    "no_received_header",
    converters.boolean,
    "do not add a Received: trace header to accepted mail",
    "protocol",
    switch=True,
    off_flag="--received-header",
    default=False,
    default_text="off, the header is added",
)


def _received_header(values: Mapping[str, Value], default: bool) -> bool:
    value = values.get("no_received_header")
    return default if value is None else not converters.boolean(value)


_VERBOSE = Setting(
    "verbose",
    converters.boolean,
    "log at DEBUG level, including each SMTP command",
    "logging",
    flags=("-v", "--verbose"),
    switch=True,
    exclusive="verbosity",
    default=False,
    default_text="off, INFO level",
)
_QUIET = Setting(
    "quiet",
    converters.boolean,
    "log only warnings and errors",
    "logging",
    flags=("-q", "--quiet"),
    switch=True,
    exclusive="verbosity",
    default=False,
    default_text="off, INFO level",
)


def _log_level(values: Mapping[str, Value], default: str) -> str:
    verbose, quiet = values.get("verbose"), values.get("quiet")
    if verbose is not None and converters.boolean(verbose):
        return "DEBUG"
    if quiet is not None and converters.boolean(quiet):
        return "WARNING"
    return default


def _admin_listen(value: Value) -> ListenAddress:
    return parse_listen_address(converters.string(value), value)


_BARE_NEWLINE_CHOICES = tuple(member.value for member in BareNewline)
_DURATION = "SECONDS"
_NETWORKS = "CIDR[,CIDR]"


@dataclass(frozen=True, slots=True)
class ServerOptions:
    listen: tuple[ListenAddress, ...] = derived(
        DEFAULT_LISTEN,
        inputs=(_LISTEN, _SMTPS_LISTEN, _SUBMISSION_LISTEN, _SUBMISSIONS_LISTEN),
        combine=_listen_addresses,
    )
    hostname: str = setting(
        "localhost",
        convert=converters.hostname,
        group="identity",
        metavar="NAME",
        help="name in the greeting and Received headers",
        # mailgate.config looks the name up when it is not given; "localhost" is for
        # ServerOptions built in code.
        default_text="this machine's FQDN, from socket.getfqdn(); the host name instead when "
        "that is localhost or has no dot",
    )
    maildir: Path = setting(
        Path("maildir"),
        convert=converters.path,
        group="delivery",
        metavar="DIR",
        exclusive="delivery",
        help="deliver accepted mail into this Maildir",
    )
    mbox: Path | None = setting(
        None,
        convert=converters.path,
        group="delivery",
        metavar="FILE",
        exclusive="delivery",
        help="append accepted mail to this mbox file",
        default_text="off",
    )
    #: Capture mode (mailgate.delivery.capture): every accepted message kept in an
    #: indexed store for the operations console's inbox.
    capture: Path | None = setting(
        None,
        convert=converters.path,
        group="delivery",
        metavar="DIR",
        exclusive="delivery",
        help="keep accepted mail in an indexed store in this directory, for the console's "
        "inbox and API (a developer's mail catcher, with --admin-listen)",
        default_text="off",
    )
    capture_max_size: int = setting(
        1024**3,
        convert=converters.size,
        group="delivery",
        metavar="BYTES",
        help="with --capture: remove the oldest messages while the store holds more than "
        "this; 0 for no limit",
        describe=converters.size_text,
    )
    # Where accepted mail goes: the one of maildir, mbox, capture and sink chosen.
    delivery: Delivery = derived("maildir", inputs=(_SINK,), combine=_delivery)
    state_dir: Path = setting(
        Path(".mailgate"),
        convert=converters.path,
        group="identity",
        metavar="DIR",
        help="directory for state such as the development certificate, the spool and AUTH captures",
    )
    tls_cert: Path | None = setting(
        None,
        convert=converters.path,
        group="identity",
        metavar="PEM",
        help="certificate chain for STARTTLS and implicit TLS, leaf first; needs --tls-key",
        default_text="a self-signed certificate generated in --state-dir",
    )
    tls_key: Path | None = setting(
        None,
        convert=converters.path,
        group="identity",
        metavar="PEM",
        help="unencrypted private key of --tls-cert",
        default_text="generated with the certificate",
    )
    #: More certificates, each for the TLS clients asking for one of its names (SNI).
    tls_certificates: tuple[SNICertificate, ...] = setting(
        (),
        convert=sni_certificates,
        group="identity",
        flags=("--tls-certificate",),
        metavar="NAMES:CERT:KEY",
        repeatable=True,
        help="a certificate for TLS clients that ask for one of NAMES (SNI; comma-separated, "
        "*.example.com for any one label); others get --tls-cert. In the file: "
        "[[tls.certificates]] tables with names, cert and key",
        describe=lambda certificates: (
            ", ".join(f"{','.join(c.names)}:{c.cert}:{c.key}" for c in certificates) or "none"
        ),
    )
    #: Development credentials, user -> password.
    auth_users: tuple[tuple[str, str], ...] = setting(
        (),
        convert=converters.auth_users,
        group="authentication",
        flags=("--auth-user",),
        metavar="USER:PASSWORD",
        repeatable=True,
        help="accept AUTH for this user (PLAIN, LOGIN and CRAM-MD5; a password given in "
        "clear: for development)",
        default_text="none, AUTH not offered",
    )
    allow_insecure_auth: bool = setting(
        False,
        convert=converters.boolean,
        group="authentication",
        switch=True,
        help="offer AUTH before TLS too, sending passwords in clear",
    )
    max_size: int = setting(
        25 * 1024 * 1024,
        convert=converters.size,
        group="limits",
        metavar="BYTES",
        help="largest message accepted; suffixes K, M, G (1024-based, also KiB, MiB, GiB) "
        "or KB, MB, GB (1000-based); 0 for no limit",
        describe=converters.size_text,
    )
    max_recipients: int = setting(
        100, convert=converters.count, group="limits", metavar="N", help="recipients per message"
    )
    max_clients: int = setting(
        1000,
        convert=converters.count,
        group="limits",
        metavar="N",
        help="simultaneous connections per process",
    )
    max_clients_per_ip: int = setting(
        20,
        convert=converters.count,
        group="limits",
        metavar="N",
        help="simultaneous connections from one IP address",
    )
    max_command_line: int = code_only(512, reason="a protocol limit; set in code if at all")
    max_unknown_commands: int = code_only(10, reason="a protocol limit; set in code if at all")
    max_bad_commands: int = code_only(20, reason="a protocol limit; set in code if at all")
    idle_timeout: float = setting(
        300.0,
        convert=converters.seconds,
        group="timeouts",
        metavar=_DURATION,
        help="close a connection that sends no command for this long",
    )
    #: RFC 5321 4.5.3.2.5/6 give a client 3 minutes per data block and per reply wait.
    data_timeout: float = setting(
        180.0,
        convert=converters.seconds,
        group="timeouts",
        metavar=_DURATION,
        help="close a connection that stalls while sending a message",
    )
    #: A command line that takes longer than this to arrive (one byte at a time, never a
    #: line end) holds its slot no more: the idle timeout alone never fires on a drip.
    command_timeout: float = setting(
        60.0,
        convert=converters.seconds,
        group="timeouts",
        metavar=_DURATION,
        help="close a connection that takes longer than this to send one command line",
    )
    #: Postfix's smtpd_min_data_rate: a message must arrive at this many bytes per second,
    #: averaged from the start of DATA/BDAT, once data_rate_grace has passed.
    min_data_rate: int = setting(
        500,
        convert=converters.count_or_zero,
        group="timeouts",
        metavar="BYTES",
        help="close a connection that sends message data slower than this many bytes per "
        "second (averaged over the message, after a grace period); 0 for no limit",
    )
    data_rate_grace: float = code_only(
        10.0, reason="seconds of DATA before min_data_rate applies; set in code if at all"
    )
    #: The longest session (Postfix has no such limit; the honeypot's is max_session, a
    #: key of its own table: the keys share one flag namespace). 30 minutes carry a message of the default 25 MiB at 14 KiB/s,
    #: far slower than any working link, and are six times the 5 minutes Postfix's client
    #: reuses a connection for (smtp_connection_reuse_time_limit); 0: no limit.
    session_timeout: float = setting(
        1800.0,
        convert=converters.seconds_or_zero,
        group="timeouts",
        metavar=_DURATION,
        help="close a connection after this long, whatever it does (mid-message: 421, the "
        "client retries later); 0 for no limit",
    )
    #: TLS handshakes (SMTPS and STARTTLS) never last longer than this, nor longer than
    #: idle_timeout: a partial ClientHello or silence after STARTTLS holds no slot.
    handshake_timeout: float = setting(
        10.0,
        convert=converters.seconds,
        group="timeouts",
        metavar=_DURATION,
        help="close a connection whose TLS handshake takes longer than this",
    )
    close_timeout: float = setting(
        30.0,
        convert=converters.seconds,
        group="timeouts",
        metavar=_DURATION,
        help="on shutdown, wait this long for connections to finish",
    )
    #: Wait this long before the banner; clients that talk first get 554 (0: no wait).
    greeting_delay: float = setting(
        0.0,
        convert=converters.seconds_or_zero,
        group="timeouts",
        metavar=_DURATION,
        help="wait this long before the 220 banner; clients that send before it are "
        "refused with 554 as early talkers",
        default_text="{default}, no wait",
    )
    lmtp: bool = setting(
        False,
        convert=converters.boolean,
        group="protocol",
        switch=True,
        help="speak LMTP (RFC 2033) instead of SMTP",
    )
    proxy_protocol: tuple[Network, ...] = setting(
        (),
        convert=converters.networks,
        group="proxies",
        metavar=_NETWORKS,
        repeatable=True,
        help="expect a PROXY protocol header (v1 or v2) from these networks, e.g. a load balancer",
    )
    proxy_timeout: float = code_only(10.0, reason="how long to wait for the PROXY header")
    workers: int = setting(
        1,
        convert=converters.count,
        group="listening",
        metavar="N",
        help="server processes sharing the ports (SO_REUSEPORT)",
    )
    received_header: bool = derived(True, inputs=(_NO_RECEIVED_HEADER,), combine=_received_header)
    bare_newline: BareNewline = setting(
        BareNewline.REJECT,
        convert=lambda value: BareNewline(converters.choice(_BARE_NEWLINE_CHOICES)(value)),
        group="protocol",
        choices=_BARE_NEWLINE_CHOICES,
        help="bare CR/LF in message data: reject the smuggling pattern, strict: reject any, "
        "normalize: rewrite as CRLF",
    )
    log_format: Literal["text", "json"] = setting(
        "text",
        convert=converters.choice(("text", "json")),
        group="logging",
        choices=("text", "json"),
        help="log line format",
    )
    log_level: str = derived("INFO", inputs=(_VERBOSE, _QUIET), combine=_log_level)
    #: Trusted peers that may use XCLIENT/XFORWARD.
    trusted_networks: tuple[Network, ...] = setting(
        (),
        convert=converters.networks,
        group="proxies",
        metavar=_NETWORKS,
        repeatable=True,
        help="peers allowed to use XCLIENT and XFORWARD",
    )
    # --- authentication --------------------------------------------------------------
    #: SASL mechanisms to offer; empty: what the registered auth plugins can check.
    auth_mechanisms: tuple[str, ...] = setting(
        (),
        convert=converters.mechanisms,
        group="authentication",
        metavar="MECH[,MECH]",
        help=f"SASL mechanisms to offer, from {', '.join(AUTH_MECHANISMS)}",
        default_text="what the configured auth backends can check",
    )
    #: A users file with argon2 hashes (``mailgate users add``) for PLAIN and LOGIN.
    users_file: Path | None = setting(
        None,
        convert=converters.path,
        group="authentication",
        metavar="FILE",
        help="accept AUTH PLAIN/LOGIN for the users in this file of argon2 hashes, managed "
        "with 'mailgate users'",
    )
    #: Honeypot-style auth that records every attempt: "refuse" or "accept" (None: off).
    auth_capture: Literal["refuse", "accept"] | None = setting(
        None,
        convert=converters.choice(("refuse", "accept")),
        group="authentication",
        choices=("refuse", "accept"),
        help="record every AUTH attempt (user, password) in the state directory and refuse "
        "or accept it, for honeypots",
        default_text="off",
    )
    #: Seconds before the first failed AUTH reply; doubles with each further failure.
    auth_failure_delay: float = setting(
        1.0,
        convert=converters.seconds_or_zero,
        group="authentication",
        metavar=_DURATION,
        help="wait this long before answering a failed AUTH, doubling with each further failure",
    )
    max_auth_failures: int = setting(
        3,
        convert=converters.count,
        group="authentication",
        metavar="N",
        help="close the connection after this many failed AUTH",
    )
    # --- hooks and deliveries --------------------------------------------------------------
    #: Longest a stage's hooks may take (message stage: delivery_timeout) before 451.
    hook_timeout: float = setting(
        30.0,
        convert=converters.seconds,
        group="hooks",
        metavar=_DURATION,
        help="answer 451 when a stage's hooks take longer than this",
    )
    delivery_timeout: float = setting(
        300.0,
        convert=converters.seconds,
        group="hooks",
        metavar=_DURATION,
        help="the same for the message stage and its deliveries",
    )
    #: Forward every message to these servers: smtp://host:port, lmtp://host:port.
    forward: tuple[str, ...] = setting(
        (),
        convert=converters.forward_urls,
        group="hooks",
        metavar="URL",
        repeatable=True,
        help="also hand every message to this server: smtp://HOST:PORT, smtps://HOST:PORT "
        "or lmtp://HOST:PORT",
    )
    #: POST every message to these HTTP(S) endpoints.
    webhook: tuple[str, ...] = setting(
        (),
        convert=converters.webhook_urls,
        group="hooks",
        metavar="URL",
        repeatable=True,
        help="also POST every message (raw, with the envelope as JSON) to this http(s) URL",
    )
    #: An aiosmtpd handler class to run, "module:Class" (with module importable).
    aiosmtpd_handler: str | None = setting(
        None,
        convert=converters.import_spec,
        group="hooks",
        metavar="MODULE:CLASS",
        help="run this aiosmtpd handler class (handle_RCPT, handle_DATA, ...) unchanged",
    )
    # --- policy --------------------------------------------------------------------------
    #: Domains we receive mail for (``*.example.com`` matches subdomains). Mail for other
    #: domains is relaying: allowed from authenticated users and relay_networks only
    #: (Postfix's mynetworks; not trusted_networks, which may send XCLIENT).
    local_domains: tuple[str, ...] = setting(
        (),
        convert=converters.domain_patterns,
        group="policy",
        metavar="DOMAIN[,DOMAIN]",
        repeatable=True,
        help="domains to receive mail for (*.example.com for subdomains); mail for others is "
        "relaying, allowed only from authenticated users and --relay-networks. Without any, "
        "every recipient is refused to other clients (554 5.7.1 Relay access denied)",
    )
    #: Accept mail for any domain from anyone (capture servers, honeypots): warned at start.
    open_relay: bool = setting(
        False,
        convert=converters.boolean,
        group="policy",
        switch=True,
        help="accept mail for every domain from anyone (capture servers and honeypots; "
        "warned at start)",
    )
    relay_networks: tuple[Network, ...] = setting(
        LOOPBACK,
        convert=converters.networks,
        group="policy",
        metavar=_NETWORKS,
        repeatable=True,
        help="clients that may relay without authenticating",
    )
    #: Name servers for policy lookups ("HOST" or "HOST:PORT"); empty: /etc/resolv.conf.
    dns_nameservers: tuple[str, ...] = setting(
        (),
        convert=converters.nameservers,
        group="policy",
        metavar="IP[:PORT]",
        repeatable=True,
        help="name servers for policy lookups (also nameservers in [dns])",
        default_text="/etc/resolv.conf",
    )
    dns_timeout: float = setting(
        3.0,
        convert=converters.seconds,
        group="policy",
        metavar=_DURATION,
        help="give up on a DNS lookup after this long (also timeout in [dns])",
    )
    #: DNS blocklists in their simplest form: listed clients are refused at RCPT.
    dnsbl_zones: tuple[str, ...] = setting(
        (),
        convert=converters.zones,
        group="policy",
        flags=("--dnsbl",),
        metavar="ZONE",
        repeatable=True,
        help="refuse clients listed in this DNS blocklist at RCPT",
    )
    #: Greylisting with its defaults (the [greylisting] table gives the details).
    greylist: bool = setting(
        False,
        convert=converters.boolean,
        group="policy",
        switch=True,
        help="greylist unknown (client, sender, recipient) triplets",
    )
    #: The policy tables of the configuration, for their plugins to read.
    policy: tuple[PolicySection, ...] = code_only(
        (), reason="the policy tables of the file ([limits], [lists]...), read by their plugins"
    )
    #: The senders a user of a submission listener may use, from code
    #: (``Server(sender_map=...)``); with the [senders] table, either may grant one.
    sender_map: SenderMap | None = code_only(
        None, reason="a callable, given in code: Server(sender_map=...)"
    )
    # --- operations console (mailgate.console) -------------------------------------------
    #: Where the HTTP console (/metrics, /healthz, /api/v1/) listens; None: no console.
    admin_listen: ListenAddress | None = setting(
        None,
        convert=_admin_listen,
        group="console",
        metavar="HOST:PORT",
        help="serve the operations console (the web UI at /, Prometheus /metrics, /healthz, "
        "/readyz and the JSON API under /api/v1/) over HTTP on this address; on a "
        "non-loopback address it needs --admin-token-file or a users file (HTTP Basic)",
        default_text="off",
    )
    #: A file holding the bearer token every console request must carry.
    admin_token_file: Path | None = setting(
        None,
        convert=converters.path,
        group="console",
        metavar="FILE",
        help="require 'Authorization: Bearer TOKEN' on every console request, TOKEN being "
        "this file's content (surrounding white space ignored)",
        default_text="none; without it or a users file only a loopback --admin-listen",
    )
    # --- presentation ------------------------------------------------------------------
    #: How the server words its replies, banner, EHLO greeting and HELP (honeypot
    #: personas); None: mailgate's own texts.
    persona: Persona | None = code_only(None, reason="set by honeypot mode from its persona")
