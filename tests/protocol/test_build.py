"""Which build runs: pure Python or compiled by mypyc (setup.py, MAILGATE_COMPILE=1: the
protocol and the server's hot path). scripts/test runs the protocol, hooks, plugin and server
tests against both, and says which one it expects, so that a path mix-up cannot test the pure
build twice."""

from __future__ import annotations

import importlib
import os

import pytest

import mailgate.protocol as protocol

# Every module setup.py compiles (its COMPILED_MODULES): all compiled, or none.
HOT_MODULES = (
    "mailgate.protocol.address",
    "mailgate.protocol.connection",
    "mailgate.protocol.data",
    "mailgate.protocol.events",
    "mailgate.protocol.params",
    "mailgate.protocol.proxy",
    "mailgate.protocol.rules",
    "mailgate.protocol.sasl",
    "mailgate.protocol.xclient",
    "mailgate.protocol.xtext",
    "mailgate.hooks.registry",
    "mailgate.hooks.runner",
    "mailgate.hooks.session",
    "mailgate.plugins.relay",
    "mailgate.server.connection",
)


def _compiled(name: str) -> bool:
    path = importlib.import_module(name).__file__
    assert path is not None, name
    return not path.endswith(".py")


def test_the_hot_modules_are_all_of_one_build() -> None:
    # A stale extension module beside newer sources (or one missing) would mix the two.
    kinds = {name: _compiled(name) for name in HOT_MODULES}
    assert set(kinds.values()) == {protocol.COMPILED}, kinds


def test_the_build_is_the_one_scripts_test_asked_for() -> None:
    expected = os.environ.get("MAILGATE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("MAILGATE_EXPECT_COMPILED is set by scripts/test only")
    compiled_expected = expected == "1"
    assert protocol.COMPILED is compiled_expected, protocol.connection.__file__


def test_pure_modules_stay_pure() -> None:
    # Modules of public values with loose constructors are never compiled, nor the hooks'
    # results (plugins subclass Reject) and the async generator of Message (setup.py says why).
    for name in ("replies", "config", "persona", "behaviour", "_fuzz"):
        assert not _compiled(f"mailgate.protocol.{name}"), name
    for name in ("mailgate.hooks.outcomes", "mailgate.hooks.chunks", "mailgate.hooks"):
        assert not _compiled(name), name
