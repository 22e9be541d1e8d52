"""mailgate with the built-in policy a public MX would run, for the policy-overhead
benchmark (``bench/run.py --servers mailgate,mailgate-policy``):

- relay control with a local domain (the load's recipient domain), relay_networks empty so
  the load's client is judged like any outside client,
- block lists: 2,000 client networks, sender and recipient entries, HELO patterns,
- rate limits per IP and per sender domain, high enough never to refuse,
- a DNSBL zone served by a DNS server on 127.0.0.1 (a child process: dnslib, as in the
  tests), which does not list the client; answers are cached by mailgate's resolver.

The client is not in any list, so every check runs and every message is accepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

from mailgate import Server

ROOT = Path(__file__).resolve().parents[2]

DNS_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.dns_server import DNSTestServer
server = DNSTestServer().start()
server.add("2.0.0.127.bl.bench.test. 300 IN A 127.0.0.2")  # listed: someone else
print(server.address, flush=True)
sys.stdin.read()  # until the parent goes away
"""


def block_networks(count: int) -> list[str]:
    """``count`` distinct /24s in 10.0.0.0/8, none of them the load's client."""
    base = int(ipaddress.ip_address("10.0.0.0"))
    return [str(ipaddress.ip_network((base + i * 256, 24))) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--maildir", help="deliver into this Maildir (default: sink)")
    parser.add_argument("--max-size", default="256M")
    parser.add_argument("--max-clients", default="2000")
    parser.add_argument("--state-dir", default=".mailgate")
    args = parser.parse_args()

    dns = subprocess.Popen(
        [sys.executable, "-c", DNS_CHILD, str(ROOT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert dns.stdout is not None
    nameserver = dns.stdout.readline().strip()

    many = 100_000_000  # a limit the load never reaches: the cost of counting, not refusing
    settings: dict[str, Any] = {
        "listen": args.listen,
        "hostname": "bench",
        "quiet": True,
        "max_size": args.max_size,
        "max_clients": args.max_clients,
        "max_clients_per_ip": args.max_clients,
        "state_dir": args.state_dir,
        "local_domains": ["bench.example", "*.bench.example"],
        "relay_networks": [],
        "dns_nameservers": [nameserver],
        "lists": {
            "block_networks": block_networks(2000),
            "block_senders": ["spammer@example.net", "*.spam.example"],
            "block_recipients": ["nobody@bench.example"],
            "block_helo": ["*.dynamic.*", "localhost.localdomain"],
        },
        "limits": {
            "connections_per_ip": f"{many}/1m",
            "messages_per_ip": f"{many}/1h",
            "recipients_per_ip": f"{many}/1h",
            "messages_per_sender_domain": f"{many}/1h",
        },
        "dnsbl": [{"zone": "bl.bench.test", "action": "reject_rcpt"}],
    }
    if args.maildir:
        settings["maildir"] = args.maildir
    try:
        raise SystemExit(Server(**settings).run())
    finally:
        dns.terminate()
        dns.wait(5)


if __name__ == "__main__":
    main()
