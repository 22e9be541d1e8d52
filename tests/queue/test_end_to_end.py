"""mailgate routes and sends mail onward, end to end: a server built from settings with
``[[routes]]``, ``[queue]`` and ``[outbound]``, real DNS answers from the test DNS server,
receiving SMTP servers on 127.0.0.x that accept, defer, refuse or drop on cue, and the
DSNs that come back parsed by flufl.bounce. Nothing mocked."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest
from flufl.bounce import all_failures
from tests.dns_server import DNSTestServer
from tests.outbound.helpers import run
from tests.outbound.receivers import (
    Certs,
    RawServer,
    Receiver,
    greeting,
    mailgate_server,
)

from mailgate import Accept, Server
from mailgate.queue import RecipientState, SQLiteQueueStore
from mailgate.queue.sqlite import INLINE_BODY_LIMIT

from .e2e import (
    Client,
    bounces,
    message_bytes,
    new_domain,
    parsed,
    publish_mx,
    queue_of,
    queued,
    sender_domain,
    serving,
    settings,
    wait_for,
    wait_until_empty,
)

RELAY_ALL = [{"recipients": ["*"], "action": "relay"}]


def test_relay_to_the_mx(tmp_path: Path, dns_server: DNSTestServer, mx_port: int) -> None:
    domain = new_domain("relay")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.5"))

    async def main() -> None:
        with Receiver("127.0.0.5", mx_port) as receiver:
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                replies, final = await Client(server).send(
                    "alice@example.org", [f"bob@{domain}", f"carol@{domain}"]
                )
                assert [code for code, _ in replies] == [250, 250]
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 1, what="the relayed message")
                await wait_until_empty(server)
        [message] = receiver.messages
        assert message.mail_from == "alice@example.org"
        assert message.rcpt_tos == [f"bob@{domain}", f"carol@{domain}"]
        assert message.data.startswith(b"Received: from client.test")
        assert message.data.endswith(message_bytes())
        assert receiver.ehlo_names == ["mx.mailgate.test"]
        # Nothing was stored locally: every recipient went onward.
        assert not list((tmp_path / "maildir" / "new").glob("*"))

    run(main())


def test_next_mx_when_the_first_refuses_to_talk(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("fallback")
    publish_mx(dns_server, domain, (10, "mx1", "127.0.0.6"), (20, "mx2", "127.0.0.7"))

    async def main() -> None:
        async with RawServer("127.0.0.6", mx_port, greeting("421 4.3.2 busy, go away")) as busy:
            with Receiver("127.0.0.7", mx_port) as receiver:
                async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                    _, final = await Client(server).send("alice@example.org", [f"bob@{domain}"])
                    assert final is not None and final[0] == 250
                    await wait_for(lambda: len(receiver.messages) == 1, what="the message")
                    await wait_until_empty(server)
        assert busy.connections >= 1
        assert receiver.messages[0].rcpt_tos == [f"bob@{domain}"]

    run(main())


def _failure_report(receiver: Receiver) -> tuple[set[bytes], str]:
    """The one DSN the sender's MX got: the failed addresses flufl.bounce finds in it,
    and its delivery-status text."""
    [report] = bounces(receiver)
    message = parsed(report)
    assert message.get_content_type() == "multipart/report"
    assert message["Auto-Submitted"] == "auto-replied"
    status = next(
        part for part in message.walk() if part.get_content_type() == "message/delivery-status"
    )
    text = "\n".join(str(block) for block in status.get_payload())
    temporary, permanent = all_failures(message)
    assert temporary == set()
    return set(permanent), text


@pytest.mark.parametrize("case", ["null-mx", "nxdomain"])
def test_a_domain_that_takes_no_mail_bounces_to_the_senders_mx(
    case: str, tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain(case)
    if case == "null-mx":
        dns_server.add(f"{domain}. 60 IN MX 0 .\n")
    sender = f"alice@{sender_domain(dns_server, '127.0.0.9')}"

    async def main() -> None:
        with Receiver("127.0.0.9", mx_port) as sender_mx:
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                _, final = await Client(server).send(sender, [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the bounce")
                await wait_until_empty(server)
        failed, status = _failure_report(sender_mx)
        assert failed == {f"bob@{domain}".encode()}
        assert "Action: failed" in status
        expected = "5.1.10" if case == "null-mx" else "5.1.2"
        assert f"Status: {expected}" in status, status
        assert bounces(sender_mx)[0].rcpt_tos == [sender]

    run(main())


def test_a_deferral_is_retried_and_delivered(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("defer")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.10"))

    async def main() -> None:
        with Receiver("127.0.0.10", mx_port) as receiver:
            receiver.cue.rcpt[f"bob@{domain}"] = "451 4.7.1 greylisted, try again"
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                _, final = await Client(server).send("alice@example.org", [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                store = queue_of(server).store
                assert isinstance(store, SQLiteQueueStore)

                async def deferred() -> bool:
                    [message] = await store.list_messages()
                    [recipient] = message.recipients
                    return recipient.state is RecipientState.DEFERRED

                for _ in range(100):
                    if await deferred():
                        break
                    await asyncio.sleep(0.05)
                [message] = await store.list_messages()
                [recipient] = message.recipients
                assert recipient.state is RecipientState.DEFERRED
                assert recipient.last_reply is not None and recipient.last_reply.code == 451
                assert recipient.attempts == 1
                receiver.cue.rcpt.clear()
                await wait_for(lambda: len(receiver.messages) == 1, what="the retry")
                await wait_until_empty(server)

    run(main())


def test_lifetime_expiry_sends_exactly_one_failure_report(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("expire")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.11"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.12')}"

    async def main() -> None:
        with (
            Receiver("127.0.0.11", mx_port) as receiver,
            Receiver("127.0.0.12", mx_port) as sender_mx,
        ):
            receiver.cue.rcpt[f"bob@{domain}"] = "452 4.2.2 mailbox full"
            values = settings(tmp_path, dns_server, mx_port, RELAY_ALL, queue={"lifetime": "3s"})
            async with serving(**values) as server:
                _, final = await Client(server).send(sender, [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the bounce")
                await wait_until_empty(server)
                await asyncio.sleep(1.5)  # time for a second report, which must not come
        failed, status = _failure_report(sender_mx)
        assert failed == {f"bob@{domain}".encode()}
        assert "Status: 5.4.7" in status
        assert "452 4.2.2 mailbox full" in status  # the last reply, as Diagnostic-Code
        assert receiver.messages == []

    run(main())


def test_per_recipient_results_one_bounce_for_the_refused(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("mixed")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.13"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.14')}"

    async def main() -> None:
        with (
            Receiver("127.0.0.13", mx_port) as receiver,
            Receiver("127.0.0.14", mx_port) as sender_mx,
        ):
            receiver.cue.rcpt[f"nobody@{domain}"] = "550 5.1.1 no such user"
            receiver.cue.rcpt[f"gone@{domain}"] = "551 5.1.6 moved away"
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                _, final = await Client(server).send(
                    sender,
                    [f"bob@{domain}", f"nobody@{domain}", f"carol@{domain}", f"gone@{domain}"],
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the bounce")
                await wait_until_empty(server)
        [message] = receiver.messages
        assert message.rcpt_tos == [f"bob@{domain}", f"carol@{domain}"]
        failed, status = _failure_report(sender_mx)
        assert failed == {f"nobody@{domain}".encode(), f"gone@{domain}".encode()}
        assert "Status: 5.1.1" in status and "Status: 5.1.6" in status
        assert "Remote-MTA: dns; mx." in status

    run(main())


def test_a_failed_bounce_is_held_and_bounces_nothing(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("nullsender")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.15"))

    async def main() -> None:
        with Receiver("127.0.0.15", mx_port) as receiver:
            receiver.cue.rcpt[f"bob@{domain}"] = "550 5.1.1 no such user"
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                _, final = await Client(server).send("", [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                store = queue_of(server).store
                assert isinstance(store, SQLiteQueueStore)
                for _ in range(200):
                    messages = await store.list_messages()
                    if messages and messages[0].recipients[0].state is RecipientState.HELD:
                        break
                    await asyncio.sleep(0.05)
                [message] = await store.list_messages()
                [recipient] = message.recipients
                assert recipient.state is RecipientState.HELD
                assert recipient.held_reason is not None and "null sender" in recipient.held_reason
                assert await store.pending_notices() == []
                runner = queue_of(server).runner
                assert runner is not None and runner.reports_sent == 0
                # Only the one queued message: no report was made of it.
                assert len(await store.list_messages()) == 1
        assert receiver.messages == []

    run(main())


def test_reject_rules_answer_at_rcpt(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    routes = [
        {"recipients": ["*@closed.test"], "action": "reject", "reply": "550 5.7.1 We are closed"},
        {"recipients": ["*@later.test"], "action": "reject", "reply": "450 4.7.1 Not today"},
        *RELAY_ALL,
    ]

    async def main() -> None:
        async with serving(**settings(tmp_path, dns_server, mx_port, routes)) as server:
            replies, final = await Client(server).send(
                "alice@example.org", ["a@closed.test", "b@later.test"]
            )
            assert replies == [(550, "5.7.1 We are closed"), (450, "4.7.1 Not today")]
            assert final is None
            assert await queued(server) == []

    run(main())


def test_local_and_relayed_recipients_of_one_message(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("both")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.16"))
    routes = [{"recipients": ["*@local.test"], "action": "deliver"}, *RELAY_ALL]

    async def main() -> None:
        with Receiver("127.0.0.16", mx_port) as receiver:
            async with serving(**settings(tmp_path, dns_server, mx_port, routes)) as server:
                _, final = await Client(server).send(
                    "alice@example.org", ["ann@local.test", f"bob@{domain}"]
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 1, what="the relayed copy")
                await wait_until_empty(server)
                _, final = await Client(server).send("alice@example.org", ["ann@local.test"])
                assert final is not None and final[0] == 250
                assert await queued(server) == []
        assert receiver.messages[0].rcpt_tos == [f"bob@{domain}"]
        stored = sorted((tmp_path / "maildir" / "new").iterdir())
        assert len(stored) == 2
        assert stored[0].read_bytes().replace(b"\n", b"\r\n").endswith(message_bytes()) or (
            stored[0].read_bytes().endswith(message_bytes())
        )

    run(main())


def test_a_queue_that_cannot_be_written_answers_451(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("broken")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.17"))

    async def main() -> None:
        async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
            # The queue's body directory is gone (a disk pulled, an operator's rm): the
            # enqueue of a body kept as a file cannot write, and the client must not get
            # a 250.
            shutil.rmtree(tmp_path / "state" / "queue" / "bodies")
            large = message_bytes() + (b"x" * 78 + b"\r\n") * (INLINE_BODY_LIMIT // 80 + 1)
            _, final = await Client(server).send("alice@example.org", [f"bob@{domain}"], large)
            assert final is not None
            assert final[0] == 451 and final[1].startswith("4.3.0"), final

    run(main())


def test_forward_to_a_smarthost_with_auth_over_starttls(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    smarthost = f"smarthost.{new_domain('fwd')}"
    dns_server.add(f"{smarthost}. 60 IN A 127.0.0.18\n")
    routes = [
        {
            "recipients": ["*"],
            "action": "forward",
            "to": f"smtp://{smarthost}:{mx_port}?starttls=require&cafile={certs.ca_file}",
            "auth": "relayuser:s3cret",
        }
    ]

    async def main() -> None:
        async with mailgate_server(
            tmp_path,
            certs,
            f"127.0.0.18:{mx_port}",
            smarthost,
            auth_users=["relayuser:s3cret"],
        ) as (_, seen):
            async with serving(**settings(tmp_path, dns_server, mx_port, routes)) as server:
                _, final = await Client(server).send(
                    "alice@example.org", ["bob@example.net", "carol@example.com"]
                )
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(seen.messages) == 1, what="the forwarded message")
                await wait_until_empty(server)
        [(session, envelope, data)] = seen.messages
        assert session.user == "relayuser"
        assert session.tls is not None
        assert list(envelope.rcpt_tos) == ["bob@example.net", "carol@example.com"]
        assert data.endswith(message_bytes())

    run(main())


def test_dsn_parameters_go_to_the_next_hop_and_success_is_reported(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int, certs: Certs
) -> None:
    domain = new_domain("dsnparams")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.19"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.20')}"

    async def main() -> None:
        async with mailgate_server(tmp_path, certs, f"127.0.0.19:{mx_port}", f"mx.{domain}") as (
            _,
            seen,
        ):
            with Receiver("127.0.0.20", mx_port) as sender_mx:
                async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                    _, final = await Client(server).send(
                        sender,
                        [
                            (
                                f"bob@{domain}",
                                ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;b+2BBob@{domain}"],
                            ),
                            f"carol@{domain}",
                        ],
                        mail_options=["ENVID=env+2B42", "RET=HDRS"],
                    )
                    assert final is not None and final[0] == 250
                    await wait_for(lambda: len(seen.messages) == 1, what="the relayed message")
                    await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the success report")
                    await wait_until_empty(server)
        [(_, envelope, _)] = seen.messages
        assert envelope.mail_params.get("ENVID") == "env+42"
        assert envelope.mail_params.get("RET") == "HDRS"
        bob, carol = envelope.rcpt_tos
        assert bob.params.get("NOTIFY") == "SUCCESS,FAILURE"
        assert bob.params.get("ORCPT") == f"rfc822;b+Bob@{domain}"
        assert "NOTIFY" not in carol.params
        [report] = bounces(sender_mx)
        text = report.data.decode()
        assert "Original-Envelope-Id: env+42" in text
        assert f"Final-Recipient: rfc822; bob@{domain}" in text
        assert "Action: relayed" in text
        assert f"carol@{domain}" not in text.split("Content-Type: message/delivery-status")[1]

    run(main())


def test_a_delay_warning_then_delivery(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("slow")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.22"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.23')}"

    async def main() -> None:
        with (
            Receiver("127.0.0.22", mx_port) as receiver,
            Receiver("127.0.0.23", mx_port) as sender_mx,
        ):
            receiver.cue.rcpt[f"bob@{domain}"] = "421 4.3.2 come back later"
            values = settings(
                tmp_path, dns_server, mx_port, RELAY_ALL, queue={"delay_warning": "1s"}
            )
            async with serving(**values) as server:
                _, final = await Client(server).send(sender, [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the delay warning")
                receiver.cue.rcpt.clear()
                await wait_for(lambda: len(receiver.messages) == 1, what="the delivery")
                await wait_until_empty(server)
                await asyncio.sleep(1.5)
        [warning] = bounces(sender_mx)
        text = warning.data.decode()
        assert "Action: delayed" in text and "Will-Retry-Until:" in text
        assert "Subject: Delayed Mail" in text
        # Delivered in the end: no further report (no NOTIFY=SUCCESS asked).
        assert len(bounces(sender_mx)) == 1

    run(main())


class _AcceptEveryone:
    """An application's RCPT hook that accepts every recipient before routing sees it."""

    name = "accept-everyone"

    async def on_rcpt(self, session: object, envelope: object, address: str) -> Accept:
        return Accept()


