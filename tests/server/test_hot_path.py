"""The server's fast paths (issue 14): hook chains that cannot wait run in the protocol
callback without a task, and what they must still do (order of replies, a chain that
waits after all handed to a task, timeouts inside hooks)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import os
import smtplib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailgate.hooks import Accept, Address, Envelope, HookError, Hooks, Reject, Session
from mailgate.hooks.registry import INLINE, NOTHING, WAITS
from mailgate.hooks.runner import never_waits
from mailgate.protocol import (
    NEED_DATA,
    Greeting,
    Persona,
    PolicyPoint,
    ProtocolConfig,
    Reply,
    ServerConnection,
)
from mailgate.server.connection import _resume
from mailgate.server.logs import BatchingStreamHandler, TextFormatter, flush_logs, lean_handler

from .harness import running_server


async def checks_only(session: Session, envelope: Envelope, address: Address) -> None:
    if address.local == "nobody":
        raise Reject(550, "no such user")


async def awaits(session: Session, envelope: Envelope, address: Address) -> None:
    await asyncio.sleep(0)


async def uses_async_with(lock: asyncio.Lock) -> None:
    async with lock:
        pass


async def uses_async_for(items: AsyncIterator[int]) -> list[int]:
    return [item async for item in items]


async def awaits_in_a_nested_function() -> Callable[[], Awaitable[None]]:
    async def inner() -> None:
        await asyncio.sleep(0)

    return inner


def plain(session: Session, envelope: Envelope, address: Address) -> None:
    return None


def waiting_wrapper(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def wrapper(*args: Any) -> Any:
        await asyncio.sleep(0)
        return await func(*args)

    return wrapper


class Relay:
    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> None:
        return None


def test_never_waits_tells_a_check_from_code_that_can_suspend() -> None:
    assert never_waits(checks_only)
    assert never_waits(Relay().on_rcpt)  # a bound method: its function's code
    assert not never_waits(awaits)
    assert not never_waits(uses_async_with)
    assert not never_waits(uses_async_for)
    assert not never_waits(awaits_in_a_nested_function)
    # A plain function may hand back a coroutine; a wrapper is judged by its own code.
    assert not never_waits(plain)
    assert not never_waits(waiting_wrapper(checks_only))
    assert not never_waits(functools.partial(checks_only))


def test_runs_inline_needs_every_required_step_to_never_wait() -> None:
    hooks = Hooks()
    assert hooks.runs_inline("rcpt")  # nothing to run
    hooks.on("rcpt", checks_only)
    assert hooks.runs_inline("rcpt")
    hooks.on("rcpt", awaits)
    assert not hooks.runs_inline("rcpt")

    with_middleware = Hooks()
    with_middleware.on("rcpt", checks_only)

    async def middleware(ctx: Any, call_next: Callable[[], Awaitable[Any]]) -> Any:
        return await call_next()

    with_middleware.use(middleware)
    assert not with_middleware.runs_inline("rcpt")  # middleware may wait

    background = Hooks()
    background.on("rcpt", checks_only)
    waits_in_background = Relay()
    waits_in_background.required = False  # type: ignore[attr-defined]
    waits_in_background.on_rcpt = awaits  # type: ignore[method-assign]
    background.add(waits_in_background, name="later")
    assert background.runs_inline("rcpt")  # the reply does not wait for that one


def _answers_of(hooks: Hooks, stage: str, *args: Any) -> tuple[Any, Any]:
    """The outcome of ``stage`` through run() (awaited) and through run_now()."""
    session = Session(
        id="S1", peer_host="192.0.2.7", peer_port=4321, local_host="127.0.0.1", local_port=25
    )
    awaited = asyncio.run(hooks.run(stage, session, *args))
    return awaited, hooks.run_now(stage, session, *args)


async def accepts_with_text(session: Session, envelope: Envelope, address: Address) -> Any:
    return Accept(text="fine by me")


async def returns_nonsense(session: Session, envelope: Envelope, address: Address) -> Any:
    return 42


async def breaks(session: Session, envelope: Envelope, address: Address) -> None:
    raise ValueError("a bug in a hook")


async def passes(session: Session, envelope: Envelope, address: Address) -> None:
    return None


@pytest.mark.parametrize(
    ("steps", "address", "code"),
    [
        ((passes,), "anyone@example.com", None),  # nobody decides: the protocol's reply
        ((checks_only,), "nobody@example.com", 550),  # a Reject raised by a step
        ((passes, checks_only), "nobody@example.com", 550),  # the second step decides
        ((accepts_with_text, checks_only), "nobody@example.com", 250),  # the first decides
        ((breaks, checks_only), "nobody@example.com", 451),  # a failing step: 4.3.0
        ((returns_nonsense,), "anyone@example.com", 451),  # a bad return value, too
    ],
)
def test_run_now_answers_what_run_answers(
    steps: tuple[Callable[..., Awaitable[Any]], ...],
    address: str,
    code: int | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()
    for step in steps:
        hooks.on("rcpt", step)
    assert hooks.runs_inline("rcpt")
    envelope = Envelope(Address("a@example.com"))
    awaited, now = _answers_of(hooks, "rcpt", envelope, Address(address))
    if code is None:
        assert awaited is None and now is None
        return
    assert type(awaited) is type(now)
    if isinstance(now, Accept):
        assert (awaited.code, awaited.text) == (now.code, now.text) == (None, "fine by me")
        return
    assert awaited.reply("rcpt") == now.reply("rcpt")
    assert now.reply("rcpt").code == code
    if code == 451:
        # Logged like any hook failure, with the step's name, for both ways of running.
        failures = [
            r for r in caplog.records if "hook" in r.getMessage() and "failed" in r.getMessage()
        ]
        assert len(failures) == 2
        assert failures[0].getMessage() == failures[1].getMessage()


def test_run_now_refuses_a_stage_that_can_wait_and_fails_a_step_that_waits() -> None:
    hooks = Hooks()
    hooks.on("rcpt", awaits)
    session = Session(
        id="S1", peer_host="192.0.2.7", peer_port=4321, local_host="127.0.0.1", local_port=25
    )
    args = (Envelope(Address("a@example.com")), Address("b@example.com"))
    with pytest.raises(HookError, match="only for a stage that runs inline"):
        hooks.run_now("rcpt", session, *args)
    # A step that waits although its code said it never would (a method replaced after
    # the chains were built) fails like any broken hook: 451, never a hang.
    sneaky = Relay()
    inline = Hooks()
    inline.add(sneaky, name="sneaky")
    assert inline.runs_inline("rcpt")
    chain = inline._chain("rcpt", required=True)
    object.__setattr__(chain[0], "call", awaits)
    outcome = inline.run_now("rcpt", session, *args)
    assert outcome is not None and outcome.reply("rcpt").code == 451


def test_a_chain_stepped_outside_a_task_hands_over_before_its_timeout() -> None:
    """The runner's guard: stepped by hand in a loop callback (no current task), as the
    server steps a chain it expects not to wait, a chain that waits yields once so the
    caller can move it into a task, where asyncio.timeout works; the outcome is the
    chain's own."""

    async def refuse_late(session: Session, envelope: Envelope, address: Address) -> None:
        await asyncio.sleep(0.01)
        raise Reject(550, "refused after a wait")

    hooks = Hooks(timeout=5.0)
    hooks.on("rcpt", refuse_late)
    session = Session(
        id="S1", peer_host="192.0.2.7", peer_port=4321, local_host="127.0.0.1", local_port=25
    )
    envelope = Envelope(Address("a@example.com"))
    results: list[Any] = []

    async def answer() -> None:
        results.append(await hooks.run("rcpt", session, envelope, Address("b@example.com")))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handed_over: asyncio.Future[asyncio.Task[None]] = loop.create_future()

        def callback() -> None:
            assert asyncio.current_task() is None
            coro = answer()
            first = coro.send(None)  # RuntimeError from asyncio.timeout without the guard
            assert first is None
            handed_over.set_result(loop.create_task(_resume(coro, first)))

        loop.call_soon(callback)
        await asyncio.wait_for(handed_over, 5)  # the callback failing would leave it unset
        await handed_over.result()

    asyncio.run(main())
    [outcome] = results
    assert isinstance(outcome, Reject)
    assert outcome.reply("rcpt").code == 550


