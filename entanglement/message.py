"""The one message type of the bus, `StateUpdate`, and its msgpack wire format.

Wire format (version 3)
-----------------------
Every update is one msgpack array (the *body*)::

    [version, key, agent, payload, seq, epoch, timestamp]

    version    int    always 3 (`WIRE_VERSION`); anything else is rejected
    key        str    "agent/<agent>/<name>" for state, or a control key starting with "$"
    agent      str    id of the agent that published the value (control: the sender)
    payload    map or nil; nil deletes the key (expired by the hub, or deleted by its owner)
               "phases"     bin, little-endian float32, length a multiple of 4
               "sedenion"   array of exactly 16 numbers
               "coherence"  number
               "step"       int
               "extra"      map str -> nil | bool | int | float | str | [scalar, ...] (flat):
                            anything else an agent shares (control messages: "request")
               every field is optional; any other field is an error
    seq        int    >= 0; stamped by the hub (strictly increasing per hub epoch), 0 from nodes
    epoch      int    >= 0; random id of the hub instance that stamped seq, 0 from nodes
    timestamp  float  time.time() when the agent published it (latency, staleness)

Static limits (part of the protocol): keys and agent ids <= 256 characters, extra strings
<= 1024, extra lists <= 4096 items, <= 64 extra fields, phases <= 1 MiB. The frame size is
limited at run time (`MessageLimits.max_frame_bytes`) before anything is decoded; a node refuses
to publish an update larger than that (so, with the default limits, phases stay a little under
1 MiB).

The hub publishes *batches*: one single-frame message per poll wake-up, carrying every update
it stamped in that turn (`pack_batch`, `unpack_batch`)::

    [version, epoch, last_seq, [body, body, ...]]

    version    int    3, as above
    epoch      int    >= 1, the hub instance
    last_seq   int    the hub's last stamped seq; body i of n has seq last_seq - n + 1 + i
    bodies     array  the bodies exactly as the agents sent them (their own seq and epoch, 0, are
                      ignored: the stamp is positional), so the hub forwards the validated bytes
                      without re-encoding them; control keys are not allowed here

An empty batch is the hub heartbeat: it says which seq the hub is at. A batch frame may exceed
`max_frame_bytes` by at most `BATCH_OVERHEAD` (its header); it holds at most `max_array_len`
bodies. Receivers validate every body; a malformed one is counted and dropped on its own, and
the hole it leaves in the sequence is a gap (the node re-syncs).

A node that publishes faster than it can send sends *parcels*: several of its bodies in one
frame (`pack_parcel`, `unpack_parcel`), so that a burst costs one message, one encryption and one
receive at the hub instead of one per update::

    [version, [body, body, ...]]

    version    int    3, as above
    bodies     array  2 to `max_array_len` bodies, in the order they were published; the hub
                      handles each as if it had come alone (a malformed one is counted and
                      dropped on its own)

A frame is a parcel when its first byte is a msgpack fixarray of 2 (a body is an array of 7).

How it travels, frame by frame::

    node PUSH -> hub PULL        [body] or [parcel]        (updates, "$heartbeat")
    hub PUB  -> node SUB         [batch]                   (updates and heartbeats)
    node DEALER -> hub ROUTER    [body "$snapshot?"]       extra {"request": int}
    hub ROUTER -> node DEALER    [body], ... one per key (seq and epoch stamped in the body),
                                 then [body "$snapshot-end"] whose seq is the sequence the
                                 snapshot covers, extra {"request": the request's number,
                                 "items": how many items came before it}

Decoding and validation happen in one pass in compiled code: the body and batch types below
are msgspec structs, so a frame is checked against the schema while it is parsed (version 2
did the same checks in Python, four times slower). Anything that fails raises
`MalformedMessage`; receivers count and drop it. Version 2 had a free-form payload map and the
envelope order [version, key, seq, epoch, agent, timestamp, payload]; its frames are rejected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Union

import msgspec
import numpy as np
from msgspec import Meta
from msgspec.structs import force_setattr

from entanglement.config import MessageLimits

WIRE_VERSION = 3
BATCH_OVERHEAD = 32  # a batch header: fixarray, version, epoch, last_seq, array length
PARCEL_OVERHEAD = 16  # room for a parcel header: fixarray, version, array length (at most 7 bytes)
SEDENION_DIM = 16
MAX_KEY_LEN = 256  # keys and agent ids
MAX_STR_LEN = 1024  # one string value in "extra"
MAX_LIST_LEN = 4096  # one list value in "extra"
MAX_EXTRA_FIELDS = 64
MAX_PHASES_BYTES = 1 << 20  # 262,144 float32 phases

NODE_HEARTBEAT = "$heartbeat"
SNAPSHOT_REQUEST = "$snapshot?"
SNAPSHOT_END = "$snapshot-end"
CONTROL_KEYS = frozenset({NODE_HEARTBEAT, SNAPSHOT_REQUEST, SNAPSHOT_END, "$hugz"})  # reserved

_MAX_INT = (1 << 63) - 1
_KNOWN = ("phases", "sedenion", "coherence", "step")
_KNOWN_SET = frozenset(_KNOWN)
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list})

_Str = Annotated[str, Meta(max_length=MAX_STR_LEN)]
_Scalar = Union[None, bool, int, float, _Str]
_Value = Union[_Scalar, Annotated[list[_Scalar], Meta(max_length=MAX_LIST_LEN)]]
_Extra = Annotated[dict[Annotated[str, Meta(max_length=MAX_KEY_LEN)], _Value],
                   Meta(max_length=MAX_EXTRA_FIELDS)]
_Count = Annotated[int, Meta(ge=0, le=_MAX_INT)]


class MalformedMessage(ValueError):
    """A frame is not a valid `StateUpdate` (bad msgpack, wrong types, too large, ...)."""


def _all_finite(values: list[float]) -> bool:
    """Whether every value is finite; values that are not numbers (a hand-built payload) pass
    here and are reported by the schema check that follows."""
    try:
        return math.isfinite(sum(values)) or all(map(math.isfinite, values))  # a finite sum: all finite
    except TypeError:
        return True


class StatePayload(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True, gc=False):
    """What an agent shares under one key (module docstring: fields and limits).

    Read it by attribute (``p.phases``) or like a mapping (``p["phases"]``, ``p.get("label")``,
    ``"step" in p``): the well-known fields that are set, then the extra ones, flat.
    Build it from a plain mapping with `StatePayload.from_mapping`, which validates.

    Payloads and updates are values: treat them as immutable. Neither is tracked by Python's
    cyclic garbage collector (msgspec ``gc=False``): a node decodes thousands of them per second,
    and tracking them made the collector run three to four times as often under full load. A
    reference cycle through one (say, a payload stored in its own ``extra`` dict) would never be
    collected.
    """

    phases: Annotated[bytes, Meta(max_length=MAX_PHASES_BYTES)] | None = None
    sedenion: Annotated[list[float], Meta(min_length=SEDENION_DIM,
                                          max_length=SEDENION_DIM)] | None = None
    coherence: float | None = None
    step: int | None = None
    extra: _Extra | None = None

    def __post_init__(self) -> None:
        if self.phases is not None and len(self.phases) % 4:
            raise ValueError(f"phases: {len(self.phases)} bytes is not a multiple of 4")
        # NaN or inf would spread to every peer's memory and never wash out (a fold accumulates)
        if type(self.coherence) is float and not math.isfinite(self.coherence):
            raise ValueError(f"coherence must be finite, got {self.coherence!r}")
        if self.sedenion is not None and not _all_finite(self.sedenion):
            raise ValueError("sedenion values must be finite")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> StatePayload:
        """Validated payload from a flat mapping; fields other than the well-known ones go to
        `extra`. numpy values are converted: scalars to Python numbers, a "phases" array to
        float32 bytes, any other array to a list. Invalid content raises `MalformedMessage`."""
        if type(values) is dict and values.keys() <= _KNOWN_SET:  # the usual state: one C call
            try:
                return msgspec.convert(values, cls)
            except msgspec.ValidationError:
                pass  # perhaps numpy values: the general path below converts them first
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        try:
            for name, value in values.items():
                if name == "extra" and isinstance(value, Mapping):
                    extra.update((n, _plain(n, v)) for n, v in value.items())
                elif name in _KNOWN:
                    fields[name] = _plain(name, value)
                else:
                    extra[name] = _plain(name, value)
        except (TypeError, ValueError) as exc:  # e.g. a "phases" array of strings
            raise MalformedMessage(f"invalid payload: {exc}") from exc
        if extra:
            fields["extra"] = extra
        try:
            return msgspec.convert(fields, cls)
        except msgspec.ValidationError as exc:
            raise MalformedMessage(f"invalid payload: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The payload as one flat dict (well-known fields that are set, then extras)."""
        return dict(self.items())

    def items(self) -> Iterator[tuple[str, Any]]:
        for name in _KNOWN:
            value = getattr(self, name)
            if value is not None:
                yield name, value
        if self.extra:
            yield from self.extra.items()

    def __getitem__(self, name: str) -> Any:
        if name in _KNOWN:
            value = getattr(self, name)
            if value is not None:
                return value
        elif self.extra and name in self.extra:
            return self.extra[name]
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        if name in _KNOWN:
            return getattr(self, str(name)) is not None
        return bool(self.extra) and name in self.extra  # type: ignore[operator]


