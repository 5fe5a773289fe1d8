"""Edges of the bus found in review, over real sockets: limits at the snapshot, a busy node
thread's last update, close() from a callback, what the counters count, a failed constructor,
the shared credential's name, and heartbeats while the hub is down."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from entanglement import (BusConfig, BusEndpoints, BusHub, BusKeys, BusNode, ConfigError, MessageLimits, NodeState,
                          encode_phases)
from entanglement.message import encode_update
from entanglement.security import SHARED_CLIENT, SecurityError
from entanglement.testing import fixed_tcp_endpoints, wait_until

pytestmark = pytest.mark.timeout(30)

FAST = dict(heartbeat_interval=0.05, hub_timeout=0.4, ttl=1.0, snapshot_timeout=0.5)


def test_an_update_at_the_frame_limit_reaches_a_late_joiner() -> None:
    """The hub re-encodes a snapshot item with its seq and epoch: up to 16 bytes more than the
    body its agent sent, which may sit exactly at max_frame_bytes."""
    limit = 1000
    config = BusConfig(security="none", limits=MessageLimits(max_frame_bytes=limit), **FAST)
    n = 1
    while len(encode_update("a", "agent/a/big", {"label": "x" * (n + 1)})) <= limit:
        n += 1
    payload = {"label": "x" * n}
    assert len(encode_update("a", "agent/a/big", payload)) == limit
    with BusHub(config) as hub:
        a = BusNode("a", hub.config)
        late = None
        try:
            assert a.wait_active(5)
            a.publish("big", payload)
            assert a.wait_for(lambda node: "big" in node.latest("a"), 5)
            for _ in range(50):  # a high seq and epoch make the stamped body as long as it gets
                a.publish("small", {"step": 1})
            assert a.wait_for(lambda node: node.seq == hub.seq and node.seq > 50, 5)
            late = BusNode("late", hub.config)
            assert late.wait_active(5)
            assert late.latest("a")["big"].payload["label"] == payload["label"]
            assert late.counters.malformed == 0
        finally:
            a.close()
            if late is not None:
                late.close()


def test_a_busy_node_thread_holds_its_last_coalesced_update_one_heartbeat_at_most() -> None:
    """Two updates back to back, the second coalesced, while the node thread sits in a slow
    callback and no further publish comes: the heartbeat thread sends the waiting one."""
    config = BusConfig(security="none", coalesce=0.01, **FAST)
    release, entered = threading.Event(), threading.Event()

    def slow(update) -> None:
        if update.key == "agent/w/block":
            entered.set()
            release.wait(10)

    with BusHub(config) as hub:
        a = BusNode("a", hub.config, on_update=slow)
        w = BusNode("w", hub.config)
        try:
            assert a.wait_active(5) and w.wait_active(5)
            w.publish("block", {"step": 1})
            assert wait_until(entered.is_set, 5)
            a.publish("phase", {"step": 1})
            a.publish("sedenion", {"step": 2})  # within coalesce: it joins the outbox
            # within 3 s: a heartbeat (every 0.05 s) sent it, not the callback's end (10 s away)
            assert w.wait_for(lambda node: "sedenion" in node.latest("a"), 3)
        finally:
            release.set()
            a.close()
            w.close()


def test_close_from_an_update_callback_releases_every_socket() -> None:
    config = BusConfig(security="none", **FAST)
    with BusHub(config) as hub:
        holder: list[BusNode] = []
        closed = threading.Event()

        def close_me(update) -> None:
            if update.key == "agent/w/stop" and holder:
                holder[0].close()  # from the node thread
                closed.set()

        a = BusNode("a", hub.config, on_update=close_me)
        holder.append(a)
        w = BusNode("w", hub.config)
        try:
            assert a.wait_active(5) and w.wait_active(5)
            w.publish("stop", {"step": 1})
            assert wait_until(closed.is_set, 5)
            assert wait_until(lambda: a.node_state is NodeState.CLOSED and a.context.closed, 5)
            assert a._out.closed and not a._thread.is_alive()
            a.close()  # again, from outside: a no-op
        finally:
            w.close()


def test_heartbeats_are_not_counted_as_failed_updates() -> None:
    """With no hub and a tiny HWM the PUSH queue fills with heartbeats; send_failed counts the
    caller's updates only."""
    # coalesce 0: every publish sends at once, so its result is its send's (a queued one would
    # be counted when the outbox leaves)
    config = BusConfig(endpoints=BusEndpoints.tcp(), security="none", hwm=2, coalesce=0.0, **FAST)
    node = BusNode("a", config)
    try:
        time.sleep(0.5)  # about ten heartbeats against a queue of two
        assert node.counters.send_failed == 0
        results = [node.publish("x", {"step": i}) for i in range(5)]
        assert False in results  # the heartbeats did fill the queue
        assert node.counters.send_failed == results.count(False)
    finally:
        node.close()


