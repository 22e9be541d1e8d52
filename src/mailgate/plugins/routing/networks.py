"""The ``clients`` networks of all routing rules, indexed: the rules whose networks hold a
client address are found with one dict probe per distinct prefix length, not by testing
every network of every rule."""

from __future__ import annotations

from collections.abc import Iterable

from mailgate.plugins.policy import IPAddress
from mailgate.server.options import Network


class NetworkIndex:
    """Rule positions by network. Networks must already be IPv4 where they are
    IPv4-mapped (clients are compared that way); positions added in increasing order."""

    def __init__(self) -> None:
        # (IP version, prefix length) -> {network address as an int: positions}
        self.by_prefix: dict[tuple[int, int], dict[int, list[int]]] = {}
        #: Rules without a clients condition: every client matches them.
        self.unconditioned: list[int] = []

    def add(self, position: int, networks: Iterable[Network] | None) -> None:
        if networks is None:
            self.unconditioned.append(position)
            return
        for network in networks:
            table = self.by_prefix.setdefault((network.version, network.prefixlen), {})
            positions = table.setdefault(int(network.network_address), [])
            if not positions or positions[-1] != position:
                positions.append(position)

    def lists(self, client: IPAddress | None) -> list[list[int]]:
        """The non-empty position lists whose union is the rules ``client`` may use
        (None: the client is not known; only rules without clients)."""
        found = [self.unconditioned]
        if client is not None:
            value, bits = int(client), client.max_prefixlen
            for (version, prefixlen), table in self.by_prefix.items():
                if version == client.version:
                    host_bits = bits - prefixlen
                    positions = table.get(value >> host_bits << host_bits)
                    if positions:
                        found.append(positions)
        return [positions for positions in found if positions]


__all__ = ["NetworkIndex"]