class StateUpdate(msgspec.Struct, frozen=True, array_like=True, tag=WIRE_VERSION, gc=False,
                  forbid_unknown_fields=True):
    """One keyed value on the bus (see the module docstring for the wire format); not tracked by
    the cyclic garbage collector (see `StatePayload`)."""

    key: Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LEN)]
    agent: Annotated[str, Meta(max_length=MAX_KEY_LEN)]
    payload: StatePayload | None
    seq: _Count = 0
    epoch: _Count = 0
    timestamp: float = 0.0

    def __post_init__(self) -> None:
        # Runs on every decode (msgspec turns the ValueError into a ValidationError); the
        # validity of a key is a pure function of the string, so it is memoised.
        if self.key not in _valid_keys:
            _check_key(self.key)
        if not -math.inf < self.timestamp < math.inf:
            raise ValueError(f"timestamp must be finite, got {self.timestamp!r}")

    @property
    def is_control(self) -> bool:
        return self.key.startswith("$")

    @property
    def is_delete(self) -> bool:
        return self.payload is None and not self.is_control


class _Batch(msgspec.Struct, frozen=True, array_like=True, tag=WIRE_VERSION):
    epoch: Annotated[int, Meta(ge=1, le=_MAX_INT)]
    last_seq: _Count
    bodies: list[StateUpdate]


