"""The bus with real sockets and threads: convergence, late join, hub restart, node death, gaps."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from entanglement import (
    BusConfig,
    BusEndpoints,
    BusHub,
    BusKeys,
    BusNode,
    HubError,
    MalformedMessage,
    MessageLimits,
    NodeError,
    NodeState,
    StateUpdate,
    decode_phases,
)
from entanglement.testing import converged, fixed_tcp_endpoints, wait_converged, wait_until

pytestmark = pytest.mark.timeout(30)

FAST = dict(heartbeat_interval=0.05, hub_timeout=0.4, ttl=1.0, snapshot_timeout=0.5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def endpoints_for(transport: str, ipc_dir: str) -> BusEndpoints:
    if transport == "tcp":
        return BusEndpoints.tcp()
    if transport == "ipc":
        return BusEndpoints.ipc(ipc_dir)
    return BusEndpoints.inproc()


@pytest.fixture(params=["inproc", "ipc", "tcp"])
def hub(request: pytest.FixtureRequest, ipc_dir: str) -> Iterator[BusHub]:
    hub = BusHub(BusConfig(endpoints=endpoints_for(request.param, ipc_dir), **FAST)).start()
    yield hub
    hub.stop()


def make_node(hub: BusHub, agent: str, **kwargs: object) -> BusNode:
    ctx = hub.context if hub.config.endpoints.is_inproc else None
    return BusNode(agent, hub.config, hub.credentials(), context=ctx, **kwargs)


def test_nodes_publishing_in_random_orders_converge(hub: BusHub) -> None:
    nodes = [make_node(hub, f"a{i}") for i in range(4)]
    last: list[dict[str, int]] = [{} for _ in nodes]  # each node's last value per key
    try:
        assert all(n.wait_active(5) for n in nodes)

        def publisher(node: BusNode, seed: int) -> None:
            rng = random.Random(seed)
            for i in range(150):
                name = f"k{rng.randrange(5)}"
                node.publish(name, {"value": i, "sedenion": [rng.random() for _ in range(16)]})
                last[seed][name] = i
                if rng.random() < 0.2:
                    time.sleep(rng.random() * 0.002)

        threads = [threading.Thread(target=publisher, args=(n, i)) for i, n in enumerate(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

        def handed(n: BusNode) -> int:
            """Own updates handed to the hub, not counting re-sends: on a loaded machine a node
            may miss the hub's heartbeats for hub_timeout, re-sync and re-send the keys its
            snapshot lacked (counted in both sent and restored)."""
            c = n.counters
            return c.sent - c.restored

        # publish() only queues: wait until every node has handed its updates to the hub
        assert all(n.wait_for(lambda n: handed(n) == 150, 5) for n in nodes), [n.counters for n in nodes]
        restored = sum(n.counters.restored for n in nodes)
        assert wait_until(lambda: hub.seq >= 4 * 150 + restored, 10), (hub.seq, restored)  # ... all stamped
        assert wait_converged(nodes, hub, timeout=10)
        assert all(n.peers() == {f"a{j}" for j in range(4)} - {n.agent_id} for n in nodes)
        for n in nodes:
            for j, values in enumerate(last):  # everyone holds every agent's last value per key
                latest = n.latest(f"a{j}")
                assert {name: u.payload["value"] for name, u in latest.items()} == values
            assert handed(n) == 150 and n.counters.send_failed == 0
            assert n.counters.malformed == 0
            assert n.alive
    finally:
        for n in nodes:
            n.close()


def test_late_joiner_gets_full_state(hub: BusHub) -> None:
    nodes = [make_node(hub, f"a{i}") for i in range(3)]
    late: BusNode | None = None
    try:
        for i, n in enumerate(nodes):
            for k in range(10):
                phases = np.full(8, i + k / 10, dtype=np.float32)
                n.publish(f"k{k}", {"phases": phases, "step": k, "coherence": 0.5})
        assert wait_converged(nodes, hub, timeout=10)
        seen: list[StateUpdate] = []
        late = make_node(hub, "late", on_update=seen.append)
        assert wait_converged([*nodes, late], hub, timeout=10)
        assert len(late.state()) == 30
        assert late.peers() == {"a0", "a1", "a2"}
        np.testing.assert_allclose(
            decode_phases(late.latest("a2")["k3"].payload["phases"]), np.full(8, 2.3, np.float32)
        )
        assert len(seen) == 30  # the snapshot is reported through the callback too
    finally:
        for n in [*nodes, *([late] if late else [])]:
            n.close()


def test_hub_killed_and_restarted_mid_stream() -> None:
    config = BusConfig(endpoints=fixed_tcp_endpoints(), **FAST)
    hub1 = BusHub(config).start()
    keys = hub1.keys
    nodes = [BusNode(f"a{i}", hub1.config, hub1.credentials()) for i in range(3)]
    last_sent = {n.agent_id: -1 for n in nodes}
    stop = threading.Event()

    def stream(node: BusNode) -> None:
        i = 0
        while not stop.is_set():
            node.publish("counter", {"value": i})
            last_sent[node.agent_id] = i
            i += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=stream, args=(n,)) for n in nodes]
    hub2: BusHub | None = None
    try:
        assert all(n.wait_active(5) for n in nodes)
        for t in threads:
            t.start()
        time.sleep(0.3)
        old_epoch = hub1.epoch
        hub1.stop()  # killed mid-stream: its map and sequence are gone
        time.sleep(0.2)
        hub2 = BusHub(config, keys=keys).start()  # same endpoints, same run keys
        assert hub2.epoch != old_epoch
        time.sleep(0.5)  # nodes keep streaming into the new hub
        stop.set()
        for t in threads:
            t.join(5)

        def carried_on() -> bool:  # the last publishes may still wait in an outbox: converged is not enough
            return converged(nodes, hub2) and all(
                n.latest(o.agent_id)["counter"].payload["value"] == last_sent[o.agent_id]
                for n in nodes for o in nodes)

        assert wait_until(carried_on, 10)
        for n in nodes:
            assert n.epoch == hub2.epoch
            assert n.counters.resyncs >= 1
            assert n.alive
            for other in nodes:  # everyone carries on with everyone's latest value
                value = n.latest(other.agent_id)["counter"].payload["value"]
                assert value == last_sent[other.agent_id]
    finally:
        stop.set()
        for n in nodes:
            n.close()
        if hub2 is not None:
            hub2.stop()


HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from entanglement import BusConfig, BusHub, BusKeys
    hub = BusHub(BusConfig.from_dict(json.loads(sys.argv[1])),
                 keys=BusKeys.from_dict(json.loads(sys.argv[2]))).start()
    print(hub.epoch, flush=True)
    time.sleep(60)
    """
)


