"""The engine's own machinery: connection cache, concurrency with slow start, dead
destinations, streaming a large message, cancellation, the log line, settings."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from pathlib import Path

import pytest
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import MESSAGE, body, make_engine, new_domain, publish_mx, request, run
from tests.outbound.receivers import Behaviour, RawServer, Receiver, greeting, sink

from mailgate.queue.outbound import Forward, OutboundOptions, Outcome, Recipient, Relay
from mailgate.queue.outbound.session import Session


def test_sessions_are_reused_then_closed_when_idle_or_worn_out(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("reuse")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.32"))
    path = body(tmp_path)
    destination = Relay(domain)

    async def main() -> None:
        with Receiver("127.0.0.32", mx_port) as receiver:
            async with make_engine(dns_server, mx_port, connection_idle_time=1.0) as engine:
                results = [
                    await engine.deliver(request(path, destination, f"r{i}@{domain}"))
                    for i in range(5)
                ]
                assert [r.reused for r in results] == [False, True, True, True, True]
                assert receiver.session_count == 1
                assert engine.status(destination).idle_sessions == 1
                await asyncio.sleep(2.0)  # longer than connection_idle_time
                assert engine.status(destination).idle_sessions == 0
                after_idle = await engine.deliver(request(path, destination, f"late@{domain}"))
                assert not after_idle.reused and receiver.session_count == 2
            async with make_engine(dns_server, mx_port, connection_reuse_count=2) as engine:
                worn = [
                    await engine.deliver(request(path, destination, f"w{i}@{domain}"))
                    for i in range(5)
                ]
        assert all(r.recipients[0].outcome is Outcome.DELIVERED for r in results + worn)
        assert [r.reused for r in worn] == [False, True, False, True, False]
        assert receiver.session_count == 2 + 3
        assert len(receiver.messages) == 11

    run(main())


def test_concurrency_limit_with_slow_start(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("conc")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.33"))
    path = body(tmp_path)
    destination = Relay(domain)

    async def main() -> None:
        with Receiver("127.0.0.33", mx_port) as receiver:
            receiver.cue.data_delay = 0.2
            async with make_engine(
                dns_server, mx_port, max_concurrency_per_destination=3, initial_concurrency=1
            ) as engine:
                assert engine.status(destination).concurrency_limit == 1
                results = await asyncio.gather(
                    *(
                        engine.deliver(request(path, destination, f"r{i}@{domain}"))
                        for i in range(12)
                    )
                )
                grown = engine.status(destination)
        assert all(r.recipients[0].outcome is Outcome.DELIVERED for r in results)
        # Started at one, grew with the successes, never past the limit.
        assert 2 <= receiver.max_active <= 3
        assert grown.concurrency_limit == 3 and grown.active == 0
        assert len(receiver.messages) == 12
        assert receiver.session_count <= 3

    run(main())


def test_dead_destination_is_suspended_probed_and_revived(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("dead")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.34"))
    path = body(tmp_path)
    destination = Relay(domain)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with make_engine(
            dns_server, mx_port, dead_after_failures=2, dead_probe_interval=0.5
        ) as engine:
            async with RawServer(
                "127.0.0.34", mx_port, greeting("421 4.3.2 Shutting down")
            ) as down:
                first = await engine.deliver(request(path, destination, f"a@{domain}"))
                assert not engine.is_suspended(destination)
                second = await engine.deliver(request(path, destination, f"b@{domain}"))
                assert engine.is_suspended(destination)
                started = loop.time()
                held = await asyncio.gather(
                    *(
                        engine.deliver(request(path, destination, f"h{i}@{domain}"))
                        for i in range(5)
                    )
                )
                assert loop.time() - started < 1.0  # answered at once, without connecting
                assert down.connections == 2
                await asyncio.sleep(0.6)  # the probe interval has passed
                probes = await asyncio.gather(
                    *(
                        engine.deliver(request(path, destination, f"p{i}@{domain}"))
                        for i in range(3)
                    )
                )
                assert down.connections == 3  # exactly one probe went through
                assert engine.is_suspended(destination)
            with Receiver("127.0.0.34", mx_port) as receiver:
                await asyncio.sleep(0.6)
                revived = await engine.deliver(request(path, destination, f"c@{domain}"))
                assert not engine.is_suspended(destination)
                after = await engine.deliver(request(path, destination, f"d@{domain}"))
        for result in (first, second):
            assert (result.recipients[0].outcome, result.recipients[0].status) == (
                Outcome.DEFERRED,
                "4.3.2",
            )
            assert (
                "refused to talk to me: 421 4.3.2 Shutting down" in result.recipients[0].diagnostic
            )
        for result in held:
            [outcome] = result.recipients
            assert (outcome.outcome, outcome.status) == (Outcome.DEFERRED, "4.3.2")
            assert outcome.diagnostic.startswith("destination suspended after 2 failed attempts")
            assert result.remote is None
        suspended = [p for p in probes if "suspended" in p.recipients[0].diagnostic]
        assert len(suspended) == 2
        assert revived.recipients[0].outcome is Outcome.DELIVERED
        assert after.recipients[0].outcome is Outcome.DELIVERED
        assert [m.rcpt_tos for m in receiver.messages] == [[f"c@{domain}"], [f"d@{domain}"]]

    run(main())


def test_50_mb_message_streams_with_flat_memory(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("big")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.35"))
    path = tmp_path / "big"
    line = b".a line starting with a dot, stuffed on the wire " + b"x" * 28 + b"\r\n"
    lines = 50 * 1024 * 1024 // len(line)
    with path.open("wb") as out:
        out.write(b"Subject: big\r\n\r\n")
        for _ in range(lines // 1000):
            out.write(line * 1000)
    size = path.stat().st_size
    assert size > 50_000_000

    async def main() -> None:
        received = [0]
        async with RawServer("127.0.0.35", mx_port, sink(received)):
            async with make_engine(dns_server, mx_port) as engine:
                tracemalloc.start()
                try:
                    result = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
        assert result.recipients[0].outcome is Outcome.DELIVERED, result.recipients[0]
        # Every line went out dot-stuffed, plus the final ".\r\n".
        assert received[0] == size + lines // 1000 * 1000 + 3
        assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while sending {size}"

    run(main(), timeout=120)


def test_cancelled_delivery_closes_its_session_and_frees_its_slot(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("cancel")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.36"))
    path = body(tmp_path)
    destination = Relay(domain)

    async def main() -> None:
        with Receiver("127.0.0.36", mx_port) as receiver:
            receiver.cue.data_delay = 3
            async with make_engine(
                dns_server, mx_port, max_concurrency_per_destination=1, initial_concurrency=1
            ) as engine:
                slow = asyncio.create_task(
                    engine.deliver(request(path, destination, f"a@{domain}"))
                )
                waiting = asyncio.create_task(
                    engine.deliver(request(path, destination, f"b@{domain}"))
                )
                await asyncio.sleep(0.5)
                assert engine.status(destination).active == 1
                waiting.cancel()
                slow.cancel()
                await asyncio.gather(slow, waiting, return_exceptions=True)
                status = engine.status(destination)
                assert (status.active, status.idle_sessions) == (0, 0)
                receiver.cue.data_delay = 0
                result = await engine.deliver(request(path, destination, f"c@{domain}"))
        assert result.recipients[0].outcome is Outcome.DELIVERED and not result.reused

    run(main())


def test_one_structured_log_line_per_attempt(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = new_domain("log")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.37"))
    path = body(tmp_path)

    async def main() -> None:
        with Receiver("127.0.0.37", mx_port) as receiver:
            receiver.cue.rcpt = {f"nobody@{domain}": "550 5.1.1 No such user"}
            async with make_engine(dns_server, mx_port) as engine:
                await engine.deliver(
                    request(
                        path,
                        Relay(domain),
                        f"a@{domain}",
                        f"nobody@{domain}",
                        queue_id="4XyZ",
                        attempt=2,
                    )
                )

    with caplog.at_level(logging.INFO, logger="mailgate.queue.outbound"):
        run(main())
    [record] = [r for r in caplog.records if r.name == "mailgate.queue.outbound"]
    assert record.levelno == logging.WARNING  # not everything was delivered
    message = record.getMessage()
    assert message.startswith(f"4XyZ: attempt=2 destination=relay:{domain.lower()} ")
    assert f"remote=mx.{domain}[127.0.0.37]:{mx_port} tls=none" in message
    assert f"<nobody@{domain}> failed 5.1.1" in message
    fields = record.__dict__["outbound"]
    assert fields["queue_id"] == "4XyZ" and fields["attempt"] == 2
    assert (fields["remote_host"], fields["remote_ip"]) == (f"mx.{domain}", "127.0.0.37")
    assert fields["tls_version"] is None and fields["tls_verified"] is None
    assert fields["delay"] >= 0
    assert [(r["address"], r["outcome"], r["status"]) for r in fields["recipients"]] == [
        (f"a@{domain}", "delivered", "2.0.0"),
        (f"nobody@{domain}", "failed", "5.1.1"),
    ]
    assert fields["recipients"][1]["reply"] == "550 5.1.1 No such user"


def test_missing_body_file_defers_without_connecting(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("nobody")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.38"))
    path = body(tmp_path)

    async def main() -> None:
        async with RawServer("127.0.0.38", mx_port, greeting("220 hello")) as server:
            async with make_engine(dns_server, mx_port) as engine:
                gone = request(path, Relay(domain), f"a@{domain}")
                path.unlink()
                result = await engine.deliver(gone)
        assert (result.recipients[0].outcome, result.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.3.0",
        )
        assert server.connections == 0

    run(main())


def test_settings_and_destinations_are_checked() -> None:
    for bad in (
        {"port": 0},
        {"helo": "two words"},
        {"connect_timeout": 0},
        {"initial_concurrency": 30},
        {"max_concurrency_per_destination": 0},
        {"tls_policy": "sometimes"},
        {"dead_after_failures": 0},
    ):
        with pytest.raises(ValueError):
            OutboundOptions(**bad)  # type: ignore[arg-type]
    assert OutboundOptions().port == 25 and OutboundOptions().tls_policy == "may"
    with pytest.raises(ValueError, match="use smtp://"):
        Forward("http://relay.example")
    with pytest.raises(ValueError, match="user:password"):
        Forward("smtp://relay.example", auth="no-colon")
    forward = Forward("smtp://relay.example:587?starttls=require", auth="u:secret")
    assert forward.key == "forward:smtp://u@relay.example:587?starttls=require"
    assert "secret" not in repr(forward)
    assert "pw" not in repr(Forward("smtp://user:pw@relay.example"))
    assert Forward("lmtp://[::1]").key == "forward:lmtp://[::1]:24"
    assert Relay("Example.ORG.").key == "relay:example.org"
    for domain in ("", ".", "two words.test", "bad\r\n.test"):
        with pytest.raises(ValueError):
            Relay(domain)


def test_requests_that_could_inject_commands_are_refused(tmp_path: Path) -> None:
    path = body(tmp_path)
    for bad in ("a@b.test\r\nRCPT TO:<x@y.test>", "a@b.test>", "", "a\x00@b.test"):
        with pytest.raises(ValueError):
            Recipient(bad)
        with pytest.raises(ValueError):
            request(path, Relay("b.test"), "ok@b.test", sender=bad or "x\n")
    with pytest.raises(ValueError):
        Recipient("a@b.test", notify="SUCCESS,NEVER")
    with pytest.raises(ValueError):
        Recipient("a@b.test", orcpt="no-type")
    with pytest.raises(ValueError):
        request(path, Relay("b.test"), "ok@b.test", envid="x\r\nQUIT")
    assert Recipient("a@b.test", notify="delay,failure").notify == "delay,failure"
    assert request(path, Relay("b.test"), "ok@b.test", sender="").sender == ""


def test_many_recipients_go_in_several_transactions_on_one_session(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("split")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.45"))
    recipients = [f"r{i}@{domain}" for i in range(7)]

    async def main() -> None:
        with Receiver("127.0.0.45", mx_port) as receiver:
            receiver.cue.rcpt = {f"r2@{domain}": "550 5.1.1 No such user"}
            async with make_engine(dns_server, mx_port, max_recipients_per_transaction=3) as engine:
                result = await engine.deliver(request(body(tmp_path), Relay(domain), *recipients))
        assert [r.recipient.address for r in result.recipients] == recipients
        assert [r.outcome for r in result.recipients] == [
            Outcome.FAILED if i == 2 else Outcome.DELIVERED for i in range(7)
        ]
        assert [m.rcpt_tos for m in receiver.messages] == [
            recipients[0:2],
            recipients[3:6],
            recipients[6:7],
        ]
        assert all(m.data == MESSAGE for m in receiver.messages)
        assert receiver.session_count == 1

    run(main())


def test_a_bug_inside_defers_and_is_logged_instead_of_raising(
    tmp_path: Path,
    dns_server: DNSTestServer,
    mx_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = new_domain("bug")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.46"))
    destination = Relay(domain)

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    async def main() -> None:
        with Receiver("127.0.0.46", mx_port) as receiver:
            async with make_engine(dns_server, mx_port) as engine:
                with monkeypatch.context() as patch:
                    patch.setattr(Session, "transact", broken)
                    result = await engine.deliver(
                        request(body(tmp_path), destination, f"a@{domain}")
                    )
                status = engine.status(destination)
                assert (status.active, status.idle_sessions) == (0, 0)
                after = await engine.deliver(request(body(tmp_path), destination, f"b@{domain}"))
        assert (result.recipients[0].outcome, result.recipients[0].status) == (
            Outcome.DEFERRED,
            "4.3.0",
        )
        assert after.recipients[0].outcome is Outcome.DELIVERED
        assert [m.rcpt_tos for m in receiver.messages] == [[f"b@{domain}"]]

    with caplog.at_level(logging.ERROR, logger="mailgate.queue.outbound"):
        run(main())
    assert any("failed unexpectedly" in r.getMessage() and r.exc_info for r in caplog.records)


def scripted(log: list[list[bytes]], *, pipelining: bool, drop_second_mail: bool) -> Behaviour:
    """An SMTP server that records each connection's command verbs; with
    ``drop_second_mail`` the first connection closes without a word at its second MAIL
    (as a server does whose idle timeout struck just then)."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        verbs: list[bytes] = []
        log.append(verbs)
        first_connection = len(log) == 1
        accepted = 0  # recipients of the open transaction
        writer.write(b"220 scripted.test ESMTP\r\n")
        for _ in range(200):
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            verbs.append(verb)
            if verb == b"EHLO":
                extensions = b"250-PIPELINING\r\n" if pipelining else b""
                writer.write(b"250-scripted.test\r\n" + extensions + b"250 8BITMIME\r\n")
            elif verb == b"MAIL":
                if drop_second_mail and first_connection and verbs.count(b"MAIL") == 2:
                    return
                accepted = 0
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                if b"<nobody@" in line:
                    writer.write(b"550 5.1.1 no such user\r\n")
                else:
                    accepted += 1
                    writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA" and not accepted:
                writer.write(b"503 5.5.1 no valid recipients\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                accepted = 0
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                return
            else:
                accepted = 0
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()

    return behaviour


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_clean_cached_session_needs_no_rset_and_an_unclean_one_gets_it(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, pipelining: bool
) -> None:
    domain = new_domain("norset")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.47"))
    path = body(tmp_path)
    log: list[list[bytes]] = []

    async def main() -> None:
        behaviour = scripted(log, pipelining=pipelining, drop_second_mail=False)
        async with RawServer("127.0.0.47", mx_port, behaviour):
            async with make_engine(dns_server, mx_port) as engine:
                for address in ("a", "b", "nobody", "c"):
                    result = await engine.deliver(
                        request(path, Relay(domain), f"{address}@{domain}")
                    )
                    assert result.reused == (address != "a")
                    expected = Outcome.FAILED if address == "nobody" else Outcome.DELIVERED
                    assert result.recipients[0].outcome is expected

    run(main())
    [verbs] = log
    transaction = [b"MAIL", b"RCPT", b"DATA"]
    # No DATA after a refused recipient without PIPELINING; RSET only after that one.
    refused = transaction if pipelining else [b"MAIL", b"RCPT"]
    assert verbs == [b"EHLO", *transaction, *transaction, *refused, b"RSET", *transaction, b"QUIT"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_cached_session_the_server_dropped_unnoticed_hands_the_message_to_a_new_one(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, pipelining: bool
) -> None:
    domain = new_domain("dropped")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.48"))
    path = body(tmp_path)
    log: list[list[bytes]] = []

    async def main() -> None:
        behaviour = scripted(log, pipelining=pipelining, drop_second_mail=True)
        async with RawServer("127.0.0.48", mx_port, behaviour) as server:
            async with make_engine(dns_server, mx_port) as engine:
                first = await engine.deliver(request(path, Relay(domain), f"a@{domain}"))
                second = await engine.deliver(request(path, Relay(domain), f"b@{domain}"))
                third = await engine.deliver(request(path, Relay(domain), f"c@{domain}"))
            assert server.connections == 2
        assert [r.recipients[0].outcome for r in (first, second, third)] == [Outcome.DELIVERED] * 3
        assert (first.reused, second.reused, third.reused) == (False, False, True)
        assert engine.sessions_opened == 2

    run(main())
    transaction = [b"MAIL", b"RCPT", b"DATA"]
    first_connection = [b"EHLO", *transaction, b"MAIL"]
    if pipelining:  # the rest of the group was read before the close
        assert log[0][: len(first_connection)] == first_connection
    else:
        assert log[0] == first_connection
    # The dropped message was sent once, on the new session, and the next one followed.
    assert log[1] == [b"EHLO", *transaction, *transaction, b"QUIT"]
