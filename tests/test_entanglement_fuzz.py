"""Fuzzed frames into live receivers over real sockets: nothing crashes, everything is counted.

Frames come from hypothesis strategies: random bytes, truncated valid bodies, type-confused
bodies (valid msgpack, wrong types), arbitrary msgpack objects, declared lengths far beyond the
data, and valid updates mixed in; the hub also gets parcels of such bodies, whole or truncated.
The expected count of each frame's fate comes from the same `unpack` (and `unpack_parcel`) the
receivers use, checked against what each kind of frame must be (a truncated body is never valid,
a valid one always is).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from entanglement import (
    BusConfig,
    BusEndpoints,
    BusHub,
    BusNode,
    MalformedMessage,
    MessageLimits,
    NodeState,
    StatePayload,
    StateUpdate,
    unpack,
)
from entanglement.message import (
    BATCH_OVERHEAD,
    WIRE_VERSION,
    encode,
    is_parcel,
    pack_batch,
    pack_parcel,
    unpack_batch,
    unpack_parcel,
)
from entanglement.testing import wait_until

pytestmark = pytest.mark.timeout(60)

HUB_BATCHES, NODE_BATCHES, BATCH = 200, 40, 50  # 10,000 frames into the hub, 2,000 into a node
CONFIG = dict(security="none", heartbeat_interval=0.05, hub_timeout=30.0, ttl=60.0,
              snapshot_timeout=30.0)
FUZZ_SETTINGS = dict(
    deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example drives live sockets
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


agents = st.sampled_from(["a0", "a1", "a2"])
valid_fields = st.builds(
    lambda agent, name, value, ts: [WIRE_VERSION, f"agent/{agent}/{name}", agent,
                                    {"extra": {"value": value}, "sedenion": [float(value)] * 16,
                                     "step": value}, 0, 0, ts],
    agents, st.sampled_from(["phase", "sedenion", "x"]), st.integers(0, 1000),
    st.floats(0, 2e9, allow_nan=False),
)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can encode
wrong_types = st.one_of(
    st.none(), st.booleans(), ints, st.floats(), st.binary(max_size=8),
    st.lists(ints, max_size=3), st.dictionaries(st.text(max_size=3), ints, max_size=2),
)
msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(),
              st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)
HUGE_HEADERS = [b"\xc6\xff\xff\xff\xff", b"\xc5\xff\xff", b"\xdb\xff\xff\xff\xff",
                b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01",
                b"\xdc\xff\xff", b"\xda\xff\xff"]


def _confuse(fields: list[Any], index: int, value: Any) -> bytes:
    fields = list(fields)
    fields[index] = value
    return packb(fields)


# (kind, frame) pairs; kind says what the frame must be, when that is known by construction.
frames = st.one_of(
    st.binary(max_size=256).map(lambda b: ("random", b)),
    valid_fields.map(packb).flatmap(
        lambda b: st.integers(0, len(b) - 1).map(lambda i: ("bad", b[:i]))),  # truncated
    st.tuples(valid_fields, st.integers(0, 6), wrong_types).map(
        lambda t: ("confused", _confuse(*t))),
    msgpack_values.map(lambda v: ("random", packb(v))),
    st.tuples(st.sampled_from([b"", b"\x97\x03", b"\x97\x03\xa3abc\xa1a"]),
              st.sampled_from(HUGE_HEADERS), st.binary(max_size=32)).map(
        lambda t: ("bad", t[0] + t[1] + t[2])),  # huge declared lengths
    valid_fields.map(lambda f: ("good", packb(f))),
)
# ... and parcels of them (several bodies in one frame, each handled on its own), whole or truncated
complete_bodies = st.one_of(  # each a whole msgpack object, valid or not as a body
    valid_fields.map(packb), st.tuples(valid_fields, st.integers(0, 6), wrong_types).map(lambda t: _confuse(*t)),
    msgpack_values.map(packb),
)
frames_and_parcels = st.one_of(
    frames,
    st.lists(complete_bodies, min_size=2, max_size=5).map(lambda bs: ("parcel", pack_parcel(bs))),
    st.lists(frames, min_size=2, max_size=5).map(lambda fs: ("random", pack_parcel([f for _, f in fs]))),
    st.lists(complete_bodies, min_size=2, max_size=3).map(pack_parcel).flatmap(
        lambda p: st.integers(1, len(p) - 1).map(lambda i: ("bad", p[:i]))),  # truncated
)


def bodies_of(frame: bytes) -> tuple[int, list[bytes]]:
    """What the hub makes of a collected frame: (malformed count, the bodies it goes on with)."""
    if is_parcel(frame):
        try:
            return 0, unpack_parcel(frame)
        except MalformedMessage:
            return 1, []
    return 0, [frame]


def parses(frame: bytes) -> bool:
    try:
        unpack(frame)
    except MalformedMessage:
        return False
    return True


def valid_in_batch(frame: bytes) -> bool:
    """Whether `frame`, as the only body of a hub batch, is a valid update there."""
    return parses(frame) and not unpack(frame).key.startswith("$")


@contextmanager
def scripted_hub(sndhwm: int | None = None, **config: Any) -> Iterator[tuple[zmq.Socket, zmq.Socket, BusNode]]:
    """A hub played by the test: its PUB and ROUTER bound on tcp, and a node "victim" connected
    (``config`` overrides CONFIG); all of it closed on exit."""
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    for s in (pub, router):
        s.linger = 0
        if sndhwm is not None:
            s.sndhwm = sndhwm
    eps = BusEndpoints.tcp()
    router.bind(eps.snapshot)
    pub.bind(eps.publish)
    real = BusEndpoints(router.last_endpoint.decode(), pub.last_endpoint.decode(), eps.collect)
    node = BusNode("victim", BusConfig(endpoints=real, **{**CONFIG, **config}))
    try:
        yield pub, router, node
    finally:
        node.close()
        pub.close()
        router.close()
        ctx.term()


@contextmanager
def live_hub() -> Iterator[tuple[BusHub, BusNode, zmq.Socket]]:
    """A real hub on tcp, a node "watcher" subscribed to it, and a raw PUSH socket into its
    collector (for frames no node would send); all of it closed on exit."""
    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp(), **CONFIG)).start()
    watcher = BusNode("watcher", hub.config)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(hub.config.endpoints.collect)
    try:
        yield hub, watcher, push
    finally:
        push.close()
        ctx.term()
        watcher.close()
        hub.stop()


def test_hub_collector_survives_10000_fuzzed_frames() -> None:
    totals = {"frames": 0, "bad": 0}
    with live_hub() as (hub, watcher, push):
        assert watcher.wait_active(5)

        @settings(max_examples=HUB_BATCHES, **FUZZ_SETTINGS)
        @given(st.lists(frames_and_parcels, min_size=BATCH, max_size=BATCH))
        def feed(batch: list[tuple[str, bytes]]) -> None:
            keys = set(hub.keys_snapshot())  # quiescent between batches
            bad = published = 0
            for kind, frame in batch:
                bad_parcel, bodies = bodies_of(frame)
                if kind == "parcel":
                    assert not bad_parcel  # whole bodies make a well-formed parcel
                elif kind == "bad" and is_parcel(frame):
                    assert bad_parcel  # a truncated parcel
                bad += bad_parcel
                for body in bodies:
                    ok = parses(body)
                    assert ok if kind == "good" else (ok is False if kind == "bad" else True)
                    if not ok:
                        bad += 1
                        continue
                    msg = unpack(body)
                    if msg.key.startswith("$"):
                        continue  # a control body: the hub acts on it, publishes nothing
                    if msg.payload is not None:
                        keys.add(msg.key)
                        published += 1
                    elif msg.key in keys:  # a type-confused payload of nil is a valid deletion
                        keys.discard(msg.key)
                        published += 1
            before = (hub.counters.received, hub.counters.malformed, hub.counters.published)
            for _, frame in batch:
                push.send(frame)
            # (received also counts the watcher's heartbeats, so wait on the other counters)
            assert wait_until(lambda: hub.counters.received >= before[0] + len(batch)
                              and hub.counters.malformed - before[1] >= bad
                              and hub.counters.published - before[2] >= published)
            assert hub.counters.malformed - before[1] == bad
            assert hub.counters.published - before[2] == published
            totals["frames"] += len(batch)
            totals["bad"] += bad

        feed()
        # A few frames above the size limit (but below the socket's MAXMSGSIZE).
        too_big = hub.config.limits.max_frame_bytes + 1
        before = hub.counters.malformed
        for _ in range(3):
            push.send(b"\x00" * too_big)
        assert wait_until(lambda: hub.counters.malformed == before + 3)

        assert totals["frames"] >= 10_000
        assert totals["bad"] > 0.7 * totals["frames"]
        assert hub.counters.malformed == totals["bad"] + 3
        assert hub.alive and watcher.alive
        assert watcher.counters.malformed == 0  # the hub only ever republishes clean state
        assert watcher.wait_for(lambda n: n.seq == hub.seq, 10)
        assert watcher.state() == hub.keys_snapshot()


def test_node_survives_fuzzed_updates_and_snapshot_replies() -> None:
    """A fake hub sends fuzz on PUB (each as the one body of a batch) and as the snapshot reply.

    A body that is not one valid msgpack object makes the whole batch frame undecodable; one
    that decodes but is invalid is dropped on its own; either way exactly one is counted."""
    with scripted_hub(sndhwm=0) as (pub, router, node):
        totals = {"frames": 0}
        assert router.poll(5000)
        identity, _request = router.recv_multipart()
        # Make sure the subscription is live before counting: probe with a junk frame.
        while node.counters.received == 0:
            pub.send_multipart([b"probe", b"\xc1"])
            time.sleep(0.01)
        assert wait_until(lambda: node.counters.malformed == node.counters.received)

        @settings(max_examples=NODE_BATCHES, **FUZZ_SETTINGS)
        @given(st.lists(frames, min_size=BATCH, max_size=BATCH), st.integers(0, 2))
        def feed(batch: list[tuple[str, bytes]], shape: int) -> None:
            before = (node.counters.received, node.counters.malformed)
            bad = 0
            for i, (_, frame) in enumerate(batch):
                if i % 2:  # snapshot path: ROUTER -> DEALER, one body per message
                    router.send_multipart([identity, frame])
                    bad += not parses(frame)
                elif shape == 0 or i % 10:  # PUB path: [batch of one body]
                    pub.send(pack_batch(7, 1000 + i, [frame]))
                    bad += not valid_in_batch(frame)
                else:  # wrong frame count on PUB, or a version 1 [topic, body] message
                    pub.send_multipart([b"junk", frame] if shape == 1 else [frame] * 3)
                    bad += 1
            assert wait_until(lambda: node.counters.received == before[0] + len(batch))
            # received is counted before a frame is decoded: wait for the last one's verdict too
            assert wait_until(lambda: node.counters.malformed - before[1] == bad, 2.0), \
                (node.counters.malformed - before[1], bad)
            totals["frames"] += len(batch)

        feed()
        assert totals["frames"] >= 2_000
        assert node.alive and node.error is None


def test_node_counts_control_messages_that_do_not_belong_on_pub() -> None:
    """Well-formed bodies with a control key other than "$hugz" on PUB are malformed there."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    eps = BusEndpoints(f"tcp://127.0.0.1:{port + 0}", f"tcp://127.0.0.1:{port}", "tcp://127.0.0.1:1")
    node = BusNode("victim", BusConfig(endpoints=eps, **CONFIG))
    try:
        while node.counters.received == 0:
            pub.send_multipart([b"probe", b"\xc1"])
            time.sleep(0.01)
        assert wait_until(lambda: node.counters.malformed == node.counters.received)
        before = node.counters.malformed
        for key in ("$snapshot-end", "$snapshot?", "$heartbeat"):
            frame = packb([WIRE_VERSION, key, "hub", None, 5, 9, 1.0])
            assert parses(frame) and not valid_in_batch(frame)
            pub.send(pack_batch(9, 5, [frame]))
        assert wait_until(lambda: node.counters.malformed == before + 3)
        assert node.alive and node.error is None
    finally:
        node.close()
        pub.close()
        ctx.term()


