"""Build ServerOptions from command-line flags and an optional TOML file.

The file given with ``mailgate serve --config FILE`` holds every setting in one
``[server]`` table. Its keys are the long flag names without the leading dashes and with
``_`` in place of ``-``; the one exception is ``--auth-user``, which may be repeated and so
becomes the list ``auth_users``::

    [server]
    listen = ["0.0.0.0:25", "[::]:25"]      # a list, or one string
    smtps_listen = ["0.0.0.0:465"]
    hostname = "mx.example.com"
    maildir = "/var/mail/incoming"          # or mbox = "/var/mail/all.mbox", or sink = true
    state_dir = "/var/lib/mailgate"
    tls_cert = "/etc/mailgate/cert.pem"
    tls_key = "/etc/mailgate/key.pem"
    auth_users = ["alice:secret"]
    allow_insecure_auth = false
    max_size = "25M"                        # bytes, or a string with a K/M/G/KB/MB/GB suffix
    max_recipients = 100
    max_clients = 1000
    max_clients_per_ip = 20
    idle_timeout = 300                      # seconds, integer or float
    data_timeout = 600
    close_timeout = 30
    greeting_delay = 0                      # seconds before the banner; early talkers get 554
    lmtp = false
    proxy_protocol = ["10.0.0.0/8"]         # a list, or one comma-separated string
    trusted_networks = ["192.168.0.0/16"]
    workers = 4
    no_received_header = false
    bare_newline = "reject"                 # reject | strict | normalize
    log_format = "json"                     # text | json
    verbose = false                         # or quiet = true

Rules:

* A flag given on the command line replaces the file's value for that key; lists are
  replaced, not merged. ``--maildir``/``--mbox``/``--sink`` replace whichever of the
  three the file chose, and ``-v``/``-q`` likewise replace ``verbose``/``quiet``.
* Relative paths in the file are relative to the file's directory (so the file works the
  same from any working directory); ``~`` is expanded. Relative paths given as flags are
  relative to the working directory, as usual.
* When neither ``listen`` nor ``smtps_listen`` is set anywhere, the server listens on
  127.0.0.1:2525. Setting only ``smtps_listen`` gives an implicit-TLS-only server.
* Unknown keys and tables are errors, as are values of the wrong type.

Honeypot mode: ``mode = "honeypot"`` in ``[server]`` makes the file a honeypot's (``mailgate
serve --config FILE`` then runs the honeypot, as ``mailgate honeypot --config FILE`` does);
its settings are in a ``[honeypot]`` table whose keys are the ``mailgate honeypot`` flags
(HONEYPOT_KEYS). A honeypot refuses the [server] keys that would deliver, relay or store
elsewhere (HONEYPOT_REFUSED). See :func:`build_honeypot_options` and docs/honeypot.md.

Every problem is reported as a ConfigError whose message is one line naming where the
bad value came from (the flag, or the file and key).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import ipaddress
import math
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from mailgate.protocol.config import BareNewline
from mailgate.server.options import ListenAddress, Network, PolicySection, ServerOptions
from mailgate.server.tls import TLSConfigError, create_server_context

T = TypeVar("T")

DEFAULTS = ServerOptions()
DEFAULT_LISTEN = DEFAULTS.listen
BARE_NEWLINE_CHOICES = tuple(member.value for member in BareNewline)
LOG_FORMAT_CHOICES = ("text", "json")

#: Every key of the ``[server]`` table; each is also the argparse ``dest`` of its flag.
KEYS: tuple[str, ...] = (
    "listen",
    "smtps_listen",
    "hostname",
    "maildir",
    "mbox",
    "sink",
    "state_dir",
    "tls_cert",
    "tls_key",
    "auth_users",
    "allow_insecure_auth",
    "max_size",
    "max_recipients",
    "max_clients",
    "max_clients_per_ip",
    "idle_timeout",
    "data_timeout",
    "close_timeout",
    "greeting_delay",
    "lmtp",
    "proxy_protocol",
    "trusted_networks",
    "workers",
    "no_received_header",
    "bare_newline",
    "log_format",
    "verbose",
    "quiet",
    "auth_mechanisms",
    "users_file",
    "auth_capture",
    "auth_failure_delay",
    "max_auth_failures",
    "hook_timeout",
    "delivery_timeout",
    "forward",
    "webhook",
    "aiosmtpd_handler",
    "local_domains",
    "open_relay",
    "relay_networks",
    "dns_nameservers",
    "dns_timeout",
    "dnsbl_zones",
    "greylist",
)
#: Tables besides [server]: each configures one policy plugin, which reads it itself.
#: ``dnsbl`` is an array of tables (``[[dnsbl]]``), one per list.
POLICY_TABLES = ("limits", "lists", "dnsbl", "client_checks", "greylisting", "mail_auth")
_ARRAY_TABLES = frozenset({"dnsbl"})
#: SASL mechanisms mailgate implements.
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")
AUTH_CAPTURE_CHOICES = ("refuse", "accept")
#: What a configuration file can run (``mode`` in [server]): a mail server or a honeypot.
MODES = ("server", "honeypot")
#: [server] keys only a file has (the command, serve or honeypot, is the mode on the
#: command line).
FILE_ONLY_KEYS = ("mode",)
#: Keys of the [honeypot] table; each is also the argparse dest of a ``mailgate honeypot``
#: flag (``--data-dir`` for ``data_dir``...).
HONEYPOT_KEYS: tuple[str, ...] = (
    "persona",
    "profile",
    "data_dir",
    "jsonl",
    "auth_outcome",
    "drop_after_credentials",
    "tarpit",
    "max_session",
    "max_storage",
    "block_networks",
    "connections_per_ip",
)
#: The built-in personas (mailgate.honeypot.personas.PERSONAS has them; listed here so
#: that reading a configuration does not load them).
PERSONA_CHOICES = ("postfix", "exim", "exchange", "sendmail", "generic")
_NO_DELIVERY = "a honeypot never delivers or hands on mail (everything stays in its data_dir)"
_OWN_AUTH = "a honeypot answers AUTH itself (auth_outcome in [honeypot], --auth-outcome)"
_EVERY_DOMAIN = "a honeypot accepts mail for every domain and relays none"
#: [server] keys a honeypot refuses, with the reason given in the error.
HONEYPOT_REFUSED: Mapping[str, str] = {
    "maildir": _NO_DELIVERY,
    "mbox": _NO_DELIVERY,
    "forward": _NO_DELIVERY,
    "webhook": _NO_DELIVERY,
    "aiosmtpd_handler": _NO_DELIVERY,
    "lmtp": "a honeypot speaks SMTP, not LMTP",
    "state_dir": "a honeypot keeps its state in its data directory (data_dir, --data-dir)",
    "auth_users": _OWN_AUTH,
    "users_file": _OWN_AUTH,
    "auth_capture": _OWN_AUTH,
    "local_domains": _EVERY_DOMAIN,
    "relay_networks": _EVERY_DOMAIN,
    "open_relay": _EVERY_DOMAIN,
}

_FLAG_NAMES = {"auth_users": "--auth-user", "dnsbl_zones": "--dnsbl"}
# Keys of which at most one may be chosen; a flag for one of them overrides the file's.
_EXCLUSIVE: tuple[tuple[str, ...], ...] = (("maildir", "mbox", "sink"), ("verbose", "quiet"))

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([a-z]*)\s*", re.IGNORECASE | re.ASCII)
# Letters, digits, hyphens and (seen in container and Windows names) underscores.
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


class ConfigError(Exception):
    """A configuration problem, described in one line meant for the user."""


def flag_name(key: str) -> str:
    """The command-line flag for a config key, e.g. ``max_size`` -> ``--max-size``."""
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


@dataclass(frozen=True, slots=True)
class _Value:
    raw: object
    #: Where the value came from, for messages: "--max-size" or "mailgate.toml: max_size".
    where: str
    #: Directory that relative paths are resolved against; None for flags (the cwd).
    base: Path | None = None

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {problem}")


def build_options(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions from parsed ``mailgate serve`` arguments and the file in ``args.config``.

    Attributes of ``args`` named like the keys in KEYS hold flag values, None when the flag
    was not given; flag values are unparsed strings (lists for repeatable flags, True for
    switches) so that flags and file go through the same checks. A file for honeypot mode
    (``mode = "honeypot"``) is an error here: see :func:`config_mode`.
    """
    values = _collect(args)
    mode = _mode(values)
    if mode != "server":
        raise values["mode"].error(
            f"this file is for {mode} mode; run it with 'mailgate {mode} --config FILE'"
        )
    if "honeypot" in values:
        raise values["honeypot"].error(
            'a [honeypot] table needs mode = "honeypot" in [server] (or use mailgate honeypot)'
        )
    return _assemble(values)