def spawn_hub(config: BusConfig, keys: BusKeys) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", HUB_SCRIPT, json.dumps(config.to_dict()), json.dumps(keys.to_dict())],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_hub_process_sigkilled_and_restarted_mid_stream() -> None:
    config = BusConfig(endpoints=fixed_tcp_endpoints(), **FAST)
    keys = BusKeys.generate()
    hub, epoch1 = spawn_hub(config, keys)
    nodes = [BusNode(f"a{i}", config, keys.credentials()) for i in range(2)]
    try:
        assert all(n.wait_active(5) for n in nodes)
        for i in range(50):
            for n in nodes:
                n.publish("counter", {"value": i})
        # >=: a node that misses the hub's heartbeats on a loaded machine re-syncs and re-sends
        assert all(n.wait_for(lambda n: n.seq >= 100, 5) for n in nodes)
        hub.kill()  # SIGKILL: no clean shutdown of any socket
        hub.wait(5)
        for i in range(50, 80):  # keep publishing while there is no hub
            for n in nodes:
                n.publish("counter", {"value": i})
        hub, epoch2 = spawn_hub(config, keys)
        assert epoch2 != epoch1
        for n in nodes:
            assert n.wait_for(lambda n: n.epoch == epoch2 and all(
                (u := n.latest(a).get("counter")) is not None and u.payload["value"] == 79
                for a in ("a0", "a1")), 10), n.counters
            assert n.counters.resyncs >= 1 and n.alive
        assert wait_converged(nodes, timeout=5)  # same (epoch, seq, map) everywhere
    finally:
        for n in nodes:
            n.close()
        hub.kill()
        hub.wait(5)


