"""The build backend: setuptools', plus mypy in the build environment when the optional
compiled build is asked for (MAILGATE_COMPILE=1, see setup.py). Without it this is exactly
setuptools.build_meta: the default install needs no compiler and no mypy."""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the whole PEP 517/660 interface)

# The mypy whose mypyc compiled and tested the protocol (scripts/test builds it in CI).
MYPYC_REQUIREMENT = "mypy>=2.4"


def _compiling() -> bool:
    return os.environ.get("MAILGATE_COMPILE", "").strip().lower() in ("1", "true", "yes")


def _extra() -> list[str]:
    return [MYPYC_REQUIREMENT] if _compiling() else []


def get_requires_for_build_wheel(config_settings=None):  # type: ignore[no-untyped-def]
    return _setuptools.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):  # type: ignore[no-untyped-def]
    return _setuptools.get_requires_for_build_editable(config_settings) + _extra()
