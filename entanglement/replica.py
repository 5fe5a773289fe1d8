"""`Replica`: a node's thread-safe local copy of the bus map.

Written only by the node thread (`install` a snapshot, `apply` one update), read from any thread
(`latest`, `state`, `agents`, `wait`). Every change is reported to the registered callbacks, in
the node thread, after the lock is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from entanglement.message import StateUpdate

log = logging.getLogger(__name__)

UpdateCallback = Callable[[StateUpdate], None]


class Replica:
    """Key -> latest `StateUpdate`, indexed by agent, with the (epoch, seq) it reflects."""

    def __init__(self, name: str, callbacks: list[UpdateCallback]) -> None:
        self.name = name  # for log messages
        self.cond = threading.Condition()  # guards everything below; notified on every change
        self.seq = 0
        self.epoch = 0
        self.callback_errors = 0
        self._waiting = 0  # threads inside wait(): notify only when someone listens
        self._map: dict[str, StateUpdate] = {}
        self._by_agent: dict[str, dict[str, StateUpdate]] = {}
        self._callbacks = list(callbacks)

    # -- readers (any thread) ---------------------------------------------------------------

    def latest(self, agent: str) -> dict[str, StateUpdate]:
        with self.cond:
            return dict(self._by_agent.get(agent, {}))

    def state(self) -> dict[str, StateUpdate]:
        with self.cond:
            return dict(self._map)

    def agents(self) -> set[str]:
        with self.cond:
            return set(self._by_agent)

    def __contains__(self, key: str) -> bool:
        with self.cond:
            return key in self._map

    def add_callback(self, callback: UpdateCallback) -> None:
        with self.cond:
            self._callbacks.append(callback)

    def wait(self, predicate: Callable[[], bool], timeout: float, give_up: Callable[[], bool]) -> bool:
        """Block until `predicate()` holds (re-checked on every change) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or give_up():
                    return predicate()
                self._waiting += 1
                try:
                    self.cond.wait(min(left, 0.05))
                finally:
                    self._waiting -= 1
        return True

    def changed(self) -> None:
        """Wake waiters after a change made elsewhere (e.g. the node's state)."""
        with self.cond:
            self.cond.notify_all()

    # -- writers (node thread) --------------------------------------------------------------

    def install(self, items: dict[str, StateUpdate], seq: int, epoch: int,
                before_notify: Callable[[], None]) -> None:
        """Replace the map by a snapshot; report what changed (removed keys as deletions).

        `before_notify` runs under the lock after the swap (the node marks itself ACTIVE there,
        so waiters see the new map and the new state together).
        """
        changes: list[StateUpdate] = []
        by_agent: dict[str, dict[str, StateUpdate]] = {}
        for key, upd in items.items():
            _, owner, name = key.split("/", 2)  # unpack() guarantees agent/<id>/<name>
            by_agent.setdefault(owner, {})[name] = upd
        with self.cond:
            old = self._map
            for key, upd in old.items():
                if key not in items:
                    changes.append(StateUpdate(key, upd.agent, None, seq, epoch, upd.timestamp))
            changes.extend(upd for key, upd in items.items() if old.get(key) != upd)
            self._map, self._by_agent = items, by_agent
            self.seq, self.epoch = seq, epoch
            before_notify()
            self.cond.notify_all()
        for upd in changes:
            self._notify(upd)

    def apply(self, msg: StateUpdate) -> None:
        """Apply the next update in sequence (payload None deletes the key)."""
        self.apply_batch((msg,))

    def apply_batch(self, msgs: Sequence[StateUpdate]) -> None:
        """Apply updates that continue the sequence in order, under one lock acquisition."""
        with self.cond:
            for msg in msgs:
                _, owner, name = msg.key.split("/", 2)
                if msg.payload is None:
                    self._map.pop(msg.key, None)
                    names = self._by_agent.get(owner)
                    if names is not None:
                        names.pop(name, None)
                        if not names:
                            del self._by_agent[owner]
                else:
                    self._map[msg.key] = msg
                    names = self._by_agent.get(owner)
                    if names is None:
                        names = self._by_agent[owner] = {}
                    names[name] = msg
            self.seq = msgs[-1].seq
            if self._waiting:
                self.cond.notify_all()
        if self._callbacks:
            for msg in msgs:
                self._notify(msg)

    def _notify(self, upd: StateUpdate) -> None:
        for callback in self._callbacks:
            try:
                callback(upd)
            except Exception:  # a user callback must not kill the bus thread: log and count
                self.callback_errors += 1
                log.exception("%s: on_update callback failed", self.name)
