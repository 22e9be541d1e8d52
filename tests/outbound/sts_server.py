"""An HTTPS server for MTA-STS policies (``https://mta-sts.<domain>/.well-known/mta-sts.txt``)
on a loopback address and a free port, with a trustme certificate for the policy hosts."""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web
from tests.dns_server import DNSTestServer
from tests.outbound.receivers import Certs

ADDRESS = "127.0.0.63"


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {name}" for name in mx)]
    return "\r\n".join([*lines, f"max_age: {max_age}", ""])


def publish_sts(dns: DNSTestServer, domain: str, policy_id: str) -> None:
    """``_mta-sts.<domain>`` TXT (replacing an earlier one) and ``mta-sts.<domain>`` A."""
    txt = f"_mta-sts.{domain}"
    with dns.resolver.lock:
        dns.resolver.records.pop(txt, None)
    dns.add(f'{txt}. 60 IN TXT "v=STSv1; id={policy_id};"\n')
    if not dns.resolver.records.get(f"mta-sts.{domain}"):
        dns.add(f"mta-sts.{domain}. 60 IN A {ADDRESS}\n")


@dataclass
class STSServer:
    """Serves ``policies`` (domain -> policy text) by the Host header; counts fetches."""

    certs: Certs
    names: list[str]
    policies: dict[str, str] = field(default_factory=dict)
    fetches: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> STSServer:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.certs.ca.issue_cert(*self.names).configure_cert(context)
        sock = socket.socket()
        sock.bind((ADDRESS, 0))
        self.port = int(sock.getsockname()[1])
        site = web.SockSite(self._runner, sock, ssl_context=context)
        await site.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _policy(self, request: web.Request) -> web.Response:
        host = request.host.rsplit(":", 1)[0].lower()
        domain = host.removeprefix("mta-sts.")
        self.fetches[domain] += 1
        text = self.policies.get(domain)
        if text is None:
            return web.Response(status=404, text="no policy")
        return web.Response(text=text, content_type="text/plain")