class _RawBatch(msgspec.Struct, frozen=True, array_like=True, tag=WIRE_VERSION):
    """The same batch with the bodies left undecoded: to find which body was malformed."""

    epoch: Annotated[int, Meta(ge=1, le=_MAX_INT)]
    last_seq: _Count
    bodies: list[msgspec.Raw]


class _Parcel(msgspec.Struct, frozen=True, array_like=True, tag=WIRE_VERSION):
    """A node's bodies sent together, left undecoded (the hub validates each on its own)."""

    bodies: list[msgspec.Raw]


# ValidationError is a DecodeError; a str that is not UTF-8 raises UnicodeDecodeError (msgspec < 0.23)
# or a DecodeError (0.23 on); arrays nested about a thousand deep (a 1 KB frame) exhaust msgspec's
# recursion limit even where the schema leaves them undecoded (msgspec.Raw) and raise RecursionError
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_ENCODER = msgspec.msgpack.Encoder()
_BODY = msgspec.msgpack.Decoder(StateUpdate)
_BATCH = msgspec.msgpack.Decoder(_Batch)
_RAW_BATCH = msgspec.msgpack.Decoder(_RawBatch)
_BATCH_PREFIX = b"\x94" + _ENCODER.encode(WIRE_VERSION)  # fixarray of 4, then the version
_FIXARRAY = [bytes([0x90 | n]) for n in range(16)]
_PARCEL = msgspec.msgpack.Decoder(_Parcel)
_PARCEL_PREFIX = b"\x92" + _ENCODER.encode(WIRE_VERSION)  # fixarray of 2, then the version

