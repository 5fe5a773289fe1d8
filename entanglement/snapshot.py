"""`SnapshotTransfer`: the snapshot a `BusNode` asked for, as its frames arrive on the DEALER.

The hub answers a request with one frame per key and then ``$snapshot-end``, whose payload
names the request and counts the items sent before it. The node keeps the items of its latest
request only: the end of an older request clears what came before it (those items belonged to
that request), so a node that asked twice installs exactly the second answer. The ROUTER drops
frames beyond its HWM without a word; the count tells a whole snapshot from a cut one. Every
frame counts as arrived, one the node could not decode too (asking again would only bring it
again), and a snapshot that keeps coming short is taken as it is after a few tries (the node's
state is then as the old protocol, without the count, would have left it).
"""

from __future__ import annotations

import enum

from entanglement.message import StateUpdate

SHORT_RETRIES = 3  # short snapshots asked for again in a row before one is taken as it is


class End(enum.Enum):
    """What an ``$snapshot-end`` means for the node."""

    OLDER = "older"  # it ends an earlier request: keep waiting for ours
    SHORT = "short"  # ours, but items went missing on the way: ask again
    WHOLE = "whole"  # ours and complete (or short too often): install `items`


class SnapshotTransfer:
    """The current request's number, the time it last showed life, and what arrived for it."""

    def __init__(self) -> None:
        self.request_id = 0
        self.active_at = 0.0  # monotonic: when the request was sent or its latest item arrived
        self.items: dict[str, StateUpdate] = {}
        self.arrived = 0  # frames since the request (or an older request's end), any content
        self.short_in_row = 0

    def begin(self, now: float) -> int:
        """A new request: its number (the first is 1)."""
        self.request_id += 1
        self.items, self.arrived, self.active_at = {}, 0, now
        return self.request_id

    def frame(self) -> None:
        """Any frame on the DEALER, decodable or not."""
        self.arrived += 1

    def item(self, msg: StateUpdate, now: float) -> None:
        """A snapshot item; a transfer that keeps arriving is alive (snapshot_timeout counts from
        its latest item, so a large snapshot over a slow link is not asked for again forever)."""
        if not msg.is_control and msg.payload is not None:
            self.items[msg.key] = msg
        self.active_at = now

    def end(self, msg: StateUpdate) -> tuple[End, dict[str, StateUpdate], int, int | None]:
        """Classify an ``$snapshot-end``: (what it means, the items, how many frames arrived
        before it, how many the hub sent). The transfer's items are handed over, not kept."""
        payload = msg.payload
        if payload is None or payload.get("request") != self.request_id:
            self.items, self.arrived = {}, 0
            return End.OLDER, {}, 0, None
        items, self.items = self.items, {}
        expected, arrived = payload.get("items"), self.arrived - 1  # (not the end itself)
        if type(expected) is int and arrived < expected:  # the hub's ROUTER dropped some (at its HWM)
            self.short_in_row += 1
            if self.short_in_row <= SHORT_RETRIES:
                return End.SHORT, items, arrived, expected
        self.short_in_row = 0
        return End.WHOLE, items, arrived, expected if type(expected) is int else None