def test_malformed_body_inside_a_batch_is_counted_and_its_hole_resyncs() -> None:
    """A scripted hub: a batch [good, malformed, good] applies the first, counts the second and
    sees the third as a gap (re-sync); a batch ahead of the node's seq is a gap as well."""
    with scripted_hub() as (pub, router, node):
        epoch = 99

        def body(name: str, step: Any) -> bytes:
            return packb([WIRE_VERSION, f"agent/a1/{name}", "a1", {"step": step}, 0, 0, 1.0])

        def answer_snapshot(seq: int, items: dict[str, int]) -> None:
            assert router.poll(5000)
            identity, request = router.recv_multipart()
            req = unpack(request)
            assert req.key == "$snapshot?"
            for name, step in items.items():
                router.send_multipart([identity, packb([WIRE_VERSION, f"agent/a1/{name}", "a1",
                                                        {"step": step}, seq, epoch, 1.0])])
            router.send_multipart([identity, packb([WIRE_VERSION, "$snapshot-end", "hub",
                                                    {"extra": {"request": req.payload["request"]}},
                                                    seq, epoch, 1.0])])

        answer_snapshot(0, {})
        assert node.wait_active(5)
        while node.counters.received < 3:  # the subscription is live once heartbeats arrive
            pub.send(pack_batch(epoch, 0, []))
            time.sleep(0.01)
        before = node.counters
        pub.send(pack_batch(epoch, 1, [body("w", 0.5)]))  # a batch that starts malformed: a gap
        assert wait_until(lambda: node.counters.malformed == before.malformed + 1)
        answer_snapshot(1, {"w": 0})
        assert node.wait_for(lambda n: n.seq == 1 and n.node_state.value == "active", 5)
        assert node.alive and node.error is None
        before = node.counters
        pub.send(pack_batch(epoch, 4, [body("x", 1), body("y", 2.5), body("z", 3)]))
        assert wait_until(lambda: node.counters.malformed == before.malformed + 1)
        assert wait_until(lambda: node.counters.gaps == before.gaps + 1)
        after = node.counters
        assert after.applied == before.applied + 1 and after.resyncs == before.resyncs + 1
        assert node.latest("a1")["x"].seq == 2 and "y" not in node.latest("a1")
        answer_snapshot(4, {"x": 1, "y": 2, "z": 3})  # the hub's map heals the hole
        assert node.wait_for(lambda n: n.seq == 4 and n.node_state.value == "active", 5)
        assert {k: u.payload["step"] for k, u in node.latest("a1").items()} == {"x": 1, "y": 2, "z": 3}
        # A heartbeat ahead of the node: updates lost at the tail, another re-sync.
        pub.send(pack_batch(epoch, 6, []))
        answer_snapshot(6, {"x": 1, "y": 2, "z": 4})
        assert node.wait_for(lambda n: n.seq == 6 and n.counters.gaps == before.gaps + 2, 5)
        assert node.latest("a1")["z"].payload["step"] == 4
        assert node.alive and node.error is None