def _session(port: int, commands: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        data = b""
        while not data.endswith(b"\r\n"):
            data += sock.recv(4096)
        sock.sendall(commands)
        while b"221 " not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_pipelined_commands_through_inline_and_waiting_hooks_keep_their_order(
    tmp_path: Path,
) -> None:
    hooks = Hooks()
    hooks.on("rcpt", checks_only)

    async def helo_waits(session: Session, domain: str) -> None:
        await asyncio.sleep(0.01)

    hooks.on("helo", helo_waits)
    with running_server(tmp_path, hooks) as server:
        port = server.port()
        data = _session(
            port,
            b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\nDATA\r\nSubject: x\r\n\r\nHi\r\n.\r\nQUIT\r\n",
        )
    codes = [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"550", b"250", b"354", b"250", b"221"]


# --- the protocol's caches: rendered replies, the look of a configuration ---------------------


def test_a_reply_renders_once_per_form_and_its_cache_is_not_part_of_its_value() -> None:
    reply = Reply(250, "2.0.0", ("first", "second"))
    assert reply.render() == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"
    assert reply.render(False) == b"250-first\r\n250 second\r\n"
    assert reply.render() is reply.render()  # kept
    twin = Reply(250, "2.0.0", ("first", "second"))
    assert twin == reply and hash(twin) == hash(reply)
    assert repr(twin) == "Reply(code=250, status='2.0.0', lines=('first', 'second'))"
    assert dataclasses.replace(reply, code=251).render(False) == b"251-first\r\n251 second\r\n"


def _banner(config: ProtocolConfig) -> bytes:
    conn = ServerConnection(config)
    assert isinstance(conn.next_event(), Greeting)
    conn.respond(None)
    return conn.data_to_send()


def test_a_banner_of_configuration_values_is_made_once_and_one_with_a_date_each_time() -> None:
    fixed = ProtocolConfig(hostname="mx.test")
    assert _banner(fixed) == _banner(fixed)
    assert _banner(fixed).startswith(b"220 mx.test ESMTP")

    ticks = iter(range(1, 100))

    def clock() -> datetime:
        return datetime(2026, 12, 6, 12, 0, next(ticks), tzinfo=UTC)

    dated = ProtocolConfig(
        hostname="mx.test", persona=Persona(banner="{hostname} ready {date}"), clock=clock
    )
    first, second = _banner(dated), _banner(dated)
    assert first.startswith(b"220 mx.test ready ") and first != second


def test_verbs_offered_to_some_clients_only_still_take_the_checks_of_the_client() -> None:
    config = ProtocolConfig(hostname="mx.test", xclient=True)
    for trusted, code in ((False, b"502"), (True, b"220")):
        conn = ServerConnection(config, peer_trusted=trusted)
        conn.next_event()
        conn.respond(None)
        conn.data_to_send()
        conn.receive_data(b"EHLO client.test\r\nXCLIENT ADDR=192.0.2.1\r\n")
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, PolicyPoint):
                conn.respond(None)
        assert conn.data_to_send().split(b"\r\n")[-2][:3] == code


