"""The wire format: round trips, strict limits and typed errors (no sockets)."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entanglement import (
    BusConfig,
    ConfigError,
    MalformedMessage,
    MessageLimits,
    StatePayload,
    StateUpdate,
    agent_key,
    decode_phases,
    encode_phases,
    key_owner,
    pack,
    unpack,
)
from entanglement.message import (
    BATCH_OVERHEAD,
    WIRE_VERSION,
    encode_update,
    is_parcel,
    make_update,
    pack_batch,
    pack_parcel,
    unpack_batch,
    unpack_parcel,
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.text(max_size=30),
)
extras = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in {"phases", "sedenion", "coherence", "step",
                                                    "extra"}),
    scalars | st.lists(scalars, max_size=10),
    max_size=10,
)
payloads = st.builds(
    lambda phases, sedenion, coherence, step, extra: {
        k: v for k, v in dict(phases=phases, sedenion=sedenion, coherence=coherence, step=step,
                              **extra).items() if v is not None},
    st.none() | st.binary(max_size=64).map(lambda b: b[: len(b) // 4 * 4]),
    st.none() | st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=16, max_size=16),
    st.none() | st.floats(0, 1), st.none() | st.integers(0, 2**63 - 1), extras,
)


@given(
    agent=st.text(min_size=1, max_size=20).filter(lambda a: "/" not in a),
    name=st.text(min_size=1, max_size=20),
    payload=payloads | st.none(),
    seq=st.integers(0, 2**63 - 1),
    ts=st.floats(0, 4e9),
)
@settings(max_examples=300, deadline=None)
def test_pack_unpack_round_trip(agent: str, name: str, payload: dict | None, seq: int, ts: float) -> None:
    update = make_update(agent, agent_key(agent, name), payload, seq, 7, ts)
    decoded = unpack(pack(update))
    assert decoded == update
    assert (decoded.payload is None) == (payload is None)
    if payload is not None:
        assert decoded.payload.to_dict() == payload
        assert all(decoded.payload[k] == v and k in decoded.payload for k, v in payload.items())


@given(st.binary(max_size=512))
@settings(max_examples=500, deadline=None)
def test_unpack_raises_only_malformed_message(data: bytes) -> None:
    try:
        unpack(data)
    except MalformedMessage:
        pass


def body(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


V = WIRE_VERSION
GOOD = [V, "agent/a/phase", "a", {"step": 1}, 0, 0, 1.0]


def with_payload(payload: object) -> bytes:
    return body(*GOOD[:3], payload, *GOOD[4:])


@pytest.mark.parametrize(
    "frame, reason",
    [
        (body(2, *GOOD[1:]), "Invalid value 2"),  # version 2 (and 1) frames are refused
        (body(1, *GOOD[1:]), "Invalid value 1"),
        (body(2, "agent/a/phase", 0, 0, "a", 1.0, {"step": 1}), "Invalid value 2"),
        (body(*GOOD[:3]), "at least length 4"),
        (body(*GOOD, None), "at most length"),
        (msgpack.packb({"key": "x"}), "Expected `array`"),
        (body(V, b"agent/a/phase", *GOOD[2:]), "Expected `str`"),
        (body(V, "", *GOOD[2:]), "length >= 1"),
        (body(V, "agent/" + "a" * 300 + "/x", *GOOD[2:]), "length <= 256"),
        (body(V, "phase", *GOOD[2:]), "agent/<id>/<name>"),
        (body(V, "$evil", *GOOD[2:]), "control key"),
        (body(*GOOD[:4], -1, *GOOD[5:]), "`int` >= 0"),
        (body(*GOOD[:4], 1.5, *GOOD[5:]), "Expected `int`"),
        (body(*GOOD[:4], True, *GOOD[5:]), "Expected `int`"),
        (body(*GOOD[:2], 5, *GOOD[3:]), "Expected `str`"),
        (body(*GOOD[:6], float("nan")), "timestamp"),
        (body(*GOOD[:6], "now"), "Expected `float`"),
        (with_payload([1, 2]), "Expected `object | null`"),
        (with_payload({"x": 1}), "unknown field `x`"),
        (with_payload({"extra": {"x": {"nested": 1}}}), "Expected"),
        (with_payload({"extra": {"x": [[1]]}}), "Expected"),
        (with_payload({"extra": {"x": b"bytes"}}), "Expected"),
        (with_payload({"extra": {str(i): i for i in range(65)}}), "length <= 64"),
        (with_payload({"extra": {"s": "y" * 1025}}), "length <= 1024"),
        (with_payload({"extra": {"l": [1] * 4097}}), "length <= 4096"),
        (with_payload({"phases": b"abc"}), "multiple of 4"),
        (with_payload({"phases": [0.1]}), "Expected `bytes"),
        (with_payload({"sedenion": [0.0] * 15}), "length >= 16"),
        (with_payload({"sedenion": ["x"] * 16}), "Expected `float`"),
        (with_payload({"coherence": "high"}), "Expected `float"),
        (with_payload({"step": 1.0}), "Expected `int"),
        (with_payload({1: 2}), "Expected `str`"),
        (body(*GOOD) + b"\x00", "trailing"),
        (body(*GOOD)[:-1], "truncated"),
        (b"\xc1", "invalid"),
        (b"\x97\x03\xa2\xff\xfe", "utf-8"),
        (b"\x97\x03\xc6\xff\xff\xff\xff", "truncated"),
        (b"\xdd\xff\xff\xff\xff", "truncated"),
        (msgpack.packb(msgpack.ExtType(5, b"xx")), "Expected `array`"),
        (b"\x00" * ((1 << 20) + 1), "exceeds"),
    ],
)
def test_malformed_frames_raise_typed_error(frame: bytes, reason: str) -> None:
    # case-insensitive: msgspec's wording changes between releases (0.23: "Invalid UTF-8 ...")
    with pytest.raises(MalformedMessage, match=re.compile(re.escape(reason), re.IGNORECASE)):
        unpack(frame)


def test_frame_limit_is_applied_before_decoding() -> None:
    limits = MessageLimits(max_frame_bytes=200)
    ok = make_update("a", "agent/a/x", {"phases": b"x" * 100}, timestamp=1.0)
    assert unpack(pack(ok), limits) == ok
    with pytest.raises(MalformedMessage, match="exceeds 200"):
        unpack(pack(make_update("a", "agent/a/x", {"phases": b"x" * 200})), limits)


def test_make_update_rejects_what_unpack_would() -> None:
    for payload in ({"o": object()}, {"step": 1.5}, {"i": 1 << 64}, {"sedenion": [1.0]},
                    {"s": "y" * 1025}, {"coherence": float("nan")}, {"sedenion": [0.0] * 15 + [float("inf")]},
                    {"sedenion": [float("nan")] + [0.0] * 15}):
        with pytest.raises(MalformedMessage):
            make_update("a", "agent/a/x", payload)
    for key in ("not-a-key", "$evil", "agent/" + "a" * 300 + "/x"):
        with pytest.raises(MalformedMessage):
            make_update("a", key, None)
    with pytest.raises(MalformedMessage):  # a hand-built payload is checked too
        pack(StateUpdate("agent/a/x", "a", StatePayload(step="x"), 0, 0, 1.0))  # type: ignore[arg-type]


def test_phases_travel_as_float32_bytes() -> None:
    phases = np.linspace(0, 6.28, 16)
    update = make_update("a", agent_key("a", "phase"),
                         {"phases": phases, "coherence": np.float64(0.7), "step": np.int64(3),
                          "sedenion": np.arange(16.0)})
    assert type(update.payload.phases) is bytes and len(update.payload["phases"]) == 64
    decoded = unpack(pack(update))
    np.testing.assert_allclose(decode_phases(decoded.payload["phases"]), phases, rtol=1e-6)
    assert decoded.payload["coherence"] == 0.7 and decoded.payload["step"] == 3
    assert decoded.payload["sedenion"] == list(np.arange(16.0))
    assert decoded.payload.get("missing", 5) == 5 and "missing" not in decoded.payload
    with pytest.raises(KeyError):
        decoded.payload["missing"]
    assert encode_phases(np.zeros(3)) == b"\x00" * 12
    with pytest.raises(MalformedMessage):
        decode_phases(b"\x00" * 5)


def test_keys() -> None:
    assert agent_key("a1", "phase") == "agent/a1/phase"
    assert key_owner("agent/a1/phase") == "a1"
    assert key_owner("agent/a1/deep/name") == "a1"
    assert key_owner("agent//x") is None and key_owner("other/a1/x") is None


def test_config_validation_and_round_trip() -> None:
    config = BusConfig(heartbeat_interval=0.1, hub_timeout=0.5, ttl=1.0)
    assert BusConfig.from_dict(config.to_dict()) == config
    for bad in (dict(security="tls"), dict(hwm=0), dict(heartbeat_interval=2.0),
                dict(ttl=0.1, heartbeat_interval=0.2)):
        with pytest.raises(ConfigError):
            BusConfig(**bad)
    with pytest.raises(ConfigError):
        BusConfig.from_dict({"endpoints": {"snapshot": "x"}})


# -- hub batches -------------------------------------------------------


def _node_body(agent: str, name: str, payload: dict | None) -> bytes:
    return pack(make_update(agent, agent_key(agent, name), payload, timestamp=1.5))


def test_batch_round_trip_stamps_positionally() -> None:
    bodies = [_node_body("a", "x", {"step": i}) for i in range(20)]  # > 15: array16 header
    epoch, last, items = unpack_batch(pack_batch(77, 120, bodies))
    assert (epoch, last) == (77, 120)
    assert [u.seq for u in items] == list(range(101, 121))
    assert all(type(u) is StateUpdate and u.epoch == 77 for u in items)
    assert [u.payload["step"] for u in items] == list(range(20))
    assert unpack_batch(pack_batch(5, 9, [])) == (5, 9, [])  # the heartbeat


def test_decoded_updates_are_not_tracked_by_the_cyclic_collector() -> None:
    """A node decodes thousands of updates a second: they must not feed the cyclic collector."""
    import gc

    body = _node_body("a", "x", {"step": 1, "sedenion": [0.0] * 16, "label": "x"})
    _, _, items = unpack_batch(pack_batch(1, 3, [body] * 3))
    for u in [*items, unpack(body), make_update("a", "agent/a/x", {"step": 2})]:
        assert not gc.is_tracked(u) and not gc.is_tracked(u.payload)


def test_batch_with_a_malformed_body_keeps_its_neighbours() -> None:
    good = _node_body("a", "x", {"step": 1})
    bad = [body(V, "agent/a/x", "a", {"step": 1.5}, 0, 0, 1.0),  # wrong type
           body(V, "$snapshot-end", "hub", None, 0, 0, 1.0),  # control key
           body(2, "agent/a/x", 0, 0, "a", 1.0, None),  # old version
           b"\x97\x03\xa2\xff\xfe\xa1a\xc0\x00\x00\x00",  # a key that is not UTF-8
           msgpack.packb(42)]
    for wrong in bad:
        _, _, items = unpack_batch(pack_batch(3, 12, [good, wrong, good]))
        assert type(items[0]) is StateUpdate and items[0].seq == 10
        assert isinstance(items[1], MalformedMessage)
        assert type(items[2]) is StateUpdate and items[2].seq == 12


@pytest.mark.parametrize(
    "frame, reason",
    [
        (pack_batch(3, 12, [b"\xc1"]), "invalid"),  # an undecodable body spoils the frame
        (pack_batch(3, 12, [_node_body("a", "x", None)[:-1]]), "truncated"),
        (pack_batch(3, 12, [_node_body("a", "x", None)]) + b"\x00", "trailing"),
        (msgpack.packb([2, 3, 12, []]), "Invalid value 2"),
        (msgpack.packb([V, 0, 12, []]), "`int` >= 1"),
        (msgpack.packb([V, 3, -1, []]), "`int` >= 0"),
        (msgpack.packb([V, 3, 1.0, []]), "Expected `int`"),
        (msgpack.packb([V, 3, 1, [_node_body("a", "x", None)] * 2]), "ends at seq 1"),
        (msgpack.packb([V, 3, 12, {}]), "Expected `array`"),
        (msgpack.packb([V, 3, 12]), "at least length 4"),
        (_node_body("a", "x", None), "Expected `int`"),  # a bare body is not a batch
        (b"\x00" * ((1 << 20) + BATCH_OVERHEAD + 1), "exceeds"),
    ],
)
def test_malformed_batches_raise_typed_error(frame: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=re.escape(reason)):
        unpack_batch(frame)


def test_batch_limits_follow_message_limits() -> None:
    limits = MessageLimits(max_frame_bytes=1100, max_array_len=8)
    body1 = _node_body("a", "x", {"s": "y" * 80})
    assert 100 < len(body1) < 125
    assert len(unpack_batch(pack_batch(1, 8, [body1] * 8), limits)[2]) == 8
    with pytest.raises(MalformedMessage, match="max_array_len"):  # nine bodies
        unpack_batch(pack_batch(1, 9, [body1] * 9), limits)
    with pytest.raises(MalformedMessage, match="exceeds"):  # > max_frame_bytes + BATCH_OVERHEAD
        unpack_batch(pack_batch(1, 5, [body1] * 4 + [b"\xc5\x02\xbc" + b"z" * 700]), limits)
    with pytest.raises(ValueError):
        pack_batch(1, 2, [body1] * 3)  # more bodies than sequence numbers


def test_encode_update_matches_pack_of_make_update() -> None:
    payload = {"phases": np.linspace(0, 1, 16), "coherence": np.float32(0.25), "step": 3,
               "sedenion": list(np.arange(16.0)), "label": "x"}
    fast = unpack(encode_update("a", "agent/a/phase", payload))
    slow = unpack(pack(make_update("a", "agent/a/phase", payload)))
    assert fast.payload == slow.payload and fast.key == slow.key and fast.agent == "a"
    assert fast.payload.extra == {"label": "x"} and fast.payload.coherence == 0.25
    assert unpack(encode_update("a", "agent/a/phase", None)).payload is None
    for wrong in ({"o": object()}, {"step": 1.5}, {"i": 1 << 64}):
        with pytest.raises(MalformedMessage):
            encode_update("a", "agent/a/x", wrong)


def test_encode_update_checks_a_hand_built_payload() -> None:
    from entanglement.message import StatePayload
    assert unpack(encode_update("a", "agent/a/x", StatePayload(step=3))).payload.step == 3
    with pytest.raises(MalformedMessage):
        encode_update("a", "agent/a/x", StatePayload(coherence="high"))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        encode_update("a", "agent/a/x", {"phases": np.array(["a", "b"])})


def test_parcel_round_trip_and_shape() -> None:
    bodies = [_node_body("a", "x", {"step": i}) for i in range(20)]  # > 15: array16 header
    frame = pack_parcel(bodies)
    assert is_parcel(frame) and not any(is_parcel(b) for b in bodies)
    assert unpack_parcel(frame) == bodies
    assert unpack_parcel(pack_parcel(bodies[:2])) == bodies[:2]
    with pytest.raises(ValueError):
        pack_parcel(bodies[:1])  # one body travels alone


@pytest.mark.parametrize("frame, reason", [
    (msgpack.packb([WIRE_VERSION, []]), "parcel of 0 bodies"),
    (msgpack.packb([WIRE_VERSION, [1]]), "parcel of 1 bodies"),
    (msgpack.packb([2, [1, 2]]), "not a valid parcel"),  # another wire version
    (msgpack.packb([WIRE_VERSION, "ab"]), "not a valid parcel"),
    (msgpack.packb([WIRE_VERSION, [1, 2]])[:-1], "not a valid parcel"),  # truncated
    (b"\x92\x03\xdd\xff\xff\xff\xff", "not a valid parcel"),  # a huge declared length
])
def test_malformed_parcels_raise_typed_error(frame: bytes, reason: str) -> None:
    assert is_parcel(frame)
    with pytest.raises(MalformedMessage, match=reason):
        unpack_parcel(frame)


def test_parcel_limits() -> None:
    body = _node_body("a", "x", {"step": 1})
    with pytest.raises(MalformedMessage, match="parcel of 5 bodies"):
        unpack_parcel(pack_parcel([body] * 5), MessageLimits(max_array_len=4))
    with pytest.raises(MalformedMessage, match="exceeds"):
        unpack_parcel(pack_parcel([body] * 5), MessageLimits(max_frame_bytes=len(body) * 4))


def test_non_finite_shared_state_on_the_wire_is_malformed() -> None:
    """A NaN in a sedenion or a coherence that reached the wire (another implementation, a
    corrupted frame) is refused like any malformed value, not handed to the coupling; finite
    values whose sum overflows are still accepted."""
    frame = pack(make_update("a", "agent/a/memory", {"sedenion": [1.5] * 16, "coherence": 0.25}))
    one_and_a_half, quarter = b"\xcb" + np.float64(1.5).byteswap().tobytes(), b"\xcb" + np.float64(0.25).byteswap().tobytes()
    nan = b"\xcb" + np.float64("nan").byteswap().tobytes()
    assert frame.count(one_and_a_half) == 16 and frame.count(quarter) == 1
    for bad in (frame.replace(one_and_a_half, nan, 1), frame.replace(quarter, nan)):
        with pytest.raises(MalformedMessage, match="finite"):
            unpack(bad)
    huge = make_update("a", "agent/a/memory", {"sedenion": [1.7e308] * 16})
    assert unpack(pack(huge)).payload.sedenion == [1.7e308] * 16
