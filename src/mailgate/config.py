"""Build ServerOptions from command-line flags and an optional TOML file.

The file given with ``mailgate serve --config FILE`` holds every setting in one
``[server]`` table. Its keys are the long flag names without the leading dashes and with
``_`` in place of ``-``; the one exception is ``--auth-user``, which may be repeated and so
becomes the list ``auth_users``::

    [server]
    listen = ["0.0.0.0:25", "[::]:25"]      # a list, or one string
    smtps_listen = ["0.0.0.0:465"]
    submission_listen = ["0.0.0.0:587"]     # AUTH before MAIL; senders from [senders]
    submissions_listen = []                 # the same with implicit TLS (port 465)
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

The settings themselves (keys, flags, converters, defaults, help) are declared once, on
the fields of ServerOptions (mailgate.server.options) and HoneypotOptions
(mailgate.honeypot.settings); KEYS, the flags of ``mailgate serve`` and ``mailgate
honeypot`` and docs/settings.md (:func:`settings_reference`) all come from there.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mailgate.honeypot.settings import GROUPS as HONEYPOT_GROUPS
from mailgate.honeypot.settings import (
    HONEYPOT_REFUSED,
    SERVER_FLAGS,
    HoneypotOptions,
    check_policy_overlap,
    refuse_server_settings,
    refuse_tables,
)
from mailgate.server.options import (
    GROUPS,
    PolicySection,
    ServerOptions,
    SNICertificate,
    parse_listen_address,
)
from mailgate.server.tls import TLSConfigError, create_server_context
from mailgate.settings import (
    ConfigError,
    Setting,
    Value,
    build_fields,
    did_you_mean,
    exclusive_groups,
    flag_values,
    settings_of,
    toml_type,
)
from mailgate.settings.converters import choice
from mailgate.settings.doc import reference_table

# machine_fqdn and user_state_dir are looked up here at call time, so tests can replace
# them on this module.
from mailgate.settings.machine import machine_fqdn, user_state_dir

__all__ = [
    "HONEYPOT_KEYS",
    "HONEYPOT_REFUSED",
    "HONEYPOT_SETTINGS",
    "KEYS",
    "MODES",
    "POLICY_TABLES",
    "SERVER_SETTINGS",
    "CheckedConfiguration",
    "ConfigError",
    "HoneypotOptions",
    "build_honeypot_options",
    "build_options",
    "check_configuration",
    "config_mode",
    "flag_name",
    "machine_fqdn",
    "options_from_settings",
    "parse_listen_address",
    "setting_sources",
    "settings_reference",
    "user_state_dir",
]

#: The settings of the [server] table, in their order, and their keys; each key is also
#: the argparse ``dest`` of its flag.
SERVER_SETTINGS: tuple[Setting, ...] = settings_of(ServerOptions)
KEYS: tuple[str, ...] = tuple(item.key for item in SERVER_SETTINGS)
#: The settings of the [honeypot] table (the ``mailgate honeypot`` flags).
HONEYPOT_SETTINGS: tuple[Setting, ...] = settings_of(HoneypotOptions)
HONEYPOT_KEYS: tuple[str, ...] = tuple(item.key for item in HONEYPOT_SETTINGS)
#: Tables besides [server]: each configures one plugin (a policy, routing, the queue),
#: which reads it itself. ``dnsbl`` and ``routes`` are arrays of tables (``[[dnsbl]]``,
#: ``[[routes]]``), one entry per list or rule.
POLICY_TABLES = (
    "limits",
    "lists",
    "dnsbl",
    "client_checks",
    "greylisting",
    "mail_auth",
    "routes",
    "queue",
    "outbound",
    "dkim_sign",
    "arc_seal",
    "senders",
    "state",
)
_ARRAY_TABLES = frozenset({"dnsbl", "routes", "dkim_sign"})
#: What a configuration file can run (``mode`` in [server]): a mail server or a honeypot.
MODES = ("server", "honeypot")
#: [server] keys only a file has (the command, serve or honeypot, is the mode on the
#: command line).
FILE_ONLY_KEYS = ("mode",)

_BY_KEY: Mapping[str, Setting] = {item.key: item for item in (*SERVER_SETTINGS, *HONEYPOT_SETTINGS)}
# Keys of which at most one may be chosen; a flag for one of them overrides the file's.
_EXCLUSIVE = exclusive_groups(SERVER_SETTINGS)


def flag_name(key: str) -> str:
    """The command-line flag for a config key, e.g. ``max_size`` -> ``--max-size``."""
    return _BY_KEY[key].flag


def build_options(args: argparse.Namespace, *, read_keys: bool = True) -> ServerOptions:
    """ServerOptions from parsed ``mailgate serve`` arguments and the file in ``args.config``.

    Attributes of ``args`` named like the keys in KEYS hold flag values, None when the flag
    was not given; flag values are unparsed strings (lists for repeatable flags, booleans
    for switches) so that flags and file go through the same checks. A file for honeypot
    mode (``mode = "honeypot"``) is an error here: see :func:`config_mode`.
    ``read_keys=False``: the ``[[dkim_sign]]``/``[arc_seal]`` tables are checked but their
    key files not read (``mailgate queue`` and ``sendmail``, which may run as users the
    keys are kept from; sendmail reads them itself when it queues a message).
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
    return _assemble(values, read_keys=read_keys)