DEEP = b"\x91" * 5000 + b"\xc0"  # [[[...[nil]...]]], 5,000 arrays deep: a 5 KB frame
NESTED = {  # each shape with the deep array where a decoder meets it
    "parcel": b"\x92" + packb(WIRE_VERSION) + b"\x92" + DEEP + b"\xc0",  # a body left as msgspec.Raw
    "batch": b"\x94" + packb(WIRE_VERSION) + b"\x01\x05\x91" + DEEP,  # a body of a hub batch
    "body": b"\x97" + packb(WIRE_VERSION) + packb("agent/a0/x") + packb("a0") + DEEP + b"\x00\x00\x00",
}


def test_deeply_nested_frames_are_malformed_and_kill_no_receiver() -> None:
    """Arrays nested thousands deep exhaust msgspec's recursion limit, even where the schema
    leaves a body undecoded: every decoder turns that into MalformedMessage, and the hub and
    a node count such frames and carry on (a RecursionError once killed the hub's thread)."""
    for frame in NESTED.values():
        for decode in (unpack, unpack_parcel, unpack_batch):
            with pytest.raises(MalformedMessage):
                decode(frame)
    with live_hub() as (hub, watcher, push):
        assert watcher.wait_active(5)
        before = hub.counters.malformed
        for frame in NESTED.values():
            push.send(frame)
        assert wait_until(lambda: hub.counters.malformed == before + len(NESTED))
        push.send(encode(StateUpdate("agent/a0/x", "a0", StatePayload(step=1))))
        assert wait_until(lambda: "agent/a0/x" in watcher.state())
        assert hub.alive and hub.error is None
    with scripted_hub() as (pub, router, node):
        assert router.poll(5000)
        identity, _request = router.recv_multipart()
        while node.counters.received == 0:  # the subscription is live
            pub.send(NESTED["batch"])
            time.sleep(0.01)
        router.send_multipart([identity, NESTED["body"]])  # as a snapshot reply
        assert wait_until(lambda: node.counters.malformed == node.counters.received
                          and node.counters.received >= 2)
        assert node.alive and node.error is None


