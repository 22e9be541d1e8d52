"""The core server imports nothing above it, and its modules import one way only.

Checked twice: what importing ``mailgate.server`` loads (sys.modules in a fresh
interpreter), and every import statement in the source, including those inside functions
and under ``if TYPE_CHECKING:`` (import-linter counts those too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mailgate

SRC = Path(mailgate.__file__).resolve().parent
#: What the core server must never import: the layers above it.
ABOVE_THE_CORE = (
    "mailgate.assembly",
    "mailgate.cli",
    "mailgate.compat",
    "mailgate.composition",
    "mailgate.config",
    "mailgate.delivery",
    "mailgate.honeypot",
    "mailgate.plugins",
    "mailgate.testing",
)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # "from . import app" names a module too.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def below(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_importing_the_server_loads_nothing_above_it() -> None:
    code = (
        "import sys, mailgate.server, mailgate.server.app, mailgate.server.runner\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('mailgate'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"},
    )
    loaded = result.stdout.split()
    assert "mailgate.server.app" in loaded
    assert [m for m in loaded if below(m, ABOVE_THE_CORE)] == []


@pytest.mark.parametrize("path", sorted((SRC / "server").glob("*.py")), ids=lambda p: p.name)
def test_no_server_module_imports_anything_above_the_core(path: Path) -> None:
    assert sorted(m for m in imported_modules(path) if below(m, ABOVE_THE_CORE)) == []


@pytest.mark.parametrize("name", ["connection", "host", "runner"])
def test_inside_the_server_imports_run_one_way(name: str) -> None:
    imports = imported_modules(SRC / "server" / f"{name}.py")
    assert "mailgate.server.app" not in imports
    if name == "host":
        assert not imports & {"mailgate.server.connection", "mailgate.server.runner"}


def test_honeypot_uses_public_interfaces_only() -> None:
    plugin = imported_modules(SRC / "honeypot" / "plugin.py")
    mode = imported_modules(SRC / "honeypot" / "mode.py")
    assert not below_any(plugin, ("mailgate.server.app", "mailgate.composition"))
    assert not below_any(plugin | mode, ("mailgate.composition", "mailgate.server.connection"))


def below_any(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if below(m, prefixes))
