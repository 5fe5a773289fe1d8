"""The one message type of the bus, `StateUpdate`, and its msgpack wire format.

Wire format
-----------
Every message is one msgpack array (the *body*), version 1::

    [version, key, seq, epoch, agent, timestamp, payload]

    version    int    always 1 (`WIRE_VERSION`); anything else is rejected
    key        str    "agent/<agent>/<name>" for state, or a control key starting with "$"
    seq        int    >= 0; stamped by the hub (strictly increasing per hub epoch), 0 from nodes
    epoch      int    >= 0; random id of the hub instance that stamped seq, 0 from nodes
    agent      str    id of the agent that published the value (control: the sender)
    timestamp  float  time.time() when the agent published it (latency, staleness)
    payload    map or nil
               map: str -> nil | bool | int | float | str | bytes | [scalar, ...] (flat)
               nil: the key is deleted (expired by the hub, or deleted by its owner)
               well-known fields, checked when present:
                 "phases"    bytes, little-endian float32, length a multiple of 4
                 "sedenion"  list of exactly 16 numbers
                 "coherence" number, "step" int

How the body travels, frame by frame::

    node PUSH -> hub PULL        [body]                    (updates, "$heartbeat")
    hub PUB  -> node SUB         [key utf-8, body]         (key is the topic: prefix filtering)
    node DEALER -> hub ROUTER    [body "$snapshot?"]       payload {"prefix": str}
    hub ROUTER -> node DEALER    [body], ... one per key, then [body "$snapshot-end"]
                                 whose seq is the sequence the snapshot covers

Control keys: "$hugz" (hub heartbeat on PUB; seq = last stamped seq), "$heartbeat" (node
heartbeat to the hub), "$snapshot?" and "$snapshot-end".

Unpacking is strict: the frame size is checked first, msgpack runs with `max_*_len` limits, and
every field is type-checked. Anything that fails raises `MalformedMessage`; receivers count and
drop it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from entanglement.config import MessageLimits

WIRE_VERSION = 1
SEDENION_DIM = 16

HUB_HEARTBEAT = "$hugz"
NODE_HEARTBEAT = "$heartbeat"
SNAPSHOT_REQUEST = "$snapshot?"
SNAPSHOT_END = "$snapshot-end"
CONTROL_KEYS = frozenset({HUB_HEARTBEAT, NODE_HEARTBEAT, SNAPSHOT_REQUEST, SNAPSHOT_END})

_MAX_INT = (1 << 63) - 1
_SCALAR_TYPES = frozenset({type(None), bool, int, float, str, bytes})
_NUMBERS = frozenset({int, float})

Payload = dict[str, Any]


class MalformedMessage(ValueError):
    """A frame is not a valid `StateUpdate` (bad msgpack, wrong types, too large, ...)."""


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """One keyed value on the bus (see the module docstring for the wire format)."""

    key: str
    agent: str
    payload: Payload | None
    seq: int = 0
    epoch: int = 0
    timestamp: float = 0.0

    @property
    def is_control(self) -> bool:
        return self.key.startswith("$")

    @property
    def is_delete(self) -> bool:
        return self.payload is None and not self.is_control


def agent_key(agent: str, name: str) -> str:
    """The bus key of state `name` owned by `agent`: ``agent/<agent>/<name>``."""
    return f"agent/{agent}/{name}"


def key_owner(key: str) -> str | None:
    """The agent id a state key belongs to, or None if `key` is not ``agent/<id>/<name>``."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] == "agent" and parts[1] and parts[2]:
        return parts[1]
    return None


def encode_phases(phases: np.ndarray) -> bytes:
    """Phases as little-endian float32 bytes (the "phases" payload field)."""
    return np.ascontiguousarray(phases, dtype="<f4").tobytes()


def decode_phases(data: bytes) -> np.ndarray:
    """Inverse of `encode_phases` (a read-only float32 view on the bytes)."""
    if len(data) % 4:
        raise MalformedMessage(f"phases: {len(data)} bytes is not a multiple of 4")
    return np.frombuffer(data, dtype="<f4")


def pack(update: StateUpdate) -> bytes:
    """The msgpack body of `update`; invalid content raises `MalformedMessage` here, early."""
    _check_payload(update.payload)
    _check_envelope(update.key, update.seq, update.epoch, update.agent, update.timestamp)
    try:
        return msgpack.packb(
            [WIRE_VERSION, update.key, update.seq, update.epoch, update.agent, update.timestamp,
             update.payload],
            use_bin_type=True,
        )
    except (OverflowError, ValueError) as exc:  # e.g. an int beyond msgpack's 64-bit range
        raise MalformedMessage(f"cannot pack {update.key!r}: {exc}") from exc