def test_hub_splits_batches_at_the_message_limits() -> None:
    """A burst bigger than one batch may hold goes out as several, each within the limits the
    nodes apply, with contiguous positional sequence numbers; a node still converges."""
    limits = MessageLimits(max_frame_bytes=2000, max_array_len=8)
    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp(), limits=limits, **CONFIG)).start()
    watcher = BusNode("watcher", hub.config)
    ctx = zmq.Context()
    push, sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    for s in (push, sub):
        s.linger = 0
    sub.subscribe(b"")
    sub.connect(hub.config.endpoints.publish)
    push.connect(hub.config.endpoints.collect)
    try:
        assert watcher.wait_active(5)
        assert sub.poll(5000)  # a heartbeat: the subscription is live
        while sub.poll(0):
            sub.recv()
        bodies = [packb([WIRE_VERSION, f"agent/a1/k{i % 40}", "a1",
                         {"extra": {"s": "x" * (i % 300)}, "step": i}, 0, 0, 1.0])
                  for i in range(400)]
        for b in bodies:
            push.send(b)
        seqs: list[int] = []
        sizes: list[int] = []
        while len(seqs) < len(bodies):
            assert sub.poll(5000)
            frame = sub.recv()
            _, last_seq, items = unpack_batch(frame, limits)
            assert len(frame) <= limits.max_frame_bytes + BATCH_OVERHEAD
            assert len(items) <= limits.max_array_len
            assert all(type(u) is StateUpdate for u in items)
            seqs.extend(u.seq for u in items)
            sizes.append(len(items))
        assert seqs == list(range(seqs[0], seqs[0] + len(bodies)))
        assert max(sizes) > 1  # a burst is batched
        assert [u.payload["step"] for u in hub.keys_snapshot().values()] == list(range(360, 400))
        assert watcher.wait_for(lambda n: n.seq == hub.seq, 10)
        assert watcher.state() == hub.keys_snapshot()
        assert watcher.counters.malformed == 0 and watcher.counters.gaps == 0
    finally:
        push.close()
        sub.close()
        ctx.term()
        watcher.close()
        hub.stop()


