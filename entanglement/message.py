"""The one message type of the bus, `StateUpdate`, and its msgpack wire format.

Wire format (version 2)
-----------------------
Every update is one msgpack array (the *body*)::

    [version, key, seq, epoch, agent, timestamp, payload]

    version    int    always 2 (`WIRE_VERSION`); anything else is rejected
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

The hub publishes *batches*: one single-frame message per poll wake-up, carrying every update
it stamped in that turn (`pack_batch`, `unpack_batch`)::

    [version, epoch, last_seq, [body, body, ...]]

    version    int    2, as above
    epoch      int    >= 1, the hub instance
    last_seq   int    the hub's last stamped seq; body i of n has seq last_seq - n + 1 + i
    bodies     array  the bodies exactly as the agents sent them (their own seq and epoch, 0, are
                      ignored: the stamp is positional), so the hub forwards the validated bytes
                      without re-encoding them; control keys are not allowed here

An empty batch is the hub heartbeat (formerly "$hugz"): it says which seq the hub is at. A batch
frame may exceed `max_frame_bytes` by at most `BATCH_OVERHEAD` (its header); it holds at most
`max_array_len` bodies. Receivers validate every body; a malformed one is counted and dropped on
its own, and the hole it leaves in the sequence is a gap (the node re-syncs).

How it travels, frame by frame::

    node PUSH -> hub PULL        [body]                    (updates, "$heartbeat")
    hub PUB  -> node SUB         [batch]                   (updates and heartbeats)
    node DEALER -> hub ROUTER    [body "$snapshot?"]       payload {"prefix": str}
    hub ROUTER -> node DEALER    [body], ... one per key (seq and epoch stamped in the body),
                                 then [body "$snapshot-end"] whose seq is the sequence the
                                 snapshot covers

Version 1 differed only on PUB: one [key, body] message per update, with the stamp re-encoded
into the body, and a "$hugz" body as the heartbeat. Control keys: "$heartbeat" (node heartbeat
to the hub), "$snapshot?" and "$snapshot-end" ("$hugz" is reserved, no longer sent).

Unpacking is strict: the frame size is checked first, msgpack runs with `max_*_len` limits, and
every field is type-checked. Anything that fails raises `MalformedMessage`; receivers count and
drop it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from entanglement.config import MessageLimits

WIRE_VERSION = 2
BATCH_OVERHEAD = 32  # a batch header: fixarray, version, epoch, last_seq, array length
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

_BATCH_PREFIX = b"\x94" + msgpack.packb(WIRE_VERSION)  # fixarray of 4, then the version
_FIXARRAY = [bytes([0x90 | n]) for n in range(16)]


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


def _decode(frame: bytes, limits: MessageLimits, max_bytes: int) -> Any:
    """msgpack-decode one frame under `limits`; raise `MalformedMessage` on anything wrong."""
    if len(frame) > max_bytes:
        raise MalformedMessage(f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(
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


def _validate(obj: Any, seq: int | None = None, epoch: int | None = None) -> StateUpdate:
    """A decoded body as a `StateUpdate`, type-checked; `seq`/`epoch` override the body's."""
    if type(obj) is not list or len(obj) != 7:
        raise MalformedMessage(f"body must be a 7-element array, got {type(obj).__name__}")
    version, key, body_seq, body_epoch, agent, timestamp, payload = obj
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedMessage(f"unsupported wire version {version!r}")
    if type(timestamp) is int:
        timestamp = float(timestamp)
    _check_envelope(key, body_seq, body_epoch, agent, timestamp)
    _check_payload(payload)
    return StateUpdate(key, agent, payload, body_seq if seq is None else seq,
                       body_epoch if epoch is None else epoch, timestamp)


def unpack(frame: bytes, limits: MessageLimits = MessageLimits()) -> StateUpdate:
    """Decode and validate one body frame; raise `MalformedMessage` on anything unexpected."""
    return _validate(_decode(frame, limits, limits.max_frame_bytes))


def pack_batch(epoch: int, last_seq: int, bodies: Sequence[bytes]) -> bytes:
    """One hub batch frame (module docstring) from already validated body frames.

    The bodies are concatenated as they are: each is one complete msgpack object, so the
    result is a single msgpack array. Raises `ValueError` on an impossible stamp.
    """
    n = len(bodies)
    if not 0 <= n <= last_seq <= _MAX_INT or not 0 <= epoch <= _MAX_INT:
        raise ValueError(f"bad batch stamp: epoch {epoch}, last_seq {last_seq}, {n} bodies")
    if n < 16:
        length = _FIXARRAY[n]
    elif n < 1 << 16:
        length = b"\xdc" + n.to_bytes(2, "big")
    else:
        length = b"\xdd" + n.to_bytes(4, "big")
    return b"".join((_BATCH_PREFIX, msgpack.packb(epoch), msgpack.packb(last_seq), length, *bodies))


