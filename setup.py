"""Optional compiled build of mailgate.protocol and the server's hot path (issue 14).

``pip install .`` and ``pip install -e .`` build the pure-Python package, as always: no
compiler, no mypy. With ``MAILGATE_COMPILE=1`` in the environment the modules listed below
(the sans-IO protocol, the hooks' runner, registry and session objects, relay control, the
connection driver) are compiled to C extension modules with mypyc (shipped with mypy),
which needs a C compiler and the Python headers (Debian: gcc, python3-dev)::

    MAILGATE_COMPILE=1 pip install .

The compiled modules are drop-in: the same package, the same behaviour; a ``.so`` next to
a ``.py`` wins at import. ``mailgate --version`` says which build is in use. Everything
else in setup() comes from pyproject.toml.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import NoReturn

from setuptools import Distribution, Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The modules that run per command and per message, as paths under src/mailgate.
# mailgate.protocol (the sans-IO state machine): every module but the package's __init__
# (re-exports) and _fuzz (the fuzzers' driver), and the modules of public values whose
# constructors take looser input than their annotations say and normalize it or refuse it
# with a named error -- replies (Reply(550, None, "text")), config (ProtocolConfig),
# behaviour (-> BehaviourError) and persona (lists for tuples, wrong types -> PersonaError;
# its module docstring documents every reply, and a compiled module has none). A compiled
# class checks its annotations at the boundary and would raise TypeError there instead.
PROTOCOL_MODULES = [
    "address",
    "connection",
    "data",
    "events",
    "params",
    "proxy",
    "rules",
    "sasl",
    "xclient",
    "xtext",
]
# The server's hot path above the protocol (issue 14): running a stage's chain of hooks
# and the objects hooks see, relay control (the one policy step of every configuration)
# and the line and count of its decisions, the asyncio protocol driving one connection,
# its log lines (the logging subclasses there stay Python classes) and counters. See
# docs/benchmarks.md for what each needed; a compiled module may import pure ones (those
# are ordinary Python to it). Left
# pure: hooks.outcomes (Reject and TempFail, exceptions plugins subclass; compiled, the class
# attributes a subclass overrides were lost), hooks.stages (constants) and hooks.chunks (an
# async generator: mypyc compiles none).
SERVER_MODULES = [
    "hooks/registry",
    "hooks/runner",
    "hooks/session",
    "plugins/decisions",
    "plugins/relay",
    "server/connection",
    "server/logs",
    "server/stats",
]
COMPILED_MODULES = [f"protocol/{name}" for name in PROTOCOL_MODULES] + SERVER_MODULES
# What mypy reads to type the compiled modules: their packages' modules (for the types
# they use from each other) and nothing outside them (see mypyc_extensions).
CHECKED = [
    "protocol",
    "hooks",
    "plugins/decisions",
    "plugins/relay",
    "server/connection",
    # Typed, not compiled: the driver's host interface, so that what the driver reads from
    # its host (the hooks, the counters) is known to be compiled and called directly.
    "server/host",
    "server/logs",
    "server/stats",
]
FALLBACK_HINT = "unset MAILGATE_COMPILE for the pure-Python build"


def compile_requested() -> bool:
    return os.environ.get("MAILGATE_COMPILE", "").strip().lower() in ("1", "true", "yes")


def fail(why: str) -> NoReturn:
    # One line on stderr; pip prints it under "error: subprocess-exited-with-error".
    sys.exit(f"mailgate: MAILGATE_COMPILE=1: {why}; {FALLBACK_HINT}")


_KEPT_OPTIONS = (
    "inplace",
    "editable_mode",
    "force",
    "debug",
    "parallel",
    "build_lib",
    "build_temp",
)


class BuildExtOrSayWhy(build_ext):
    """build_ext that runs mypyc only when the extensions are built (not for metadata), and
    whose failure is one clear line instead of a compiler traceback."""

    def run(self) -> None:
        if compile_requested() and (self.inplace or getattr(self, "editable_mode", False)):
            # Extension modules in src/ would shadow every later edit of the .py beside them.
            fail("not for an editable or in-place build (pip install ., not pip install -e .)")
        if compile_requested() and not self.extensions:
            # mypyc runs only now, when the extensions are about to be built: not for the
            # metadata, not for sdist (setuptools finalizes build_ext for those too).
            headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
            if not headers.is_file():
                fail(
                    f"no Python headers ({headers} is missing; Debian: apt-get install python3-dev)"
                )
            self.distribution.ext_modules = mypyc_extensions()
            if self.parallel is None:
                # mypyc writes one C file per module (multi_file): compile them side by side.
                self.parallel = os.cpu_count() or 1
            # Finalize again, now with the extensions (their names, paths, stubs): from fresh
            # options, keeping those a caller set (pip's editable mode sets inplace).
            kept = {name: getattr(self, name, None) for name in _KEPT_OPTIONS}
            self.initialize_options()
            for name, value in kept.items():
                setattr(self, name, value)
            self.finalized = False
            self.ensure_finalized()
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing compiler (OSError)
            fail(f"compiling mailgate with mypyc failed: {exc}")


def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify
    except ImportError:
        fail("mypyc is not installed (pip install mypy, or build with build isolation)")
    compiled = [f"src/mailgate/{name}.py" for name in COMPILED_MODULES]
    # mypy checks the compiled modules and their packages (mypy --strict via [tool.mypy]
    # of pyproject.toml) and follows no import out of them: what they import from elsewhere
    # in mailgate (the server's host, the spool, policy helpers) and from third parties is
    # typed Any, and stays ordinary Python; the package root would pull in every layer and
    # its dependencies, absent from an isolated build environment. Only part of the project
    # is checked, so the overrides of other modules are unused.
    checked: list[str] = []
    for name in CHECKED:
        path = ROOT / "src/mailgate" / name
        found = sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        checked += [str(module.relative_to(ROOT)) for module in found]
    # Skipped imports are Any: strict mode's warning about returning Any would fire on every
    # value that comes from one (the full project check, scripts/test's mypy, types them).
    options = [
        "--follow-imports=skip",
        "--no-warn-unused-configs",
        "--no-warn-return-any",
        "--no-warn-unused-ignores",
    ]
    # Run from the project root so the paths and pyproject.toml are the ones mypy finds; the
    # C goes under build/.
    os.chdir(ROOT)
    try:
        return list(
            mypycify(
                [*options, *checked], only_compile_paths=compiled, opt_level="3", multi_file=True
            )
        )
    except SystemExit as exc:  # mypy errors: mypycify printed them and exits
        fail(f"mypyc refused the modules to compile (exit {exc.code}; errors above)")


class MaybeCompiledDistribution(Distribution):
    """A platform wheel when compiling (the extensions are only known at build_ext time)."""

    def has_ext_modules(self) -> bool:
        return compile_requested()


setup(distclass=MaybeCompiledDistribution, cmdclass={"build_ext": BuildExtOrSayWhy})