def test_an_active_node_survives_fuzzed_batches_and_heals_by_snapshot() -> None:
    """Fuzzed batches that continue an ACTIVE node's sequence (the path of real traffic, not the
    snapshot wait): a batch of valid bodies is applied in full; any invalid body is counted and
    its hole makes the node re-sync, after which it holds exactly the snapshot the (scripted)
    hub sent. The node never dies and never holds anything the hub did not send as valid."""
    with scripted_hub(sndhwm=0) as (pub, router, node):
        epoch = 42
        state = {"seq": 0, "map": {}, "bodies": 0, "resyncs": 0, "applied": 0}

        def answer_snapshot() -> None:
            assert router.poll(5000)
            identity, request = router.recv_multipart()
            req = unpack(request)
            for key, upd in state["map"].items():
                router.send_multipart([identity, encode(StateUpdate(key, upd.agent, upd.payload, state["seq"],
                                                                    epoch, upd.timestamp))])
            end = StateUpdate("$snapshot-end", "hub", StatePayload(extra={"request": req.payload["request"]}),
                              state["seq"], epoch, 1.0)
            router.send_multipart([identity, encode(end)])
            assert node.wait_for(lambda n: n.node_state is NodeState.ACTIVE and n.seq == state["seq"], 5)

        answer_snapshot()
        while node.counters.received < 3:  # the subscription is live once heartbeats arrive
            pub.send(pack_batch(epoch, 0, []))
            time.sleep(0.01)

        good_batches = st.lists(valid_fields.map(lambda f: ("good", packb(f))), min_size=1, max_size=25)

        @settings(max_examples=2 * NODE_BATCHES, **FUZZ_SETTINGS)
        @given(st.one_of(good_batches, st.lists(frames, min_size=5, max_size=25)))
        def feed(batch: list[tuple[str, bytes]]) -> None:
            bodies = [f for _, f in batch]
            before = node.counters
            last = state["seq"] + len(bodies)
            pub.send(pack_batch(epoch, last, bodies))
            assert wait_until(lambda: node.counters.received == before.received + 1)
            valid = [valid_in_batch(f) for f in bodies]
            state["seq"] = last  # where the hub is now, whatever the node made of the batch
            assert all(valid) or any(kind != "good" for kind, _ in batch)  # "good" by construction
            if all(valid):  # applied in full, in order: the node's map is the hub's map
                assert node.wait_for(lambda n: n.seq == last, 5)
                state["applied"] += 1
                assert node.counters.malformed == before.malformed
                for f in bodies:
                    upd = unpack(f)
                    if upd.payload is None:
                        state["map"].pop(upd.key, None)
                    else:
                        state["map"][upd.key] = upd
            else:
                assert wait_until(lambda: node.counters.malformed > before.malformed)  # counted, dropped
                # The hole is a gap (or, for a batch frame that does not decode at all, the next
                # heartbeat is ahead of the node): it asks for a snapshot, and the hub's map is
                # what it had before the batch.
                pub.send(pack_batch(epoch, last, []))
                answer_snapshot()
                state["resyncs"] += 1
            assert node.node_state is NodeState.ACTIVE and node.seq == last
            got = {k: (u.agent, u.payload) for k, u in node.state().items()}
            assert got == {k: (u.agent, u.payload) for k, u in state["map"].items()}
            state["bodies"] += len(bodies)

        feed()
        # 80 batches of 1 to 25 bodies; how many exactly depends on the Hypothesis version's
        # derandomised draws (at least 500 with the versions CI had before, 455 with 6.170.16
        # and .17): a floor well below either
        assert state["bodies"] >= 6 * NODE_BATCHES and state["resyncs"] >= 10 and state["applied"] >= 10
        assert len(state["map"]) >= 3
        assert node.alive and node.error is None


