"""docs/openapi.yaml describes the console as it is: every route and method, and the
fields of the queue's objects."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from mailgate.console import Console
from mailgate.queue import ClientInfo, HistoryEntry, MessageInfo, RecipientInfo, RemoteReply
from mailgate.server import ListenAddress, ServerOptions, SMTPServer

SPEC = Path(__file__).parents[2] / "docs" / "openapi.yaml"


def _spec() -> dict[str, Any]:
    data = yaml.safe_load(SPEC.read_text())
    assert isinstance(data, dict)
    return data


def test_every_route_is_documented_and_every_documented_path_exists() -> None:
    app = Console(SMTPServer(ServerOptions()), ListenAddress("127.0.0.1", 0)).make_app()
    served = {
        (re.sub(r"\{(\w+)\}", r"{\1}", route.resource.canonical), route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        # The web UI's page and files are no API.
        and not (route.resource.canonical == "/" or route.resource.canonical.startswith("/static/"))
    }
    documented = {
        (path, method)
        for path, item in _spec()["paths"].items()
        for method in item
        if method in ("get", "post", "delete", "put", "patch")
    }
    assert served == documented


def test_queue_schemas_name_the_fields_the_api_sends() -> None:
    schemas = _spec()["components"]["schemas"]
    for name, cls in (
        ("MessageInfo", MessageInfo),
        ("RecipientInfo", RecipientInfo),
        ("HistoryEntry", HistoryEntry),
        ("ClientInfo", ClientInfo),
        ("RemoteReply", RemoteReply),
    ):
        fields = {field.name for field in dataclasses.fields(cls)}
        assert set(schemas[name]["properties"]) == fields, name
