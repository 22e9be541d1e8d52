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
    switches) so that flags and file go through the same checks.
    """
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
    return _assemble(values)


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

    for name, item in document.items():
        if name in ("server", "dns") or name in POLICY_TABLES:
            continue
        tables = ", ".join(f"[{t}]" for t in ("server", "dns", *POLICY_TABLES))
        is_table = isinstance(item, dict) or (
            isinstance(item, list) and bool(item) and all(isinstance(i, dict) for i in item)
        )
        if is_table:
            close = difflib.get_close_matches(name, ("server", "dns", *POLICY_TABLES), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"{path}: unknown table [{name}]{hint}; tables are {tables}")
        raise ConfigError(f"{path}: unknown key {name!r} at top level; settings go in [server]")
    table = document.get("server", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'server' must be a table ([server])")

    for key in table:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in [server]{hint}")
    values = {key: _Value(raw, f"{path}: {key}", path.parent) for key, raw in table.items()}
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