def test_a_slow_snapshot_that_keeps_arriving_is_not_abandoned() -> None:
    """A scripted hub sends its snapshot items 0.15 s apart, longer in all than snapshot_timeout:
    the timeout counts from the latest item, so the node takes this snapshot, not a new one."""
    timeout = 0.3
    with scripted_hub(snapshot_timeout=timeout) as (pub, router, node):
        epoch = 7
        assert router.poll(5000)
        identity, request = router.recv_multipart()
        req = unpack(request)
        items = max(4, int(2 * timeout / 0.15) + 1)  # the transfer lasts twice snapshot_timeout
        for i in range(items):
            router.send_multipart([identity, packb([WIRE_VERSION, f"agent/a1/k{i}", "a1", {"step": i}, i + 1,
                                                    epoch, 1.0])])
            time.sleep(0.15)
        router.send_multipart([identity, packb([WIRE_VERSION, "$snapshot-end", "hub",
                                                {"extra": {"request": req.payload["request"]}}, items, epoch,
                                                1.0])])
        assert node.wait_active(5)
        assert len(node.latest("a1")) == items and node.counters.resyncs == 0
        assert not router.poll(200)  # no second request


def test_a_snapshot_short_of_its_item_count_is_asked_for_again() -> None:
    """The end of a snapshot says how many items came before it: a node that got fewer (the
    hub's ROUTER drops at its HWM) asks again instead of installing a partial map."""
    with scripted_hub() as (pub, router, node):
        epoch = 7

        def reply(request: bytes, keys: range, claimed: int) -> None:
            req = unpack(request)
            for i in keys:
                router.send_multipart([identity, packb([WIRE_VERSION, f"agent/a1/k{i}", "a1", {"step": i}, i + 1,
                                                        epoch, 1.0])])
            end = {"extra": {"request": req.payload["request"], "items": claimed}}
            router.send_multipart([identity, packb([WIRE_VERSION, "$snapshot-end", "hub", end, 3, epoch, 1.0])])

        assert router.poll(5000)
        identity, request = router.recv_multipart()
        reply(request, range(2), claimed=3)  # one item lost on the way
        assert router.poll(5000)  # so the node asks again...
        identity, request = router.recv_multipart()
        assert node.node_state is NodeState.SYNCING and node.counters.resyncs == 1
        reply(request, range(3), claimed=3)  # ...and installs the whole one
        assert node.wait_active(5)
        assert sorted(node.latest("a1")) == ["k0", "k1", "k2"] and node.counters.dropped == 2


