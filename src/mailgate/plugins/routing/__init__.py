"""Routing: where each accepted recipient's mail goes (``[[routes]]``, first match wins).

See :mod:`mailgate.plugins.routing.rules` for the rules, :mod:`mailgate.plugins.routing.plugin` for the
server plugin and :mod:`mailgate.plugins.routing.explain` for ``mailgate routes test``.
"""

from mailgate.plugins.routing.explain import describe, explain, load_routes, routes_test
from mailgate.plugins.routing.patterns import PatternError
from mailgate.plugins.routing.plugin import DECISIONS_NOTE, RoutingPlugin, plugins_from_options
from mailgate.plugins.routing.rules import (
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
    "plugins_from_options",
    "route_from_section",
    "route_sections",
    "routes_test",
]
