"""The console's HTTP server: started and stopped with the SMTP server, off by default,
loopback without credentials, a bearer token everywhere else."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from tests.console.http import request
from tests.server.harness import CLIServer, running_server, wait_for

from mailgate import Server
from mailgate.config import options_from_settings
from mailgate.console import Console, is_loopback, read_token
from mailgate.server import ListenAddress, ServerOptions, StartupError

LOOPBACK_ANY_PORT = ListenAddress("127.0.0.1", 0)
TOKEN = "0123456789abcdef0123456789abcdef"


def _console_port(server: object) -> int:
    console = server.server.console  # type: ignore[attr-defined]
    assert console is not None
    return int(console.address[1])


def _closed(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_off_by_default(tmp_path: Path) -> None:
    assert ServerOptions().admin_listen is None
    with running_server(tmp_path, delivery="sink") as server:
        assert server.server is not None and server.server.console is None


def test_loopback_console_needs_no_token_and_stops_with_the_server(tmp_path: Path) -> None:
    with running_server(tmp_path, delivery="sink", admin_listen=LOOPBACK_ANY_PORT) as server:
        port = _console_port(server)
        health = request(port, "/healthz")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        ready = request(port, "/readyz")
        assert ready.status == 200
        assert ready.json() == {"status": "ready", "listening": [f"127.0.0.1:{server.port()}"]}
        # Every response carries the security headers, errors too.
        for response in (health, request(port, "/nothing-here")):
            assert response.headers["content-security-policy"].startswith("default-src 'none'")
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["cache-control"] == "no-store"
        assert request(port, "/nothing-here").status == 404
    assert _closed(port)


def test_loopback_console_refuses_foreign_host_and_cross_origin_writes(tmp_path: Path) -> None:
    with running_server(tmp_path, delivery="sink", admin_listen=LOOPBACK_ANY_PORT) as server:
        port = _console_port(server)
        # DNS rebinding: a page of evil.example resolving to 127.0.0.1 sends its own Host.
        rebound = request(port, "/healthz", headers={"Host": f"evil.example:{port}"})
        assert rebound.status == 403
        assert "Host" in rebound.json()["error"]
        assert request(port, "/healthz", headers={"Host": f"localhost:{port}"}).status == 200
        assert request(port, "/healthz", headers={"Host": f"[::1]:{port}"}).status == 200
        # A state-changing request from another site's page is refused before routing...
        forged = request(port, "/healthz", method="POST", headers={"Origin": "http://evil.example"})
        assert forged.status == 403
        cross_site = request(
            port, "/healthz", method="POST", headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert cross_site.status == 403
        # ...while one from the console's own origin, or from a tool, reaches the router
        # (no POST route here: 405).
        own = request(
            port, "/healthz", method="POST", headers={"Origin": f"http://127.0.0.1:{port}"}
        )
        assert own.status == 405
        assert request(port, "/healthz", method="POST").status == 405


def test_token_is_required_on_every_request_when_given(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(
        tmp_path, delivery="sink", admin_listen=LOOPBACK_ANY_PORT, admin_token_file=token_file
    ) as server:
        port = _console_port(server)
        missing = request(port, "/healthz")
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert request(port, "/metrics", headers={"Authorization": "Bearer wrong"}).status == 401
        assert request(port, "/healthz", headers={"Authorization": f"Basic {TOKEN}"}).status == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert request(port, "/healthz", headers=good).status == 200
        assert request(port, "/metrics", headers=good).status == 200
        # With a token, the Host header is no longer the guard: the token is.
        assert request(port, "/healthz", headers={**good, "Host": "console.example"}).status == 200


def test_non_loopback_address_without_token_refuses_to_start(tmp_path: Path) -> None:
    async def main() -> tuple[bool, list[tuple[str, int]]]:
        server = Server(
            ServerOptions(
                listen=(LOOPBACK_ANY_PORT,),
                delivery="sink",
                state_dir=tmp_path / "state",
                admin_listen=ListenAddress("0.0.0.0", 0),
            )
        )
        with pytest.raises(StartupError, match=r"not a loopback address.*admin_token_file"):
            await server.start()
        # The SMTP listeners were closed again: nothing half-started stays behind.
        return server.console is None, server.addresses

    no_console, addresses = asyncio.run(main())
    assert no_console and addresses == []


def test_non_loopback_address_with_token_passes_the_check() -> None:
    # Not bound here (tests stay on loopback): the rule itself is what is checked.
    console = Console(object(), ListenAddress("192.0.2.10", 8025), token=TOKEN)  # type: ignore[arg-type]
    assert console.token == TOKEN and not is_loopback("192.0.2.10")
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("0.0.0.0")
    assert not is_loopback("::") and not is_loopback("mail.example")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "No such file"),
        ("short\n", "at least 16"),
        ("has a space in the middle!!", "at least 16"),
        ("x" * 5000, "longer than"),
    ],
)
def test_unusable_token_files(tmp_path: Path, content: str | None, error: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StartupError, match=error):
        read_token(path)


def test_admin_settings_from_file_and_flags(tmp_path: Path) -> None:
    options = options_from_settings({"admin_listen": "[::1]:8025", "admin_token_file": "tok"})
    assert options.admin_listen == ListenAddress("::1", 8025)
    assert options.admin_token_file == Path("tok")
    with pytest.raises(Exception, match="HOST:PORT"):
        options_from_settings({"admin_listen": "8025"})


def test_cli_serve_with_admin_listen(tmp_path: Path) -> None:
    cli = CLIServer(
        ["--listen", "127.0.0.1:0", "--sink", "--admin-listen", "127.0.0.1:0"], cwd=tmp_path
    ).start()
    try:
        marker = "console listening on http://127.0.0.1:"
        assert wait_for(lambda: any(marker in line for line in cli.log)), cli.text()
        line = next(line for line in cli.log if marker in line)
        port = int(line.split(marker)[1].split()[0])
        assert request(port, "/readyz").status == 200
        assert cli.stop() == 0
        assert _closed(port)
    finally:
        cli.kill()


def _users_file(tmp_path: Path) -> Path:
    from argon2 import PasswordHasher

    from mailgate.plugins.users_file import UsersDocument, write_document

    # Cheap parameters: the test checks the rule, not argon2's cost.
    hasher = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    document = UsersDocument()
    document.set("ops", hasher.hash("correct horse"))
    path = tmp_path / "users"
    write_document(path, document)
    return path


def _basic(user: str, password: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_users_file_protects_the_console_with_basic_authentication(tmp_path: Path) -> None:
    users = _users_file(tmp_path)
    with running_server(
        tmp_path, delivery="sink", admin_listen=LOOPBACK_ANY_PORT, users_file=users
    ) as server:
        port = _console_port(server)
        missing = request(port, "/healthz")
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith('Basic realm="mailgate console"')
        assert request(port, "/healthz", headers=_basic("ops", "wrong")).status == 401
        assert request(port, "/healthz", headers=_basic("nobody", "correct horse")).status == 401
        assert request(port, "/healthz", headers={"Authorization": "Basic !!!"}).status == 401
        for _ in range(3):  # verified once, then remembered
            assert request(port, "/metrics", headers=_basic("ops", "correct horse")).status == 200


def test_users_file_allows_a_non_loopback_address(tmp_path: Path) -> None:
    users = _users_file(tmp_path)
    server = Server(ServerOptions(listen=(LOOPBACK_ANY_PORT,), state_dir=tmp_path / "state"))
    console = Console(server, ListenAddress("192.0.2.10", 8025), users_file=users)

    async def main() -> None:
        # Past the protection rule; binding an address this machine lacks then fails
        # (nothing is sent anywhere).
        with pytest.raises(StartupError, match=r"cannot listen on 192\.0\.2\.10:8025"):
            await console.start()

    asyncio.run(main())
    assert console.protected