def config_mode(path: str | os.PathLike[str] | None) -> str:
    """The mode (one of MODES) a configuration file asks for; "server" without a file or
    without a ``mode`` key."""
    if path is None:
        return "server"
    return _mode(_load_config_file(Path(path)))


@dataclass(frozen=True, slots=True)
class HoneypotOptions:
    """The settings of honeypot mode besides the server's (the [honeypot] table and the
    ``mailgate honeypot`` flags). mailgate.honeypot.mode turns them into a server."""

    #: Where everything is stored: the capture database, raw messages, the TLS certificate,
    #: the spool.
    data_dir: Path
    #: A built-in persona (PERSONA_CHOICES); the base of ``profile`` when one is given.
    persona: str = "postfix"
    #: A TOML persona profile (mailgate.honeypot.personas.load_profile).
    profile: Path | None = None
    #: JSON lines of every event: a file to append to, "-" for stdout, None for none.
    jsonl: str | None = None
    #: refuse | accept | accept-after:N
    auth_outcome: str = "refuse"
    drop_after_credentials: bool = False
    #: Seconds before each answer, times the connections seen from the address (0: off).
    tarpit: float = 0.0
    #: The longest session in seconds (None: no limit).
    max_session: float | None = 600.0
    #: Cap on the capture store (database plus raw messages); None: no cap.
    max_storage: int | None = 1024**3
    #: Clients refused at connect (the lists policy's block_networks).
    block_networks: tuple[Network, ...] = ()
    #: New connections per client IP, "N/WINDOW" (the rate limits' connections_per_ip).
    connections_per_ip: str | None = None
    #: The [server] keys given by the file or flags; the persona fills in the others
    #: (host name, SIZE, SASL mechanisms).
    given: frozenset[str] = frozenset()


