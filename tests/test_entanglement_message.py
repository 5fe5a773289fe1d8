"""The wire format: round trips, strict limits and typed errors (no sockets)."""

from __future__ import annotations

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
    make_update,
    pack_batch,
    unpack_batch,
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.text(max_size=30), st.binary(max_size=30),
)
payloads = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in {"phases", "sedenion", "coherence", "step"}),
    scalars | st.lists(scalars.filter(lambda v: v is not None), max_size=10),
    max_size=10,
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
    update = StateUpdate(agent_key(agent, name), agent, payload, seq, 7, ts)
    assert unpack(pack(update)) == update


@given(st.binary(max_size=512))
@settings(max_examples=500, deadline=None)
def test_unpack_raises_only_malformed_message(data: bytes) -> None:
    try:
        unpack(data)
    except MalformedMessage:
        pass


def body(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD = [WIRE_VERSION, "agent/a/phase", 0, 0, "a", 1.0, {"step": 1}]


@pytest.mark.parametrize(
    "frame, reason",
    [
        (body(1, *GOOD[1:]), "version"),
        (body(3, *GOOD[1:]), "version"),
        (body(*GOOD[:6]), "7-element"),
        (body(*GOOD, None), "7-element"),
        (msgpack.packb({"key": "x"}), "7-element"),
        (body(WIRE_VERSION, b"agent/a/phase", *GOOD[2:]), "key"),
        (body(WIRE_VERSION, "", *GOOD[2:]), "key"),
        (body(WIRE_VERSION, "phase", *GOOD[2:]), "agent/<id>/<name>"),
        (body(WIRE_VERSION, "$evil", *GOOD[2:]), "control key"),
        (body(*GOOD[:2], -1, *GOOD[3:]), "seq"),
        (body(*GOOD[:2], 1.5, *GOOD[3:]), "seq"),
        (body(*GOOD[:2], True, *GOOD[3:]), "seq"),
        (body(*GOOD[:4], 5, *GOOD[5:]), "agent"),
        (body(*GOOD[:5], float("nan"), GOOD[6]), "timestamp"),
        (body(*GOOD[:5], "now", GOOD[6]), "timestamp"),
        (body(*GOOD[:6], [1, 2]), "payload"),
        (body(*GOOD[:6], {"x": {"nested": 1}}), "unsupported value"),
        (body(*GOOD[:6], {"x": [[1]]}), "unsupported value"),
        (body(*GOOD[:6], {"phases": b"abc"}), "phases"),
        (body(*GOOD[:6], {"phases": [0.1]}), "phases"),
        (body(*GOOD[:6], {"sedenion": [0.0] * 15}), "sedenion"),
        (body(*GOOD[:6], {"sedenion": ["x"] * 16}), "sedenion"),
        (body(*GOOD[:6], {"coherence": "high"}), "coherence"),
        (body(*GOOD[:6], {"step": 1.0}), "step"),
        (body(*GOOD[:6], {1: 2}), "msgpack"),
        (body(*GOOD) + b"\x00", "msgpack"),
        (body(*GOOD)[:-1], "msgpack"),
        (b"\xc1", "msgpack"),
        (b"\x97\x01\xc6\xff\xff\xff\xff", "msgpack"),
        (b"\xdd\xff\xff\xff\xff", "msgpack"),
        (msgpack.packb(msgpack.ExtType(5, b"xx")), "msgpack"),
        (b"\x00" * ((1 << 20) + 1), "exceeds"),
    ],
)
def test_malformed_frames_raise_typed_error(frame: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason.replace("$", r"\$")):
        unpack(frame)


def test_limits_are_applied() -> None:
    limits = MessageLimits(max_frame_bytes=10_000, max_bin_len=100, max_str_len=50,
                           max_array_len=20, max_map_len=3)
    ok = StateUpdate("agent/a/x", "a", {"b": b"x" * 100}, 0, 0, 1.0)
    assert unpack(pack(ok), limits) == ok
    for payload in ({"b": b"x" * 101}, {"s": "y" * 51}, {"l": [1] * 21},
                    {"a": 1, "b": 2, "c": 3, "d": 4}):
        with pytest.raises(MalformedMessage):
            unpack(pack(StateUpdate("agent/a/x", "a", payload, 0, 0, 1.0)), limits)


def test_pack_rejects_what_unpack_would() -> None:
    with pytest.raises(MalformedMessage):
        pack(StateUpdate("agent/a/x", "a", {"o": object()}, 0, 0, 1.0))
    with pytest.raises(MalformedMessage):
        pack(StateUpdate("not-a-key", "a", {}, 0, 0, 1.0))


def test_phases_travel_as_float32_bytes() -> None:
    phases = np.linspace(0, 6.28, 16)
    update = make_update("a", agent_key("a", "phase"),
                         {"phases": phases, "coherence": np.float64(0.7), "step": np.int64(3),
                          "sedenion": np.arange(16.0)})
    assert type(update.payload["phases"]) is bytes and len(update.payload["phases"]) == 64
    decoded = unpack(pack(update))
    np.testing.assert_allclose(decode_phases(decoded.payload["phases"]), phases, rtol=1e-6)
    assert decoded.payload["coherence"] == 0.7 and decoded.payload["step"] == 3
    assert decoded.payload["sedenion"] == list(np.arange(16.0))
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


# -- hub batches (wire format version 2) -------------------------------------------------------


def _node_body(agent: str, name: str, payload: dict | None) -> bytes:
    return pack(StateUpdate(agent_key(agent, name), agent, payload, 0, 0, 1.5))


def test_batch_round_trip_stamps_positionally() -> None:
    bodies = [_node_body("a", "x", {"step": i}) for i in range(20)]  # > 15: array16 header
    epoch, last, items = unpack_batch(pack_batch(77, 120, bodies))
    assert (epoch, last) == (77, 120)
    assert [u.seq for u in items] == list(range(101, 121))
    assert all(type(u) is StateUpdate and u.epoch == 77 for u in items)
    assert [u.payload["step"] for u in items] == list(range(20))
    assert unpack_batch(pack_batch(5, 9, [])) == (5, 9, [])  # the heartbeat


def test_batch_with_a_malformed_body_keeps_its_neighbours() -> None:
    good = _node_body("a", "x", {"step": 1})
    bad = [body(WIRE_VERSION, "agent/a/x", 0, 0, "a", 1.0, {"step": 1.5}),  # wrong type
           body(WIRE_VERSION, "$snapshot-end", 0, 0, "hub", 1.0, None),  # control key
           body(1, "agent/a/x", 0, 0, "a", 1.0, None),  # old version
           msgpack.packb(42)]
    for wrong in bad:
        _, _, items = unpack_batch(pack_batch(3, 12, [good, wrong, good]))
        assert type(items[0]) is StateUpdate and items[0].seq == 10
        assert isinstance(items[1], MalformedMessage)
        assert type(items[2]) is StateUpdate and items[2].seq == 12


@pytest.mark.parametrize(
    "frame, reason",
    [
        (pack_batch(3, 12, [b"\xc1"]), "msgpack"),  # an undecodable body spoils the frame
        (pack_batch(3, 12, [_node_body("a", "x", None)[:-1]]), "msgpack"),
        (pack_batch(3, 12, [_node_body("a", "x", None)]) + b"\x00", "msgpack"),
        (msgpack.packb([1, 3, 12, []]), "version"),
        (msgpack.packb([WIRE_VERSION, 0, 12, []]), "epoch"),
        (msgpack.packb([WIRE_VERSION, 3, -1, []]), "last_seq"),
        (msgpack.packb([WIRE_VERSION, 3, 1.0, []]), "last_seq"),
        (msgpack.packb([WIRE_VERSION, 3, 1, [1, 2]]), "at most last_seq"),
        (msgpack.packb([WIRE_VERSION, 3, 12, {}]), "array"),
        (msgpack.packb([WIRE_VERSION, 3, 12]), "4-element"),
        (_node_body("a", "x", None), "4-element"),  # a bare body is not a batch
        (b"\x00" * ((1 << 20) + BATCH_OVERHEAD + 1), "exceeds"),
    ],
)
def test_malformed_batches_raise_typed_error(frame: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        unpack_batch(frame)


def test_batch_limits_follow_message_limits() -> None:
    limits = MessageLimits(max_frame_bytes=1100, max_array_len=8)
    body1 = _node_body("a", "x", {"s": "y" * 90})
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
    assert unpack(encode_update("a", "agent/a/phase", None)).payload is None
    for wrong in ({"o": object()}, {"step": 1.5}, {"i": 1 << 64}):
        with pytest.raises(MalformedMessage):
            encode_update("a", "agent/a/x", wrong)
