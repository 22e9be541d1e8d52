"""A raw setting with where it came from, and the one error type of configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ConfigError(Exception):
    """A configuration problem, described in one line meant for the user."""


@dataclass(frozen=True, slots=True)
class Value:
    """One raw value from a flag, a file or code, before conversion."""

    raw: object
    #: Where the value came from, for messages: "--max-size" or "mailgate.toml: max_size".
    where: str
    #: Directory that relative paths are resolved against; None for flags (the cwd).
    base: Path | None = None

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {problem}")


def toml_type(raw: object) -> str:
    """How a raw value reads in an error: "a boolean", "the string 'x'", "a list"..."""
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
