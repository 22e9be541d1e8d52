"""The settings machinery: every setting is declared once, on a field of an options
dataclass, and the configuration file, the command-line flags, their --help and the
settings reference (docs/settings.md) all come from that declaration.

- :mod:`.values`: :class:`Value` (a raw value and where it came from) and
  :class:`ConfigError`, whose message names that place;
- :mod:`.converters`: the converters (sizes, seconds, networks, paths, host names, URLs...);
- :mod:`.table`: :func:`setting`, :func:`required`, :func:`derived`, :func:`code_only`
  for declaring fields, and reading the table back (:func:`settings_of`,
  :func:`build_fields`);
- :mod:`.flags`: argparse flags from a table; :mod:`.doc`: the Markdown reference;
- :mod:`.machine`: defaults that depend on the machine (its name, the state directory).

A leaf: it imports nothing of mailgate but mailgate.protocol and mailgate.dns.
"""

from __future__ import annotations

from .converters import AUTH_MECHANISMS, Network
from .machine import machine_fqdn, user_state_dir
from .table import (
    REQUIRED,
    CodeOnly,
    Derived,
    Setting,
    build_fields,
    code_only,
    derived,
    describe,
    did_you_mean,
    exclusive_groups,
    flag_values,
    required,
    roles,
    setting,
    settings_of,
)
from .values import ConfigError, Value, toml_type

__all__ = [
    "AUTH_MECHANISMS",
    "REQUIRED",
    "CodeOnly",
    "ConfigError",
    "Derived",
    "Network",
    "Setting",
    "Value",
    "build_fields",
    "code_only",
    "derived",
    "describe",
    "did_you_mean",
    "exclusive_groups",
    "flag_values",
    "machine_fqdn",
    "required",
    "roles",
    "setting",
    "settings_of",
    "toml_type",
    "user_state_dir",
]
