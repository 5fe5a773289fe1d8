"""`BusHub`: the one server of a run, the Clone pattern's clonesrv.

The hub owns the sequence. Its thread runs one poll loop over

    collect  (PULL)    nodes' updates (alone or in parcels) and heartbeats -> validate, stamp seq,
                       store, publish
    snapshot (ROUTER)  "$snapshot?" -> every stored key, then "$snapshot-end"
    publish  (PUB)     batches of stamped updates and, every heartbeat_interval, an empty batch
                       with the last seq (the heartbeat)
    zap      (REP)     RFC 27 authentication of CURVE clients (security "curve" only)
    pipe     (PAIR)    commands from the owning thread (stop)

With CURVE, every collected message carries the name of the credential that sent it (the ZAP
User-Id): a per-agent credential (`add_client(agent_id)`) may only publish and heartbeat as
that agent; the shared run credential (`SHARED_CLIENT`) may speak for any agent.

On every heartbeat tick the hub expires the keys of agents not heard from for `ttl` seconds by
publishing a deletion (payload nil, a new seq) for each of them.

Publishing is batched (wire format in `entanglement.message`): everything the collector holds
when the loop wakes up is validated, stamped and stored one by one, and goes out as one batch
frame that carries the agents' body bytes unchanged (the seq is positional, so nothing is
re-encoded). Batches never wait for more traffic: a lone update leaves at once, under load the
per-message costs (syscalls, CURVE boxes, the nodes' receive calls) are shared.

Each hub instance has a random `epoch` stamped on everything it sends: a node that sees a new
epoch knows the hub restarted (and lost its map) and re-syncs; nodes then re-publish their own
keys, so the state heals without a second hub.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import zmq

from entanglement.config import BusConfig, BusEndpoints, ConfigError, MessageLimits
from entanglement.drain import drain, waiting
from entanglement.message import (
    NODE_HEARTBEAT,
    SNAPSHOT_END,
    SNAPSHOT_REQUEST,
    MalformedMessage,
    StatePayload,
    StateUpdate,
    encode,
    is_parcel,
    key_owner,
    pack_batch,
    unpack,
    unpack_parcel,
)
from entanglement.security import (
    SHARED_CLIENT,
    BusKeys,
    NodeCredentials,
    SecurityError,
    ZapHandler,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

HUB_AGENT = "hub"
_DRAIN = 1000  # messages handled per socket per loop turn, so no socket starves the others


class HubError(RuntimeError):
    """The hub could not start (e.g. an endpoint is in use) or is used in the wrong state."""


@dataclass
class HubCounters:
    received: int = 0  # frames on the collector (a parcel of several updates is one frame)
    published: int = 0  # stamped updates published (deletions included)
    malformed: int = 0  # frames that failed to decode (collector and snapshot socket), and bodies in a parcel
    rejected: int = 0  # valid messages refused: key not owned by sender, control misuse, map full
    snapshots: int = 0  # snapshot requests answered
    expired_agents: int = 0
    expired_keys: int = 0
    auth_denied: int = 0  # ZAP refusals


class BusHub:
    """The sequencing server of one bus. Use as a context manager or `start()`/`stop()`."""

    def __init__(
        self,
        config: BusConfig | None = None,
        keys: BusKeys | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self._config = config or BusConfig()
        if self._config.security == "curve":
            keys = keys or BusKeys.generate()
        elif keys is not None:  # they would turn CURVE on while the config, handed to nodes, says "none"
            raise ConfigError("keys were given but the config's security is 'none': drop the keys, "
                              "or use BusConfig(security='curve')")
        self.keys = keys
        self._own_context = context is None
        # Two I/O threads: CURVE encryption of the fan-out to every node happens there.
        self.context = context or zmq.Context(io_threads=2)
        self.epoch = secrets.randbits(62) + 1
        self.counters = HubCounters()
        self._seq = 0
        # key -> (update as received, the seq it was stamped with, its stamped body or None
        # until a snapshot needs it): the stamped `StateUpdate` is only built on demand
        self._map: dict[str, tuple[StateUpdate, int, bytes | None]] = {}
        self._batch: list[bytes] = []  # bodies stamped this loop turn, not yet published
        self._batch_bytes = 0
        self._seen: dict[str, float] = {}  # agent -> monotonic time last heard
        self._owners: dict[str, str] = {}  # key -> the agent allowed to write it ("" for none)
        self._seen_lock = threading.Lock()
        self._resolved: BusEndpoints | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._zap: ZapHandler | None = None
        self._pipe_addr = f"inproc://hub-pipe-{uuid.uuid4().hex}"
        self._pipe: zmq.Socket | None = None

    # -- owner-thread API -------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> BusHub:
        """Bind all sockets in the hub thread; raise `HubError` if that fails."""
        if self._thread is not None:
            raise HubError("hub already started")
        self._pipe = self.context.socket(zmq.PAIR)
        self._pipe.linger = 0
        self._pipe.bind(self._pipe_addr)
        self._thread = threading.Thread(target=self._run, name=f"bus-hub-{self.epoch:x}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise HubError(f"hub did not start within {timeout}s")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._close_pipe()
            if self._own_context:
                self.context.term()  # every socket of it is closed by now
            raise HubError(f"hub failed to start: {self._start_error}") from self._start_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop, close all sockets (linger 0) and, if the hub made it, the context."""
        if self._thread is not None and self._thread.is_alive() and self._pipe is not None:
            try:
                self._pipe.send(b"stop", zmq.NOBLOCK)
            except zmq.Again:  # the thread ended since is_alive() (its end of the pipe is gone)
                log.debug("hub: the stop request found no thread to take it")
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise HubError(f"hub thread did not stop within {timeout}s")
        self._close_pipe()
        if self._own_context:
            self._term_context(timeout)

    def _term_context(self, timeout: float) -> None:
        """Terminate the hub's own context. Nodes on inproc:// share it; while one of them is
        open, libzmq's term waits for it, so termination is left to a background thread
        instead of hanging `stop()` (it completes when the last such node closes)."""
        closer = threading.Thread(target=self.context.term, name="bus-hub-term", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            log.warning("hub stopped, but sockets of its zmq context are still open (nodes on "
                        "inproc://?); the context terminates when they close")

    def __enter__(self) -> BusHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def config(self) -> BusConfig:
        """The config with the endpoints actually bound (hand this to nodes)."""
        if self._resolved is None:
            raise HubError("hub not started: endpoints are not bound yet")
        return self._config.with_endpoints(self._resolved)

    @property
    def endpoints(self) -> BusEndpoints:
        return self.config.endpoints

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def credentials(self, name: str = SHARED_CLIENT) -> NodeCredentials | None:
        """Credentials for a node (None when security is off)."""
        return None if self.keys is None else self.keys.credentials(name)

    def add_client(self, name: str) -> NodeCredentials:
        """Create a key pair for a new client and admit it from now on."""
        if self.keys is None:
            raise SecurityError("security is 'none': there are no client keys")
        if name == SHARED_CLIENT:  # its pair may speak for every agent: never hand it out as a client's
            raise SecurityError(f"{SHARED_CLIENT!r} names the run's shared credential; choose another client name")
        creds = self.keys.add_client(name)
        if self._zap is not None:
            self._zap.allow(creds.client.public, name)
        return creds

    def agents(self) -> set[str]:
        """The agents the hub holds alive: each was heard within the last `ttl` seconds when the
        latest expiry check ran (one per heartbeat tick). A silent agent leaves this set at the
        check that expires its keys, so the two always agree."""
        with self._seen_lock:
            return set(self._seen)

    def keys_snapshot(self) -> dict[str, StateUpdate]:
        """A copy of the hub's map (for tests and diagnostics)."""
        return {k: self._stamped(m, seq) for k, (m, seq, _) in list(self._map.items())}

    def _stamped(self, msg: StateUpdate, seq: int) -> StateUpdate:
        return StateUpdate(msg.key, msg.agent, msg.payload, seq, self.epoch, msg.timestamp)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close(linger=0)
            self._pipe = None

    # -- hub thread -------------------------------------------------------------------------

    def _bind(self, kind: int, endpoint: str) -> tuple[zmq.Socket, str]:
        sock = self.context.socket(kind)
        sock.linger = 0
        sock.sndhwm = self._config.hwm
        sock.rcvhwm = self._config.hwm
        if kind == zmq.ROUTER:
            # Room for two whole snapshots per node (max_keys items and the end each): never cut
            # one short, yet a node that asks again and again without reading cannot make the hub
            # queue without bound (the ROUTER drops beyond it; that node's snapshot times out).
            sock.sndhwm = 2 * (self._config.max_keys + 1)
        try:
            if self.keys is not None:
                self.keys.apply_server(sock)
            sock.bind(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock, sock.get(zmq.LAST_ENDPOINT).decode()

    def _run(self) -> None:
        socks: list[zmq.Socket] = []
        try:
            if self.keys is not None:
                self._zap = ZapHandler(self.context, self.keys.client_names())
            eps = self._config.endpoints
            snapshot, snap_ep = self._bind(zmq.ROUTER, eps.snapshot)
            socks.append(snapshot)
            publisher, pub_ep = self._bind(zmq.PUB, eps.publish)
            socks.append(publisher)
            collector, col_ep = self._bind(zmq.PULL, eps.collect)
            socks.append(collector)
            collector.maxmsgsize = 4 * self._config.limits.max_frame_bytes
            pipe = self.context.socket(zmq.PAIR)
            socks.append(pipe)
            pipe.connect(self._pipe_addr)
            self._resolved = BusEndpoints(snap_ep, pub_ep, col_ep)
        except (zmq.ZMQError, SecurityError) as exc:
            self._start_error = exc
            for s in socks:
                s.close(linger=0)
            if self._zap is not None:
                self._zap.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(pipe, snapshot, publisher, collector)
        except BaseException as exc:  # record why the thread died, then let it propagate
            self.error = exc
            log.error("bus hub thread died: %r", exc)
            raise
        finally:
            for s in socks:
                s.close(linger=0)
            if self._zap is not None:
                self._zap.close()

    def _loop(self, pipe: zmq.Socket, snapshot: zmq.Socket, publisher: zmq.Socket,
              collector: zmq.Socket) -> None:
        poller = zmq.Poller()
        for s in (pipe, snapshot, collector):
            poller.register(s, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap.socket, zmq.POLLIN)
        interval = self._config.heartbeat_interval
        next_tick = time.monotonic()
        deferred = False  # the last tick put expiry off (a backlog of collected frames)
        # CURVE: each collected message says whose credential sent it (no handshake over inproc)
        bound = self._zap is not None and not self._resolved.collect.startswith("inproc://")
        while True:
            wait_ms = max(0, math.ceil((next_tick - time.monotonic()) * 1000.0))  # zmq truncates: no 0 ms spins
            events = dict(poller.poll(wait_ms))
            if pipe in events:
                if pipe.recv() == b"stop":
                    return
            if self._zap is not None and self._zap.socket in events:
                self._zap.handle()
                self.counters.auth_denied = self._zap.denied
            backlog = False  # the collector still held frames when the drain's budget ran out
            if collector in events:
                heard: dict[str, None] = {}
                read = 0
                for message in drain(collector, _DRAIN, copy=not bound):
                    read += 1
                    if not bound:
                        self._collect(message, publisher, heard)
                        continue
                    user = self._sender(message)
                    if user is not None:
                        self._collect(message.bytes, publisher, heard,
                                      None if user == SHARED_CLIENT else user)
                backlog = read == _DRAIN and waiting(collector)
                self._flush(publisher)
                self._touch(heard, time.monotonic())
            if snapshot in events:
                for frames in drain(snapshot, _DRAIN, multipart=True):
                    self._answer_snapshot(frames, snapshot)
            now = time.monotonic()
            if now >= next_tick:
                # after a stall, live agents' heartbeats may still wait in a backlog: expiry waits
                # one tick for them (one only: a flood that never ends must not stop expiry)
                if backlog and not deferred:
                    deferred = True
                else:
                    deferred = False
                    self._expire(now, publisher)
                self._flush(publisher)
                publisher.send(pack_batch(self.epoch, self._seq, []))  # the heartbeat
                next_tick = now + interval

    def _collect(self, frame: bytes, publisher: zmq.Socket, heard: dict[str, None],
                 bound: str | None = None) -> None:
        """Validate, stamp and batch one collected frame (a body, or a parcel of bodies each
        handled on its own); `heard` gathers the senders of this loop turn (their liveness is
        recorded once per turn, see `_touch`). `bound`: the agent id the sender's credential is
        bound to (None: the shared run credential, or no security), the only agent it may
        speak for."""
        self.counters.received += 1
        if is_parcel(frame):
            for body in self._decoded(unpack_parcel, frame, "parcel") or ():
                self._collect_body(body, publisher, heard, bound)
        else:
            self._collect_body(frame, publisher, heard, bound)

    def _sender(self, message: zmq.Frame) -> str | None:
        """The client name ZAP gave the connection `message` came over, or None (counted as
        rejected) if it has none: such a message is not accepted from a CURVE collector."""
        try:
            return message.get("User-Id")
        except zmq.ZMQError:
            self.counters.rejected += 1
            log.debug("hub: a collected message without a ZAP User-Id was rejected")
            return None

    def _decoded(self, decode: Callable[[bytes, MessageLimits], T], frame: bytes, what: str) -> T | None:
        """``decode(frame, limits)``, or None for a malformed frame (counted and logged)."""
        try:
            return decode(frame, self._config.limits)
        except MalformedMessage as exc:
            self.counters.malformed += 1
            log.debug("hub: dropped malformed %s: %s", what, exc)
            return None

    def _collect_body(self, frame: bytes, publisher: zmq.Socket, heard: dict[str, None],
                      bound: str | None) -> None:
        msg = self._decoded(unpack, frame, "frame")
        if msg is None:
            return
        key, agent = msg.key, msg.agent
        if bound is not None and agent != bound:
            self.counters.rejected += 1  # a per-agent credential speaking for another agent
            log.debug("hub: rejected %r claiming agent %r from credential %r", key, agent, bound)
            return
        if key == NODE_HEARTBEAT:
            heard[agent] = None
            return
        owner = self._owners.get(key)
        if owner is None:  # first sight of this key: who owns it (control keys own nothing)
            owner = "" if msg.is_control else (key_owner(key) or "")
            if len(self._owners) >= self._config.max_keys:
                self._owners.clear()  # bounded: a flood of rejected keys cannot grow it
            self._owners[key] = owner
        if owner != agent or not owner:
            self.counters.rejected += 1
            log.debug("hub: rejected %r from agent %r", key, agent)
            return
        heard[agent] = None
        if msg.payload is None:
            if msg.key in self._map:
                self._publish(msg, frame, publisher, delete=True)
            return
        if msg.key not in self._map and len(self._map) >= self._config.max_keys:
            self.counters.rejected += 1
            log.debug("hub: map full (%d keys), rejected %r", len(self._map), msg.key)
            return
        self._publish(msg, frame, publisher, delete=False)

    def _publish(self, msg: StateUpdate, body: bytes, publisher: zmq.Socket, delete: bool) -> None:
        """Stamp `msg` (whose validated body is `body`), store it, add it to the batch."""
        limits = self._config.limits
        if (len(self._batch) >= limits.max_array_len
                or self._batch_bytes + len(body) > limits.max_frame_bytes):
            self._flush(publisher)  # keep every batch within what nodes accept
        self._seq += 1
        if delete:
            self._map.pop(msg.key, None)
        else:
            self._map[msg.key] = (msg, self._seq, None)
        self._batch.append(body)
        self._batch_bytes += len(body)
        self.counters.published += 1

    def _flush(self, publisher: zmq.Socket) -> None:
        """Publish the bodies stamped since the last flush as one batch (PUB never blocks)."""
        if not self._batch:
            return
        frame = pack_batch(self.epoch, self._seq, self._batch)
        self._batch = []
        self._batch_bytes = 0
        publisher.send(frame)

    def _touch(self, agents: dict[str, None], now: float) -> None:
        """Record that `agents` were heard at `now` (once per loop turn, under one lock)."""
        if agents:
            with self._seen_lock:
                self._seen.update(dict.fromkeys(agents, now))

    def _answer_snapshot(self, frames: list[bytes], snapshot: zmq.Socket) -> None:
        if len(frames) != 2:
            self.counters.malformed += 1
            return
        identity, frame = frames
        req = self._decoded(unpack, frame, "snapshot request")
        if req is None:
            return
        if req.key != SNAPSHOT_REQUEST:
            self.counters.rejected += 1
            return
        for key, (msg, seq, body) in self._map.items():
            if body is None:  # encoded on first demand, then kept until the key changes
                body = encode(self._stamped(msg, seq))
                self._map[key] = (msg, seq, body)
            snapshot.send_multipart([identity, body])
        request = req.payload.get("request", 0) if req.payload is not None else 0
        # the item count lets the node tell a whole snapshot from one the ROUTER cut at its HWM
        end = StateUpdate(SNAPSHOT_END, HUB_AGENT, StatePayload(extra={"request": request, "items": len(self._map)}),
                          self._seq, self.epoch, time.time())
        snapshot.send_multipart([identity, encode(end)])
        self.counters.snapshots += 1

    def _expire(self, now: float, publisher: zmq.Socket) -> None:
        ttl = self._config.ttl
        with self._seen_lock:
            gone = [a for a, t in self._seen.items() if now - t > ttl]
            for agent in gone:
                del self._seen[agent]
        for agent in gone:
            keys = [k for k, (m, _, _) in self._map.items() if m.agent == agent]
            log.debug("hub: agent %r silent for > %.2fs, expiring %d keys", agent, ttl, len(keys))
            self.counters.expired_agents += 1
            self.counters.expired_keys += len(keys)
            for key in keys:
                deletion = StateUpdate(key, agent, None, 0, 0, time.time())
                self._publish(deletion, encode(deletion), publisher, delete=True)
