"""Helpers for tests of code that uses the bus (ours and the agents layer's)."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from entanglement.config import BusEndpoints
from entanglement.hub import BusHub
from entanglement.node import BusNode, NodeState


def free_tcp_ports(count: int = 3, host: str = "127.0.0.1") -> tuple[int, ...]:
    """`count` distinct ports that were free a moment ago (for hubs restarted on fixed ports)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


def fixed_tcp_endpoints(host: str = "127.0.0.1") -> BusEndpoints:
    snap, pub, col = free_tcp_ports(3, host)
    return BusEndpoints.tcp(host, (snap, pub, col))


def converged(nodes: Sequence[BusNode], hub: BusHub | None = None) -> bool:
    """True if every node is ACTIVE with the same (epoch, seq, map), equal to the hub's if given."""
    views = []
    for node in nodes:
        if node.node_state is not NodeState.ACTIVE:
            return False
        views.append((node.epoch, node.seq, node.state()))
    if hub is not None:
        views.append((hub.epoch, hub.seq, hub.keys_snapshot()))
    return all(v == views[0] for v in views[1:])


def wait_converged(nodes: Sequence[BusNode], hub: BusHub | None = None, timeout: float = 10.0) -> bool:
    """Poll `converged` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if converged(nodes, hub):
            return True
        time.sleep(0.01)
    return converged(nodes, hub)
