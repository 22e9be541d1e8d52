"""mailgate.hooks without sockets: results, chains, ordering, middleware, errors, and the
objects hooks see (Address, Envelope, AuthAttempt, Message, Session)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from mailgate.hooks import (
    STAGES,
    Accept,
    Address,
    AuthAttempt,
    Envelope,
    HookContext,
    HookError,
    Hooks,
    Message,
    MessageTooLarge,
    Middleware,
    Outcome,
    PerRecipient,
    Reject,
    Session,
    TempFail,
    default_status,
)
from mailgate.protocol import Address as WireAddress
from mailgate.protocol import AuthCredentials, Reply
from mailgate.protocol.sasl import cram_md5_matches


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def session(sid: str = "S1") -> Session:
    return Session(
        id=sid, peer_host="192.0.2.7", peer_port=4321, local_host="127.0.0.1", local_port=25
    )


class Recorder:
    """A plugin that records each call and returns a fixed result at one stage."""

    def __init__(self, name: str, log: list[str], result: Any = None) -> None:
        self.name = name
        self.log = log
        self.result = result

    async def on_rcpt(self, session: Session, envelope: Envelope, address: Address) -> Any:
        self.log.append(self.name)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def rcpt(hooks: Hooks, address: str = "b@example.com", sid: str = "S1") -> Outcome:
    result: Outcome = run(hooks.run("rcpt", session(sid), Envelope(), Address(address)))
    return result


# --- results ---------------------------------------------------------------------------------


def test_reject_positional_arguments_in_either_order() -> None:
    assert (Reject(553, "x").code, Reject(553, "x").text) == (553, "x")
    assert (Reject("x", 553).code, Reject("x", 553).text) == (553, "x")
    only_text = Reject("go away")
    assert (only_text.code, only_text.text, only_text.enhanced) == (550, "go away", None)
    default = Reject()
    assert (default.code, default.text, default.disconnect) == (550, "Rejected", False)
    keywords = Reject(code=554, text="no", enhanced="5.7.1", disconnect=True)
    assert (keywords.code, keywords.text, keywords.enhanced, keywords.disconnect) == (
        554,
        "no",
        "5.7.1",
        True,
    )
    assert Reject(550, status="5.1.1").enhanced == "5.1.1"  # the older spelling
    assert str(Reject(550, "shown")) == "shown"
    assert isinstance(Reject(), Exception)


def test_tempfail_defaults() -> None:
    fail = TempFail()
    assert (fail.code, fail.text) == (451, "Temporary failure, try again later")
    assert fail.reply("rcpt") == Reply(451, "4.3.0", ("Temporary failure, try again later",))
    assert TempFail(450, "busy").reply("rcpt") == Reply(450, "4.2.1", ("busy",))
    assert TempFail("later").code == 451


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: Reject(451), "5xx"),
        (lambda: Reject(600), "5xx"),
        (lambda: TempFail(550), "4xx"),
        (lambda: Reject(550, "x", 551), "unexpected argument"),
        (lambda: Reject(True), "unexpected argument"),
        (lambda: Reject(b"bytes"), "unexpected argument"),  # type: ignore[arg-type]
        (lambda: Reject(550, enhanced="4.1.1"), "does not match"),
        (lambda: TempFail(451, enhanced="5.3.0"), "does not match"),
        (lambda: Accept(code=550), "2xx or 3xx"),
        (lambda: Accept(code=199), "2xx or 3xx"),
    ],
)
def test_bad_results_are_refused_when_made(make: Callable[[], object], problem: str) -> None:
    with pytest.raises(HookError, match=problem):
        make()


@pytest.mark.parametrize(
    ("stage", "code", "status"),
    [
        ("rcpt", 550, "5.7.1"),
        ("mail", 550, "5.7.1"),
        ("helo", 550, "5.7.1"),
        ("connect", 554, "5.7.1"),
        ("data_start", 554, "5.7.1"),
        ("message", 550, "5.7.1"),
        ("auth", 535, "5.7.8"),
        ("auth", 550, "5.7.8"),
        ("rcpt", 553, "5.1.3"),
        ("message", 552, "5.3.4"),
        ("rcpt", 451, "4.3.0"),
        ("rcpt", 450, "4.2.1"),
        ("rcpt", 452, "4.3.1"),
        ("connect", 421, "4.3.2"),
        ("helo", 454, "4.7.0"),
        ("rcpt", 453, "4.7.1"),
        ("mail", 551, "5.7.1"),
        ("close", 550, "5.0.0"),
        (None, 450, "4.2.1"),
        (None, 555, "5.0.0"),
    ],
)
def test_default_status(stage: str | None, code: int, status: str) -> None:
    assert default_status(stage, code) == status


def test_refusal_reply_fills_in_or_keeps_the_enhanced_code() -> None:
    assert Reject(550, "x").reply("rcpt") == Reply(550, "5.7.1", ("x",))
    assert Reject(550, "x", enhanced="5.1.1").reply("rcpt") == Reply(550, "5.1.1", ("x",))
    assert Reject("x").reply(None) == Reply(550, "5.0.0", ("x",))
    assert Reject(550, "one\ntwo").reply("mail").lines == ("one", "two")


def test_refusal_text_with_crlf_still_makes_a_sendable_reply() -> None:
    # Text from elsewhere (an exception, a file) may carry CRLF; the reply must not break.
    assert Reject(550, "one\r\ntwo").reply("rcpt").lines == ("one", "two")
    assert TempFail(451, "trailing\r\n").reply("rcpt").lines == ("trailing",)


def test_accept_is_a_frozen_value() -> None:
    accept = Accept(251, "forwarding")
    assert (accept.code, accept.text) == (251, "forwarding")
    assert Accept() == Accept()
    with pytest.raises(dataclasses.FrozenInstanceError):
        accept.code = 250  # type: ignore[misc]


# --- the objects hooks see ---------------------------------------------------------------------


def test_address_parts_params_and_str_behaviour() -> None:
    address = Address("Alice@Example.COM", {"NOTIFY": "SUCCESS", "SMTPUTF8": None})
    assert address == "Alice@Example.COM"
    assert isinstance(address, str)
    assert (address.local, address.domain) == ("Alice", "Example.COM")
    assert dict(address.params) == {"NOTIFY": "SUCCESS", "SMTPUTF8": None}
    with pytest.raises(TypeError):
        address.params["X"] = "y"  # type: ignore[index]
    assert address.lower() == "alice@example.com"
    by_text: dict[str, int] = {address: 1}
    assert by_text["Alice@Example.COM"] == 1
    assert "params=" in repr(address)


def test_address_quoted_local_part_bare_name_and_null_path() -> None:
    quoted = Address('"a@b"@example.com')
    assert (quoted.local, quoted.domain) == ('"a@b"', "example.com")
    postmaster = Address("Postmaster")
    assert (postmaster.local, postmaster.domain) == ("Postmaster", "")
    null = Address("")
    assert not null
    assert (null.local, null.domain, dict(null.params)) == ("", "", {})


def test_address_from_wire_and_pickle() -> None:
    wire = WireAddress("user", "example.org")
    address = Address.from_wire(wire, {"ORCPT": "rfc822;user@example.org"})
    assert address == "user@example.org"
    assert (address.local, address.domain) == ("user", "example.org")
    assert address.params["ORCPT"] == "rfc822;user@example.org"
    null = Address.from_wire(None, {"BODY": "8BITMIME"})
    assert null == "" and null.params["BODY"] == "8BITMIME"
    copy = pickle.loads(pickle.dumps(address))
    assert copy == address and type(copy) is Address
    assert (copy.local, copy.domain, dict(copy.params)) == (
        "user",
        "example.org",
        {"ORCPT": "rfc822;user@example.org"},
    )
    assert address.written == ""  # not known
    routed = Address.from_wire(wire, None, "<@relay.example:user@example.org>")
    assert routed == "user@example.org"
    assert pickle.loads(pickle.dumps(routed)).written == "<@relay.example:user@example.org>"


def test_envelope_is_read_only_and_grows_only_by_copy() -> None:
    sender = Address("a@example.com", {"BODY": "8BITMIME", "SIZE": "100", "SMTPUTF8": None})
    envelope = Envelope(sender)
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.mail_from = Address("evil@example.com")  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.rcpt_tos = (Address("x@example.com"),)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        envelope.rcpt_tos.append(Address("x@example.com"))  # type: ignore[attr-defined]
    grown = envelope.with_recipient(Address("b@example.com"))
    assert envelope.rcpt_tos == () and grown.rcpt_tos == ("b@example.com",)
    assert grown.mail_from is sender
    assert (envelope.sender, envelope.body, envelope.smtputf8) == (
        "a@example.com",
        "8BITMIME",
        True,
    )
    assert envelope.mail_params["SIZE"] == "100"


def test_envelope_before_mail_and_with_null_sender() -> None:
    empty = Envelope()
    assert (empty.mail_from, empty.sender, dict(empty.mail_params)) == (None, "", {})
    assert (empty.body, empty.smtputf8) == ("7BIT", False)
    bounce = Envelope(Address(""))
    assert bounce.mail_from == "" and bounce.mail_from is not None
    assert bounce.sender == ""


def test_session_defaults_and_properties() -> None:
    s = session()
    assert s.peer == ("192.0.2.7", 4321)
    assert not s.authenticated and s.user is None and s.tls is None
    assert (s.transactions, s.messages, s.auth_failures, s.notes) == (0, 0, 0, {})
    s.user = "alice"
    assert s.authenticated
    assert session().notes is not session().notes


def test_auth_attempt_verify_plain_and_login() -> None:
    attempt = AuthAttempt("PLAIN", "alice", password="sécret")
    assert attempt.mechanism == "PLAIN"
    assert attempt.verify("sécret")
    assert not attempt.verify("secret")
    assert not attempt.verify("")
    # An attempt that ends up in a log line must not carry the secret with it.
    assert "sécret" not in repr(attempt)
    assert "ya29" not in repr(AuthAttempt("XOAUTH2", "u", token="ya29.secret"))
    assert not AuthAttempt("LOGIN", "bob").verify("anything")


def test_auth_attempt_verify_cram_md5_and_xoauth2() -> None:
    import hashlib
    import hmac

    challenge = b"<1234.5678@mx.test>"
    digest = hmac.new(b"tanstaaftanstaaf", challenge, hashlib.md5).hexdigest()
    assert cram_md5_matches(challenge, digest, "tanstaaftanstaaf")
    credentials = AuthCredentials("CRAM-MD5", None, "tim", challenge=challenge, digest=digest)
    attempt = AuthAttempt.from_credentials(credentials)
    assert (attempt.method, attempt.username, attempt.password) == ("CRAM-MD5", "tim", None)
    assert attempt.verify("tanstaaftanstaaf")
    assert not attempt.verify("wrong")
    # Made by hand, without the challenge, CRAM-MD5 can prove nothing.
    assert not AuthAttempt("CRAM-MD5", "tim").verify("tanstaaftanstaaf")
    oauth = AuthAttempt.from_credentials(
        AuthCredentials("XOAUTH2", None, "u@example.com", token="ya29.token")
    )
    assert oauth.token == "ya29.token"
    assert not oauth.verify("ya29.token")


def make_message(tmp_path: Path, data: bytes, synced: list[int] | None = None) -> Message:
    path = tmp_path / "spooled"
    path.write_bytes(data)
    envelope = Envelope(Address("a@example.com"), (Address("b@example.com"),))
    return Message(
        id="Q1",
        session=session(),
        envelope=envelope,
        size=len(data),
        path=path,
        received_at=time.time(),
        _sync=(lambda: synced.append(1)) if synced is not None else None,
    )


MIME = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody\r\n"
)


def test_message_read_limit_chunks_and_email(tmp_path: Path) -> None:
    big = MIME + b"x" * (600 * 1024) + b"\r\n"
    message = make_message(tmp_path, big)
    assert (message.mail_from, message.rcpt_tos) == ("a@example.com", ("b@example.com",))

    async def use() -> tuple[bytes, list[bytes]]:
        data = await message.read()
        with pytest.raises(MessageTooLarge, match="more than read"):
            await message.read(limit=1000)
        assert await message.read(limit=None) == data
        assert await message.read(limit=len(big)) == data
        return data, [chunk async for chunk in message]

    data, chunks = run(use())
    assert data == big == b"".join(chunks)
    assert len(chunks) >= 3  # streamed, not loaded whole
    assert message.read_bytes() == big
    with message.open() as f:
        assert f.read(4) == b"From"
    parsed = message.as_email()
    assert parsed["Subject"] == "café"
    assert parsed.get_content().startswith("body")


def test_message_too_large_is_a_hook_error() -> None:
    assert issubclass(MessageTooLarge, HookError)


def test_message_sync_and_no_spool(tmp_path: Path) -> None:
    synced: list[int] = []
    message = make_message(tmp_path, MIME, synced)
    assert message.sync() is True
    assert message.sync() is True
    assert synced == [1, 1]
    bare = dataclasses.replace(message, path=None, _sync=None)
    assert bare.sync() is False  # nothing to sync: no error, and the caller is told
    with pytest.raises(HookError, match="sink"):
        bare.open()
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.size = 1  # type: ignore[misc]


# --- registration and ordering ---------------------------------------------------------------


def test_registration_order_breaks_ties() -> None:
    hooks = Hooks()
    calls: list[str] = []
    for name in ("a", "b", "c"):
        hooks.add(Recorder(name, calls))
    assert hooks.names() == ["a", "b", "c"]
    assert rcpt(hooks) is None
    assert calls == ["a", "b", "c"]


def test_before_and_after_order_the_chain() -> None:
    hooks = Hooks()
    calls: list[str] = []
    hooks.add(Recorder("deliver", calls))
    hooks.add(Recorder("first", calls), before="deliver")
    hooks.add(Recorder("last", calls), after=("deliver", "first"))
    hooks.add(Recorder("middle", calls), after="first", before=["deliver"])
    assert hooks.names() == ["first", "middle", "deliver", "last"]
    rcpt(hooks)
    assert calls == ["first", "middle", "deliver", "last"]
    assert [p.name for p in hooks.plugins()] == hooks.names()
    assert [p.name for p in hooks] == hooks.names()


def test_order_may_name_a_plugin_added_later() -> None:
    hooks = Hooks()
    hooks.add(Recorder("late-runner", []), after="spf")
    hooks.add(Recorder("spf", []))
    assert hooks.names() == ["spf", "late-runner"]
    hooks.check()


def test_cycle_is_refused_at_add_and_leaves_the_hooks_unchanged() -> None:
    hooks = Hooks()
    hooks.add(Recorder("a", []), before="b")
    hooks.add(Recorder("b", []), before="c")
    with pytest.raises(HookError, match="cycle") as info:
        hooks.add(Recorder("c", []), before="a")
    assert "a" in str(info.value) and "c" in str(info.value)
    assert hooks.names() == ["a", "b"]
    hooks.add(Recorder("c", []))  # the name is free again
    assert hooks.names() == ["a", "b", "c"]


def test_self_cycle_is_refused() -> None:
    with pytest.raises(HookError, match="cycle"):
        Hooks().add(Recorder("me", []), after="me")


def test_unknown_order_name_is_an_error_at_check() -> None:
    hooks = Hooks()
    hooks.add(Recorder("a", []), after="dkim")
    assert hooks.names() == ["a"]  # tolerated while plugins are still being added
    with pytest.raises(HookError, match="'a' is ordered after 'dkim', which is not registered"):
        hooks.check()


def test_bad_registrations() -> None:
    hooks = Hooks()
    hooks.add(Recorder("a", []))
    with pytest.raises(HookError, match="already registered"):
        hooks.add(Recorder("a", []))
    with pytest.raises(HookError, match="no stage method"):
        hooks.add(object(), name="nothing")
    with pytest.raises(HookError, match="unknown stage 'rcpt_to'"):
        hooks.on("rcpt_to", lambda *a: None)
    with pytest.raises(HookError, match="must be callable"):
        hooks.on("rcpt", "not a function")  # type: ignore[arg-type]
    with pytest.raises(HookError, match="no plugin named"):
        hooks.remove("zzz")
    with pytest.raises(HookError, match="middleware"):
        hooks.use("not callable")  # type: ignore[arg-type]


def test_plugins_without_a_name_get_one_and_remove_works() -> None:
    class Anonymous:
        async def on_helo(self, session: Session, hostname: str) -> None:
            return None

    hooks = Hooks()
    plugin = Anonymous()
    assert hooks.add(plugin) is plugin
    (name,) = hooks.names()
    assert name.startswith("plugin-")
    assert hooks.has_steps("helo") and not hooks.has_steps("rcpt")
    hooks.remove(name)
    assert hooks.names() == [] and not hooks.has("helo")


def test_callbacks_are_one_step_plugins() -> None:
    hooks = Hooks()

    def sync_rcpt(session: Session, envelope: Envelope, address: Address) -> None:
        return None

    assert hooks.on("rcpt", sync_rcpt) is sync_rcpt
    hooks.on("rcpt", sync_rcpt, name="again", before="rcpt:" + sync_rcpt.__qualname__)
    assert hooks.names() == ["again", "rcpt:" + sync_rcpt.__qualname__]
    assert hooks.has("rcpt") and hooks.has_steps("rcpt")
    assert not hooks.has("mail") and not hooks.has_steps("mail")


def test_callback_attributes_required_and_mechanisms_carry_over() -> None:
    hooks = Hooks()

    async def later(session: Session, envelope: Envelope, message: Message) -> None:
        return None

    later.required = False  # type: ignore[attr-defined]

    async def check(session: Session, auth: AuthAttempt) -> bool:
        return True

    check.auth_mechanisms = ("CRAM-MD5",)  # type: ignore[attr-defined]
    hooks.on("message", later)
    hooks.on("auth", check)
    assert [s.plugin for s in hooks.background_steps("message")] == [
        "message:" + later.__qualname__
    ]
    auth_plugin = hooks.plugins()[1]
    assert auth_plugin.auth_mechanisms == ("CRAM-MD5",)
    # A background step is not part of the chain that decides the reply.
    assert run(hooks.run("message", session(), Envelope(), None)) is None


def test_middleware_alone_counts_for_has_but_not_has_steps() -> None:
    hooks = Hooks()

    async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        return await call_next()

    hooks.use(mw)
    assert hooks.has("rcpt") and not hooks.has_steps("rcpt")
    assert rcpt(hooks) is None


# --- running a chain -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (None, None),
        (True, Accept()),
        (Accept(text="fine"), Accept(text="fine")),
        (Reply(252, "2.1.5", ("exact",)), Reply(252, "2.1.5", ("exact",))),
    ],
)
def test_results_returned(result: Any, expected: Any) -> None:
    hooks = Hooks()
    hooks.add(Recorder("p", [], result))
    assert rcpt(hooks) == expected


def test_false_is_the_stage_default_refusal() -> None:
    hooks = Hooks()
    hooks.add(Recorder("p", [], False))
    outcome = rcpt(hooks)
    assert isinstance(outcome, Reject)
    assert outcome.reply("rcpt") == Reply(550, "5.7.1", ("Rejected",))

    auth = Hooks()
    auth.on("auth", lambda s, a: False)
    outcome = run(auth.run("auth", session(), AuthAttempt("PLAIN", "u", "p")))
    assert isinstance(outcome, Reject)
    assert outcome.reply("auth") == Reply(535, "5.7.8", ("Authentication credentials invalid",))


def test_refusals_raised_or_returned_are_the_outcome() -> None:
    raised = Hooks()
    raised.add(Recorder("p", [], Reject(550, "no such user", enhanced="5.1.1")))
    outcome = rcpt(raised)
    assert isinstance(outcome, Reject) and outcome.enhanced == "5.1.1"
    returned = Hooks()
    returned.on("rcpt", lambda s, e, a: TempFail("greylisted"))
    outcome = rcpt(returned)
    assert isinstance(outcome, TempFail) and outcome.text == "greylisted"


@pytest.mark.parametrize("decision", [True, Accept(), Reject("no"), False, Reply(250)])
def test_a_decision_ends_the_chain(decision: Any) -> None:
    hooks = Hooks()
    calls: list[str] = []
    hooks.add(Recorder("first", calls))
    hooks.add(Recorder("decides", calls, decision))
    hooks.add(Recorder("never", calls))
    assert rcpt(hooks) is not None
    assert calls == ["first", "decides"]


def test_sync_steps_and_sync_steps_that_return_a_coroutine() -> None:
    hooks = Hooks()
    seen: list[tuple[str, str]] = []

    def plain(session: Session, envelope: Envelope, address: Address) -> None:
        seen.append(("plain", address.domain))

    async def later(address: Address) -> Reject:
        return Reject(550, f"no {address.local}")

    def returns_coroutine(s: Session, e: Envelope, address: Address) -> Awaitable[Any]:
        seen.append(("coroutine", address.local))
        return later(address)

    hooks.on("rcpt", plain)
    hooks.on("rcpt", returns_coroutine)
    outcome = rcpt(hooks, "bob@example.net")
    assert isinstance(outcome, Reject) and outcome.text == "no bob"
    assert seen == [("plain", "example.net"), ("coroutine", "bob")]


def test_callable_object_as_a_step() -> None:
    class Checker:
        async def __call__(self, s: Session, e: Envelope, a: Address) -> bool:
            return a.domain == "example.com"

    hooks = Hooks()
    hooks.on("rcpt", Checker(), name="checker")
    assert rcpt(hooks, "x@example.com") == Accept()
    assert isinstance(rcpt(hooks, "x@elsewhere.test"), Reject)


def test_steps_get_the_stage_arguments() -> None:
    hooks = Hooks()
    got: dict[str, tuple[Any, ...]] = {}

    class All:
        name = "all"

        def __getattr__(self, attribute: str) -> Any:
            if not attribute.startswith("on_") or attribute[3:] not in STAGES:
                raise AttributeError(attribute)

            async def step(*args: Any) -> None:
                got[attribute[3:]] = args

            return step

    hooks.add(All())
    s = session()
    envelope = Envelope(Address("a@example.com"))
    address = Address("b@example.com")
    attempt = AuthAttempt("PLAIN", "u", "p")

    async def every_stage() -> None:
        await hooks.run("connect", s)
        await hooks.run("tls", s)
        await hooks.run("helo", s, "client.test")
        await hooks.run("auth", s, attempt)
        await hooks.run("mail", s, envelope, envelope.mail_from)
        await hooks.run("rcpt", s, envelope, address)
        await hooks.run("vrfy", s, "root", False)
        await hooks.run("data_start", s, envelope)
        await hooks.run("reset", s, envelope)
        await hooks.run("close", s)

    run(every_stage())
    assert got == {
        "connect": (s,),
        "tls": (s,),
        "helo": (s, "client.test"),
        "auth": (s, attempt),
        "mail": (s, envelope, "a@example.com"),
        "rcpt": (s, envelope, address),
        "vrfy": (s, "root", False),
        "data_start": (s, envelope),
        "reset": (s, envelope),
        "close": (s,),
    }


def test_notes_are_shared_by_the_steps_of_a_session() -> None:
    hooks = Hooks()

    def count(s: Session, *args: Any) -> None:
        s.notes["seen"] = s.notes.get("seen", 0) + 1

    hooks.on("helo", count)
    hooks.on("rcpt", count)
    one, other = session("A"), session("B")

    async def go() -> None:
        await hooks.run("helo", one, "c.test")
        await hooks.run("rcpt", one, Envelope(), Address("b@example.com"))
        await hooks.run("helo", other, "c.test")

    run(go())
    assert one.notes == {"seen": 2}
    assert other.notes == {"seen": 1}


# --- errors and timeouts -----------------------------------------------------------------------


def is_hook_failure(outcome: Outcome) -> bool:
    return isinstance(outcome, TempFail) and outcome.reply("rcpt") == Reply(
        451, "4.3.0", ("Local error in processing, try again later",)
    )


def test_bad_return_value_is_451_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks()
    hooks.add(Recorder("answers-42", [], 42))
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert is_hook_failure(rcpt(hooks, sid="SESS42"))
    (record,) = caplog.records
    text = record.getMessage()
    assert "session SESS42" in text and "answers-42" in text and "rcpt" in text
    assert "returned 42" in record.exc_text  # type: ignore[operator]


def test_a_list_outside_the_message_stage_is_a_bad_result() -> None:
    hooks = Hooks()
    hooks.add(Recorder("lister", [], [None]))
    assert is_hook_failure(rcpt(hooks))


def test_message_stage_list_and_dict_become_per_recipient() -> None:
    hooks = Hooks()
    hooks.on("message", lambda s, e, m: [None, Reject("no")])
    outcome = run(hooks.run("message", session(), Envelope(), None))
    assert isinstance(outcome, PerRecipient) and len(outcome.answers) == 2
    by_address = Hooks()
    by_address.on("message", lambda s, e, m: {"b@example.com": False})
    outcome = run(by_address.run("message", session(), Envelope(), None))
    assert outcome == PerRecipient({"b@example.com": False})


def test_exception_is_451_logged_with_session_and_plugin(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks()
    calls: list[str] = []
    hooks.add(Recorder("broken", calls, KeyError("boom")))
    hooks.add(Recorder("after", calls))
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert is_hook_failure(rcpt(hooks, sid="SESSX"))
    assert calls == ["broken"]
    (record,) = caplog.records
    assert "session SESSX: rcpt hook broken failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_hook_error_from_message_read_limit_is_451(tmp_path: Path) -> None:
    hooks = Hooks()

    async def greedy(s: Session, e: Envelope, m: Message) -> None:
        await m.read(limit=10)

    hooks.on("message", greedy)
    message = make_message(tmp_path, MIME)
    outcome = run(hooks.run("message", session(), message.envelope, message))
    assert is_hook_failure(outcome)


def test_timeout_is_451_logged_and_cancels_the_step(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks(timeout=0.05)
    cancelled: list[bool] = []

    async def slow(s: Session, e: Envelope, a: Address) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    hooks.on("rcpt", slow, name="slowpoke")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert is_hook_failure(rcpt(hooks, sid="SLOW1"))
    assert time.monotonic() - started < 2
    assert cancelled == [True]
    assert "session SLOW1: rcpt hook slowpoke took longer than" in caplog.text


def test_message_stage_has_its_own_timeout() -> None:
    hooks = Hooks(timeout=0.01, message_timeout=5)

    async def takes_a_moment(s: Session, e: Envelope, m: Any) -> bool:
        await asyncio.sleep(0.05)
        return True

    hooks.on("message", takes_a_moment)
    hooks.on("rcpt", takes_a_moment)
    assert run(hooks.run("message", session(), Envelope(), None)) == Accept()
    assert is_hook_failure(rcpt(hooks))
    unbounded = Hooks(timeout=None)
    unbounded.on("rcpt", takes_a_moment)
    assert rcpt(unbounded) == Accept()


def test_notifications_ignore_results_and_run_every_step(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks()
    calls: list[str] = []

    def refuses(s: Session, e: Envelope) -> None:
        calls.append("refuses")
        raise Reject("ignored")

    def answers(s: Session, e: Envelope) -> int:
        calls.append("answers")
        return 42

    def breaks(s: Session, e: Envelope) -> None:
        calls.append("breaks")
        raise RuntimeError("cleanup failed")

    def last(s: Session, e: Envelope) -> None:
        calls.append("last")

    for step in (refuses, answers, breaks, last):
        hooks.on("reset", step)
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert run(hooks.run("reset", session("N1"), Envelope())) is None
    # One plugin's failing clean-up does not skip the others'.
    assert calls == ["refuses", "answers", "breaks", "last"]
    assert "session N1: reset hook reset:" in caplog.text and "breaks" in caplog.text


# --- middleware ------------------------------------------------------------------------------


def test_middleware_wraps_first_added_outermost() -> None:
    hooks = Hooks()
    trace: list[str] = []

    def make(label: str) -> Middleware:
        async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
            trace.append(f"{label}>")
            result = await call_next()
            trace.append(f"<{label}")
            return result

        return mw

    hooks.use(make("outer"))
    hooks.use(make("inner"))
    hooks.on("rcpt", lambda s, e, a: trace.append("step"))
    assert rcpt(hooks) is None
    assert trace == ["outer>", "inner>", "step", "<inner", "<outer"]


def test_middleware_sees_stage_args_and_deciding_step() -> None:
    hooks = Hooks()
    seen: list[tuple[str, str | None, str | None, int]] = []

    async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        before = ctx.step
        result = await call_next()
        seen.append((ctx.stage, before, ctx.step, len(ctx.args)))
        assert ctx.session.id == "MW"
        return result

    hooks.use(mw)
    hooks.add(Recorder("passes", []))
    hooks.add(Recorder("rejects", [], Reject("no")))
    outcome = run(hooks.run("rcpt", session("MW"), Envelope(), Address("b@example.com")))
    assert isinstance(outcome, Reject)
    run(hooks.run("helo", session("MW"), "c.test"))
    assert seen == [("rcpt", None, "rejects", 2), ("helo", None, None, 1)]


def test_middleware_can_short_circuit_and_replace_results() -> None:
    hooks = Hooks()
    calls: list[str] = []
    hooks.add(Recorder("never", calls))

    async def blocker(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        if ctx.stage == "rcpt":
            return Reject(550, "blocked by middleware")
        return await call_next()

    hooks.use(blocker)
    outcome = rcpt(hooks)
    assert isinstance(outcome, Reject) and outcome.text == "blocked by middleware"
    assert calls == []

    raising = Hooks()
    raising.add(Recorder("never", calls))

    async def raiser(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        raise TempFail("slow down")

    raising.use(raiser)
    outcome = rcpt(raising)
    assert isinstance(outcome, TempFail) and outcome.text == "slow down"

    accepting = Hooks()
    accepting.add(Recorder("rejects", calls, Reject("no")))

    async def overrule(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        await call_next()
        return True

    accepting.use(overrule)
    assert rcpt(accepting) == Accept()
    assert calls == ["rejects"]


def test_middleware_failures_are_451(caplog: pytest.LogCaptureFixture) -> None:
    broken = Hooks()

    async def crash(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        raise ValueError("middleware bug")

    broken.use(crash)
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert is_hook_failure(rcpt(broken, sid="MWX"))
    assert "session MWX: rcpt hook (middleware) failed" in caplog.text

    bad_value = Hooks()

    async def answers_42(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        await call_next()
        return 42

    bad_value.use(answers_42)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="mailgate.hooks"):
        assert is_hook_failure(rcpt(bad_value, sid="MW42"))
    assert "session MW42" in caplog.text

    slow = Hooks(timeout=0.05)

    async def sleeper(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        await asyncio.sleep(5)

    slow.use(sleeper)
    assert is_hook_failure(rcpt(slow))


def test_middleware_wraps_notifications_without_changing_them() -> None:
    hooks = Hooks()
    stages: list[str] = []

    async def mw(ctx: HookContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        stages.append(ctx.stage)
        await call_next()
        return Reject("ignored at close")

    hooks.use(mw)
    assert run(hooks.run("close", session())) is None
    assert stages == ["close"]


# --- hooks that use asyncio themselves (the chain is stepped by hand until it waits) ----------


async def own_timeout(s: Session, e: Envelope, a: Address) -> Reject | None:
    try:
        async with asyncio.timeout(0.02):
            await asyncio.sleep(5)
    except TimeoutError:
        return Reject(550, "own timeout")
    return None


async def own_wait_for(s: Session, e: Envelope, a: Address) -> Reject | None:
    try:
        await asyncio.wait_for(asyncio.sleep(5), 0.02)
    except TimeoutError:
        return Reject(550, "wait_for timeout")
    return None


async def gathers(s: Session, e: Envelope, a: Address) -> Reject:
    async def lookup(n: int) -> int:
        await asyncio.sleep(0.001 * n)
        return n

    found = await asyncio.gather(lookup(3), lookup(1), lookup(2))
    return Reject(550, f"gathered {found}")


async def awaits_task_queue_and_failed_future(s: Session, e: Envelope, a: Address) -> Reject:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(asyncio.sleep(0.001, result="task"))
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop.call_later(0.001, queue.put_nowait, "queue")
    failing = loop.create_future()
    loop.call_later(0.001, failing.set_exception, LookupError("dns"))
    try:
        await failing
    except LookupError as exc:
        caught = str(exc)
    for _ in range(3):
        await asyncio.sleep(0)  # bare yields
    assert asyncio.current_task() is not None
    return Reject(550, f"{await task} {await queue.get()} {caught}")


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize(
    ("step", "text"),
    [
        (own_timeout, "own timeout"),
        (own_wait_for, "wait_for timeout"),
        (gathers, "gathered [3, 1, 2]"),
        (awaits_task_queue_and_failed_future, "task queue dns"),
    ],
)
def test_steps_may_use_asyncio_freely(
    step: Callable[..., Awaitable[Any]], text: str, timeout: float | None
) -> None:
    hooks = Hooks(timeout=timeout)
    hooks.on("rcpt", step)
    outcome = rcpt(hooks)
    assert isinstance(outcome, Reject) and outcome.text == text


def test_cancelling_the_caller_cancels_the_step() -> None:
    """A closed connection cancels the task running the chain: the hook sees it and may
    clean up (awaiting), and the cancellation reaches the caller."""
    cleaned: list[str] = []

    async def cleans_up(s: Session, e: Envelope, a: Address) -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(0.001)
            cleaned.append("cleaned")
            raise

    async def main() -> None:
        for timeout in (None, 5.0):
            hooks = Hooks(timeout=timeout)
            hooks.on("rcpt", cleans_up)
            task = asyncio.create_task(
                hooks.run("rcpt", session(), Envelope(), Address("b@example.com"))
            )
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert cleaned == ["cleaned", "cleaned"]


def test_stages_attribute_narrows_where_a_plugin_runs() -> None:
    """A plugin that needs its message step only for some configurations leaves it out
    with ``stages``, so the server does not spool messages for nothing."""

    class Annotating:
        name = "annotating"

        def __init__(self, with_message: bool) -> None:
            self.stages = {"rcpt", "message"} if with_message else {"rcpt"}

        async def on_rcpt(self, session: Any, envelope: Any, address: Any) -> None:
            return None

        async def on_message(self, session: Any, envelope: Any, message: Any) -> None:
            return None

    hooks = Hooks()
    hooks.add(Annotating(with_message=False))
    assert hooks.has_steps("rcpt")
    assert not hooks.has_steps("message")
    hooks = Hooks()
    hooks.add(Annotating(with_message=True))
    assert hooks.has_steps("message")


def test_a_plugin_ordered_before_another_takes_its_place_not_its_own() -> None:
    """Added last with before=..., a plugin runs right before that one, and does not push
    it behind the plugins registered in between."""

    def plugin(name: str) -> Any:
        return type(name, (), {"name": name, "on_rcpt": lambda self, s, e, a: None})()

    hooks = Hooks()
    for name in ("policy-1", "policy-2", "app-1", "app-2"):
        hooks.add(plugin(name))
    hooks.add(plugin("late"), before="policy-2")
    assert hooks.names() == ["policy-1", "late", "policy-2", "app-1", "app-2"]
    hooks.add(plugin("after-app"), after="app-1", before="app-2")
    assert hooks.names()[-3:] == ["app-1", "after-app", "app-2"]


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def on_rcpt(self, *args: object) -> None:
        return None


def test_replace_swaps_plugins_in_place_or_not_at_all() -> None:
    hooks = Hooks()
    old_a, old_b, app = _Named("a"), _Named("b"), _Named("app")
    hooks.add(app, before="delivery")
    hooks.add(old_b, index=0)
    hooks.add(old_a, index=0)
    hooks.add(_Named("delivery"))
    assert hooks.names() == ["a", "b", "app", "delivery"]

    new_a, new_c = _Named("a"), _Named("c")
    hooks.replace([old_a, old_b], [new_a, new_c])
    assert hooks.names() == ["a", "c", "app", "delivery"]
    assert hooks.plugins()[0] is new_a

    with pytest.raises(HookError, match="'app' is already registered"):
        hooks.replace([new_a], [_Named("app")])
    with pytest.raises(HookError, match="has no name"):
        hooks.replace([new_a], [object()])  # refused before anything changes
    assert hooks.plugins()[:2] == [new_a, new_c]