def unpack(frame: bytes, limits: MessageLimits = MessageLimits()) -> StateUpdate:
    """Decode and validate one body frame; raise `MalformedMessage` on anything unexpected."""
    if len(frame) > limits.max_frame_bytes:
        raise MalformedMessage(f"frame of {len(frame)} bytes exceeds {limits.max_frame_bytes}")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError, UnicodeDecodeError and limits.
        raise MalformedMessage(f"not a valid msgpack body: {exc!r}") from exc
    if not isinstance(obj, list) or len(obj) != 7:
        raise MalformedMessage(f"body must be a 7-element array, got {type(obj).__name__}")
    version, key, seq, epoch, agent, timestamp, payload = obj
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedMessage(f"unsupported wire version {version!r}")
    if type(timestamp) is int:
        timestamp = float(timestamp)
    _check_envelope(key, seq, epoch, agent, timestamp)
    _check_payload(payload)
    return StateUpdate(key, agent, payload, seq, epoch, timestamp)


def make_update(agent: str, key: str, payload: Mapping[str, Any] | None) -> StateUpdate:
    """A node-side update (seq and epoch 0, timestamp now).

    numpy values are converted for convenience: scalars to Python numbers, a "phases" array to
    float32 bytes, any other 1-d array to a list.
    """
    if payload is None:
        return StateUpdate(key, agent, None, 0, 0, time.time())
    if all(type(v) in _SCALAR_TYPES for v in payload.values()) and "phases" not in payload:
        plain = dict(payload)
    else:
        plain = {k: _plain(k, v) for k, v in payload.items()}
    return StateUpdate(key, agent, plain, 0, 0, time.time())


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_phases(value) if name == "phases" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is list:
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


def _check_envelope(key: Any, seq: Any, epoch: Any, agent: Any, timestamp: Any) -> None:
    if type(key) is not str or not key:
        raise MalformedMessage(f"key must be a non-empty str, got {key!r:.80}")
    if type(agent) is not str:
        raise MalformedMessage(f"agent must be a str, got {type(agent).__name__}")
    for name, value in (("seq", seq), ("epoch", epoch)):
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise MalformedMessage(f"{name} must be an int in [0, 2^63), got {value!r:.80}")
    if type(timestamp) is not float or not math.isfinite(timestamp):
        raise MalformedMessage(f"timestamp must be a finite float, got {timestamp!r:.80}")
    if key.startswith("$"):
        if key not in CONTROL_KEYS:
            raise MalformedMessage(f"unknown control key {key!r:.80}")
    elif key_owner(key) is None:
        raise MalformedMessage(f"state key must look like agent/<id>/<name>, got {key!r:.80}")


def _check_payload(payload: Any) -> None:
    # Hot path (every message, every receiver): set comparisons instead of per-item calls.
    if payload is None:
        return
    if type(payload) is not dict:
        raise MalformedMessage(f"payload must be a map or nil, got {type(payload).__name__}")
    for name, value in payload.items():
        if type(name) is not str:
            raise MalformedMessage(f"payload field names must be str, got {name!r:.80}")
        kind = type(value)
        if kind not in _SCALAR_TYPES and not (kind is list and {type(x) for x in value} <= _SCALAR_TYPES):
            raise MalformedMessage(f"payload field {name!r}: unsupported value {value!r:.80}")
    if "phases" in payload:
        phases = payload["phases"]
        if type(phases) is not bytes or len(phases) % 4:
            raise MalformedMessage("payload 'phases' must be float32 bytes (length % 4 == 0)")
    if "sedenion" in payload:
        sed = payload["sedenion"]
        if type(sed) is not list or len(sed) != SEDENION_DIM or not {type(x) for x in sed} <= _NUMBERS:
            raise MalformedMessage(f"payload 'sedenion' must be a list of {SEDENION_DIM} numbers")
    if "coherence" in payload and type(payload["coherence"]) not in _NUMBERS:
        raise MalformedMessage("payload 'coherence' must be a number")
    if "step" in payload and type(payload["step"]) is not int:
        raise MalformedMessage("payload 'step' must be an int")
