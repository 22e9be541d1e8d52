"""hooks.Session writes its own ``__init__`` (compiled in the optional build, where the one
dataclass writes would stay interpreted): it must take the dataclass's fields in their
order with their defaults, and make a factory's value anew for each session."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tests.init_checks import check_own_init

from mailgate.hooks import Session, TLSInfo

SAMPLE: dict[str, Any] = {
    "id": "S1",
    "peer_host": "192.0.2.1",
    "peer_port": 4000,
    "local_host": "192.0.2.2",
    "local_port": 25,
    "started_at": 12.5,
    "tls": TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
    "helo": "client.test",
    "esmtp": True,
    "user": "alice",
    "auth_mechanism": "PLAIN",
    "forwarded": True,
    "xforward": {"NAME": "x.test"},
    "transactions": 2,
    "messages": 1,
    "auth_failures": 3,
    "lmtp": True,
    "submission": True,
    "notes": {"policy.logged": 1},
}
REQUIRED = ("id", "peer_host", "peer_port", "local_host", "local_port")


def test_the_init_takes_the_fields_in_order() -> None:
    check_own_init(Session, SAMPLE)


def test_the_defaults_are_the_dataclass_s_and_factories_make_new_values() -> None:
    before = time.time()
    first = Session(*(SAMPLE[name] for name in REQUIRED))
    second = Session(**{name: SAMPLE[name] for name in REQUIRED})
    for field in dataclasses.fields(Session):
        if field.default is not dataclasses.MISSING:
            assert getattr(first, field.name) == field.default, field.name
    assert before <= first.started_at <= time.time()
    assert first.notes == {} and first.xforward == {}
    assert first.notes is not second.notes and first.xforward is not second.xforward
    first.notes["x"] = 1
    assert second.notes == {}
    assert not first.authenticated and first.peer == ("192.0.2.1", 4000)
    assert dataclasses.replace(first, helo="other.test").helo == "other.test"
