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
from entanglement.message import make_update

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


GOOD = [1, "agent/a/phase", 0, 0, "a", 1.0, {"step": 1}]


@pytest.mark.parametrize(
    "frame, reason",
    [
        (body(2, *GOOD[1:]), "version"),
        (body(*GOOD[:6]), "7-element"),
        (body(*GOOD, None), "7-element"),
        (msgpack.packb({"key": "x"}), "7-element"),
        (body(1, b"agent/a/phase", *GOOD[2:]), "key"),
        (body(1, "", *GOOD[2:]), "key"),
        (body(1, "phase", *GOOD[2:]), "agent/<id>/<name>"),
        (body(1, "$evil", *GOOD[2:]), "control key"),
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