def test_node_restart_resyncs_from_snapshot(hub: BusHub) -> None:
    a, b = make_node(hub, "a"), make_node(hub, "b")
    try:
        a.publish("x", {"value": 1})
        b.publish("x", {"value": 2})
        assert wait_converged([a, b], hub)
        b.close()
        a.publish("x", {"value": 3})
        b = make_node(hub, "b")  # restarted: subscribes, takes a snapshot, carries on
        assert wait_converged([a, b], hub)
        assert b.latest("a")["x"].payload.to_dict() == {"value": 3}
        assert b.latest("b")["x"].payload.to_dict() == {"value": 2}
    finally:
        a.close()
        b.close()


NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from entanglement import BusConfig, BusNode, NodeCredentials
    config = BusConfig.from_dict(json.loads(sys.argv[1]))
    node = BusNode("doomed", config, NodeCredentials.from_dict(json.loads(sys.argv[2])))
    node.wait_active(5)
    node.publish("phase", {"step": 1})
    node.publish("sedenion", {"sedenion": [0.0] * 16})
    print("ready", flush=True)
    time.sleep(60)
    """
)


def spawn_node(hub: BusHub) -> subprocess.Popen:
    """NODE_SCRIPT in a process of its own, on `hub` with the run credential."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", NODE_SCRIPT, json.dumps(hub.config.to_dict()),
         json.dumps(hub.credentials().to_dict())],
        stdout=subprocess.PIPE, env=env, text=True,
    )


def test_killed_node_expires_and_peers_see_it_leave() -> None:
    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp(), **FAST)).start()
    watcher = BusNode("watcher", hub.config, hub.credentials())
    left: list[StateUpdate] = []
    watcher.on_update(lambda u: left.append(u) if u.payload is None else None)
    proc = spawn_node(hub)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert watcher.wait_for(lambda n: len(n.latest("doomed")) == 2, 5)
        assert set(watcher.latest("doomed")) == {"phase", "sedenion"}
        proc.kill()  # SIGKILL: no goodbye, its heartbeats just stop
        proc.wait(5)
        t0 = time.monotonic()
        assert watcher.wait_for(lambda n: "doomed" not in n.peers(), 5)
        assert time.monotonic() - t0 >= 0.3  # not before the TTL ran out
        assert watcher.latest("doomed") == {}
        assert {u.key for u in left} == {"agent/doomed/phase", "agent/doomed/sedenion"}
        assert hub.counters.expired_agents == 1 and hub.counters.expired_keys == 2
        assert "watcher" in hub.agents() and "doomed" not in hub.agents()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        watcher.close()
        hub.stop()


def test_dead_hub_is_detected_and_node_recovers_when_it_returns() -> None:
    config = BusConfig(endpoints=fixed_tcp_endpoints(), security="none", **FAST)
    hub = BusHub(config).start()
    node = BusNode("a", hub.config)
    try:
        assert node.wait_active(5)
        hub.stop()
        assert node.wait_for(lambda n: n.counters.hub_timeouts >= 1, 3)
        assert node.node_state is not NodeState.ACTIVE
        node.publish("x", {"value": 7})  # queued while the hub is away
        hub = BusHub(config).start()
        assert node.wait_for(lambda n: "x" in n.latest("a"), 5)
        assert wait_converged([node], hub, timeout=5)
        assert node.latest("a")["x"].payload.to_dict() == {"value": 7}
    finally:
        node.close()
        hub.stop()


