"""Routing: where each accepted recipient's mail goes (``[[routes]]``, first match wins).

See :mod:`mailgate.routing.rules` for the rules, :mod:`mailgate.routing.plugin` for the
server plugin and :mod:`mailgate.routing.explain` for ``mailgate routes test``.
"""

from mailgate.routing.explain import describe, explain, load_routes, routes_test
from mailgate.routing.patterns import PatternError
from mailgate.routing.plugin import DECISIONS_NOTE, RoutingPlugin
from mailgate.routing.rules import (
    DEFAULT_DECISION,
    Action,
    ForwardTarget,
    RejectReply,
    Route,
    RouteDecision,
    RoutesConfigError,
    RouteTable,
    route_from_section,
    route_sections,
)

__all__ = [
    "DECISIONS_NOTE",
    "DEFAULT_DECISION",
    "Action",
    "ForwardTarget",
    "PatternError",
    "RejectReply",
    "Route",
    "RouteDecision",
    "RouteTable",
    "RoutesConfigError",
    "RoutingPlugin",
    "describe",
    "explain",
    "load_routes",
    "route_from_section",
    "route_sections",
    "routes_test",
]