_valid_keys: set[str] = set()  # keys that passed `_check_key` (bounded memo)
_VALID_KEYS_MAX = 1 << 16


def _check_key(key: str) -> None:
    if key.startswith("$"):
        if key not in CONTROL_KEYS:
            raise ValueError(f"unknown control key {key!r:.80}")
    elif key_owner(key) is None:
        raise ValueError(f"state key must look like agent/<id>/<name>, got {key!r:.80}")
    if len(_valid_keys) >= _VALID_KEYS_MAX:
        _valid_keys.clear()  # a flood of distinct keys: start over rather than grow
    _valid_keys.add(key)


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


def encode(update: StateUpdate) -> bytes:
    """The body of an update already known to be valid (decoded, or built by `make_update`)."""
    return _ENCODER.encode(update)


def pack(update: StateUpdate) -> bytes:
    """The msgpack body of `update`, validated: what `unpack` would refuse raises
    `MalformedMessage` here, early (a struct built by hand is not type-checked)."""
    try:
        body = _ENCODER.encode(update)
    except (TypeError, OverflowError, ValueError) as exc:  # e.g. an int beyond 64 bits
        raise MalformedMessage(f"cannot pack {update.key!r:.80}: {exc}") from exc
    _decode_body(body)
    return body


def _check_size(frame: bytes, limit: int) -> None:
    if len(frame) > limit:
        raise MalformedMessage(f"frame of {len(frame)} bytes exceeds {limit}")


def unpack(frame: bytes, limits: MessageLimits = MessageLimits()) -> StateUpdate:
    """Decode and validate one body frame; raise `MalformedMessage` on anything unexpected."""
    _check_size(frame, limits.max_frame_bytes)
    return _decode_body(frame)


def _decode_body(body: bytes | msgspec.Raw) -> StateUpdate:
    try:
        return _BODY.decode(body)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(f"not a valid body: {exc}") from exc


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n < 16:
        return _FIXARRAY[n]
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_batch(epoch: int, last_seq: int, bodies: Sequence[bytes]) -> bytes:
    """One hub batch frame (module docstring) from already validated body frames.

    The bodies are concatenated as they are: each is one complete msgpack object, so the
    result is a single msgpack array. Raises `ValueError` on an impossible stamp.
    """
    n = len(bodies)
    if not 0 <= n <= last_seq <= _MAX_INT or not 0 <= epoch <= _MAX_INT:
        raise ValueError(f"bad batch stamp: epoch {epoch}, last_seq {last_seq}, {n} bodies")
    return b"".join((_BATCH_PREFIX, _ENCODER.encode(epoch), _ENCODER.encode(last_seq), _array_header(n),
                     *bodies))


def pack_parcel(bodies: Sequence[bytes]) -> bytes:
    """One parcel frame (module docstring) from at least two body frames, concatenated as they
    are (each is one complete msgpack object)."""
    if len(bodies) < 2:
        raise ValueError(f"a parcel holds at least 2 bodies, got {len(bodies)}")
    return b"".join((_PARCEL_PREFIX, _array_header(len(bodies)), *bodies))


def is_parcel(frame: bytes) -> bool:
    """Whether `frame` is shaped as a parcel (a 2-array); it may still be malformed."""
    return frame[:1] == _PARCEL_PREFIX[:1]


def unpack_parcel(frame: bytes, limits: MessageLimits = MessageLimits()) -> list[bytes]:
    """The bodies of a parcel, undecoded; a frame that is not a well-formed parcel of 2 to
    `max_array_len` bodies raises `MalformedMessage`."""
    _check_size(frame, limits.max_frame_bytes)
    try:
        bodies = _PARCEL.decode(frame).bodies
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(f"not a valid parcel: {exc}") from exc
    if not 2 <= len(bodies) <= limits.max_array_len:
        raise MalformedMessage(f"parcel of {len(bodies)} bodies (2 to {limits.max_array_len} allowed)")
    return [bytes(b) for b in bodies]