def test_sequence_gaps_trigger_resync_and_still_converge() -> None:
    # Tiny HWMs over inproc (no kernel buffers) and a slow subscriber: the hub's PUB must drop.
    config = BusConfig(endpoints=BusEndpoints.inproc(), security="none", hwm=5, **FAST)
    hub = BusHub(config).start()
    fast = BusNode("fast", hub.config, context=hub.context)
    slow = BusNode("slow", hub.config, context=hub.context)
    slow.on_update(lambda u: time.sleep(0.0005))
    try:
        assert fast.wait_active(5) and slow.wait_active(5)
        for i in range(3000):
            fast.publish(f"k{i % 50}", {"value": i})
            if i % 100 == 0:
                time.sleep(0.001)
        assert wait_converged([fast, slow], hub, timeout=15)
        assert slow.counters.gaps >= 1
        assert slow.counters.resyncs >= 1
        assert slow.alive and fast.alive
    finally:
        fast.close()
        slow.close()
        hub.stop()


def test_callback_errors_are_counted_not_fatal(hub: BusHub) -> None:
    node = make_node(hub, "a")
    try:
        node.on_update(lambda u: 1 / 0)
        node.publish("x", {"value": 1})
        assert node.wait_for(lambda n: n.counters.callback_errors >= 1, 5)
        node.publish("x", {"value": 2})
        assert node.wait_for(lambda n: n.latest("a").get("x") is not None
                             and n.latest("a")["x"].payload.to_dict() == {"value": 2}, 5)
        assert node.alive
    finally:
        node.close()


def test_delete_and_converged_helper(hub: BusHub) -> None:
    a = make_node(hub, "a")
    try:
        a.publish("x", {"value": 1})
        assert wait_converged([a], hub)
        a.delete("x")
        assert a.wait_for(lambda n: "a" not in n.peers(include_self=True), 5)
        # FAST's 0.4 s hub timeout can send a node on a loaded machine through a reconnect,
        # so convergence is waited for rather than sampled once.
        assert wait_converged([a], hub)
        assert not any(key.startswith("agent/a/") for key in hub.keys_snapshot())
    finally:
        a.close()
    assert not converged([a], hub)  # a closed node is never counted as converged


def test_closed_node_refuses_publish() -> None:
    hub = BusHub(BusConfig(security="none", **FAST)).start()
    node = BusNode("a", hub.config)
    node.close()
    hub.stop()
    with pytest.raises(NodeError, match="closed"):
        node.publish("x", {"value": 1})


def _recording_node(hub: BusHub, agent: str, key: str) -> tuple[BusNode, list[int]]:
    """A node that records the "step" of every update of `key` it applies, in order."""
    steps: list[int] = []

    def record(u: StateUpdate) -> None:
        if u.key == key and u.payload is not None:
            steps.append(u.payload["step"])

    return make_node(hub, agent, on_update=record), steps


def test_a_burst_travels_in_parcels_and_in_order(hub: BusHub) -> None:
    a = make_node(hub, "a")
    b, steps = _recording_node(hub, "b", "agent/a/x")
    try:
        assert a.wait_active(5) and b.wait_active(5)
        frames, published = hub.counters.received, hub.counters.published
        for i in range(300):  # far faster than one send per coalesce interval
            a.publish("x", {"step": i})
        assert b.wait_for(lambda n: bool(steps) and steps[-1] == 299, 10)
        assert a.wait_for(lambda n: n.counters.sent - n.counters.restored == 300, 5)  # re-sends apart
        assert wait_until(lambda: hub.counters.published - published == 300 + a.counters.restored, 5)
        # fewer frames than updates reached the hub (its received count includes heartbeats)
        assert hub.counters.received - frames < 150
        # in order (a re-sync may skip some, and a re-send repeat the latest)
        assert all(x < y or x == y == steps[-1] for x, y in zip(steps, steps[1:]))
        assert a.counters.send_failed == 0 and hub.counters.malformed == 0
    finally:
        a.close()
        b.close()


