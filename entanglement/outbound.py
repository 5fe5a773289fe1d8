"""`Outbound`: everything a `BusNode` sends to the hub, on its one PUSH socket.

The socket is shared by the publishing callers, the node's heartbeat thread and its node thread
(flushing the outbox, re-sending own keys), so every use is under one lock, which also guards
the outbox and the node's own latest bodies. ZeroMQ sockets are not thread-safe; this lock is
what makes the sharing safe.

An update leaves at once from the caller's thread, unless the node sent something less than
`BusConfig.coalesce` ago: then it joins the outbox, and the node thread, woken through the
node's pipe (b"F") when the outbox stops being empty, sends everything in it as one parcel (see
`entanglement.message`). A full outbox leaves from the caller's thread, and so does one the node
thread has left waiting longer than `coalesce` (it is busy, e.g. in a slow `on_update` callback),
with the next publish or, when none comes, the next heartbeat (the heartbeat thread's): a busy
node thread holds its agent's updates back by at most `coalesce + heartbeat_interval`. Waking the node thread never blocks
(a full pipe already holds a wake-up; an ended thread has nothing to wake), so no caller can
hang holding the lock. Stopping is not a pipe message (a pipe filled by wake-ups while the node
thread sat in a callback could not take it): the node sets a flag and wakes the thread. Order is kept either way:
anything sent directly after the outbox filled up sends the outbox first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import zmq

from entanglement.config import BusConfig
from entanglement.message import (
    NODE_HEARTBEAT,
    PARCEL_OVERHEAD,
    encode,
    make_update,
    pack_parcel,
)


class Outbound:
    """The PUSH socket to the hub, the outbox and the node's own latest bodies (module docstring).

    `sent`, `send_failed` and `restored` of `counters` (a `NodeCounters`) are kept here, under
    the lock. A re-send that ZeroMQ refuses (`hwm` messages already wait for the hub) is tried
    again with each heartbeat until it leaves or the key is published anew or deleted.
    """

    def __init__(self, agent_id: str, config: BusConfig, push: zmq.Socket, wake: zmq.Socket,
                 counters) -> None:
        self.agent_id = agent_id
        self.config = config
        self.lock = threading.Lock()
        self._push = push
        self._wake = wake  # the node thread's pipe: b"F" wakes it to flush the outbox (or to see a stop)
        self._counters = counters
        self._own: dict[str, bytes] = {}  # key -> latest body published (for re-sending)
        self._unsent: dict[str, None] = {}  # own keys whose re-send ZeroMQ refused, in order
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._outbox_since = 0.0  # monotonic time the oldest update in the outbox joined it
        self._last_send = float("-inf")  # monotonic time of the last send to the hub
        self.closed = False

    # -- callers ----------------------------------------------------------------------------

    def publish(self, key: str, body: bytes, deleting: bool) -> bool | None:
        """Remember (or, for a deletion, forget) `body` as the key's latest and send or queue it.
        Returns whether ZeroMQ took it (False: `config.hwm` messages already wait for the hub),
        or None when the node is closed."""
        with self.lock:
            if self.closed:
                return None
            self._unsent.pop(key, None)  # this body supersedes the one that failed to leave
            if deleting:
                self._own.pop(key, None)
            else:
                self._own[key] = body
            return self._queue(body)

    def heartbeat(self, beat: bool) -> bool:
        """Send the outbox if the node thread has left it waiting longer than `coalesce` (it is
        busy, and no publish came to send it), then a "$heartbeat" unless `beat` is false (the
        hub is silent), and again any re-send ZeroMQ refused before; False once closed."""
        with self.lock:
            if self.closed:
                return False
            if self._stale(time.monotonic()):
                self._flush()
            if beat:
                if self._unsent:  # before the beat: it may be the one message the queue still takes
                    self._resend(list(self._unsent))
                self._send(encode(make_update(self.agent_id, NODE_HEARTBEAT, None)), updates=0)
            return True

    # -- node thread ------------------------------------------------------------------------

    def flush(self) -> bool:
        """Send the outbox now (the node thread, on its pipe's b"F"); False once closed."""
        with self.lock:
            return not self.closed and self._flush()

    def resend(self, keys: Iterable[str]) -> int:
        """Send the outbox, then the latest body of each of `keys` this node still holds (a
        deleted key is forgotten, so it is never re-sent); returns how many were re-sent (each
        counts in `restored`)."""
        with self.lock:
            if self.closed:
                return 0
            self._flush()  # older than the re-sent keys: it goes first
            return self._resend(keys)

    def resend_missing(self, present: Callable[[str], bool]) -> int:
        """`resend` of every own key for which `present(key)` is false (after a snapshot).
        `present` runs outside the lock: it takes the replica's, and a reader waiting on the
        replica may call `publish` (which takes this one) while it holds the replica's lock."""
        with self.lock:
            own = list(self._own)
        return self.resend([k for k in own if not present(k)])

    def wake(self) -> None:
        """Wake the node thread (best effort: a full pipe already holds a wake-up), e.g. to see
        that the node is stopping."""
        with self.lock:
            if not self.closed:
                self._wake_node(b"F")

    def close(self, linger: float) -> None:
        """Send what is still queued, then close both sockets; publishing returns None after.

        The PUSH socket lingers up to `linger` seconds: updates ZeroMQ has taken but not yet
        written (a large CURVE frame takes a while) still leave, unless the hub does not take
        them in that time. Closing the context (`zmq.Context.term`) is what waits for them."""
        with self.lock:
            if self.closed:
                return
            self._flush()
            self._wake.close(linger=0)
            self._push.close(linger=max(0, round(linger * 1000)))
            self.closed = True

    # -- under the lock ---------------------------------------------------------------------

    def _queue(self, body: bytes) -> bool:
        now = time.monotonic()
        if not self._outbox and now - self._last_send >= self.config.coalesce:
            self._last_send = now
            return self._send(body, updates=1)
        limits = self.config.limits
        sent = True
        full = (len(self._outbox) >= limits.max_array_len
                or self._outbox_bytes + len(body) > limits.max_frame_bytes - PARCEL_OVERHEAD)
        # the node thread has not sent the outbox within coalesce (it is busy, e.g. in a slow
        # on_update callback): it leaves from this thread with this update, nothing waits
        stale = not full and self._stale(now)
        if full:
            sent = self._flush()  # a full parcel leaves from this thread
        if not self._outbox:
            self._outbox_since = now
        self._outbox.append(body)
        self._outbox_bytes += len(body)
        if stale:
            return self._flush()
        if len(self._outbox) == 1:
            self._wake_node(b"F")  # wake the node thread: it sends the outbox when it runs
        return sent

    def _resend(self, keys: Iterable[str]) -> int:
        done = 0
        for key in keys:
            body = self._own.get(key)
            if body is None:
                self._unsent.pop(key, None)
            elif self._send(body, updates=1):
                self._unsent.pop(key, None)
                done += 1
            else:
                self._unsent[key] = None  # the heartbeat tries again
        self._counters.restored += done
        return done

    def _stale(self, now: float) -> bool:
        """Whether the outbox holds updates the node thread has left waiting longer than `coalesce`."""
        return bool(self._outbox) and now - self._outbox_since >= self.config.coalesce

    def _wake_node(self, command: bytes) -> None:
        """Tell the node thread ``command`` without ever blocking under the lock: a full pipe
        already holds a wake-up, and a node thread that has ended (its pipe end closed) has
        nothing to wake; whatever waits in the outbox then leaves with ``close()``."""
        try:
            self._wake.send(command, zmq.NOBLOCK)
        except (zmq.Again, zmq.ContextTerminated):  # full (a wake-up waits already), or no thread
            pass

    def _flush(self) -> bool:
        """Send the outbox as one parcel (one body goes alone)."""
        bodies, self._outbox, self._outbox_bytes = self._outbox, [], 0
        if not bodies:
            return True
        self._last_send = time.monotonic()
        return self._send(bodies[0] if len(bodies) == 1 else pack_parcel(bodies), updates=len(bodies))

    def _send(self, frame: bytes, updates: int) -> bool:
        """Queue `frame`, holding `updates` updates (0: a heartbeat, which no counter counts),
        for the hub."""
        try:
            self._push.send(frame, zmq.NOBLOCK)
        except (zmq.Again, zmq.ContextTerminated):  # hub overloaded or gone; its context ended
            self._counters.send_failed += updates
            return False
        self._counters.sent += updates
        return True