def config_mode(path: str | os.PathLike[str] | None) -> str:
    """The mode (one of MODES) a configuration file asks for; "server" without a file or
    without a ``mode`` key."""
    if path is None:
        return "server"
    return _mode(_load_config_file(Path(path)))


def build_honeypot_options(args: argparse.Namespace) -> tuple[ServerOptions, HoneypotOptions]:
    """The settings of ``mailgate honeypot`` (or ``mailgate serve`` with a file saying
    ``mode = "honeypot"``): ServerOptions from the [server] keys as for ``serve`` (the
    honeypot's safe settings are applied later, by mailgate.honeypot.mode) and
    HoneypotOptions from the [honeypot] table, flags overriding the file. [server] keys a
    honeypot cannot honour (deliveries, relay settings, auth backends) are errors, in the
    file and as flags."""
    values = _collect(args)
    mode = _mode(values, "honeypot")
    if mode != "honeypot":
        raise values["mode"].error(
            f"this file is for {mode} mode; run it with 'mailgate serve --config FILE'"
        )
    refuse_server_settings(values)
    honeypot = _honeypot_values(args, values.get("honeypot"))
    options = _assemble(values)
    refuse_tables(options.policy)
    check_policy_overlap(honeypot, options.policy)
    fields = build_fields(HoneypotOptions, honeypot, table="honeypot")
    given = frozenset(key for key in values if key in KEYS)
    return options, HoneypotOptions(**fields, given=given)


def _collect(args: argparse.Namespace) -> dict[str, Value]:
    """The raw settings of the file in ``args.config`` with the flags of ``args`` over them."""
    values: dict[str, Value] = {}
    config = getattr(args, "config", None)
    if config is not None:
        values.update(_load_config_file(Path(config)))
    flags = flag_values(args, SERVER_SETTINGS)
    for group in _EXCLUSIVE:
        # --mbox replaces the file's maildir; --no-sink only turns off the file's sink.
        if any(key in flags and flags[key].raw is not False for key in group):
            for key in group:
                values.pop(key, None)
    values.update(flags)
    return values


def _mode(values: Mapping[str, Value], default: str = "server") -> str:
    value = values.get("mode")
    return default if value is None else choice(MODES)(value)


def _honeypot_values(args: argparse.Namespace, table: Value | None) -> dict[str, Value]:
    """The [honeypot] table's values (checked for unknown keys) with the flags over them."""
    values: dict[str, Value] = {}
    if table is not None:
        raw = table.raw
        if not isinstance(raw, dict):
            raise table.error(f"'honeypot' must be a table ([honeypot]), got {toml_type(raw)}")
        for key, item in raw.items():
            if key not in HONEYPOT_KEYS:
                hint = did_you_mean(key, HONEYPOT_KEYS)
                raise table.error(f"unknown key {key!r} in [honeypot]{hint}")
            values[key] = Value(item, f"{table.where} {key}", table.base)
    values.update(flag_values(args, HONEYPOT_SETTINGS))
    return values


