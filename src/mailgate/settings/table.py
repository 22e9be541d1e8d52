"""Settings declared once, on the fields of an options dataclass.

A field says what it is with its default::

    @dataclass(frozen=True)
    class Options:
        max_size: int = setting(25 * 1024**2, convert=size, group="limits",
                                help="largest message accepted")

- :func:`setting`: a user setting, one key (``[server] max_size``) and one flag
  (``--max-size``), converted and stored as is;
- :func:`required`: the same without a default;
- :func:`derived`: a field computed from input settings that do not map one to one
  (``--verbose``/``--quiet`` give ``log_level``); the inputs are declared right there;
- :func:`code_only`: a field that is no user setting (yet), with the reason.

From these, :func:`settings_of` gives the table (TOML keys, flags, help, docs) and
:func:`build_fields` turns raw values into the dataclass's keyword arguments. A field
with none of these is an error, so no setting can be forgotten.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from .values import ConfigError, Value

T = TypeVar("T")
Converter = Callable[[Value], Any]

#: The key of a field's metadata that holds its role.
_ROLE: Final = "mailgate.setting"


class _Required(enum.Enum):
    REQUIRED = "required"


#: The default of a setting that has none: it must be given.
REQUIRED: Final = _Required.REQUIRED


@dataclass(frozen=True, slots=True)
class Setting:
    """One user setting: a key of its configuration table and a command-line flag."""

    #: The key in the file and in code, and the argparse ``dest`` of the flag.
    key: str
    #: Raw value -> setting value (mailgate.settings.converters), raising the value's error.
    convert: Converter
    #: What it does, for --help and the reference; the default is added.
    help: str
    #: The --help section and reference heading it is listed under.
    group: str
    #: The command-line spellings; empty: ``--`` and the key with dashes.
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    #: Values the flag accepts (argparse checks them; the file is checked by ``convert``).
    choices: tuple[str, ...] = ()
    #: The flag may be given again (a list in the file).
    repeatable: bool = False
    #: A boolean flag without argument; ``off_flag`` (default ``--no-NAME``) turns it off,
    #: so a file's ``true`` can be undone on the command line.
    switch: bool = False
    off_flag: str | None = None
    #: Settings naming the same group exclude each other (one delivery, one verbosity).
    exclusive: str | None = None
    default: object = None
    #: What help says the default is, when the value alone does not say it well;
    #: ``{default}`` in it is replaced by the described default.
    default_text: str | None = None
    #: How to describe the default value (e.g. converters.size_text); None: :func:`describe`.
    describe: Callable[[Any], str] | None = None
    #: For a required setting: the error when it is missing, before "--flag METAVAR".
    missing: str | None = None

    @property
    def option_strings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.key.replace("_", "-"),)

    @property
    def flag(self) -> str:
        """The long flag, as errors name it."""
        return next(flag for flag in self.option_strings if flag.startswith("--"))

    @property
    def off_option(self) -> str | None:
        if not self.switch:
            return None
        return self.off_flag or "--no-" + self.flag[2:]

    @property
    def is_required(self) -> bool:
        return self.default is REQUIRED

    def default_description(self, override: str | None = None) -> str:
        """The default as help and the reference state it."""
        if override is not None:
            return override
        if self.is_required:
            return "required"
        described = (self.describe or describe)(self.default)
        if self.default_text is None:
            return described
        return self.default_text.replace("{default}", described)


@dataclass(frozen=True, slots=True)
class Derived:
    """A field computed from input settings (see :func:`derived`)."""

    inputs: tuple[Setting, ...]
    #: (all values given, the field's default) -> the field's value.
    combine: Callable[[Mapping[str, Value], Any], Any]
    #: The field's default (filled in by :func:`roles`).
    default: object = None


@dataclass(frozen=True, slots=True)
class CodeOnly:
    """A field only code sets (see :func:`code_only`)."""

    reason: str


Role = Setting | Derived | CodeOnly


def setting(
    default: T,
    *,
    convert: Converter,
    help: str,
    group: str,
    key: str = "",
    flags: tuple[str, ...] = (),
    metavar: str | None = None,
    choices: tuple[str, ...] = (),
    repeatable: bool = False,
    switch: bool = False,
    off_flag: str | None = None,
    exclusive: str | None = None,
    default_text: str | None = None,
    describe: Callable[[Any], str] | None = None,
) -> T:
    """A dataclass field that is a user setting named like the field (or ``key``)."""
    role = Setting(
        key=key,
        convert=convert,
        help=help,
        group=group,
        flags=flags,
        metavar=metavar,
        choices=choices,
        repeatable=repeatable,
        switch=switch,
        off_flag=off_flag,
        exclusive=exclusive,
        default=default,
        default_text=default_text,
        describe=describe,
    )
    return dataclasses.field(default=default, metadata={_ROLE: role})


def required(
    *,
    convert: Converter,
    help: str,
    group: str,
    missing: str,
    metavar: str | None = None,
) -> Any:
    """A dataclass field (without default) that is a user setting which must be given;
    ``missing`` begins the error when it is not."""
    role = Setting(
        key="",
        convert=convert,
        help=help,
        group=group,
        metavar=metavar,
        default=REQUIRED,
        missing=missing,
    )
    return dataclasses.field(metadata={_ROLE: role})


def derived(
    default: T,
    *,
    inputs: tuple[Setting, ...],
    combine: Callable[[Mapping[str, Value], T], T],
) -> T:
    """A dataclass field computed by ``combine(values, default)`` from the input settings
    declared here (and any other values it reads)."""
    role = Derived(inputs, combine)
    return dataclasses.field(default=default, metadata={_ROLE: role})


def code_only(default: T, *, reason: str) -> T:
    """A dataclass field that no file or flag sets; ``reason`` says why."""
    return dataclasses.field(default=default, metadata={_ROLE: CodeOnly(reason)})


@functools.cache
def roles(options_class: type) -> tuple[tuple[str, Role], ...]:
    """Each field of a dataclass with its role, its Setting's key and default filled in."""
    result: list[tuple[str, Role]] = []
    for field in dataclasses.fields(options_class):
        role = field.metadata.get(_ROLE)
        if isinstance(role, Setting):
            default = REQUIRED if field.default is dataclasses.MISSING else field.default
            role = dataclasses.replace(role, key=role.key or field.name, default=default)
        elif isinstance(role, Derived):
            role = dataclasses.replace(role, default=field.default)
        elif not isinstance(role, CodeOnly):
            raise TypeError(
                f"{options_class.__name__}.{field.name} is declared with neither setting(), "
                "required(), derived() nor code_only()"
            )
        result.append((field.name, role))
    return tuple(result)


