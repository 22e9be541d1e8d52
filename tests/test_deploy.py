"""deploy/: the systemd units and the Dockerfile.

The units are checked by ``systemd-analyze verify`` (when the command exists) with the
install path of the mailgate command pointed at this environment's, and their command
lines are parsed by mailgate's own argument parser. The Dockerfile is built and run when
a Docker engine answers; it is always linted: a non-root USER, a HEALTHCHECK, port 25 by
capability, the volumes, no ADD of a remote URL.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailgate.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = ("mailgate.service", "mailgate-honeypot.service")
INSTALLED = "/opt/mailgate/bin/mailgate"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (all sections), values in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def mailgate_command() -> str:
    found = shutil.which("mailgate") or str(Path(sys.executable).with_name("mailgate"))
    if not Path(found).exists():
        pytest.skip("no installed mailgate command to point the units at")
    return found


@pytest.mark.parametrize("name", UNITS)
def test_units_are_sandboxed(name: str) -> None:
    settings = unit_settings((DEPLOY / name).read_text())
    required = {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }
    for key, value in required.items():
        assert settings.get(key) == [value], (name, key, settings.get(key))
    assert settings["User"] != ["root"] and settings["User"]
    assert settings["ReadWritePaths"] and settings["StateDirectory"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize("name", UNITS)
def test_unit_commands_are_mailgate_command_lines(name: str) -> None:
    """What ExecStart/ExecStartPre run is accepted by mailgate's own parser."""
    settings = unit_settings((DEPLOY / name).read_text())
    commands = settings["ExecStart"] + settings.get("ExecStartPre", [])
    for command in commands:
        program, *args = shlex.split(command)
        assert program == INSTALLED
        parsed = build_parser().parse_args(args)
        assert parsed.config.startswith("/etc/mailgate/")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    command = mailgate_command()
    for name in UNITS:
        (tmp_path / name).write_text((DEPLOY / name).read_text().replace(INSTALLED, command))
    done = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Warnings (an unknown key, a value it cannot parse) go to stderr with status 0.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_systemd_analyze_verify_sees_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    text = (DEPLOY / UNITS[0]).read_text().replace(INSTALLED, mailgate_command())
    (tmp_path / UNITS[0]).write_text(text.replace("ProtectSystem=", "ProtectSystm="))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / UNITS[0])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Unknown key" in done.stderr and "ProtectSystm" in done.stderr


# --- the Dockerfile -----------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, "a continuation line runs off the end"
    return result


def test_dockerfile_lint() -> None:
    steps = instructions((DEPLOY / "Dockerfile").read_text())
    keywords = [keyword for keyword, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    # Everything after the last USER runs as that user: no RUN as root after it.
    last_user = max(i for i, keyword in enumerate(keywords) if keyword == "USER")
    assert "RUN" not in keywords[last_user:]
    (health,) = [arguments for keyword, arguments in steps if keyword == "HEALTHCHECK"]
    assert "CMD" in health and "NONE" not in health and "noop()" in health
    for keyword, arguments in steps:
        if keyword == "ADD":
            assert not re.search(r"\b(https?|ftp)://", arguments), arguments
        if keyword == "COPY":
            *sources, _ = shlex.split(arguments)
            for source in sources:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), source
    runs = " ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    assert "setcap cap_net_bind_service=+ep" in runs
    (volume,) = [arguments for keyword, arguments in steps if keyword == "VOLUME"]
    assert "/var/lib/mailgate" in volume and "/var/mail/mailgate" in volume
    assert any(keyword == "EXPOSE" and "25" in arguments.split() for keyword, arguments in steps)
    (entrypoint,) = [arguments for keyword, arguments in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == '["mailgate"]'


def docker_engine() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        answered = subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None
    return docker if answered.returncode == 0 else None


def test_docker_image_builds_and_becomes_healthy(tmp_path: Path) -> None:
    docker = docker_engine()
    if docker is None:
        pytest.skip("no Docker engine answers here; the Dockerfile is linted above")
    tag = "mailgate-test:deploy"
    subprocess.run(
        [docker, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
        check=True,
        timeout=900,
    )
    config = tmp_path / "etc"
    config.mkdir()
    (config / "mailgate.toml").write_text(
        '[server]\nlisten = "0.0.0.0:25"\nhostname = "mx.test"\nlocal_domains = ["example.test"]\n'
        'maildir = "/var/mail/mailgate"\nstate_dir = "/var/lib/mailgate"\n'
    )
    config.chmod(0o755)
    name = f"mailgate-test-{int(time.time())}"
    subprocess.run(
        [docker, "run", "-d", "--name", name, "-v", f"{config}:/etc/mailgate:ro", tag],
        check=True,
        timeout=120,
    )
    try:
        status = ""
        for _ in range(60):
            status = subprocess.run(
                [docker, "inspect", "-f", "{{.State.Health.Status}}", name],
                capture_output=True, text=True, timeout=30, check=False,
            ).stdout.strip()  # fmt: skip
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(2)
        user = subprocess.run(
            [docker, "exec", name, "id", "-u"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        assert status == "healthy" and user != "0", (status, user)
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=60, check=False)