def _load_config_file(path: Path) -> dict[str, Value]:
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

    known_tables = ("server", "dns", "tls", "honeypot", *POLICY_TABLES)
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
            hint = did_you_mean(key, (*KEYS, *FILE_ONLY_KEYS))
            raise ConfigError(f"{path}: unknown key {key!r} in [server]{hint}")
    values = {key: Value(raw, f"{path}: {key}", path.parent) for key, raw in table.items()}
    if "honeypot" in document:
        values["honeypot"] = Value(document["honeypot"], f"{path}: [honeypot]", path.parent)
    _dns_table(document.get("dns"), f"{path}", values)
    _tls_table(document.get("tls"), f"{path}", path.parent, values)
    sections = _policy_sections(document, f"{path}", path.parent)
    if sections:
        values["policy"] = Value(sections, f"{path}", path.parent)

    for group in _EXCLUSIVE:
        chosen = [key for key in group if key in values and values[key].raw is not False]
        if len(chosen) > 1:
            raise ConfigError(f"{path}: {' and '.join(chosen)} exclude each other; keep one")
    return values


def _assemble(
    values: Mapping[str, Value], problems: list[str] | None = None, *, read_keys: bool = True
) -> ServerOptions:
    """ServerOptions from the collected values. With ``problems``, the checks after the
    conversion (TLS files, routing tables) add what they find there instead of raising at
    the first, so that ``mailgate check-config`` can list them all."""
    fields = build_fields(ServerOptions, values, table="server")
    _gather(problems, _check_tls, fields.get("tls_cert"), fields.get("tls_key"))
    for certificate in fields.get("tls_certificates", ()):
        _gather(problems, _check_sni_certificate, certificate)
    if "hostname" not in fields:
        # Looked up only when needed, as it may query DNS; ServerOptions() says "localhost".
        fields["hostname"] = machine_fqdn()
    if "policy" in values:
        fields["policy"] = values["policy"].raw
    options = ServerOptions(**fields)
    _check_routing_tables(options, problems, read_keys=read_keys)
    _gather(problems, _check_senders_table, options)
    _gather(problems, _check_state_table, options)
    return options


def _gather(problems: list[str] | None, check: Callable[..., object], *args: Any) -> None:
    """Run ``check(*args)``; its ConfigError is raised, or added to ``problems`` if given."""
    if problems is None:
        check(*args)
        return
    try:
        check(*args)
    except ConfigError as exc:
        problems.append(str(exc))


def _check_state_table(options: ServerOptions) -> None:
    """[state] read now: a mistake in it (or redis-py missing for backend = "redis") is
    reported with the other configuration errors, before anything starts."""
    if any(s.name == "state" for s in options.policy):
        from mailgate.plugins.state import state_settings

        state_settings(options.policy, hook_timeout=options.hook_timeout)


def _check_senders_table(options: ServerOptions) -> None:
    """[senders] read now, so that a mistake in it is reported with the other
    configuration errors, before anything starts."""
    if not any(s.name == "senders" for s in options.policy):
        return
    from mailgate.plugins.policy import PolicyConfigError
    from mailgate.plugins.submission import sender_table

    try:
        sender_table(options.policy)
    except PolicyConfigError as exc:
        raise ConfigError(str(exc)) from None


def _check_routing_tables(
    options: ServerOptions, problems: list[str] | None = None, *, read_keys: bool = True
) -> None:
    """[[routes]], [queue], [outbound], [[dkim_sign]] and [arc_seal] read now (the key
    files too), so that a mistake in them is reported with the other configuration
    errors, before anything starts."""
    tables = ("routes", "queue", "outbound", "dkim_sign", "arc_seal")
    if not any(s.name in tables for s in options.policy):
        return
    from mailgate.plugins.policy import PolicyConfigError
    from mailgate.plugins.routing import RouteTable
    from mailgate.queue.settings import outbound_options, queue_settings

    def routes() -> None:
        try:
            RouteTable.from_sections(options.policy)
        except PolicyConfigError as exc:
            raise ConfigError(str(exc)) from None

    _gather(problems, routes)
    _gather(problems, queue_settings, options.policy)
    _gather(problems, outbound_options, options.policy, options.hostname)
    _gather(problems, _check_signing, options, read_keys)


