"""Outbound TLS policy costs: what a delivery pays for its policy and its certificate check.

* ``chain check``: the post-handshake verification of a server's chain (trustme CA,
  leaf + intermediate) against a store, for the MX name (every TLS session pays it, in
  every level but ``none``: ``verify`` and MTA-STS enforce on it, ``may`` logs it);
* ``policy, may, no MTA-STS``: resolving a destination's policy when the domain publishes
  no MTA-STS policy (the TXT answer in the resolver's cache);
* ``policy, MTA-STS cached``: the same for a domain whose policy is cached (TXT cached,
  id unchanged, no fetch).

    python3 bench/tls_policy.py [--rounds 20000]

Not a test: prints microseconds per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import Store

from mailgate.dns import Resolver
from mailgate.queue.outbound import OutboundOptions
from mailgate.queue.outbound.mtasts import MTASTS, STSPolicy
from mailgate.queue.outbound.tlscheck import chain_problem
from mailgate.queue.outbound.tlspolicy import PolicyResolver


def chain_check(rounds: int) -> float:
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("mx.example.test")
    chain = [
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(Encoding.DER)
        for blob in leaf.cert_chain_pems
    ]
    store = Store([x509.load_pem_x509_certificate(ca.cert_pem.bytes())])
    assert chain_problem(chain, "mx.example.test", store) is None
    started = time.perf_counter()
    for _ in range(rounds):
        chain_problem(chain, "mx.example.test", store)
    return (time.perf_counter() - started) / rounds * 1e6


async def policies(rounds: int) -> tuple[float, float]:
    resolver = Resolver(["127.0.0.1:1"], timeout=0.5)
    far = time.monotonic() + 3600
    # Answers as the resolver's cache holds them: no TXT for one, an STSv1 record for the other.
    resolver._cache[("_mta-sts.plain.test", "TXT")] = (far, [])
    resolver._cache[("_mta-sts.sts.test", "TXT")] = (far, ["v=STSv1; id=1"])
    mta_sts = MTASTS(resolver, OutboundOptions())
    now = time.time()
    mta_sts._policies["sts.test"] = STSPolicy(
        "sts.test", "1", "enforce", ("mx.sts.test",), 86400, now, now + 86400
    )
    resolver_ = PolicyResolver(default="may", domains={}, cafile=None, mta_sts=mta_sts)
    results = []
    for domain in ("plain.test", "sts.test"):
        level, source = resolver_.level_for(domain, None)
        started = time.perf_counter()
        for _ in range(rounds):
            policy = await resolver_.relay_policy(domain, [f"mx.{domain}"], 25, level, source)
            policy.for_host(f"mx.{domain}")
        results.append((time.perf_counter() - started) / rounds * 1e6)
    assert mta_sts.fetches == 0
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    print(f"chain check (leaf + intermediate):  {chain_check(args.rounds // 10):8.1f} us")
    plain, cached = asyncio.run(policies(args.rounds))
    print(f"policy, may, no MTA-STS published:  {plain:8.1f} us")
    print(f"policy, MTA-STS policy cached:      {cached:8.1f} us")


if __name__ == "__main__":
    main()