def test_a_constructor_that_fails_releases_its_context(monkeypatch) -> None:
    made: list[zmq.Context] = []

    class Recording(zmq.Context):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr("entanglement.node.zmq.Context", Recording)
    endpoints = BusEndpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "bogus://nowhere")
    with pytest.raises(ConfigError, match="bogus://nowhere"):
        BusNode("a", BusConfig(endpoints=endpoints, security="none"))
    assert len(made) == 1 and made[0].closed


def test_the_shared_credential_name_is_not_a_client_name() -> None:
    with BusHub(BusConfig(endpoints=BusEndpoints.tcp())) as hub:
        with pytest.raises(SecurityError, match=SHARED_CLIENT):
            hub.add_client(SHARED_CLIENT)
        assert hub.add_client("a0").client.public != hub.credentials().client.public


def _frames_within(sock: zmq.Socket, seconds: float) -> int:
    count, deadline = 0, time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(left * 1000):
            sock.recv()
            count += 1
    return count


def test_a_node_holds_its_heartbeats_while_the_hub_is_silent() -> None:
    """No hub for 1.2 s: the node beats for hub_timeout (0.4 s, 8 beats), then holds its beats
    instead of queueing about 16 more for whoever binds the collector next."""
    config = BusConfig(endpoints=fixed_tcp_endpoints(), security="none", **FAST)
    node = BusNode("a", config)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    try:
        time.sleep(1.2)
        pull.bind(config.endpoints.collect)  # a collector appears; no hub speaks on PUB
        arrived = _frames_within(pull, 0.5)
        beats = config.hub_timeout / config.heartbeat_interval
        assert 1 <= arrived <= beats + 3  # what queued before the hold, and nothing after it
        assert node.counters.heartbeats_held >= 10
    finally:
        node.close()
        pull.close(linger=0)
        ctx.term()


def test_heartbeats_resume_with_a_restarted_hub_and_keep_the_node_alive() -> None:
    """The hub down for 2.5 hub_timeouts (the node holds its beats), then back on the same
    endpoints: the node's beats resume, so the new hub does not expire it in 2 TTLs."""
    config = BusConfig(endpoints=fixed_tcp_endpoints(), **FAST)
    hub1 = BusHub(config).start()
    keys = hub1.keys
    node = BusNode("a", hub1.config, hub1.credentials())
    hub2 = None
    try:
        assert node.wait_active(5)
        node.publish("phase", {"step": 1})
        assert wait_until(lambda: "agent/a/phase" in hub1.keys_snapshot(), 5)
        hub1.stop()
        assert wait_until(lambda: node.counters.heartbeats_held >= 3, 5)
        held = node.counters.heartbeats_held
        hub2 = BusHub(config, keys=keys).start()
        assert wait_until(lambda: "agent/a/phase" in hub2.keys_snapshot(), 10)  # re-sent after the snapshot
        time.sleep(2 * config.ttl)
        assert hub2.counters.expired_agents == 0
        assert "agent/a/phase" in hub2.keys_snapshot()
        assert node.counters.heartbeats_held - held <= 2  # at most the beats already being decided
    finally:
        node.close()
        if hub2 is not None:
            hub2.stop()


def test_close_delivers_large_updates_it_just_sent() -> None:
    """Updates ZeroMQ has queued but not yet written (large CURVE frames) still reach the hub
    when the node is closed right after publishing them: close() lingers on its PUSH socket
    (up to hub_timeout) instead of discarding them."""
    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp(), **FAST)).start()
    big = encode_phases(np.zeros(200_000, dtype=np.float32))  # 800 KB each, under the frame limit
    try:
        for round_ in range(3):
            node = BusNode(f"a{round_}", hub.config, hub.credentials())
            assert node.wait_active(5)
            for j in range(8):
                assert node.publish(f"k{j}", {"phases": big, "step": j})
            node.close()
            assert node.counters.sent - node.counters.restored == 8
            keys = [f"agent/a{round_}/k{j}" for j in range(8)]
            assert wait_until(lambda: all(k in hub.keys_snapshot() for k in keys), 5), \
                sorted(k for k in hub.keys_snapshot() if k.startswith(f"agent/a{round_}/"))
    finally:
        hub.stop()