def unpack_batch(
    frame: bytes, limits: MessageLimits = MessageLimits()
) -> tuple[int, int, list[StateUpdate | MalformedMessage]]:
    """Decode one hub batch: (epoch, last_seq, one entry per body).

    A frame that is not a well-formed batch raises `MalformedMessage`. A body that is invalid
    on its own (or carries a control key) is returned as its `MalformedMessage`, in place, so the
    caller can count it and still see its neighbours; valid bodies come back stamped with their
    positional seq and the batch's epoch.
    """
    obj = _decode(frame, limits, limits.max_frame_bytes + BATCH_OVERHEAD)
    if type(obj) is not list or len(obj) != 4:
        raise MalformedMessage(f"batch must be a 4-element array, got {type(obj).__name__}")
    version, epoch, last_seq, bodies = obj
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedMessage(f"unsupported wire version {version!r}")
    if type(epoch) is not int or not 0 < epoch <= _MAX_INT:
        raise MalformedMessage(f"batch epoch must be an int in [1, 2^63), got {epoch!r:.80}")
    if type(last_seq) is not int or not 0 <= last_seq <= _MAX_INT:
        raise MalformedMessage(f"batch last_seq must be an int in [0, 2^63), got {last_seq!r:.80}")
    if type(bodies) is not list or len(bodies) > last_seq:
        raise MalformedMessage("batch bodies must be an array of at most last_seq bodies")
    seq = last_seq - len(bodies)
    out: list[StateUpdate | MalformedMessage] = []
    for body in bodies:
        seq += 1
        try:
            update = _validate(body, seq, epoch)
            if update.key[0] == "$":
                raise MalformedMessage(f"control key {update.key!r} does not belong in a batch")
        except MalformedMessage as exc:
            out.append(exc)
        else:
            out.append(update)
    return epoch, last_seq, out


def encode_update(agent: str, key: str, payload: Mapping[str, Any] | None) -> bytes:
    """The body of a node-side update (seq and epoch 0, timestamp now), validated.

    The publish fast path: equivalent to ``pack(make_update(agent, key, payload))`` without
    the intermediate `StateUpdate`. `agent` and `key` must already be valid (the node checks
    them once per key); the payload is checked here and invalid content raises
    `MalformedMessage`.
    """
    plain = None if payload is None else _plain_payload(payload)
    _check_payload(plain)
    try:
        return msgpack.packb([WIRE_VERSION, key, 0, 0, agent, time.time(), plain], use_bin_type=True)
    except (OverflowError, ValueError) as exc:  # e.g. an int beyond msgpack's 64-bit range
        raise MalformedMessage(f"cannot pack {key!r}: {exc}") from exc


def _plain_payload(payload: Mapping[str, Any]) -> Payload:
    """A plain dict copy of `payload`, numpy values converted (see `make_update`)."""
    plain = dict(payload)
    for name, value in plain.items():
        kind = type(value)
        if kind in _SCALAR_TYPES or (kind is list and set(map(type, value)) <= _SCALAR_TYPES):
            continue  # already plain (the common case)
        plain[name] = _plain(name, value)
    return plain


def make_update(agent: str, key: str, payload: Mapping[str, Any] | None) -> StateUpdate:
    """A node-side update (seq and epoch 0, timestamp now).

    numpy values are converted for convenience: scalars to Python numbers, a "phases" array to
    float32 bytes, any other 1-d array to a list.
    """
    if payload is None:
        return StateUpdate(key, agent, None, 0, 0, time.time())
    return StateUpdate(key, agent, _plain_payload(payload), 0, 0, time.time())


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_phases(value) if name == "phases" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is list:
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


_valid_keys: set[str] = set()  # keys that passed the full check (bounded memo, see below)
_VALID_KEYS_MAX = 1 << 16
_INF = math.inf


def _check_envelope(key: Any, seq: Any, epoch: Any, agent: Any, timestamp: Any) -> None:
    # Hot path (every message, every receiver): one chained test for the common, valid case;
    # a key's validity is a pure function of the string, so it is memoised.
    if (type(key) is str and type(agent) is str and type(seq) is int and type(epoch) is int
            and type(timestamp) is float and 0 <= seq <= _MAX_INT and 0 <= epoch <= _MAX_INT
            and -_INF < timestamp < _INF and key in _valid_keys):
        return
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
    if len(_valid_keys) >= _VALID_KEYS_MAX:
        _valid_keys.clear()  # a flood of distinct keys: start over rather than grow
    _valid_keys.add(key)


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
        if kind in _SCALAR_TYPES:
            continue
        if kind is list and (name == "sedenion" or set(map(type, value)) <= _SCALAR_TYPES):
            continue  # "sedenion" gets the stricter check (numbers only) below
        raise MalformedMessage(f"payload field {name!r}: unsupported value {value!r:.80}")
    if "phases" in payload:
        phases = payload["phases"]
        if type(phases) is not bytes or len(phases) % 4:
            raise MalformedMessage("payload 'phases' must be float32 bytes (length % 4 == 0)")
    if "sedenion" in payload:
        sed = payload["sedenion"]
        if type(sed) is not list or len(sed) != SEDENION_DIM or not set(map(type, sed)) <= _NUMBERS:
            raise MalformedMessage(f"payload 'sedenion' must be a list of {SEDENION_DIM} numbers")
    if "coherence" in payload and type(payload["coherence"]) not in _NUMBERS:
        raise MalformedMessage("payload 'coherence' must be a number")
    if "step" in payload and type(payload["step"]) is not int:
        raise MalformedMessage("payload 'step' must be an int")