def test_mode_is_has_and_runs_inline_in_one_answer() -> None:
    hooks = Hooks()
    assert hooks.mode("rcpt") == NOTHING and not hooks.has("rcpt")
    hooks.on("rcpt", checks_only, name="checks")
    assert hooks.mode("rcpt") == INLINE and hooks.runs_inline("rcpt")
    assert hooks.mode("mail") == NOTHING
    hooks.on("rcpt", awaits, name="waits")
    assert hooks.mode("rcpt") == WAITS and not hooks.runs_inline("rcpt")
    hooks.remove("waits")
    assert hooks.mode("rcpt") == INLINE

    async def middleware(ctx: Any, call_next: Callable[[], Awaitable[Any]]) -> Any:
        return await call_next()

    # Middleware may wait, around every stage: added after the chains were built, it is
    # seen at once, and run_now() refuses a stage it wraps.
    hooks.use(middleware)
    assert hooks.mode("rcpt") == WAITS and hooks.mode("mail") == WAITS
    session = Session(
        id="S1", peer_host="192.0.2.7", peer_port=4321, local_host="127.0.0.1", local_port=25
    )
    with pytest.raises(HookError):
        hooks.run_now("rcpt", session, Envelope(), Address("a@example.com"))


def _send_the_two_messages(port: int) -> list[str]:
    """A lone recipient and twelve (ten named, the rest counted), client text to escape:
    the recipients of the second message."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.test")
        client.sendmail(
            "a\u00a0b@example.org", ["x\u00a0y@example.com"], b"\r\nhi\r\n", ["SMTPUTF8"]
        )
        many = [f"r{n}@example.com" for n in range(12)]
        client.sendmail("", many, b"\r\nhi\r\n")
    return many


def _expected_lines(many: list[str]) -> list[str]:
    return [
        r"from=<a\xa0b@example.org> to=<x\xa0y@example.com> size=6 client=127.0.0.1",
        "from=<> to=" + ",".join(f"<{r}>" for r in many[:10]) + " (+2) size=6 client=127.0.0.1",
    ]


def test_the_message_line_names_recipients_and_escapes_what_is_not_printable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line of a message answered inline (sink, no hooks), written without a call per
    address, as an ordinary record (caplog sees it): its text and its fields."""
    caplog.set_level(logging.INFO, "mailgate.session")
    with running_server(
        tmp_path, log_level="INFO", delivery="sink", local_domains=("example.com",)
    ) as srv:
        many = _send_the_two_messages(srv.port())
        srv.call(lambda: None)
    lines = [r for r in caplog.records if " accepted from=" in r.getMessage()]
    assert [r.getMessage().split(" accepted ")[1] for r in lines] == _expected_lines(many)
    # The fields carry the addresses as given.
    assert lines[0].sender == "a\u00a0b@example.org"  # type: ignore[attr-defined]
    assert lines[0].recipients == ["x\u00a0y@example.com"]  # type: ignore[attr-defined]
    assert lines[1].recipients == many[:10] and lines[1].rcpt_count == 12  # type: ignore[attr-defined]