def build_honeypot_options(args: argparse.Namespace) -> tuple[ServerOptions, HoneypotOptions]:
    """The settings of ``mailgate honeypot`` (or ``mailgate serve`` with a file saying
    ``mode = "honeypot"``): ServerOptions from the [server] keys as for ``serve`` (the
    honeypot's safe settings are applied later, by mailgate.honeypot.mode) and
    HoneypotOptions from the [honeypot] table, flags overriding the file. [server] keys a
    honeypot cannot honour (deliveries, relay settings, auth backends) are errors."""
    values = _collect(args)
    mode = _mode(values, "honeypot")
    if mode != "honeypot":
        raise values["mode"].error(
            f"this file is for {mode} mode; run it with 'mailgate serve --config FILE'"
        )
    for key, reason in HONEYPOT_REFUSED.items():
        value = values.get(key)
        if value is not None and value.raw is not False and value.raw != []:
            raise value.error(f"not for honeypot mode: {reason}")
    workers = values.get("workers")
    if workers is not None and _count(workers) > 1:
        raise workers.error("honeypot mode runs in one process; remove workers")
    honeypot = _honeypot_values(args, values.get("honeypot"))
    options = _assemble(values)
    _check_policy_overlap(honeypot, options.policy)

    def get(key: str, convert: Callable[[_Value], T], default: T) -> T:
        value = honeypot.get(key)
        return default if value is None else convert(value)

    jsonl = get("jsonl", _jsonl_target, None)
    max_session = get("max_session", _seconds_or_zero, 600.0)
    max_storage = get("max_storage", _size, 1024**3)
    persona = get("persona", _choice(PERSONA_CHOICES), "postfix")
    profile = get("profile", _path, None)
    auth_outcome = get("auth_outcome", _auth_outcome, "refuse")
    drop = get("drop_after_credentials", _bool, False)
    tarpit = get("tarpit", _seconds_or_zero, 0.0)
    block_networks: tuple[Network, ...] = get("block_networks", _networks, ())
    connections_per_ip = get("connections_per_ip", _rate, None)
    data_dir = get("data_dir", _path, None)
    if data_dir is None:
        raise ConfigError(
            "honeypot mode needs a data directory: --data-dir DIR (or data_dir in [honeypot])"
        )
    hp = HoneypotOptions(
        data_dir=data_dir,
        persona=persona,
        profile=profile,
        jsonl=jsonl,
        auth_outcome=auth_outcome,
        drop_after_credentials=drop,
        tarpit=tarpit,
        max_session=max_session or None,
        max_storage=max_storage or None,
        block_networks=block_networks,
        connections_per_ip=connections_per_ip,
        given=frozenset(key for key in values if key in KEYS),
    )
    return options, hp