def test_close_sends_what_waits_in_the_outbox(hub: BusHub) -> None:
    a = make_node(hub, "a")
    b, steps = _recording_node(hub, "b", "agent/a/x")
    try:
        assert a.wait_active(5) and b.wait_active(5)
        for i in range(50):
            a.publish("x", {"step": i})
        a.close()  # at once: whatever waits in the outbox must still leave
        assert a.counters.sent - a.counters.restored == 50
        assert b.wait_for(lambda n: 49 in steps, 5)
    finally:
        b.close()


def test_coalesce_zero_sends_every_update_alone() -> None:
    hub = BusHub(BusConfig(security="none", coalesce=0.0, **FAST)).start()
    a = BusNode("a", hub.config)
    try:
        assert a.wait_active(5)
        frames = hub.counters.received
        for i in range(100):
            a.publish("x", {"step": i})
        assert wait_until(lambda: hub.counters.published >= 100, 5)
        assert hub.counters.received - frames >= 100
    finally:
        a.close()
        hub.stop()


def test_a_busy_node_thread_is_not_taken_for_a_vanished_agent() -> None:
    """Heartbeats have their own thread: a node whose thread is stuck in a slow callback for
    twice the TTL is not expired; a deletion it asks for stays a deletion (nothing restores it)."""
    hub = BusHub(BusConfig(security="none", **FAST)).start()
    stalled = threading.Event()

    def slow_callback(u: StateUpdate) -> None:
        if u.key == "agent/w/stall" and not stalled.is_set():
            stalled.set()
            time.sleep(2 * FAST["ttl"])  # the node thread is stuck here

    slow = BusNode("slow", hub.config, on_update=slow_callback)
    w = BusNode("w", hub.config)
    gone: list[str] = []
    w.on_update(lambda u: gone.append(u.key) if u.payload is None else None)
    try:
        assert slow.wait_active(5) and w.wait_active(5)
        slow.publish("phase", {"step": 7})
        assert w.wait_for(lambda n: "phase" in n.latest("slow"), 5)
        w.publish("stall", {"step": 1})
        assert wait_until(stalled.is_set, 5)
        assert slow.wait_for(lambda n: "stall" in n.latest("w"), 10)  # the callback returned
        assert hub.counters.expired_agents == 0 and gone == [] and "slow" in w.peers()
        assert slow.counters.hub_timeouts == 0  # nor does the node take the hub for dead

        slow.delete("phase")
        assert w.wait_for(lambda n: "phase" not in n.latest("slow"), 5)
        slow.publish("other", {"step": 2})  # later traffic: the deletion was applied before it
        assert w.wait_for(lambda n: "other" in n.latest("slow"), 5)
        assert slow.wait_for(lambda n: "other" in n.latest("slow"), 5)
        assert "phase" not in w.latest("slow") and slow.counters.restored == 0
    finally:
        slow.close()
        w.close()
        hub.stop()


def test_a_paused_process_gets_its_expired_keys_back() -> None:
    """A node process paused (SIGSTOP) past the TTL is expired by the hub: its peers see it
    leave. Resumed, it sees its own keys deleted and sends them again: they come back."""
    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp(), **FAST)).start()
    watcher = BusNode("watcher", hub.config, hub.credentials())
    left: list[str] = []
    watcher.on_update(lambda u: left.append(u.key) if u.payload is None else None)
    proc = spawn_node(hub)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert watcher.wait_for(lambda n: len(n.latest("doomed")) == 2, 5)
        proc.send_signal(signal.SIGSTOP)
        assert watcher.wait_for(lambda n: "doomed" not in n.peers(), 10)  # expired while paused
        assert set(left) == {"agent/doomed/phase", "agent/doomed/sedenion"}
        proc.send_signal(signal.SIGCONT)
        assert watcher.wait_for(lambda n: len(n.latest("doomed")) == 2, 10)  # and back
        assert watcher.latest("doomed")["phase"].payload["step"] == 1
        assert hub.counters.expired_agents == 1 and "doomed" in hub.agents()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(5)
        watcher.close()
        hub.stop()


