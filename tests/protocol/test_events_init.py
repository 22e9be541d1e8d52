"""The dataclasses made for every message write their ``__init__`` themselves (compiled by
mypyc in the optional build, where dataclass's own would stay interpreted: see the note in
mailgate/protocol/events.py). Each must stay the one dataclass would write: the fields'
names, order and defaults; the frozen ones frozen all the same."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from tests.init_checks import check_own_init

from mailgate.hooks import Address as HookAddress
from mailgate.hooks import Envelope
from mailgate.protocol import (
    Address,
    DataChunk,
    DataComplete,
    DataStart,
    Hello,
    MailFrom,
    RcptTo,
)
from mailgate.protocol.connection import Transaction
from mailgate.protocol.params import ParamContext

# A value for every field, each different from the field's default (and of its type: the
# compiled build checks them).
SAMPLES: dict[type[Any], dict[str, Any]] = {
    Hello: {"verb": "EHLO", "domain": "client.test"},
    MailFrom: {
        "address": Address("a", "b.test"),
        "params": {"SIZE": "10"},
        "written": "<a@b.test>",
    },
    RcptTo: {
        "address": Address("c", "d.test"),
        "params": {"NOTIFY": "NEVER"},
        "written": "c@d.test",
    },
    DataStart: {"bdat": True},
    DataComplete: {"size": 10, "recipients": (Address("c", "d.test"),)},
    DataChunk: {"data": b"x"},
    Address: {"local_part": "a", "domain": "b.test"},
    ParamContext: {
        "verb": "RCPT",
        "extensions": frozenset({"SIZE"}),
        "max_size": 100,
        "smtputf8": True,
        "after_tls": frozenset({"REQUIRETLS"}),
    },
    Envelope: {"mail_from": HookAddress("a@b.test"), "rcpt_tos": (HookAddress("c@d.test"),)},
    Transaction: {
        "sender": Address("a", "b.test"),
        "params": {"BODY": "8BITMIME"},
        "smtputf8": True,
        "recipients": [Address("c", "d.test")],
        "bdat_size": 7,
        "written": {("c", "d.test"): "<c@d.test>"},
    },
}
#: Not frozen: the rest of the checks hold all the same.
MUTABLE = {Transaction}
CLASSES = list(SAMPLES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_the_own_init_takes_the_fields_in_order(cls: type[Any]) -> None:
    check_own_init(cls, SAMPLES[cls])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_the_defaults_and_frozenness_are_dataclass_s(cls: type[Any]) -> None:
    fields = dataclasses.fields(cls)
    sample = SAMPLES[cls]
    required = {f.name: sample[f.name] for f in fields if f.default is dataclasses.MISSING}
    obj = cls(**required)
    for field in fields:
        if field.default is not dataclasses.MISSING:
            assert getattr(obj, field.name) == field.default, field.name
    if cls not in MUTABLE:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, fields[0].name, sample[fields[0].name])
    changed = dataclasses.replace(obj, **sample)
    assert {f.name: getattr(changed, f.name) for f in fields} == sample
