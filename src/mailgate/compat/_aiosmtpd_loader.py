"""Find an aiosmtpd handler by name: ``"package.module:Class [args...]"``.

Used for the ``aiosmtpd_handler`` setting and ``mailgate serve --aiosmtpd-handler``;
re-exported as :func:`mailgate.compat.aiosmtpd.load_handler`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import types
from typing import Any, NoReturn

from mailgate.hooks import HookError

__all__ = ["load_handler"]


class _CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """What aiosmtpd's ``from_cli(parser, *args)`` may call ``error()`` on."""

    def error(self, message: str) -> NoReturn:
        raise _CLIError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _CLIError(message or f"exited with status {status}")


def load_handler(spec: str) -> Any:
    """The handler named by ``spec``: ``"package.module:Class"`` (aiosmtpd's
    ``package.module.Class`` works too), optionally followed by arguments as aiosmtpd's
    CLI takes them (``"aiosmtpd.handlers:Mailbox /var/mail/in"``, handed to the class's
    ``from_cli(parser, *args)``). A class is instantiated (``from_cli(parser)`` when it
    has one, else with no arguments); any other object is used as it is.

    If the module cannot be found, the current directory is tried as well (appended to
    ``sys.path``, so it never shadows an installed module): ``mailgate serve`` started
    in a project directory finds ``handlers.py`` there, as ``python -m`` would.

    Every failure is a :class:`~mailgate.hooks.HookError` with a one-line message.
    """
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise HookError(f"aiosmtpd handler {spec!r}: {exc}") from None
    if not words:
        raise HookError("aiosmtpd handler: empty name; expected module:Class")
    target, args = words[0], words[1:]
    module_name, colon, attribute = target.partition(":")
    if not colon:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise HookError(
            f"aiosmtpd handler {spec!r} is not module:Class (e.g. myapp.handlers:Handler)"
        )
    obj: Any = _import(module_name, spec)
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HookError(
                f"aiosmtpd handler {spec!r}: {module_name} has no attribute {attribute!r}"
            ) from None
    if isinstance(obj, type):
        return _instantiate(obj, args, spec)
    if args:
        raise HookError(f"aiosmtpd handler {spec!r}: arguments are for a class, not an object")
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.ModuleType):
        kind = "module" if isinstance(obj, types.ModuleType) else "function"
        raise HookError(f"aiosmtpd handler {spec!r} is a {kind}, not a handler class or object")
    return obj


def _import(name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _is_target(exc, name):
            raise HookError(_import_failed(spec, name, exc)) from None
    except Exception as exc:
        raise HookError(_import_failed(spec, name, exc)) from None
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        raise HookError(f"aiosmtpd handler {spec!r}: no module named {name!r}")
    sys.path.append(cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if not _is_target(exc, name):
            raise HookError(_import_failed(spec, name, exc)) from None
        sys.path.remove(cwd)
        raise HookError(
            f"aiosmtpd handler {spec!r}: no module named {name!r} (nor in {cwd})"
        ) from None
    except Exception as exc:
        raise HookError(_import_failed(spec, name, exc)) from None


def _import_failed(spec: str, name: str, exc: BaseException) -> str:
    return f"aiosmtpd handler {spec!r}: importing {name} failed: {_one_line(exc)}"


def _is_target(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether the missing module is ``name`` (or a package above it), not something
    ``name`` itself imports."""
    missing = exc.name or ""
    return bool(missing) and (name == missing or name.startswith(missing + "."))


def _instantiate(cls: type, args: list[str], spec: str) -> Any:
    from_cli = getattr(cls, "from_cli", None)
    try:
        if callable(from_cli):
            return from_cli(_Parser(prog=cls.__name__), *args)
        if args:
            raise HookError(
                f"aiosmtpd handler {spec!r}: {cls.__name__} takes no arguments (no from_cli)"
            )
        return cls()
    except HookError:
        raise
    except _CLIError as exc:  # from_cli called parser.error(): its message says it all
        raise HookError(f"aiosmtpd handler {spec!r}: {' '.join(str(exc).split())}") from None
    except Exception as exc:
        raise HookError(
            f"aiosmtpd handler {spec!r}: cannot create {cls.__name__}: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
