"""Configuration of one entanglement bus: where the hub listens and how both sides behave.

A `BusConfig` is a plain frozen dataclass that round-trips through `to_dict`/`from_dict`, so
whoever starts a run (the orchestrator, through Ray) can hand the same settings to the hub and
to every node. The hub resolves wildcard endpoints (``tcp://127.0.0.1:0``) when it binds and
reports the real ones through `BusHub.config`; nodes must be given that resolved config.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

SecurityMode = Literal["curve", "none"]


class ConfigError(ValueError):
    """A bus setting is out of range or inconsistent."""


@dataclass(frozen=True)
class BusEndpoints:
    """The hub's three sockets, Clone-pattern style.

    snapshot: ROUTER, answers snapshot requests (node DEALER connects).
    publish:  PUB, sends sequenced updates and hub heartbeats (node SUB connects).
    collect:  PULL, receives nodes' updates and heartbeats (node PUSH connects).
    """

    snapshot: str
    publish: str
    collect: str

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", ports: tuple[int, int, int] = (0, 0, 0)) -> BusEndpoints:
        """TCP endpoints; port 0 lets the hub pick a free port and report it."""
        snap, pub, col = ports
        return cls(f"tcp://{host}:{snap}", f"tcp://{host}:{pub}", f"tcp://{host}:{col}")

    @classmethod
    def ipc(cls, directory: str | None = None) -> BusEndpoints:
        """IPC endpoints in `directory`; by default a fresh temporary directory, which is left in
        place so that a hub can be restarted on the same endpoints: pass a directory you own (and
        remove) when you create many buses."""
        base = directory or tempfile.mkdtemp(prefix="reso-bus-")
        return cls(
            f"ipc://{os.path.join(base, 'snapshot')}",
            f"ipc://{os.path.join(base, 'publish')}",
            f"ipc://{os.path.join(base, 'collect')}",
        )

    @classmethod
    def inproc(cls, name: str | None = None) -> BusEndpoints:
        """In-process endpoints; hub and nodes must then share one `zmq.Context`."""
        tag = name or uuid.uuid4().hex[:12]
        return cls(f"inproc://{tag}-snapshot", f"inproc://{tag}-publish", f"inproc://{tag}-collect")

    @property
    def is_inproc(self) -> bool:
        """Whether any endpoint is in-process (then nodes must share the hub's context)."""
        return any(ep.startswith("inproc://") for ep in (self.snapshot, self.publish, self.collect))


MIN_FRAME_BYTES = 1000  # a bus's smallest max_frame_bytes: every control message fits (at most ~310 bytes)


@dataclass(frozen=True)
class MessageLimits:
    """Run-time limits of a bus (see `entanglement.message`). The limits of single values
    (key and string lengths, list lengths, the number of extra fields, the phases' bytes) are
    part of the wire format and fixed there, in the message schema."""

    max_frame_bytes: int = 1 << 20  # one update (or parcel) as sent, checked before unpacking
    max_array_len: int = 4096  # updates in one batch or parcel


@dataclass(frozen=True)
class BusConfig:
    """Settings shared by the hub and its nodes.

    security: "curve" (default) encrypts and authenticates every tcp/ipc connection; "none" is
        an explicit opt-out. Over inproc:// libzmq performs no security handshake at all; the
        trust boundary there is the process (nodes must share the hub's context).
    hwm: send and receive high-water mark of every data socket (messages; on PUB one message is
        a batch of updates, see `entanglement.message`). PUB drops above it; the sequence
        numbers make such drops visible to nodes as gaps, which trigger a re-sync. It counts
        messages, not bytes: a queue for a subscriber that stopped reading can grow to
        hwm x limits.max_frame_bytes in the worst case (large batches under load).
    heartbeat_interval: seconds between hub heartbeats (on PUB) and node heartbeats (to the hub).
    hub_timeout: a node that hears nothing from the hub for this long re-connects and re-syncs.
    ttl: the hub expires all keys of an agent whose heartbeats stopped for this long.
    snapshot_timeout: a node re-sends its snapshot request (on fresh sockets) after this long.
    max_keys: the hub refuses (and counts) updates that would grow its map beyond this.
    coalesce: a node sends an update at once unless it sent one less than this many seconds
        ago; then it queues the update and its thread sends everything queued as one parcel
        when it wakes (at once, not after a timer). Paced updates leave alone, without delay;
        a burst costs one message per wake-up instead of one per update. 0 sends every update
        on its own.
    """

    endpoints: BusEndpoints = field(default_factory=BusEndpoints.tcp)
    security: SecurityMode = "curve"
    hwm: int = 100_000
    heartbeat_interval: float = 0.2
    hub_timeout: float = 1.0
    ttl: float = 2.0
    snapshot_timeout: float = 1.0
    max_keys: int = 65_536
    coalesce: float = 0.0002
    limits: MessageLimits = field(default_factory=MessageLimits)

    def __post_init__(self) -> None:
        if self.security not in ("curve", "none"):
            raise ConfigError(f"security must be 'curve' or 'none', got {self.security!r}")
        if self.hwm < 1:
            raise ConfigError(f"hwm must be >= 1, got {self.hwm}")
        if not 0 < self.heartbeat_interval < self.hub_timeout:
            raise ConfigError(
                f"need 0 < heartbeat_interval ({self.heartbeat_interval}) < hub_timeout "
                f"({self.hub_timeout})"
            )
        if self.ttl <= self.heartbeat_interval:
            raise ConfigError(f"ttl ({self.ttl}) must exceed heartbeat_interval")
        if self.snapshot_timeout <= 0 or self.max_keys < 1:
            raise ConfigError("need snapshot_timeout > 0 and max_keys >= 1")
        if not 0 <= self.coalesce < self.heartbeat_interval:
            raise ConfigError(f"need 0 <= coalesce ({self.coalesce}) < heartbeat_interval")
        if self.limits.max_array_len < 1 or self.limits.max_frame_bytes < MIN_FRAME_BYTES:
            # smaller limits would make the hub's batches, or control messages, malformed everywhere
            raise ConfigError(f"need limits.max_array_len >= 1 (got {self.limits.max_array_len}) and "
                              f"limits.max_frame_bytes >= {MIN_FRAME_BYTES} (got {self.limits.max_frame_bytes})")

    def with_endpoints(self, endpoints: BusEndpoints) -> BusConfig:
        """A copy of this config with other endpoints."""
        return replace(self, endpoints=endpoints)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str/int/float only), e.g. to pass through Ray or write to a run file."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BusConfig:
        """Inverse of `to_dict`; unknown fields raise `ConfigError`."""
        data = dict(data)
        try:
            endpoints = BusEndpoints(**data.pop("endpoints"))
            limits = MessageLimits(**data.pop("limits", {}))
            return cls(endpoints=endpoints, limits=limits, **data)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"invalid bus config dict: {exc}") from exc
