"""`BusNode`: one agent's view of the bus, the Clone pattern's clonecli.

The node's own thread owns the receiving sockets (SUB <- hub PUB, DEALER <-> hub ROUTER) and
listens to an inproc PAIR pipe (wake-ups: flush the outbox, see a stop). Everything sent to the hub goes through
`entanglement.outbound.Outbound`: one PUSH socket shared under a lock by `publish()` callers, the
heartbeat thread and the node thread, with the outbox of updates that leave together as one
parcel. Readers of the local map use a lock too (`entanglement.replica`).

States and transitions::

    CONNECTING --sockets made, SUB subscribed, "$snapshot?" sent--> SYNCING
    SYNCING    --"$snapshot-end" of the current request: install map, apply queued updates
                 with seq > snapshot seq, re-publish own keys the snapshot lacks--> ACTIVE
                 (fewer items than the end counts: ask again, stay SYNCING)
    ACTIVE     --seq gap, a batch/heartbeat ahead of us, or a new hub epoch--> SYNCING (same sockets)
    SYNCING/ACTIVE --hub silent for hub_timeout, or no snapshot within snapshot_timeout-->
                 CONNECTING (fresh SUB and DEALER)
    any        --close()--> CLOSED

While SYNCING, updates from SUB are queued; those the snapshot covers are dropped (counted).
The hub publishes batches (see `entanglement.message`): every body in a batch is validated on
its own; a malformed one is counted and dropped, and the hole it leaves is a gap.
A heartbeat thread sends "$heartbeat" every heartbeat_interval so the hub can expire the node
when its process vanishes (dies, is paused, or loses the network); a node thread busy in a slow
callback keeps beating. A node thread that is free to listen and has not heard the hub for
hub_timeout holds its beats: beats to a hub that is down would wait in the PUSH queue, taking
room from updates, and reach a restarted hub as a stale burst. They resume with the first
message from the hub (`counters.heartbeats_held` counts the ones left out). A node that was
expired while alive re-sends its own keys when it sees their deletions (`counters.restored`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import zmq

from entanglement.config import BusConfig, ConfigError
from entanglement.drain import drain
from entanglement.message import (
    BATCH_OVERHEAD,
    NODE_HEARTBEAT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST,
    MalformedMessage,
    StateUpdate,
    agent_key,
    encode,
    encode_update,
    make_update,
    unpack,
    unpack_batch,
)
from entanglement.node_types import NodeCounters, NodeError, NodeState
from entanglement.outbound import Outbound
from entanglement.replica import Replica, UpdateCallback
from entanglement.security import NodeCredentials, SecurityError
from entanglement.snapshot import End, SnapshotTransfer

log = logging.getLogger(__name__)

_DRAIN = 1000


class BusNode:
    """A member of the bus. Starts its thread at construction; call `close()` when done."""

    def __init__(
        self,
        agent_id: str,
        config: BusConfig,
        credentials: NodeCredentials | None = None,
        context: zmq.Context | None = None,
        on_update: UpdateCallback | None = None,
    ) -> None:
        """Start a node for `agent_id`; `on_update` (see `on_update()`) is registered before
        the thread starts, so it also sees the first snapshot. The replica holds the whole map:
        Clone-style subtrees are not offered, as gap detection needs every sequence number."""
        if not agent_id or "/" in agent_id:
            raise ConfigError(f"agent id must be non-empty without '/', got {agent_id!r}")
        try:  # what the node's own control messages need (e.g. at most 256 characters)
            make_update(agent_id, NODE_HEARTBEAT, None)
        except MalformedMessage as exc:
            shown = agent_id if len(agent_id) <= 40 else agent_id[:40] + "..."
            raise ConfigError(f"agent id {shown!r} is not valid on the bus: {exc}") from exc
        if config.security == "curve" and credentials is None:
            raise SecurityError(
                "security is 'curve' but no credentials were given; pass hub/run credentials "
                "or opt out explicitly with BusConfig(security='none')"
            )
        if config.endpoints.is_inproc and context is None:
            raise ConfigError("inproc:// endpoints need the hub's zmq context (context=hub.context)")
        self.agent_id = agent_id
        self.config = config
        self._credentials = credentials if config.security == "curve" else None
        self._own_context = context is None
        self.context = context or zmq.Context()
        self._counters = NodeCounters()
        # A snapshot item is a body as its agent sent it (at most max_frame_bytes), re-encoded
        # with the hub's seq and epoch stamped in (up to 16 bytes more): allow for the stamp.
        self._snapshot_limits = replace(config.limits,
                                        max_frame_bytes=config.limits.max_frame_bytes + BATCH_OVERHEAD)
        self._state = NodeState.CONNECTING
        self._replica = Replica(f"node {agent_id!r}", [on_update] if on_update else [])
        self.error: BaseException | None = None
        self._keys: dict[str, str] = {}  # name -> validated key (publish fast path)
        # Node-thread bookkeeping (touched only by the node thread).
        self._pending: list[StateUpdate] = []
        self._replaying = False  # replaying the updates queued while a snapshot was on its way
        self._transfer = SnapshotTransfer()  # the snapshot asked for, as it arrives
        self._connected_at = 0.0  # when the sockets were last made: silence counts from the later of this and _heard
        # Read by the heartbeat thread too: the last message from the hub, the node thread's last wake-up.
        self._heard = self._awake = time.monotonic()
        self._sub: zmq.Socket | None = None
        self._dealer: zmq.Socket | None = None
        self._poller = zmq.Poller()
        # Caller -> node thread pipe (used by `Outbound`): b"F" wakes the thread to flush the
        # outbox or to see `_stopping` (a flag, not a message: the pipe may be full of wake-ups).
        addr = f"inproc://node-pipe-{uuid.uuid4().hex}"
        made: list[zmq.Socket] = []
        try:
            self._pipe_in = self.context.socket(zmq.PAIR)
            made.append(self._pipe_in)
            self._pipe_in.linger = 0
            self._pipe_in.bind(addr)
            pipe_out = self.context.socket(zmq.PAIR)
            made.append(pipe_out)
            pipe_out.linger = 0
            pipe_out.connect(addr)
            push = self.context.socket(zmq.PUSH)  # to the hub's collector
            made.append(push)
            self._configure(push)
            push.connect(config.endpoints.collect)
        except BaseException as exc:  # bad keys or endpoint: release what was made, say which
            for sock in made:
                sock.close(linger=0)
            if self._own_context:
                self.context.term()
            if isinstance(exc, zmq.ZMQError):
                raise ConfigError(f"node {agent_id!r}: cannot set up its socket to the hub's collector "
                                  f"{config.endpoints.collect!r}: {exc}") from exc
            raise
        self._out = Outbound(agent_id, config, push, pipe_out, self._counters)
        self._closed = False
        self._stopping = threading.Event()  # close() was called: both threads end
        # Who finishes closing (the outbound, the context): close() itself, unless the node thread
        # is still running then (close() came from a callback, or the thread did not stop in
        # time); then the thread does, as it ends. Both read and write these under _handover.
        self._handover = threading.Lock()
        self._close_in_thread = False
        self._thread_ended = False
        self._thread = threading.Thread(target=self._run, name=f"bus-node-{agent_id}", daemon=True)
        self._beats = threading.Thread(target=self._beat, name=f"bus-beat-{agent_id}", daemon=True)
        self._thread.start()  # a callback may call close() from here on: everything it uses exists
        self._beats.start()

    # -- caller API -------------------------------------------------------------------------

    def publish(self, name: str, payload: Mapping[str, Any] | None) -> bool:
        """Publish `payload` under ``agent/<agent_id>/<name>`` (None deletes the key).

        Validation errors, and an update larger than `config.limits.max_frame_bytes`, raise
        `MalformedMessage` here. The update goes straight from the
        calling thread to the hub (queued by ZeroMQ), or, within `config.coalesce` of the
        previous send, into the outbox the node thread sends as one parcel when it wakes (module
        docstring); the order of a node's updates is kept either way. The value is also kept
        so it can be re-published if a restarted hub lost it. Returns False (counted in
        send_failed) when `config.hwm` messages are already queued for the hub (it is gone or
        overloaded); updates that wait in the outbox are counted when it is sent.
        """
        key = self._keys.get(name)
        if key is None:
            key = agent_key(self.agent_id, name)
            make_update(self.agent_id, key, None)  # validates the key once per name
            self._keys[name] = key
        body = encode_update(self.agent_id, key, payload)
        limit = self.config.limits.max_frame_bytes
        if len(body) > limit:  # the hub would drop it as malformed: refuse it here instead
            raise MalformedMessage(f"update {key!r} encodes to {len(body):,} bytes, over the bus's "
                                   f"max_frame_bytes ({limit:,})")
        if not self._closed and self._thread.is_alive():
            sent = self._out.publish(key, body, deleting=payload is None)
            if sent is not None:  # None: closed meanwhile
                return sent
        raise NodeError(f"node {self.agent_id!r} is closed") from self.error

    def delete(self, name: str) -> bool:
        """Delete this agent's key `name` for everyone."""
        return self.publish(name, None)

    def latest(self, agent_id: str) -> dict[str, StateUpdate]:
        """The latest value of each of `agent_id`'s keys, by name (``phase``, ``sedenion``...)."""
        return self._replica.latest(agent_id)

    def state(self) -> dict[str, StateUpdate]:
        """A copy of the whole replicated map (key -> update)."""
        return self._replica.state()

    def peers(self, include_self: bool = False) -> set[str]:
        """Agents that currently have at least one key on the bus."""
        agents = self._replica.agents()
        if not include_self:
            agents.discard(self.agent_id)
        return agents

    @property
    def counters(self) -> NodeCounters:
        """A snapshot of the node's counters."""
        return replace(self._counters, callback_errors=self._replica.callback_errors)

    @property
    def seq(self) -> int:
        """The hub sequence number the local map reflects."""
        return self._replica.seq

    @property
    def epoch(self) -> int:
        """The hub instance the local map comes from."""
        return self._replica.epoch

    @property
    def node_state(self) -> NodeState:
        return self._state

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_update(self, callback: UpdateCallback) -> None:
        """Call `callback(update)` in the node thread for every applied change (deletions have
        payload None). Exceptions are logged and counted, never propagated. Pass `on_update`
        to the constructor instead to also see the very first snapshot."""
        self._replica.add_callback(callback)

    def wait_for(self, predicate: Callable[[BusNode], bool], timeout: float) -> bool:
        """Block until `predicate(self)` holds (checked on every change) or `timeout` passes."""
        return self._replica.wait(lambda: predicate(self), timeout,
                                  give_up=lambda: self._state is NodeState.CLOSED)

    def wait_active(self, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda n: n.node_state is NodeState.ACTIVE, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every socket (and the context, if the node made it).

        What the node sent is still delivered: the PUSH socket lingers up to
        ``min(timeout, config.hub_timeout)`` seconds for updates ZeroMQ has not yet written.
        Called from an `on_update` callback (the node thread itself), it asks the thread to
        stop and returns at once; the thread closes everything when the callback returns. A
        thread that does not stop within `timeout` (stuck in a callback) raises `NodeError`;
        the thread then closes everything itself when it ends."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if threading.current_thread() is self._thread:
            with self._handover:
                self._close_in_thread = True  # the loop sees _stopping when the callback returns
            return
        self._out.wake()
        self._beats.join(timeout)
        self._thread.join(timeout)
        with self._handover:
            self._close_in_thread = not self._thread_ended
        if self._close_in_thread:
            raise NodeError(f"node {self.agent_id!r} thread did not stop within {timeout}s (an "
                            "on_update callback still running?); it closes the node's sockets when it ends")
        self._finish_close(min(timeout, self.config.hub_timeout))

    def _finish_close(self, linger: float) -> None:
        self._out.close(linger)  # sends what a publish racing with close() queued
        if self._own_context:
            self.context.term()  # waits (up to the linger) for what the PUSH socket still holds

    def __enter__(self) -> BusNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- node thread ------------------------------------------------------------------------

    def _socket(self, kind: int) -> zmq.Socket:
        return self._configure(self.context.socket(kind))

    def _configure(self, sock: zmq.Socket) -> zmq.Socket:
        """Linger, HWMs, the message size cap and the CURVE client keys of a data socket."""
        sock.linger = 0
        sock.sndhwm = self.config.hwm
        sock.rcvhwm = self.config.hwm
        sock.maxmsgsize = 4 * self.config.limits.max_frame_bytes
        if self._credentials is not None:
            self._credentials.apply(sock)
        return sock

    def _run(self) -> None:
        try:
            self._poller.register(self._pipe_in, zmq.POLLIN)
            self._loop()
        except zmq.ContextTerminated as exc:  # the hub owning our (inproc) context stopped first
            self.error = NodeError(f"node {self.agent_id!r}: its zmq context was terminated "
                                   "(the hub that owns it stopped)")
            self.error.__cause__ = exc
            log.warning("%s", self.error)
        except BaseException as exc:  # record why the thread died; the caller sees NodeError
            self.error = exc
            log.error("bus node %r thread died: %r", self.agent_id, exc)
            raise
        finally:
            for sock in (self._sub, self._dealer, self._pipe_in):
                if sock is not None:
                    sock.close(linger=0)
            self._set_state(NodeState.CLOSED)
            with self._handover:
                self._thread_ended = True
                finish = self._close_in_thread
            if finish:  # close() came from a callback, or gave up waiting: finish it here
                self._finish_close(self.config.hub_timeout)

    def _beat(self) -> None:
        """The heartbeat thread: "$heartbeat" to the hub every heartbeat_interval while the node
        thread lives. It is a thread of its own so that a node whose thread is busy (a slow
        `on_update` callback) is not taken for a vanished one: only a dead or unreachable
        process stops its heartbeats. Each tick also sends an outbox left waiting; the beat
        itself is held while the hub is silent (module docstring)."""
        interval, timeout = self.config.heartbeat_interval, self.config.hub_timeout
        while self._thread.is_alive():
            now = time.monotonic()
            # No beats into a silent hub's queue; but a node thread stuck in a callback may just
            # not have read the hub yet: then keep beating.
            beat = now - self._heard <= timeout or now - self._awake > timeout
            if not self._out.heartbeat(beat):
                return
            if not beat:
                self._counters.heartbeats_held += 1
            if self._stopping.wait(interval):
                return

    def _loop(self) -> None:
        self._connect()
        poll_ms = self.config.heartbeat_interval * 1000.0  # the timers' resolution
        while True:
            events = dict(self._poller.poll(poll_ms))
            self._awake = now = time.monotonic()
            sub = self._sub
            if sub is not None and sub in events:
                self._heard = now  # the hub is heard, even if this thread was late to read it
            if self._pipe_in in events:
                self._on_pipe()
            if self._stopping.is_set():
                return
            # Read what waits on each readable socket (entanglement.drain: no zmq.Again per wake-up)
            if sub is not None and sub in events:
                budget = _DRAIN  # updates, not messages: a batch may carry thousands
                for frames in drain(sub, _DRAIN, multipart=True):
                    budget -= self._on_sub(frames)
                    if budget <= 0 or self._stopping.is_set():
                        break
            dealer = self._dealer
            if dealer is not None and dealer in events:
                for frame in drain(dealer, _DRAIN):
                    self._on_snapshot(frame)
            self._check_timers(now)  # as of the wake-up: time spent in callbacks is not silence
            if self._stopping.is_set():  # close() (from a callback too): the outbound is closed, and flushed, after
                return

    def _on_pipe(self) -> None:
        """Take the pipe's wake-ups and send the outbox."""
        for _ in drain(self._pipe_in, _DRAIN):
            pass
        self._out.flush()

    def _check_timers(self, now: float) -> None:
        if self._state is NodeState.CONNECTING:
            return
        silent = now - max(self._heard, self._connected_at)
        if silent > self.config.hub_timeout:
            log.debug("node %r: hub silent for %.2fs, reconnecting", self.agent_id, silent)
            self._counters.hub_timeouts += 1
            self._connect()
        elif self._state is NodeState.SYNCING and now - self._transfer.active_at > self.config.snapshot_timeout:
            log.debug("node %r: no snapshot within %.2fs, reconnecting", self.agent_id,
                      self.config.snapshot_timeout)
            self._connect()

    def _connect(self) -> None:
        """(Re)make SUB and DEALER, subscribe, then ask for a snapshot (CONNECTING -> SYNCING)."""
        self._set_state(NodeState.CONNECTING)
        for sock in (self._sub, self._dealer):
            if sock is not None:
                self._poller.unregister(sock)
                sock.close(linger=0)
        eps = self.config.endpoints
        self._sub = self._socket(zmq.SUB)
        # Everything: gap detection needs every sequence number (no Clone subtrees here).
        self._sub.setsockopt_string(zmq.SUBSCRIBE, "")
        self._sub.connect(eps.publish)
        self._dealer = self._socket(zmq.DEALER)
        self._dealer.connect(eps.snapshot)
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._dealer, zmq.POLLIN)
        self._connected_at = time.monotonic()
        self._request_snapshot()

    def _request_snapshot(self) -> None:
        """Ask for a snapshot on the current DEALER; SUB traffic is queued meanwhile."""
        if self._transfer.request_id > 0:
            self._counters.resyncs += 1
        request = make_update(self.agent_id, SNAPSHOT_REQUEST, {"request": self._transfer.begin(time.monotonic())})
        assert self._dealer is not None
        self._dealer.send(encode(request))
        self._set_state(NodeState.SYNCING)

    def _on_sub(self, frames: list[bytes]) -> int:
        """Handle one PUB message; return how much work it was (bodies, at least 1)."""
        self._counters.received += 1
        self._heard = time.monotonic()
        try:
            if len(frames) != 1:
                raise MalformedMessage(f"expected one batch frame, got {len(frames)} frames")
            epoch, last_seq, items = unpack_batch(frames[0], self.config.limits)
        except MalformedMessage as exc:
            self._counters.malformed += 1
            log.debug("node %r: dropped malformed batch: %s", self.agent_id, exc)
            return 1
        replica = self._replica
        if (self._state is NodeState.ACTIVE and items and epoch == replica.epoch
                and all(type(m) is StateUpdate for m in items) and items[0].seq == replica.seq + 1):
            # The common case: a clean batch continuing our sequence (seqs are positional, so
            # the whole batch is contiguous): apply it in one go.
            replica.apply_batch(items)
            self._counters.applied += len(items)
            self._restore_own(items)
            self._check_head(epoch, last_seq)
            return len(items)
        for msg in items:
            if type(msg) is not StateUpdate:  # a malformed body: count it, its seq is a gap
                self._counters.malformed += 1
                log.debug("node %r: dropped malformed update: %s", self.agent_id, msg)
            elif self._state is NodeState.ACTIVE:
                self._sequence(msg)
            elif self._state is NodeState.SYNCING:
                self._pending.append(msg)
                if len(self._pending) > self.config.hwm:  # snapshot far behind: start over
                    self._counters.dropped += len(self._pending)
                    self._pending = []
                    self._request_snapshot()
        if self._state is NodeState.ACTIVE:  # the batch also says where the hub is
            self._check_head(epoch, last_seq)
        return max(1, len(items))

    def _check_head(self, epoch: int, last_seq: int) -> None:
        """Re-sync if the hub restarted or is ahead of us (updates lost at the tail)."""
        if epoch != self._replica.epoch:
            log.debug("node %r: hub epoch changed, re-syncing", self.agent_id)
            self._request_snapshot()
        elif last_seq > self._replica.seq:
            self._counters.gaps += 1
            log.debug("node %r: hub at %d, we are at %d, re-syncing", self.agent_id, last_seq,
                      self._replica.seq)
            self._request_snapshot()

    def _sequence(self, msg: StateUpdate) -> None:
        """Apply `msg` if it is the next in sequence; otherwise drop it or re-sync."""
        if msg.epoch != self._replica.epoch:
            log.debug("node %r: hub epoch changed, re-syncing", self.agent_id)
            self._pending = [msg]
            self._request_snapshot()
            return
        if msg.seq <= self._replica.seq:
            self._counters.dropped += 1
            return
        if msg.seq > self._replica.seq + 1:
            self._counters.gaps += 1
            log.debug("node %r: gap %d -> %d, re-syncing", self.agent_id, self._replica.seq, msg.seq)
            self._pending = [msg]
            self._request_snapshot()
            return
        self._apply(msg)

    def _on_snapshot(self, frame: bytes) -> None:
        self._counters.received += 1
        self._heard = time.monotonic()
        self._transfer.frame()
        try:
            msg = unpack(frame, self._snapshot_limits)
        except MalformedMessage as exc:
            self._counters.malformed += 1
            log.debug("node %r: dropped malformed snapshot frame: %s", self.agent_id, exc)
            return
        if self._state is not NodeState.SYNCING:
            return
        if msg.key != SNAPSHOT_END:
            self._transfer.item(msg, self._heard)
            return
        outcome, items, arrived, expected = self._transfer.end(msg)
        if outcome is End.OLDER:
            return
        if outcome is End.SHORT:
            self._counters.dropped += len(items)
            log.debug("node %r: %d of the snapshot's %d items arrived: asking again", self.agent_id, arrived, expected)
            self._request_snapshot()
            return
        if expected is not None and arrived < expected:
            log.warning("node %r: snapshots kept coming short of their items (%d of %d this time); taking "
                        "what arrived", self.agent_id, arrived, expected)
        self._replica.install(items, msg.seq, msg.epoch, before_notify=self._activate)
        pending, self._pending = self._pending, []
        self._replaying = True  # own keys the replay deletes are re-sent once, below
        try:
            for queued in pending:
                if self._state is not NodeState.ACTIVE:
                    self._pending.append(queued)  # a re-sync started: keep queueing
                elif queued.epoch != self._replica.epoch or queued.seq <= self._replica.seq:
                    self._counters.dropped += 1  # covered by the snapshot (or from an old hub)
                else:
                    self._sequence(queued)
        finally:
            self._replaying = False
        # what the hub lacks (lost in a restart or expired, or still on its way there: an update
        # published just before this snapshot): send it again, after the outbox. Every re-send
        # counts in restored, so sent - restored is the number of updates the caller published.
        self._out.resend_missing(self._replica.__contains__)  # counted in restored

    def _apply(self, msg: StateUpdate) -> None:
        self._replica.apply(msg)
        self._counters.applied += 1
        self._restore_own((msg,))

    def _restore_own(self, applied: Sequence[StateUpdate]) -> None:
        """Re-send own keys that `applied` deleted although this node still holds them: the
        hub expired this agent while it was alive (no heartbeat reached the hub for `ttl`: the
        process was paused, or the network or the hub stalled). A deletion the node asked for
        is not undone: `publish(name, None)` forgets the key before the deletion is sent. (If
        the user re-publishes a key while its deletion is on its way back, the new value is
        sent once more: harmless, and counted as restored.)"""
        if self._replaying:  # the snapshot's resend_missing covers these
            return
        lost = [m.key for m in applied if m.payload is None and m.agent == self.agent_id]
        if lost:
            restored = self._out.resend(lost)  # counted in restored
            if restored:
                log.debug("node %r: the hub deleted %d own keys, re-sent them", self.agent_id, restored)

    def _activate(self) -> None:
        self._state = NodeState.ACTIVE  # called by the replica under its lock

    def _set_state(self, state: NodeState) -> None:
        self._state = state
        self._replica.changed()