def test_recipients_a_reject_rule_missed_are_bounced_with_its_reply(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("open")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.24"))
    sender = f"alice@{sender_domain(dns_server, '127.0.0.25')}"
    routes = [
        {"recipients": ["*@closed.test"], "action": "reject", "reply": "550 5.7.1 We are closed"},
        *RELAY_ALL,
    ]

    async def main() -> None:
        with (
            Receiver("127.0.0.24", mx_port) as receiver,
            Receiver("127.0.0.25", mx_port) as sender_mx,
        ):
            server = Server(**settings(tmp_path, dns_server, mx_port, routes))
            server.add_plugin(_AcceptEveryone(), before="routing")
            async with server:
                # Every recipient is one the rules refuse: the message is refused.
                replies, final = await Client(server).send(sender, ["a@closed.test"])
                assert replies == [(250, "2.1.5 Recipient OK")]
                assert final == (550, "5.7.1 We are closed")
                _, final = await Client(server).send(sender, ["a@closed.test", f"bob@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: len(receiver.messages) == 1, what="the relayed message")
                await wait_for(lambda: len(bounces(sender_mx)) == 1, what="the bounce")
                await wait_until_empty(server)
        assert receiver.messages[0].rcpt_tos == [f"bob@{domain}"]
        failed, status = _failure_report(sender_mx)
        assert failed == {b"a@closed.test"}
        assert "Status: 5.7.1" in status and "550 5.7.1 We are closed" in status

    run(main())


def test_stopping_hands_deliveries_in_flight_back_to_the_queue(
    tmp_path: Path, dns_server: DNSTestServer, mx_port: int
) -> None:
    domain = new_domain("inflight")
    publish_mx(dns_server, domain, (10, "mx", "127.0.0.28"))

    async def main() -> None:
        with Receiver("127.0.0.28", mx_port) as receiver:
            receiver.cue.data_delay = 30.0  # the message is still being taken at the stop
            async with serving(**settings(tmp_path, dns_server, mx_port, RELAY_ALL)) as server:
                _, final = await Client(server).send("alice@example.org", [f"bob@{domain}"])
                assert final is not None and final[0] == 250
                await wait_for(lambda: receiver.active == 1, what="the delivery in flight")
            # Stopped: the runner gave the delivery its grace, then cancelled it and
            # handed the recipient back. Read the rows as they are (opening a store would
            # recover leases of stopped instances itself and hide the difference).
        with sqlite3.connect(tmp_path / "state" / "queue" / "queue.db") as database:
            rows = database.execute(
                "SELECT state, lease_owner, attempts FROM recipients"
            ).fetchall()
        assert rows == [("queued", None, 0)]

    run(main())