def _collect(args: argparse.Namespace) -> dict[str, _Value]:
    """The raw settings of the file in ``args.config`` with the flags of ``args`` over them."""
    values: dict[str, _Value] = {}
    config = getattr(args, "config", None)
    if config is not None:
        values.update(_load_config_file(Path(config)))
    flags = {
        key: _Value(raw, flag_name(key))
        for key in KEYS
        if (raw := getattr(args, key, None)) is not None
    }
    for group in _EXCLUSIVE:
        if any(key in flags for key in group):
            for key in group:
                values.pop(key, None)
    values.update(flags)
    return values


def _mode(values: Mapping[str, _Value], default: str = "server") -> str:
    value = values.get("mode")
    return default if value is None else _choice(MODES)(value)


def _honeypot_values(args: argparse.Namespace, table: _Value | None) -> dict[str, _Value]:
    """The [honeypot] table's values (checked for unknown keys) with the flags over them."""
    values: dict[str, _Value] = {}
    if table is not None:
        raw = table.raw
        if not isinstance(raw, dict):
            raise table.error(f"'honeypot' must be a table ([honeypot]), got {_toml_type(raw)}")
        for key, item in raw.items():
            if key not in HONEYPOT_KEYS:
                close = difflib.get_close_matches(key, HONEYPOT_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise table.error(f"unknown key {key!r} in [honeypot]{hint}")
            values[key] = _Value(item, f"{table.where} {key}", table.base)
    for key in HONEYPOT_KEYS:
        raw = getattr(args, key, None)
        if raw is not None:
            values[key] = _Value(raw, flag_name(key))
    return values


_POLICY_TWINS = {"block_networks": "lists", "connections_per_ip": "limits"}


def _check_policy_overlap(
    honeypot: Mapping[str, _Value], sections: tuple[PolicySection, ...]
) -> None:
    """A [honeypot] key and the same key in its policy table of the same file: which one
    was meant is unclear. (A flag simply wins over both.)"""
    for key, table in _POLICY_TWINS.items():
        value = honeypot.get(key)
        if value is None or value.base is None:  # not given, or given as a flag
            continue
        for section in sections:
            if section.name == table and key in section.values:
                raise value.error(f"[{table}] {key} is set too; keep one")


def _load_config_file(path: Path) -> dict[str, _Value]:
    """The raw settings of a TOML file, checked for unknown keys but not yet converted."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # The message already carries "(at line L, column C)".
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None

    known_tables = ("server", "dns", "honeypot", *POLICY_TABLES)
    for name, item in document.items():
        if name in known_tables:
            continue
        tables = ", ".join(f"[{t}]" for t in known_tables)
        is_table = isinstance(item, dict) or (
            isinstance(item, list) and bool(item) and all(isinstance(i, dict) for i in item)
        )
        if is_table:
            close = difflib.get_close_matches(name, known_tables, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"{path}: unknown table [{name}]{hint}; tables are {tables}")
        raise ConfigError(f"{path}: unknown key {name!r} at top level; settings go in [server]")
    table = document.get("server", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'server' must be a table ([server])")

    for key in table:
        if key not in KEYS and key not in FILE_ONLY_KEYS:
            close = difflib.get_close_matches(key, (*KEYS, *FILE_ONLY_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in [server]{hint}")
    values = {key: _Value(raw, f"{path}: {key}", path.parent) for key, raw in table.items()}
    if "honeypot" in document:
        values["honeypot"] = _Value(document["honeypot"], f"{path}: [honeypot]", path.parent)
    _dns_table(document.get("dns"), f"{path}", values)
    sections = _policy_sections(document, f"{path}", path.parent)
    if sections:
        values["policy"] = _Value(sections, f"{path}", path.parent)

    for group in _EXCLUSIVE:
        chosen = [key for key in group if key in values and values[key].raw is not False]
        if len(chosen) > 1:
            raise ConfigError(f"{path}: {' and '.join(chosen)} exclude each other; keep one")
    return values


def _assemble(values: Mapping[str, _Value]) -> ServerOptions:
    def get(key: str, convert: Callable[[_Value], T], default: T) -> T:
        value = values.get(key)
        return default if value is None else convert(value)

    tls_cert = get("tls_cert", _path, None)
    tls_key = get("tls_key", _path, None)
    _check_tls(tls_cert, tls_key)

    delivery: Literal["maildir", "mbox", "sink"] = "maildir"
    maildir = get("maildir", _path, DEFAULTS.maildir)
    mbox = get("mbox", _path, None)
    if mbox is not None:
        delivery = "mbox"
    elif get("sink", _bool, False):
        delivery = "sink"

    log_level = DEFAULTS.log_level
    if get("verbose", _bool, False):
        log_level = "DEBUG"
    elif get("quiet", _bool, False):
        log_level = "WARNING"

    bare_newline = get("bare_newline", _choice(BARE_NEWLINE_CHOICES), DEFAULTS.bare_newline.value)
    log_format = get("log_format", _choice(LOG_FORMAT_CHOICES), str(DEFAULTS.log_format))

    return ServerOptions(
        listen=_listen_addresses(values),
        hostname=get("hostname", _hostname, None) or machine_fqdn(),
        delivery=delivery,
        maildir=maildir,
        mbox=mbox,
        state_dir=get("state_dir", _path, DEFAULTS.state_dir),
        tls_cert=tls_cert,
        tls_key=tls_key,
        auth_users=get("auth_users", _auth_users, ()),
        allow_insecure_auth=get("allow_insecure_auth", _bool, DEFAULTS.allow_insecure_auth),
        max_size=get("max_size", _size, DEFAULTS.max_size),
        max_recipients=get("max_recipients", _count, DEFAULTS.max_recipients),
        max_clients=get("max_clients", _count, DEFAULTS.max_clients),
        max_clients_per_ip=get("max_clients_per_ip", _count, DEFAULTS.max_clients_per_ip),
        idle_timeout=get("idle_timeout", _seconds, DEFAULTS.idle_timeout),
        data_timeout=get("data_timeout", _seconds, DEFAULTS.data_timeout),
        close_timeout=get("close_timeout", _seconds, DEFAULTS.close_timeout),
        greeting_delay=get("greeting_delay", _seconds_or_zero, DEFAULTS.greeting_delay),
        lmtp=get("lmtp", _bool, DEFAULTS.lmtp),
        proxy_protocol=get("proxy_protocol", _networks, DEFAULTS.proxy_protocol),
        trusted_networks=get("trusted_networks", _networks, DEFAULTS.trusted_networks),
        workers=get("workers", _count, DEFAULTS.workers),
        received_header=not get("no_received_header", _bool, False),
        bare_newline=BareNewline(bare_newline),
        log_format=cast(Literal["text", "json"], log_format),
        log_level=log_level,
        auth_mechanisms=get("auth_mechanisms", _mechanisms, ()),
        users_file=get("users_file", _path, None),
        auth_capture=cast(
            Literal["refuse", "accept"] | None,
            get("auth_capture", _choice(AUTH_CAPTURE_CHOICES), None),
        ),
        auth_failure_delay=get("auth_failure_delay", _seconds_or_zero, DEFAULTS.auth_failure_delay),
        max_auth_failures=get("max_auth_failures", _count, DEFAULTS.max_auth_failures),
        hook_timeout=get("hook_timeout", _seconds, DEFAULTS.hook_timeout),
        delivery_timeout=get("delivery_timeout", _seconds, DEFAULTS.delivery_timeout),
        forward=get("forward", _forward_urls, ()),
        webhook=get("webhook", _webhook_urls, ()),
        aiosmtpd_handler=get("aiosmtpd_handler", _import_spec, None),
        local_domains=get("local_domains", _domain_patterns, ()),
        open_relay=get("open_relay", _bool, False),
        relay_networks=get("relay_networks", _networks, DEFAULTS.relay_networks),
        dns_nameservers=get("dns_nameservers", _nameservers, ()),
        dns_timeout=get("dns_timeout", _seconds, DEFAULTS.dns_timeout),
        dnsbl_zones=get("dnsbl_zones", _zones, ()),
        greylist=get("greylist", _bool, False),
        policy=cast(tuple[PolicySection, ...], values["policy"].raw) if "policy" in values else (),
    )


_DNS_KEYS = {"nameservers": "dns_nameservers", "timeout": "dns_timeout"}


def _dns_table(table: Any, where: str, values: dict[str, _Value]) -> None:
    """``[dns]`` with ``nameservers`` and ``timeout``: another spelling of the [server]
    keys ``dns_nameservers`` and ``dns_timeout``, into ``values``."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'dns' must be a table ([dns]), got {_toml_type(table)}")
    for key, raw in table.items():
        if key not in _DNS_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r} in [dns]; keys are {', '.join(_DNS_KEYS)}"
            )
        target = _DNS_KEYS[key]
        if target in values:
            raise ConfigError(f"{where}: [dns] {key} and {target} both given; keep one")
        values[target] = _Value(raw, f"{where} [dns] {key}")