def unpack_batch(
    frame: bytes, limits: MessageLimits = MessageLimits()
) -> tuple[int, int, list[StateUpdate | MalformedMessage]]:
    """Decode one hub batch: (epoch, last_seq, one entry per body).

    A frame that is not a well-formed batch raises `MalformedMessage`. A body that is invalid
    on its own (or carries a control key) is returned as its `MalformedMessage`, in place, so the
    caller can count it and still see its neighbours; valid bodies come back stamped with their
    positional seq and the batch's epoch.
    """
    _check_size(frame, limits.max_frame_bytes + BATCH_OVERHEAD)
    try:
        batch: _Batch | _RawBatch = _BATCH.decode(frame)
    except _DECODE_ERRORS:
        # some body is invalid (which error says so depends on msgspec's version: a non-UTF-8
        # string is a DecodeError from 0.23 on), or the frame itself is: the raw pass tells which
        batch = _unpack_raw_batch(frame)
    epoch, last_seq, bodies = batch.epoch, batch.last_seq, batch.bodies
    if len(bodies) > last_seq:
        raise MalformedMessage(f"batch of {len(bodies)} bodies ends at seq {last_seq}")
    if len(bodies) > limits.max_array_len:
        raise MalformedMessage(f"batch of {len(bodies)} bodies exceeds max_array_len")
    seq = last_seq - len(bodies)
    out: list[StateUpdate | MalformedMessage] = []
    for body in bodies:
        seq += 1
        if type(body) is not StateUpdate:
            body = _body_or_error(body)
        if type(body) is StateUpdate:
            if body.key[0] == "$":
                body = MalformedMessage(f"control key {body.key!r} does not belong in a batch")
            else:
                force_setattr(body, "seq", seq)  # freshly decoded, not yet shared: stamp it
                force_setattr(body, "epoch", epoch)
        out.append(body)
    return epoch, last_seq, out


def _unpack_raw_batch(frame: bytes) -> _RawBatch:
    try:
        return _RAW_BATCH.decode(frame)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(f"not a valid batch: {exc}") from exc


def _body_or_error(raw: msgspec.Raw) -> StateUpdate | MalformedMessage:
    try:
        return _decode_body(raw)
    except MalformedMessage as exc:
        return exc


def make_update(agent: str, key: str, payload: Mapping[str, Any] | StatePayload | None,
                seq: int = 0, epoch: int = 0, timestamp: float | None = None) -> StateUpdate:
    """A validated update (by default node-side: seq and epoch 0, timestamp now).

    `payload` is a `StatePayload` or a flat mapping (`StatePayload.from_mapping`: numpy values
    are converted). Anything a receiver would refuse raises `MalformedMessage` here.
    """
    if payload is not None and type(payload) is not StatePayload:
        payload = StatePayload.from_mapping(payload)
    try:
        update = StateUpdate(key, agent, payload, seq, epoch,
                             time.time() if timestamp is None else timestamp)
    except (TypeError, ValueError, AttributeError) as exc:  # __post_init__ on a wrong key
        raise MalformedMessage(f"invalid update {key!r:.80}: {exc}") from exc
    pack(update)  # the constructor does not type-check: check it the way a receiver would
    return update


def encode_update(agent: str, key: str,
                  payload: Mapping[str, Any] | StatePayload | None) -> bytes:
    """The body of a node-side update (seq and epoch 0, timestamp now), validated.

    The publish fast path: `agent` and `key` must already be valid (the node checks them once
    per key); the payload is converted and checked here (`MalformedMessage` if invalid).
    """
    hand_built = type(payload) is StatePayload
    if payload is not None and not hand_built:
        payload = StatePayload.from_mapping(payload)
    update = StateUpdate(key, agent, payload, 0, 0, time.time())
    try:
        body = _ENCODER.encode(update)
    except (TypeError, OverflowError, ValueError) as exc:
        raise MalformedMessage(f"cannot pack {key!r:.80}: {exc}") from exc
    if hand_built:  # its constructor did not check the types: check it as a receiver would
        _decode_body(body)
    return body


def _plain(name: str, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return encode_phases(value) if name == "phases" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is list:
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value
