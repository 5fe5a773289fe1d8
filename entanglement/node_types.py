"""The public types of a `BusNode`: its states, its counters and its error."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeState(enum.Enum):
    CONNECTING = "connecting"
    SYNCING = "syncing"
    ACTIVE = "active"
    CLOSED = "closed"


class NodeError(RuntimeError):
    """The node is closed, or its thread died (the original error is chained)."""


@dataclass
class NodeCounters:
    sent: int = 0  # own updates handed to the hub
    received: int = 0  # messages from the hub (batches, heartbeats, snapshot items)
    applied: int = 0  # updates applied to the local map in sequence
    send_failed: int = 0  # own updates not queued: hwm updates already waiting for the hub
    dropped: int = 0  # incoming, well-formed but discarded: covered by a snapshot, stale
    malformed: int = 0  # frames that failed to decode, and invalid bodies inside a batch
    gaps: int = 0  # sequence gaps seen (each triggers a re-sync)
    resyncs: int = 0  # snapshot requests after the first
    hub_timeouts: int = 0  # hub silent for hub_timeout: sockets re-made
    callback_errors: int = 0  # exceptions raised by on_update callbacks (logged)
    heartbeats_held: int = 0  # heartbeats not sent: the hub was silent for hub_timeout
    restored: int = 0  # own updates re-sent: the hub lost them (expiry, restart) or a snapshot missed them
    # (node.counters returns a copy; callback_errors is filled in from the replica)