def _check_signing(options: ServerOptions, read_keys: bool = True) -> None:
    """Every [[dkim_sign]] entry and [arc_seal]: its settings and (unless ``read_keys``
    is false) its key file, read."""
    from mailgate.queue.signing import message_signer

    message_signer(
        options.policy,
        hostname=options.hostname,
        relay_networks=options.relay_networks,
        read_keys=read_keys,
    )


@dataclass(frozen=True)
class CheckedConfiguration:
    """What :func:`check_configuration` found: the options (None when the settings could
    not be read at all; with problems, the settings that failed are left at their
    defaults), every problem as one line, and where each setting came from."""

    options: ServerOptions | None
    problems: tuple[str, ...]
    #: key -> where its value came from ("--maildir", "mailgate.toml: maildir"); settings
    #: left at their default are not in it.
    sources: Mapping[str, str]

    def where(self, key: str) -> str:
        """How an error names a setting: where it was given, else its flag."""
        return self.sources.get(key) or flag_name(key)


def setting_sources(args: argparse.Namespace) -> Callable[[str], str]:
    """key -> how an error names that setting: where its value came from (the flag, or
    the file and key), else its flag."""
    try:
        values = _collect(args)
    except ConfigError:
        values = {}
    sources = {key: value.where for key, value in values.items() if key in KEYS}
    return lambda key: sources.get(key) or flag_name(key)


def check_configuration(args: argparse.Namespace) -> CheckedConfiguration:
    """Read the settings of ``mailgate serve`` as :func:`build_options` does, but collect
    every problem instead of stopping at the first: each setting is converted on its own,
    then the TLS files and the routing tables are checked. A file that cannot be read or
    parsed is one problem (nothing more can be said then)."""
    try:
        values = _collect(args)
        mode = _mode(values)
    except ConfigError as exc:
        return CheckedConfiguration(None, (str(exc),), {})
    sources = {key: value.where for key, value in values.items() if key in KEYS}
    if mode != "server":
        problem = f"this file is for {mode} mode; 'mailgate check-config' checks server files"
        return CheckedConfiguration(None, (str(values["mode"].error(problem)),), sources)
    problems: list[str] = []
    if "honeypot" in values:
        problems.append(
            str(values["honeypot"].error('a [honeypot] table needs mode = "honeypot" in [server]'))
        )
    failed: set[str] = set()
    for item in SERVER_SETTINGS:
        value = values.get(item.key)
        if value is not None:
            before = len(problems)
            _gather(problems, item.convert, value)
            if len(problems) > before:
                failed.add(item.key)
    # The rest is checked with the failed settings left at their defaults, so that one
    # bad value does not hide the problems of the files and tables.
    values = {key: value for key, value in values.items() if key not in failed}
    try:
        options = _assemble(values, problems)
    except ConfigError as exc:
        return CheckedConfiguration(None, (*problems, str(exc)), sources)
    return CheckedConfiguration(options, tuple(problems), sources)


_DNS_KEYS = {"nameservers": "dns_nameservers", "timeout": "dns_timeout"}