def test_a_malformed_snapshot_item_counts_as_arrived_and_short_snapshots_are_retried_a_few_times() -> None:
    """The item count counts frames: one the node cannot decode still arrived (asking again would
    bring it again). And a snapshot that keeps coming short is taken after three more tries."""
    with scripted_hub() as (pub, router, node):
        epoch = 7

        def reply(request: bytes, frames: list[bytes], claimed: int) -> None:
            req = unpack(request)
            for frame in frames:
                router.send_multipart([identity, frame])
            end = {"extra": {"request": req.payload["request"], "items": claimed}}
            router.send_multipart([identity, packb([WIRE_VERSION, "$snapshot-end", "hub", end, 3, epoch, 1.0])])

        good = packb([WIRE_VERSION, "agent/a1/k0", "a1", {"step": 0}, 1, epoch, 1.0])
        assert router.poll(5000)
        identity, request = router.recv_multipart()
        reply(request, [good, b"\xc1"], claimed=2)
        assert node.wait_active(5) and node.counters.resyncs == 0
        assert sorted(node.latest("a1")) == ["k0"] and node.counters.malformed == 1

    with scripted_hub() as (pub, router, node):
        for attempt in range(4):  # the first answer and three more, all one item short
            assert router.poll(5000)
            identity, request = router.recv_multipart()
            assert node.node_state is NodeState.SYNCING and node.counters.resyncs == attempt
            reply(request, [good], claimed=2)
        assert node.wait_active(5) and sorted(node.latest("a1")) == ["k0"]