def test_close_stops_a_node_whose_pipe_filled_while_its_callback_was_stuck() -> None:
    """A callback blocked long enough for thousands of flush wake-ups to fill the node's pipe:
    close() still stops the node once the callback returns (the stop is a flag, not a message
    that can find the pipe full), and publishers are not held up meanwhile."""
    hub = BusHub(BusConfig(security="none", endpoints=BusEndpoints.inproc(), **FAST)).start()
    stuck, release = threading.Event(), threading.Event()

    def callback(update) -> None:
        if update.key == "agent/a/go" and update.payload is not None:
            stuck.set()
            release.wait(10)

    a = BusNode("a", hub.config, context=hub.context)
    b = BusNode("b", hub.config, context=hub.context, on_update=callback)
    try:
        assert a.wait_active(5) and b.wait_active(5)
        a.publish("go", {"step": 1})
        assert stuck.wait(5)
        slowest = 0.0
        for i in range(3000):  # each burst wakes the node thread once (b"F" on its pipe, which holds 2,000)
            t = time.monotonic()
            b.publish("x", {"step": i})
            b.publish("y", {"step": i})
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.0005)
        assert slowest < 0.5  # no publish waits on a full pipe
        threading.Timer(1.5, release.set).start()  # longer than any retry of a message into the pipe
        t = time.monotonic()
        b.close(timeout=5)
        assert time.monotonic() - t < 4
        assert not b._thread.is_alive() and b.node_state is NodeState.CLOSED
    finally:
        release.set()
        b.close()
        a.close()
        hub.stop()


def test_inconsistent_or_unusable_settings_are_refused_up_front() -> None:
    with pytest.raises(ConfigError, match="security is 'none'"):  # keys would turn CURVE on anyway
        BusHub(BusConfig(security="none"), keys=BusKeys.generate())
    for limits in (MessageLimits(max_array_len=0), MessageLimits(max_frame_bytes=200)):
        with pytest.raises(ConfigError, match="limits"):
            BusConfig(limits=limits)
    hub = BusHub(BusConfig(security="none", endpoints=BusEndpoints.inproc(), **FAST)).start()
    try:
        with pytest.raises(ConfigError, match="agent id"):  # its own heartbeat could not be sent
            BusNode("x" * 300, hub.config, context=hub.context)
    finally:
        hub.stop()


def test_a_refused_re_send_is_tried_again_with_the_heartbeat() -> None:
    """A key the hub lost is re-sent; when ZeroMQ refuses that (`hwm` messages already wait
    for the hub), the heartbeat tries it again until it leaves, and it counts once in restored."""
    from entanglement.node_types import NodeCounters
    from entanglement.outbound import Outbound

    ctx = zmq.Context()
    endpoint = fixed_tcp_endpoints().collect
    push, wake = ctx.socket(zmq.PUSH), ctx.socket(zmq.PAIR)
    push.sndhwm, push.linger, wake.linger = 1, 0, 0
    push.connect(endpoint)  # nobody listens yet: the queue holds one message
    counters = NodeCounters()
    out = Outbound("a", BusConfig(security="none", coalesce=0.0, **FAST), push, wake, counters)
    pull = None
    try:
        assert out.publish("agent/a/k", b"K", deleting=False)  # fills the queue
        assert out.publish("agent/a/other", b"O", deleting=False) is False
        assert out.resend(["agent/a/k"]) == 0 and counters.restored == 0  # refused: remembered
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        pull.bind(endpoint)
        assert pull.poll(5000) and pull.recv() == b"K"  # the queued publish
        assert wait_until(lambda: out.heartbeat(True) and counters.restored == 1, 5)
        frames = [pull.recv() for _ in range(2) if pull.poll(2000)]
        assert b"K" in frames  # the re-send, beside a heartbeat
        out.heartbeat(True)
        assert counters.restored == 1  # not sent again once it left
    finally:
        out.close(0)
        if pull is not None:
            pull.close(linger=0)
        ctx.term()
