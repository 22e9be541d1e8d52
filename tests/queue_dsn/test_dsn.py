"""DSNs (RFC 3464) as build_dsn makes them, read back by two independent parsers: the
stdlib email parser (every field checked) and flufl.bounce (what list managers use)."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import flufl.bounce
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.queue.dsn import (
    DEFAULT_MAX_FULL_SIZE,
    Action,
    Diagnostic,
    MessageFacts,
    RecipientResult,
    build_dsn,
    needs_8bitmime,
    status_for,
    utf8_addr_xtext,
)

ORIGINAL = (
    b"Received: from client.example by mx.test; Sun, 6 Dec 2026 10:00:00 +0000\r\n"
    b"From: Ann <ann@example.com>\r\n"
    b"To: bob@x.test, carol@y.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)
ARRIVED = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
FACTS = MessageFacts(
    sender="ann@example.com",
    reporting_mta="mx.test",
    arrival_date=ARRIVED,
    envid="QQ314159",
    received_from="client.example",
    queue_id="7F3A2B",
)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def status_blocks(data: bytes) -> list[email.message.Message]:
    """The header blocks of the delivery-status part (per-message first)."""
    report = email.message_from_bytes(data, policy=email.policy.default)
    [part] = [p for p in report.walk() if p.get_content_type().endswith("delivery-status")]
    if part.get_content_type() == "message/delivery-status":
        payload = part.get_payload()
        assert isinstance(payload, list)
        return payload
    # email neither splits message/global-delivery-status into blocks nor decodes UTF-8
    # header fields (RFC 6532) it parses from bytes: take the part's text from the bytes.
    match = re.search(
        rb"Content-Type: message/global-delivery-status\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--",
        data,
        re.DOTALL,
    )
    assert match is not None
    text = match.group(1).decode("utf-8")
    return [
        email.message_from_string(chunk + "\n", policy=email.policy.default)
        for chunk in re.split(r"\r\n\r\n", text.strip())
    ]


def fields(block: email.message.Message) -> dict[str, str]:
    return {name: str(value) for name, value in block.items()}


def failure(address: str = "bob@x.test", **changes: object) -> RecipientResult:
    values: dict[str, object] = {
        "address": address,
        "action": Action.FAILED,
        "status": "5.1.1",
        "orcpt": f"rfc822;{address}",
        "remote_mta": "mx.x.test",
        "diagnostic": Diagnostic(550, "5.1.1", "<bob@x.test>: no such user"),
        "last_attempt": NOW - timedelta(minutes=1),
    }
    values.update(changes)
    return RecipientResult(**values)  # type: ignore[arg-type]


def test_failure_report_every_field() -> None:
    data = build_dsn(FACTS, [failure(), failure("carol@y.test", orcpt=None)], ORIGINAL, now=NOW)
    assert data.isascii() and not needs_8bitmime(data)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    report = parse(data)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert report["To"] == "ann@example.com"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Date"].datetime == NOW
    assert re.fullmatch(r"<[0-9a-f]{32}@mx\.test>", report["Message-ID"])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, returned = report.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "This is the mail system at mx.test." in text
    assert (
        "<bob@x.test>: delivery failed; mx.x.test said: 550 5.1.1 <bob@x.test>: no such user"
        in text
    )
    assert "Your message is attached below." in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob, carol = status_blocks(data)
    assert fields(per_message) == {
        "Reporting-MTA": "dns; mx.test",
        "X-Mailgate-Queue-ID": "7F3A2B",
        "Original-Envelope-Id": "QQ314159",
        "Received-From-MTA": "dns; client.example",
        "Arrival-Date": "Sun, 06 Dec 2026 10:00:00 +0000",
    }
    assert fields(bob) == {
        "Original-Recipient": "rfc822; bob@x.test",
        "Final-Recipient": "rfc822; bob@x.test",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.x.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@x.test>: no such user",
        "Last-Attempt-Date": "Sun, 06 Dec 2026 11:59:00 +0000",
    }
    assert "Original-Recipient" not in fields(carol)
    assert fields(carol)["Final-Recipient"] == "rfc822; carol@y.test"
    # No RET and a small message: the whole message comes back, unchanged.
    assert returned.get_content_type() == "message/rfc822"
    assert ORIGINAL in data
    original = returned.get_payload()[0]
    assert original["Subject"] == "quarterly numbers"
    assert original.get_content().strip() == "The numbers are in."
    temporary, permanent = flufl.bounce.all_failures(email.message_from_bytes(data))
    assert temporary == frozenset()
    assert permanent == {b"bob@x.test", b"carol@y.test"}
    assert flufl.bounce.scan_message(email.message_from_bytes(data)) == permanent


def test_orcpt_is_what_flufl_reports_and_is_kept_as_given() -> None:
    data = build_dsn(FACTS, [failure("bob@x.test", orcpt="rfc822;Bob.Original@Old.test")], ORIGINAL)
    [_, bob] = status_blocks(data)
    assert bob["Original-Recipient"] == "rfc822; Bob.Original@Old.test"
    assert bob["Final-Recipient"] == "rfc822; bob@x.test"
    assert flufl.bounce.scan_message(email.message_from_bytes(data)) == {b"Bob.Original@Old.test"}


def test_ret_hdrs_returns_the_header_only(tmp_path: Path) -> None:
    facts = MessageFacts("ann@example.com", "mx.test", ret="HDRS")
    path = tmp_path / "message.eml"
    path.write_bytes(ORIGINAL)
    for original in (ORIGINAL, path):
        data = build_dsn(facts, [failure()], original)
        report = parse(data)
        returned = report.get_payload()[2]
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"Subject: quarterly numbers\r\n" in data
        assert b"The numbers are in." not in data
        assert (
            "The header of your message is attached below." in report.get_payload()[0].get_content()
        )


def test_large_message_falls_back_to_headers_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.eml"
    with path.open("wb") as file:
        file.write(ORIGINAL.replace(b"\r\n", b"\n"))  # a spool file with bare LF
        for _ in range(2000):
            file.write(b"x" * 998 + b"\n")
    for ret in (None, "FULL"):
        facts = MessageFacts("ann@example.com", "mx.test", ret=ret)  # type: ignore[arg-type]
        data = build_dsn(facts, [failure()], path)
        assert len(data) < 10_000
        report = parse(data)
        assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
        assert b"Message-ID: <orig-1@example.com>\r\n" in data
        assert b"xxxx" not in data
        assert f"larger than {DEFAULT_MAX_FULL_SIZE} bytes" in report.get_payload()[0].get_content()
    # A higher cap returns it whole, with CRLF line ends.
    data = build_dsn(FACTS, [failure()], path, max_full_size=3_000_000)
    assert parse(data).get_payload()[2].get_content_type() == "message/rfc822"
    assert (b"x" * 998 + b"\r\n") * 3 in data


def test_delay_report() -> None:
    until = ARRIVED + timedelta(days=5)
    delayed = RecipientResult(
        "bob@x.test",
        Action.DELAYED,
        "4.4.1",
        remote_mta="mx.x.test",
        diagnostic=Diagnostic(451, "4.4.1", "connection timed out"),
        last_attempt=NOW.timestamp(),
        will_retry_until=until.timestamp(),
    )
    facts = MessageFacts("ann@example.com", "mx.test", ret="FULL")
    data = build_dsn(facts, [delayed], ORIGINAL, now=NOW)
    report = parse(data)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    text = report.get_payload()[0].get_content()
    assert "will keep trying until Fri, 11 Dec 2026 10:00:00 +0000" in text
    # RET=FULL is for failures: a delay report returns the header only.
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
    [per_message, bob] = status_blocks(data)
    assert fields(per_message) == {"Reporting-MTA": "dns; mx.test"}
    assert fields(bob) == {
        "Final-Recipient": "rfc822; bob@x.test",
        "Action": "delayed",
        "Status": "4.4.1",
        "Remote-MTA": "dns; mx.x.test",
        "Diagnostic-Code": "smtp; 451 4.4.1 connection timed out",
        "Last-Attempt-Date": "Sun, 06 Dec 2026 12:00:00 +0000",
        "Will-Retry-Until": "Fri, 11 Dec 2026 10:00:00 +0000",
    }
    assert flufl.bounce.all_failures(email.message_from_bytes(data)) == (
        frozenset({b"bob@x.test"}),
        frozenset(),
    )


def test_success_report() -> None:
    results = [
        RecipientResult(
            "bob@x.test",
            Action.DELIVERED,
            "2.0.0",
            remote_mta="mx.x.test",
            diagnostic=Diagnostic(250, "2.0.0", "Ok: queued as 12345"),
        ),
        RecipientResult("carol@y.test", Action.RELAYED, "2.0.0", remote_mta="old.y.test"),
    ]
    data = build_dsn(FACTS, results, ORIGINAL)
    report = parse(data)
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
    text = report.get_payload()[0].get_content()
    assert (
        "<carol@y.test>: relayed to a system that does not report delivery (by old.y.test)" in text
    )
    assert [b["Action"] for b in status_blocks(data)[1:]] == ["delivered", "relayed"]
    assert flufl.bounce.all_failures(email.message_from_bytes(data)) == (frozenset(), frozenset())


def test_idn_reporting_host_is_written_in_a_labels() -> None:
    data = build_dsn(MessageFacts("ann@example.com", "mx.bücher.example."), [failure()], ORIGINAL)
    report = parse(data)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.xn--bcher-kva.example>"
    assert report["Message-ID"].endswith("@mx.xn--bcher-kva.example>")
    assert status_blocks(data)[0]["Reporting-MTA"] == "dns; mx.xn--bcher-kva.example"


def test_status_for_a_recipient() -> None:
    assert status_for(Action.FAILED, Diagnostic(550, "5.1.1", "x")) == "5.1.1"
    assert status_for(Action.FAILED, Diagnostic(550, None, "x")) == "5.0.0"
    # A deferral that ended in a failure (lifetime expired): the class is the action's.
    assert status_for(Action.FAILED, Diagnostic(451, "4.4.1", "timeout")) == "5.0.0"
    assert status_for(Action.DELAYED, Diagnostic(451, "4.4.1", "timeout")) == "4.4.1"
    assert status_for(Action.DELIVERED) == "2.0.0"
    assert status_for(Action.RELAYED, Diagnostic(250, "2.6.0", "ok")) == "2.6.0"


def test_message_ids_are_unique() -> None:
    ids = {parse(build_dsn(FACTS, [failure()], ORIGINAL))["Message-ID"] for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize(
    ("facts", "result", "problem"),
    [
        (MessageFacts("", "mx.test"), failure(), "null sender"),
        (MessageFacts("<>", "mx.test"), failure(), "null sender"),
        (MessageFacts("ann\x85@example.com", "mx.test"), failure(), "is not an address"),
        (MessageFacts("postmaster", "mx.test"), failure(), "is not an address"),
        (MessageFacts("ann\xa0lee@example.com", "mx.test"), failure(), "is not an address"),
        (FACTS, failure(status="4.1.1"), "does not fit action failed"),
        (FACTS, failure(status="5.1"), "is not a status code"),
        (FACTS, failure(will_retry_until=NOW), "only for delayed"),
        (FACTS, failure(last_attempt=datetime(2026, 1, 1)), "naive datetime"),
        (FACTS, failure(action="bounced"), "is not a valid Action"),
    ],
)
def test_refused_reports(facts: MessageFacts, result: RecipientResult, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_dsn(facts, [result], ORIGINAL)
    with pytest.raises(ValueError, match="at least one recipient"):
        build_dsn(FACTS, [], ORIGINAL)


def test_smtputf8_recipient_in_an_ascii_report() -> None:
    """A UTF-8 address in a report to an ASCII sender: utf-8-addr-xtext, all ASCII."""
    result = failure(
        "jöe@bücher.example",
        orcpt="utf-8;jöe@bücher.example",
        diagnostic=Diagnostic(550, "5.1.1", "Benutzer unbekannt: jöe"),
    )
    data = build_dsn(FACTS, [result], ORIGINAL)
    assert data.isascii()
    report = parse(data)
    [_, joe] = status_blocks(data)
    assert joe["Final-Recipient"] == "utf-8; j\\x{F6}e@b\\x{FC}cher.example"
    assert joe["Original-Recipient"] == "utf-8; j\\x{F6}e@b\\x{FC}cher.example"
    assert joe["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: j\\x{F6}e"
    assert "<jöe@bücher.example>: delivery failed" in report.get_payload()[0].get_content()
    # flufl.bounce reports rfc822 addresses only: nothing for this one (and no crash).
    assert flufl.bounce.all_failures(email.message_from_bytes(data)) == (frozenset(), frozenset())


def test_report_to_a_utf8_sender_is_a_global_report() -> None:
    original = "From: Jöe <jöe@bücher.example>\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
    facts = MessageFacts("jöe@bücher.example", "mx.test", envid="ENV1")
    result = failure(
        "zoë@exämple.test",
        orcpt="utf-8;zoë@exämple.test",
        diagnostic=Diagnostic(550, "5.1.1", "unbekannt: zoë"),
    )
    data = build_dsn(facts, [result, failure("bob@x.test")], original)
    assert needs_8bitmime(data)
    report = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert report["To"] == "jöe@bücher.example"
    assert report.get_param("report-type") == "global-delivery-status"
    _, status, returned = report.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global"
    assert "zoë@exämple.test".encode() in data
    [per_message, zoe, bob] = status_blocks(data)
    assert per_message["Original-Envelope-Id"] == "ENV1"
    assert zoe["Final-Recipient"] == "utf-8; zoë@exämple.test"
    assert zoe["Diagnostic-Code"] == "smtp; 550 5.1.1 unbekannt: zoë"
    assert bob["Final-Recipient"] == "rfc822; bob@x.test"
    assert original in data  # returned unchanged
    # Headers only: message/global-headers.
    data = build_dsn(MessageFacts("jöe@bücher.example", "mx.test", ret="HDRS"), [result], original)
    assert (
        email.message_from_bytes(data).get_payload()[2].get_content_type()
        == "message/global-headers"
    )
    assert b"hallo" not in data


def test_8bit_original_keeps_its_bytes_in_an_ascii_report() -> None:
    original = "Subject: caf\u00e9\r\nX-Long: ".encode() + b"y" * 200 + b"\r\n\r\nbody \xe9\r\n"
    data = build_dsn(FACTS, [failure()], original)
    assert needs_8bitmime(data)
    assert original in data  # not refolded, not re-encoded
    assert b"Content-Transfer-Encoding: 8bit" in data


# --- odd addresses and texts ---------------------------------------------------------------


def _unescape(text: str) -> str:
    return re.sub(r"\\x\{([0-9A-F]{2,6})\}", lambda m: chr(int(m.group(1), 16)), text)


local_parts = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc", "Zl", "Zp", "Zs"),
        blacklist_characters='@<>\\"',
    ),
    min_size=1,
    max_size=40,
)
domains = st.from_regex(r"[a-zäöü0-9]{1,12}(\.[a-z0-9]{1,10}){1,3}", fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=600)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    local=local_parts,
    domain=domains,
    diagnostic=texts,
    envid=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100),
)
def test_odd_addresses_and_texts_survive(
    local: str, domain: str, diagnostic: str, envid: str
) -> None:
    address = f"{local}@{domain}"
    facts = MessageFacts("ann@example.com", "mx.test", envid=envid)
    result = failure(
        address, orcpt=f"rfc822;{address}", diagnostic=Diagnostic(554, "5.7.1", diagnostic)
    )
    data = build_dsn(facts, [result], ORIGINAL)
    # An ASCII report (the sender is ASCII) with sane lines, whatever the input.
    assert data.isascii()
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    per_message, block = status_blocks(data)
    assert per_message["Original-Envelope-Id"] == envid
    expected_type = "rfc822" if address.isascii() else "utf-8"
    final = block["Final-Recipient"]
    assert final.startswith(f"{expected_type}; ")
    decoded = final.split("; ", 1)[1]
    assert (_unescape(decoded) if expected_type == "utf-8" else decoded) == address
    assert decoded == (address if address.isascii() else utf8_addr_xtext(address))
    code = block["Diagnostic-Code"]
    assert code.startswith("smtp; 554 5.7.1")
    one_line = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", diagnostic).split())
    # Folding may cut a word longer than a line: compare without the spaces.
    assert _unescape(code[len("smtp; 554 5.7.1") :]).replace(" ", "") == one_line.replace(" ", "")
    # flufl.bounce reads addresses with parseaddr, which takes ":" "(" "," ... as syntax,
    # and reads a local part that starts with "=" (hypothesis found "=@0.0") as empty and
    # one that ends with "=" without it ("0=@0.0" as "0"): its own VERP-style reading.
    if re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._+=-]*[A-Za-z0-9._+-])?@[a-z0-9.]+", address):
        assert flufl.bounce.scan_message(email.message_from_bytes(data)) == {address.encode()}


@settings(max_examples=50, deadline=None)
@given(local=local_parts, domain=domains, diagnostic=texts)
def test_odd_addresses_in_a_global_report(local: str, domain: str, diagnostic: str) -> None:
    address = f"{local}@{domain}"
    result = failure(
        address, orcpt=f"utf-8;{address}", diagnostic=Diagnostic(550, None, diagnostic)
    )
    data = build_dsn(FACTS, [result], ORIGINAL, utf8=True)
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    _, block = status_blocks(data)
    address_type = "rfc822" if address.isascii() else "utf-8"
    assert block["Final-Recipient"] == f"{address_type}; {address}"
    assert block["Original-Recipient"] == f"utf-8; {address}"
    one_line = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", diagnostic).split())
    assert block["Diagnostic-Code"].replace(" ", "") == f"smtp; 550 {one_line}".replace(" ", "")


@settings(max_examples=150, deadline=None)
@given(
    local=st.text(
        st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), min_codepoint=0x21),
        min_size=1,
        max_size=30,
    ),
    domain=st.sampled_from(["x.test", "bücher.example"]),
)
def test_any_sender_is_a_to_header(local: str, domain: str) -> None:
    """The report's To is built from the sender's parts: local parts that look like header
    syntax (":;", quotes, dots) are quoted, not misread."""
    sender = f"{local}@{domain}"
    data = build_dsn(MessageFacts(sender, "mx.test"), [failure()], ORIGINAL)
    assert data.isascii() == sender.isascii()
    if sender.isascii():
        [address] = parse(data)["To"].addresses
        assert (address.username, address.domain) == (local, domain)
    else:
        # email does not decode UTF-8 header fields it parses from bytes: read the line.
        # The first To: is the report's (the returned original has one too).
        lines = data.decode("utf-8").split("\r\n")
        line = next(text for text in lines if text.startswith("To: "))
        assert _split_address(line[len("To: ") :]) == (local, domain)


def _split_address(text: str) -> tuple[str, str]:
    """local part (unquoted) and domain of an addr-spec."""
    match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"@(.*)', text)
    if match:
        return re.sub(r"\\(.)", r"\1", match.group(1)), match.group(2)
    local, _, domain = text.rpartition("@")
    return local, domain


def test_a_utf8_sender_needs_a_utf8_report() -> None:
    with pytest.raises(ValueError, match="UTF-8 address"):
        build_dsn(MessageFacts("jöe@x.test", "mx.test"), [failure()], ORIGINAL, utf8=False)