def _dns_table(table: Any, where: str, values: dict[str, Value]) -> None:
    """``[dns]`` with ``nameservers`` and ``timeout``: another spelling of the [server]
    keys ``dns_nameservers`` and ``dns_timeout``, into ``values``."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'dns' must be a table ([dns]), got {toml_type(table)}")
    for key, raw in table.items():
        if key not in _DNS_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r} in [dns]; keys are {', '.join(_DNS_KEYS)}"
            )
        target = _DNS_KEYS[key]
        if target in values:
            raise ConfigError(f"{where}: [dns] {key} and {target} both given; keep one")
        values[target] = Value(raw, f"{where} [dns] {key}")


def _tls_table(table: Any, where: str, base: Path | None, values: dict[str, Value]) -> None:
    """``[tls]`` with ``certificates``, an array of tables (``[[tls.certificates]]``):
    another spelling of the [server] key ``tls_certificates``, into ``values``."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'tls' must be a table ([tls]), got {toml_type(table)}")
    for key in table:
        if key != "certificates":
            hint = did_you_mean(key, ("certificates",))
            raise ConfigError(f"{where}: unknown key {key!r} in [tls]{hint}; keys are certificates")
    entries = table.get("certificates")
    if entries is None:
        return
    if not isinstance(entries, list):
        raise ConfigError(
            f"{where}: [tls] certificates must be an array of tables ([[tls.certificates]])"
        )
    if "tls_certificates" in values:
        raise ConfigError(
            f"{where}: [[tls.certificates]] and tls_certificates both given; keep one"
        )
    values["tls_certificates"] = Value(entries, f"{where} [[tls.certificates]]", base)


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
                raise ConfigError(f"{where}: [{name}] must be a table, got {toml_type(entry)}")
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
    values: dict[str, Value] = {}
    sections = _policy_sections(
        {k: v for k, v in settings.items() if k in POLICY_TABLES}, "setting", None
    )
    if sections:
        values["policy"] = Value(sections, "settings")
    for key, raw in settings.items():
        if key in POLICY_TABLES or key in ("dns", "tls"):
            continue
        if key not in KEYS:
            hint = did_you_mean(key, KEYS)
            raise ConfigError(f"unknown setting {key!r}{hint}")
        if raw is None:
            continue
        if isinstance(raw, Path):
            raw = str(raw)
        elif isinstance(raw, tuple | set | frozenset):
            raw = [str(item) for item in raw]
        elif isinstance(raw, list):
            raw = [str(item) if isinstance(item, Path) else item for item in raw]
        values[key] = Value(raw, f"setting {key}")
    _dns_table(settings.get("dns"), "setting", values)
    _tls_table(settings.get("tls"), "setting", None, values)
    delivery_chosen = False
    for group in _EXCLUSIVE:
        chosen = [key for key in group if key in values and values[key].raw is not False]
        if len(chosen) > 1:
            raise ConfigError(f"settings {' and '.join(chosen)} exclude each other; keep one")
        delivery_chosen = delivery_chosen or (bool(chosen) and "sink" in group)
    if not delivery_chosen and default_delivery == "sink":
        values["sink"] = Value(True, "default")
    if "state_dir" not in values:
        # An embedded server must not litter the application's working directory.
        values["state_dir"] = Value(str(user_state_dir()), "default")
    return _assemble(values)


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


def _check_sni_certificate(certificate: SNICertificate) -> None:
    try:
        create_server_context(certificate.cert, certificate.key)
    except TLSConfigError as exc:
        raise ConfigError(f"certificate for {', '.join(certificate.names)}: {exc}") from None


# -- the settings reference ------------------------------------------------------------------

_REFERENCE_INTRO = """\
# Settings reference

<!-- Generated from the settings table by scripts/settings-doc; do not edit. Each setting
is declared once, on its field of ServerOptions (src/mailgate/server/options.py) or
HoneypotOptions (src/mailgate/honeypot/settings.py): change it there and run
scripts/settings-doc. -->

Every setting of `mailgate serve` is a key of the `[server]` table of the configuration
file given with `--config FILE`, and a flag; a flag given on the command line replaces
the file's value (lists are replaced, not merged). The same keys are the keyword
arguments of `mailgate.Server(...)` in code. `mailgate serve --help` lists them too.

- Switches are `true` or `false` in the file; on the command line the flag turns one on
  and its `--no-...` form turns it off, so a file's `true` can be undone.
- Repeatable flags are lists in the file (one string is a list of one); most of them also
  take comma-separated items.
- Sizes are bytes or a number with a suffix: `K`, `M`, `G` (also `KiB`...) are 1024-based,
  `KB`, `MB`, `GB` 1000-based. Durations are seconds, fractions allowed.
- Relative paths in the file are relative to the file's directory, `~` is expanded;
  relative paths given as flags are relative to the working directory.
- Unknown keys are errors (with a suggestion for a misspelt one), as are values of the
  wrong type; every error is one line naming the flag, or the file and key.

See the [user guide](user-guide.md) for how the settings work together,
[policy](policy.md) for the policy tables (`[limits]`, `[lists]`, `[[dnsbl]]`,
`[client_checks]`, `[greylisting]`, `[mail_auth]`) and [honeypot](honeypot.md) for
honeypot mode.
"""

_SERVER_NOTES = """\
Two more things go in the file only:

- `mode = "honeypot"` in `[server]` makes the file a honeypot's (see below);
  `mailgate serve --config FILE` then runs the honeypot.
- A `[dns]` table with `nameservers` and `timeout` is another spelling of
  `dns_nameservers` and `dns_timeout`.
"""