def _policy_sections(
    document: Mapping[str, Any], where: str, base: Path | None
) -> tuple[PolicySection, ...]:
    """The policy tables of a document (a TOML file, or settings given in code)."""
    sections: list[PolicySection] = []
    for name in POLICY_TABLES:
        item = document.get(name)
        if item is None:
            continue
        entries = item if isinstance(item, list) else [item]
        if name in _ARRAY_TABLES and not isinstance(item, list):
            raise ConfigError(f"{where}: {name} must be an array of tables ([[{name}]])")
        if name not in _ARRAY_TABLES and isinstance(item, list):
            raise ConfigError(f"{where}: {name} must be one table ([{name}]), not an array")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: [{name}] must be a table, got {_toml_type(entry)}")
            label = f"[[{name}]] #{index + 1}" if name in _ARRAY_TABLES else f"[{name}]"
            sections.append(PolicySection(name, dict(entry), base, f"{where} {label}"))
    return tuple(sections)


def options_from_settings(
    settings: Mapping[str, Any], *, default_delivery: Literal["maildir", "sink"] = "sink"
) -> ServerOptions:
    """ServerOptions from keyword settings given in code (``Server(hostname=..., ...)``):
    the same keys and checks as the ``[server]`` table. Numbers, booleans, lists and
    ``Path`` objects may be given as such. Unlike ``mailgate serve``, code stores nothing
    unless asked (``maildir=...``, ``mbox=...``), keeps its state (spool, development
    certificate) under :func:`user_state_dir` rather than the working directory, and listens
    on 127.0.0.1:2525 by default."""
    values: dict[str, _Value] = {}
    sections = _policy_sections(
        {k: v for k, v in settings.items() if k in POLICY_TABLES}, "setting", None
    )
    if sections:
        values["policy"] = _Value(sections, "settings")
    for key, raw in settings.items():
        if key in POLICY_TABLES or key == "dns":
            continue
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}")
        if raw is None:
            continue
        if isinstance(raw, Path):
            raw = str(raw)
        elif isinstance(raw, tuple | set | frozenset):
            raw = [str(item) for item in raw]
        elif isinstance(raw, list):
            raw = [str(item) if isinstance(item, Path) else item for item in raw]
        values[key] = _Value(raw, f"setting {key}")
    _dns_table(settings.get("dns"), "setting", values)
    chosen = [k for k in ("maildir", "mbox", "sink") if k in values and values[k].raw is not False]
    if len(chosen) > 1:
        raise ConfigError(f"settings {' and '.join(chosen)} exclude each other; keep one")
    if not chosen and default_delivery == "sink":
        values["sink"] = _Value(True, "default")
    if "state_dir" not in values:
        # An embedded server must not litter the application's working directory.
        values["state_dir"] = _Value(str(user_state_dir()), "default")
    return _assemble(values)


