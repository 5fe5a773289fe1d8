"""Helpers for tests of code that uses the bus (ours and the agents layer's)."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from entanglement.config import BusEndpoints
from entanglement.hub import BusHub
from entanglement.node import BusNode, NodeState


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out by itself (Linux; `default` elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_tcp_ports(count: int = 3, host: str = "127.0.0.1") -> tuple[int, ...]:
    """`count` distinct ports that were free a moment ago (for hubs restarted on fixed ports).

    They are drawn below the kernel's ephemeral range, so no outgoing connection and no
    bind-to-any-port elsewhere can take one between now and the hub's bind."""
    low = _ephemeral_low()
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(max(1024, low - 12000), low)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:  # in use: draw another
                continue
        ports.append(port)
    return tuple(ports)


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


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_converged(nodes: Sequence[BusNode], hub: BusHub | None = None, timeout: float = 10.0) -> bool:
    """Poll `converged` until it holds or `timeout` passes."""
    return wait_until(lambda: converged(nodes, hub), timeout, 0.01)