def settings_reference() -> str:
    """docs/settings.md: every setting of the [server] and [honeypot] tables, from the
    settings table (scripts/settings-doc writes it; a test checks it is current)."""
    honeypot_defaults = {key: text for key, text in SERVER_FLAGS.items() if text is not None}
    shared = [item for item in SERVER_SETTINGS if item.key in SERVER_FLAGS]
    parts = [
        _REFERENCE_INTRO,
        "## `[server]`: `mailgate serve`\n",
        reference_table(SERVER_SETTINGS, GROUPS, table="server"),
        _SERVER_NOTES,
        "## `[honeypot]`: `mailgate honeypot`\n",
        '`mailgate honeypot` (or a file with `mode = "honeypot"`) takes these settings, in '
        "a `[honeypot]` table of the file or as flags:\n",
        reference_table(HONEYPOT_SETTINGS, HONEYPOT_GROUPS, table="honeypot", heading="###"),
        "### `[server]` settings in honeypot mode\n",
        "A honeypot's file may hold the `[server]` settings above, except those refused "
        "below. These are flags of `mailgate honeypot` too (defaults as for `mailgate "
        "serve` unless given here):\n",
        "| flag | default in a honeypot |\n| --- | --- |\n"
        + "".join(
            f"| `{item.flag}` | {item.default_description(honeypot_defaults.get(item.key))} |\n"
            for item in shared
        ),
        "Refused in honeypot mode, in the file and as flags:\n",
        "| `[server]` key | why |\n| --- | --- |\n"
        + "".join(f"| `{key}` | {reason} |\n" for key, reason in HONEYPOT_REFUSED.items())
        + "| `workers` above 1 | honeypot mode runs in one process |\n",
        *_queue_reference(),
        *_state_reference(),
    ]
    return "\n".join(parts)


def _state_reference() -> list[str]:
    """The [state] table (file only)."""
    from mailgate.plugins.state import StateSettings

    return [
        "## `[state]`: policy state shared by several nodes\n",
        "Where rate limits count, greylisting remembers triplets and a honeypot counts "
        "each address's connections and logins: in each process (`memory`, the default) "
        'or in one Redis server every node uses (see docs/policy.md, "Shared state on '
        "Redis\"). Also allowed in a honeypot's file.\n",
        reference_table(settings_of(StateSettings), {"state": "state"}, table="state", flags=False),
    ]


def _queue_reference() -> list[str]:
    """The [queue] and [outbound] tables (file only: they have no flags)."""
    from mailgate.queue.outbound import OutboundOptions
    from mailgate.queue.settings import QueueSettings
    from mailgate.queue.signing import ArcSealSettings, DkimSignSettings

    return [
        "## `[queue]`: the queue of mail sent onward\n",
        "Mail that a `[[routes]]` rule relays or forwards (see docs/routing.md) waits in "
        "this queue until it is delivered, returned to its sender, or removed with "
        "`mailgate queue`. Durations are like `90s`, `5m`, `1h30m` or `5d`.\n",
        reference_table(settings_of(QueueSettings), {"queue": "queue"}, table="queue", flags=False),
        "## `[outbound]`: how mailgate talks to other servers\n",
        reference_table(
            settings_of(OutboundOptions),
            {"outbound": "outbound"},
            table="outbound",
            flags=False,
        ),
        "## `[[dkim_sign]]`: DKIM signatures on mail sent onward\n",
        "One table per key; a message may get several signatures (an RSA and an Ed25519 "
        "key of one domain, RFC 8463). Only mail of your users is signed: clients that "
        "authenticated or connect from `relay_networks`. Keys are read at start and on "
        "SIGHUP. See docs/outbound.md.\n",
        reference_table(
            settings_of(DkimSignSettings),
            {"dkim_sign": "dkim_sign"},
            table="[dkim_sign]",
            flags=False,
        ),
        "## `[arc_seal]`: ARC seals on mail forwarded from outside\n",
        "Mail received from outside and sent onward gets an ARC set (RFC 8617) whose "
        "ARC-Authentication-Results are this server's Authentication-Results "
        "(`[mail_auth]`). See docs/outbound.md.\n",
        reference_table(
            settings_of(ArcSealSettings), {"arc_seal": "arc_seal"}, table="arc_seal", flags=False
        ),
    ]