def user_state_dir() -> Path:
    """Where an embedded server keeps its state by default: $XDG_STATE_HOME/mailgate, or
    ~/.local/state/mailgate (the development certificate, the spool)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mailgate"


@functools.cache
def machine_fqdn() -> str:
    """This machine's fully qualified name; looked up once, as it may query DNS."""
    return socket.getfqdn() or "localhost"


# -- listen addresses ---------------------------------------------------------------------


def _listen_addresses(values: Mapping[str, _Value]) -> tuple[ListenAddress, ...]:
    plain = values.get("listen")
    implicit_tls = values.get("smtps_listen")
    if plain is None and implicit_tls is None:
        return DEFAULT_LISTEN
    addresses: list[ListenAddress] = []
    seen: dict[tuple[str, int], str] = {}
    for value, tls in ((plain, False), (implicit_tls, True)):
        if value is None:
            continue
        for text in _string_list(value):
            address = replace(parse_listen_address(text, value), implicit_tls=tls)
            endpoint = (address.host, address.port)
            if endpoint in seen:
                raise value.error(f"{address} is already given (in {seen[endpoint]})")
            seen[endpoint] = value.where
            addresses.append(address)
    if not addresses:
        raise ConfigError("no address to listen on: listen and smtps_listen are both empty")
    return tuple(addresses)


