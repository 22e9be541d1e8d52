"""Which build of mailgate.protocol runs: pure Python or compiled by mypyc (setup.py,
MAILGATE_COMPILE=1). scripts/test runs the protocol and server tests against both, and
says which one it expects, so that a path mix-up cannot test the pure build twice."""

from __future__ import annotations

import importlib
import os

import pytest

import mailgate.protocol as protocol

# The hot modules setup.py compiles (a subset of its COMPILED_MODULES is enough here).
HOT_MODULES = ("address", "connection", "data", "params", "rules")


def test_the_hot_modules_are_all_of_one_build() -> None:
    # A stale extension module beside newer sources (or one missing) would mix the two.
    kinds = {
        name: not importlib.import_module(f"mailgate.protocol.{name}").__file__.endswith(".py")
        for name in HOT_MODULES
    }
    assert set(kinds.values()) == {protocol.COMPILED}, kinds


def test_the_build_is_the_one_scripts_test_asked_for() -> None:
    expected = os.environ.get("MAILGATE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("MAILGATE_EXPECT_COMPILED is set by scripts/test only")
    compiled_expected = expected == "1"
    assert protocol.COMPILED is compiled_expected, protocol.connection.__file__


def test_pure_modules_stay_pure() -> None:
    # Modules of public values with loose constructors are never compiled (setup.py says why).
    for name in ("replies", "config", "persona", "behaviour", "_fuzz"):
        module = importlib.import_module(f"mailgate.protocol.{name}")
        assert module.__file__ is not None and module.__file__.endswith(".py"), module.__file__
