"""The built-in personas read from their TOML package data are the personas mailgate had
when they were Python dictionaries: every reply, banner, greeting, capability and setting
is compared with a JSON snapshot taken from the Python definitions before they were moved
(tests/honeypot/data/builtin_personas.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mailgate.honeypot.personas import (
    PERSONAS,
    SERVER_REPLY_NAMES,
    PersonaProfile,
    dump_profile,
    load_profile,
)
from mailgate.protocol.persona import REPLY_NAMES
from mailgate.protocol.replies import Reply

SNAPSHOT = Path(__file__).parent / "data" / "builtin_personas.json"
BUILT_IN = ("postfix", "exim", "exchange", "sendmail", "generic")


def reply_json(reply: Reply) -> dict[str, Any]:
    return {"code": reply.code, "status": reply.status, "lines": list(reply.lines)}


def describe(profile: PersonaProfile) -> dict[str, Any]:
    """Everything a profile shows, as JSON-able values."""
    persona = profile.persona
    given = {
        name: reply_json(value) if isinstance(value, Reply) else value
        for name, value in sorted(persona.replies.items())
    }
    return {
        "name": profile.name,
        "description": profile.description,
        "software": profile.software,
        "hostname": profile.hostname,
        "auth_mechanisms": list(profile.auth_mechanisms),
        "message_size_limit": profile.message_size_limit,
        "queue_id_style": profile.queue_id_style,
        "queue_id_pattern": profile.queue_id_pattern,
        "server_replies": {
            name: reply_json(getattr(profile, name)) for name in sorted(SERVER_REPLY_NAMES)
        },
        "banner": persona.banner,
        "ehlo_greeting": persona.ehlo_greeting,
        "helo_greeting": persona.helo_greeting,
        "capability_order": list(persona.capability_order),
        "hidden_capabilities": sorted(persona.hidden_capabilities),
        "unadvertised_capabilities": sorted(persona.unadvertised_capabilities),
        "hidden_verbs": sorted(persona.hidden_verbs),
        "help": list(persona.help),
        "help_code": persona.help_code,
        "enhanced_status_codes": persona.enhanced_status_codes,
        "overridden": sorted(persona.overridden),
        "given_replies": given,
        "replies": {name: reply_json(persona.reply(name)) for name in sorted(REPLY_NAMES)},
    }


def test_the_built_ins_are_the_five_products_in_order() -> None:
    assert tuple(PERSONAS) == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_equals_the_former_python_definition(name: str) -> None:
    expected = json.loads(SNAPSHOT.read_text())[name]
    assert describe(PERSONAS[name]) == expected


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_survives_dump_and_load(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_profile(PERSONAS[name]))
    assert load_profile(path) == PERSONAS[name]