def test_the_message_line_written_directly_is_the_same_text(tmp_path: Path) -> None:
    """With the command line's handler alone above it, the message line is written without
    a record, from the text the driver made itself (not by %-formatting): the same text."""
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=60)
    handler.setFormatter(TextFormatter())
    top = logging.getLogger("mailgate")
    saved = top.handlers[:], top.propagate, top.level
    top.handlers[:] = [handler]
    top.propagate = False
    top.setLevel(logging.INFO)
    try:
        with running_server(
            tmp_path, log_level="INFO", delivery="sink", local_domains=("example.com",)
        ) as srv:
            assert lean_handler(logging.getLogger("mailgate.session"), logging.INFO) is handler
            many = _send_the_two_messages(srv.port())
            srv.call(lambda: None)
        flush_logs()
    finally:
        top.handlers[:], top.propagate = saved[0], saved[1]
        top.setLevel(saved[2])
        handler.close()
    lines = [line for line in stream.getvalue().splitlines() if " accepted from=" in line]
    assert [line.split(" accepted ")[1] for line in lines] == _expected_lines(many)
    assert all(f" INFO [{os.getpid()}] mailgate.session: session " in line for line in lines)


def test_address_from_wire_as_a_function_is_the_classmethod() -> None:
    from mailgate.hooks.session import address_from_wire
    from mailgate.protocol.address import Address as WireAddress

    wire = WireAddress("Bob.Smith", "Example.COM")
    for args in [
        (wire, {"NOTIFY": "SUCCESS", "ORCPT": None}, "<Bob.Smith@Example.COM>"),
        (wire, None, ""),
        (None, {"SIZE": "100"}, "<>"),
    ]:
        made, classmethod_made = address_from_wire(*args), Address.from_wire(*args)
        assert type(made) is Address and made == classmethod_made
        for name in ("local", "domain", "params", "written"):
            assert getattr(made, name) == getattr(classmethod_made, name), name
    assert address_from_wire(wire).local == "Bob.Smith" and not address_from_wire(None)