def settings_of(options_class: type) -> tuple[Setting, ...]:
    """The user settings of a dataclass, in the order of its fields (a derived field's
    inputs at its place)."""
    settings: list[Setting] = []
    for _, role in roles(options_class):
        if isinstance(role, Setting):
            settings.append(role)
        elif isinstance(role, Derived):
            settings.extend(role.inputs)
    keys = [s.key for s in settings]
    if len(set(keys)) != len(keys):
        raise TypeError(f"{options_class.__name__} declares a setting key twice")
    return tuple(settings)


def build_fields(options_class: type, values: Mapping[str, Value], *, table: str) -> dict[str, Any]:
    """Keyword arguments for ``options_class`` from raw ``values`` by key: each given
    setting converted, each derived field combined; fields not given keep their default.
    A missing required setting is an error naming its flag and its key in ``[table]``."""
    fields: dict[str, Any] = {}
    missing: list[Setting] = []
    for name, role in roles(options_class):
        if isinstance(role, Setting):
            value = values.get(role.key)
            if value is not None:
                fields[name] = role.convert(value)
            elif role.is_required:
                missing.append(role)
        elif isinstance(role, Derived):
            fields[name] = role.combine(values, role.default)
    # Checked last: a wrong value given says more than a value not given.
    for role in missing:
        flag = f"{role.flag} {role.metavar}" if role.metavar else role.flag
        raise ConfigError(f"{role.missing}: {flag} (or {role.key} in [{table}])")
    return fields


def describe(value: object) -> str:
    """A default value as help texts show it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        return str(value) if value.is_absolute() else f"./{value}"
    if isinstance(value, tuple | list | frozenset):
        return ", ".join(describe(item) for item in value) or "none"
    return str(value)


def did_you_mean(key: str, known: tuple[str, ...] | list[str]) -> str:
    """`` (did you mean 'max_size'?)`` for a misspelt key, or ""."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def exclusive_groups(settings: tuple[Setting, ...]) -> tuple[tuple[str, ...], ...]:
    """The keys of each group of settings that exclude each other, in table order."""
    groups: dict[str, list[str]] = {}
    for item in settings:
        if item.exclusive is not None:
            groups.setdefault(item.exclusive, []).append(item.key)
    return tuple(tuple(keys) for keys in groups.values())


def flag_values(namespace: object, settings: tuple[Setting, ...]) -> dict[str, Value]:
    """The values of the flags given in a parsed argparse namespace (None: not given)."""
    return {
        item.key: Value(raw, item.flag)
        for item in settings
        if (raw := getattr(namespace, item.key, None)) is not None
    }
