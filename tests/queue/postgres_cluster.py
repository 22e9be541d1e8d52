"""A private PostgreSQL cluster for the test suite: initdb and pg_ctl in a temporary
directory, listening on a free port of 127.0.0.1, trust authentication, gone at the end.

Used when ``MAILGATE_TEST_POSTGRES_DSN`` names no server. initdb refuses to run as root,
so under root the cluster belongs to the ``postgres`` user (``nobody`` without one) and
its commands run through ``runuser``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PrivateCluster", "find_server_binaries"]

# Startup of a fresh cluster takes a second or two; a stuck one is an error, not a hang.
_TIMEOUT = 60


def find_server_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then Debian's
    /usr/lib/postgresql/<version>/bin, newest version first)."""
    found = shutil.which("initdb")
    if found is not None:
        directory = Path(os.path.realpath(found)).parent
        if (directory / "pg_ctl").exists():
            return directory
    for candidate in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    ):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateCluster:
    """``PrivateCluster.start()`` ... ``cluster.stop()``; ``dsn`` names its ``postgres``
    database as the superuser ``mailgate``."""

    def __init__(self, binaries: Path, directory: Path, port: int, user: str | None) -> None:
        self.binaries = binaries
        self.directory = directory
        self.port = port
        self.user = user
        self.dsn = f"postgresql://mailgate@127.0.0.1:{port}/postgres"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        argv = list(command)
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False, cwd=self.directory
        )

    @classmethod
    def start(cls, binaries: Path) -> PrivateCluster:
        directory = Path(tempfile.mkdtemp(prefix="mailgate-pg-"))
        user: str | None = None
        if os.geteuid() == 0:
            user = "postgres"
            try:
                owner = pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
                owner = pwd.getpwnam(user)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        cluster = cls(binaries, directory, _free_port(), user)
        try:
            cluster._initdb()
            cluster._start_server()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _initdb(self) -> None:
        done = self._run(
            str(self.binaries / "initdb"),
            "--pgdata",
            str(self.data),
            "--auth=trust",
            "--username=mailgate",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a throw-away cluster: nothing to keep across a power loss
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}\n{done.stderr}")

    def _start_server(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.directory}",
                "-c max_connections=300",
                # The suite kills clients, never the server: fsync only slows it down.
                "-c fsync=off",
                "-c full_page_writes=off",
            ]
        )
        done = self._run(
            str(self.binaries / "pg_ctl"),
            "--pgdata",
            str(self.data),
            "--log",
            str(self.directory / "server.log"),
            "--options",
            options,
            "--wait",
            f"--timeout={_TIMEOUT}",
            "start",
        )
        if done.returncode != 0:
            log = self.directory / "server.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}\n{done.stderr}\n{text}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                str(self.binaries / "pg_ctl"), "--pgdata", str(self.data), "-m", "immediate", "stop"
            )
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)