def parse_listen_address(text: str, value: _Value | None = None) -> ListenAddress:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> ListenAddress (plain SMTP; IPv6 without brackets)."""
    where = value or _Value(text, "listen address")
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
        if not _is_host_name(host):
            raise where.error(f"{host!r} in {text!r} is neither an IP address nor a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise where.error(f"{text!r} has no valid port number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        # 0 asks the system for a free port (logged at start); --workers needs a fixed one.
        raise where.error(f"port {port} in {text!r} is out of range (0-65535)")
    return ListenAddress(host, port)


def _is_host_name(name: str) -> bool:
    labels = name.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        # Looks like an IPv4 address, so it has to be a valid one.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return (
        name.isascii() and len(name) <= 253 and all(_LABEL_RE.fullmatch(label) for label in labels)
    )


# -- converters: each takes a raw value from a flag or the file ---------------------------


def _string(value: _Value) -> str:
    if not isinstance(value.raw, str):
        raise value.error(f"expected a string, got {_toml_type(value.raw)}")
    return value.raw


def _string_list(value: _Value) -> list[str]:
    raw = value.raw
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list | tuple):
        for item in raw:
            if not isinstance(item, str):
                raise value.error(
                    f"expected a list of strings, got a list holding {_toml_type(item)} {item!r}"
                )
        return list(raw)
    raise value.error(f"expected a list of strings, got {_toml_type(raw)}")


def _path(value: _Value) -> Path:
    text = _string(value)
    if not text.strip():
        raise value.error("empty path")
    path = Path(text)
    if value.base is not None:
        path = value.base / path.expanduser()
    return path


def _bool(value: _Value) -> bool:
    if not isinstance(value.raw, bool):
        raise value.error(f"expected true or false, got {_toml_type(value.raw)}")
    return value.raw


def _hostname(value: _Value) -> str:
    name = _string(value).strip()
    if not name or not _is_host_name(name):
        raise value.error(f"{name!r} is not a valid host name")
    return name


def _number(value: _Value, parse: Callable[[str], T], kinds: tuple[type, ...], what: str) -> T:
    raw = value.raw
    if isinstance(raw, str):
        try:
            return parse(raw.strip())
        except ValueError:
            raise value.error(f"{raw!r} is not {what}") from None
    if isinstance(raw, bool) or not isinstance(raw, kinds):
        raise value.error(f"expected {what}, got {_toml_type(raw)}")
    return cast(T, raw)


def _count(value: _Value) -> int:
    number = _number(value, int, (int,), "a whole number")
    if number < 1:
        raise value.error(f"must be at least 1, got {number}")
    return number


def _seconds(value: _Value) -> float:
    seconds = float(_number(value, float, (int, float), "a number of seconds"))
    if not math.isfinite(seconds) or seconds <= 0:
        raise value.error(f"must be a positive number of seconds, got {value.raw}")
    return seconds


def _seconds_or_zero(value: _Value) -> float:
    seconds = float(_number(value, float, (int, float), "a number of seconds"))
    if not math.isfinite(seconds) or seconds < 0:
        raise value.error(f"must be zero or a positive number of seconds, got {value.raw}")
    return seconds


def _size(value: _Value) -> int:
    raw = value.raw
    if isinstance(raw, int) and not isinstance(raw, bool):
        size = raw
    elif isinstance(raw, str):
        match = _SIZE_RE.fullmatch(raw)
        if raw.strip().startswith("-"):
            raise value.error(f"must not be negative, got {raw.strip()}")
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise value.error(
                f"{raw!r} is not a size; use bytes or a suffix: K, M, G (1024-based) "
                "or KB, MB, GB (1000-based)"
            )
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise value.error(f"expected a number of bytes, got {_toml_type(raw)}")
    if size < 0:
        raise value.error(f"must not be negative, got {size}")
    return size


def _choice(allowed: tuple[str, ...]) -> Callable[[_Value], str]:
    def convert(value: _Value) -> str:
        text = _string(value).strip().lower()
        if text not in allowed:
            raise value.error(f"{value.raw!r} is not one of {', '.join(allowed)}")
        return text

    return convert


def _networks(value: _Value) -> tuple[Network, ...]:
    networks: list[Network] = []
    for text in _string_list(value):
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError as exc:
                if "host bits set" in str(exc):
                    meant = ipaddress.ip_network(item, strict=False)
                    raise value.error(f"{item} has host bits set; did you mean {meant}?") from None
                raise value.error(f"{item!r} is not a network in CIDR notation") from None
    return tuple(networks)


def _auth_users(value: _Value) -> tuple[tuple[str, str], ...]:
    users: dict[str, str] = {}
    for entry in _string_list(value):
        user, colon, password = entry.partition(":")
        # Never echo the entry: it contains the password.
        if not colon or not user:
            raise value.error("expected USER:PASSWORD")
        if not password:
            raise value.error(f"empty password for user {user!r}")
        if user in users:
            raise value.error(f"user {user!r} is given twice")
        users[user] = password
    return tuple(users.items())


def _mechanisms(value: _Value) -> tuple[str, ...]:
    mechanisms: list[str] = []
    for text in _string_list(value):
        for item in text.replace(",", " ").split():
            name = item.upper()
            if name not in AUTH_MECHANISMS:
                raise value.error(f"{item!r} is not one of {', '.join(AUTH_MECHANISMS)}")
            if name not in mechanisms:
                mechanisms.append(name)
    return tuple(mechanisms)


_URL_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>[^\s]+)", re.IGNORECASE)


def _urls(value: _Value, schemes: tuple[str, ...], example: str) -> tuple[str, ...]:
    urls: list[str] = []
    for text in _string_list(value):
        text = text.strip()
        match = _URL_RE.fullmatch(text)
        if not match or match.group("scheme").lower() not in schemes:
            raise value.error(
                f"{text!r} is not a {' or '.join(s + '://' for s in schemes)} URL (e.g. {example})"
            )
        urls.append(text)
    return tuple(urls)


def _forward_urls(value: _Value) -> tuple[str, ...]:
    urls = _urls(value, ("smtp", "smtps", "lmtp"), "smtp://mail.example.com:25")
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise value.error(f"{url!r} has no valid port number") from None
        if not parts.hostname:
            raise value.error(f"{url!r} names no host")
    return urls


def _webhook_urls(value: _Value) -> tuple[str, ...]:
    return _urls(value, ("http", "https"), "https://app.example.com/mail")


def _import_spec(value: _Value) -> str:
    text = _string(value).strip()
    module, colon, attribute = text.partition(":")
    if not colon or not module or not attribute:
        raise value.error(f"{text!r} is not module:Class (e.g. myapp.handlers:Handler)")
    return text


def _domain_patterns(value: _Value) -> tuple[str, ...]:
    domains: list[str] = []
    for text in _string_list(value):
        for item in text.split(","):
            item = item.strip().lower().rstrip(".")
            if not item:
                continue
            name = item[2:] if item.startswith("*.") else item
            if not _is_host_name(name) or name.replace(".", "").isdigit():
                raise value.error(f"{item!r} is not a domain (or *.domain)")
            domains.append(item)
    return tuple(dict.fromkeys(domains))


def _nameservers(value: _Value) -> tuple[str, ...]:
    from mailgate.dns import parse_nameserver

    servers: list[str] = []
    for text in _string_list(value):
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                parse_nameserver(item)
            except ValueError as exc:
                raise value.error(str(exc)) from None
            servers.append(item)
    return tuple(servers)


def _zones(value: _Value) -> tuple[str, ...]:
    zones: list[str] = []
    for text in _string_list(value):
        for item in text.split(","):
            item = item.strip().lower().rstrip(".")
            if not item:
                continue
            if not _is_host_name(item):
                raise value.error(f"{item!r} is not a DNS zone")
            zones.append(item)
    return tuple(zones)


def _jsonl_target(value: _Value) -> str:
    """A JSON lines file (resolved like other paths) or "-" for stdout."""
    text = _string(value).strip()
    if text == "-":
        return text
    return str(_path(value))


def _auth_outcome(value: _Value) -> str:
    from mailgate.honeypot.plugin import parse_auth_outcome

    try:
        mode, count = parse_auth_outcome(_string(value))
    except ValueError as exc:
        raise value.error(str(exc).replace("auth_outcome must be", "must be")) from None
    return f"{mode}:{count}" if count else mode


def _rate(value: _Value) -> str:
    from mailgate.plugins.rate_limits import Rate

    text = _string(value).strip()
    try:
        Rate.parse(text)
    except ValueError as exc:
        raise value.error(str(exc)) from None
    return text


def _check_tls(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ConfigError(
            f"{given} needs {missing} as well (or tls_cert and tls_key in the config file)"
        )
    if cert is not None and key is not None:
        try:
            create_server_context(cert, key)
        except TLSConfigError as exc:
            raise ConfigError(str(exc)) from None


def _toml_type(raw: Any) -> str:
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int | float):
        return f"the number {raw}"
    if isinstance(raw, str):
        return f"the string {raw!r}"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, dict):
        return "a table"
    return type(raw).__name__