def test_an_update_over_the_frame_limit_is_refused_at_publish() -> None:
    config = BusConfig(security="none", limits=MessageLimits(max_frame_bytes=4096), **FAST)
    with BusHub(config) as hub:
        a = BusNode("a", hub.config)
        try:
            assert a.wait_active(5)
            big = {"phases": np.zeros(2048, "<f4").tobytes()}  # 8 KiB of phases
            with pytest.raises(MalformedMessage, match="max_frame_bytes"):
                a.publish("phase", big)
            assert a.counters.sent == 0
            a.publish("phase", {"step": 1})
            assert a.wait_for(lambda n: "phase" in n.latest("a"), 5)
            assert a.latest("a")["phase"].payload.phases is None
            # sent - restored: a publish right after activation may also be re-sent by the
            # snapshot's resend_missing, which runs just after the node turns ACTIVE
            assert hub.counters.malformed == 0 and a.counters.sent - a.counters.restored == 1
        finally:
            a.close()


def test_stopping_the_hub_before_an_inproc_node_does_not_hang() -> None:
    """Nodes on inproc share the hub's context: stopping the hub first ends them (NodeError on
    publish) instead of blocking in the context's termination; closing them afterwards works."""
    hub = BusHub(BusConfig(endpoints=BusEndpoints.inproc(), security="none", **FAST)).start()
    node = BusNode("a", hub.config, context=hub.context)
    assert node.wait_active(5)
    hub.stop(timeout=1.0)  # the pytest timeout catches a hang
    assert wait_until(lambda: not node.alive, 5)
    with pytest.raises(NodeError, match="closed"):
        node.publish("x", {"value": 1})
    node.close()
    assert wait_until(lambda: hub.context.closed, 5)  # terminated once the node's sockets closed


def test_publish_racing_close_only_ever_raises_node_error() -> None:
    hub = BusHub(BusConfig(security="none", **FAST)).start()
    errors: list[BaseException] = []
    try:
        for _ in range(10):
            node = BusNode("a", hub.config)
            assert node.wait_active(5)

            def publish_until_closed() -> None:
                while True:
                    try:
                        node.publish("x", {"value": 1})
                    except NodeError:
                        return
                    except BaseException as exc:  # what the test is looking for
                        errors.append(exc)
                        return

            t = threading.Thread(target=publish_until_closed)
            t.start()
            time.sleep(0.01)
            node.close()
            t.join(5)
            assert not t.is_alive()
    finally:
        hub.stop()
    assert errors == []


def test_a_hub_that_fails_to_start_releases_its_context() -> None:
    with BusHub(BusConfig(security="none", **FAST)) as first:
        second = BusHub(first.config)  # the same, already bound endpoints
        with pytest.raises(HubError, match="failed to start"):
            second.start()
        assert second.context.closed


def test_a_busy_node_thread_does_not_hold_back_its_own_updates(hub: BusHub) -> None:
    """While the node thread sits in a slow callback, a publish that comes after the outbox has
    waited longer than coalesce sends the outbox from the caller's thread."""
    release = threading.Event()
    entered = threading.Event()

    def slow(update) -> None:
        if update.key == "agent/w/block":
            entered.set()
            release.wait(5)

    a = make_node(hub, "a", on_update=slow)
    w = make_node(hub, "w")
    try:
        assert a.wait_active(5) and w.wait_active(5)
        w.publish("block", {"step": 1})
        assert wait_until(entered.is_set, 5)  # a's node thread is now busy
        for i in range(3):  # back to back: they join the outbox...
            a.publish("x", {"step": i})
        time.sleep(0.05)
        a.publish("y", {"step": 9})  # ...and this one, far later than coalesce, sends it all
        assert w.wait_for(lambda n: "y" in n.latest("a") and n.latest("a")["x"].payload["step"] == 2, 2)
    finally:
        release.set()
        a.close()
        w.close()
