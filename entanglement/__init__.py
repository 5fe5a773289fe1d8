"""The entanglement bus: agents share oscillator phases and sedenion state over ZeroMQ.

A Clone-pattern (Clustered Hashmap Protocol) state bus: one `BusHub` per run sequences and
republishes every agent's updates; each agent runs a `BusNode` that keeps a replica of the
whole map. Messages are msgpack (`entanglement.message`), connections CURVE-encrypted and
ZAP-authenticated by default (`entanglement.security`), and `entanglement.coupling` turns
peers' state into the external Kuramoto field and the sedenion fold. This package knows
nothing of Ray or of the model; `agents/` wires them together.
"""

from entanglement.config import BusConfig, BusEndpoints, ConfigError, MessageLimits
from entanglement.coupling import (
    CouplingError,
    external_field,
    fold_sedenion,
    inter_agent_order,
    order_parameter,
    staleness_weight,
)
from entanglement.hub import BusHub, HubCounters, HubError
from entanglement.message import (
    MalformedMessage,
    StateUpdate,
    agent_key,
    decode_phases,
    encode_phases,
    key_owner,
    pack,
    unpack,
)
from entanglement.node import BusNode, NodeCounters, NodeError, NodeState
from entanglement.security import BusKeys, CurveKeyPair, NodeCredentials, SecurityError

__all__ = [
    "BusConfig", "BusEndpoints", "BusHub", "BusKeys", "BusNode", "ConfigError", "CouplingError",
    "CurveKeyPair", "HubCounters", "HubError", "MalformedMessage", "MessageLimits",
    "NodeCounters", "NodeCredentials", "NodeError", "NodeState", "SecurityError", "StateUpdate",
    "agent_key", "decode_phases", "encode_phases", "external_field", "fold_sedenion",
    "inter_agent_order", "key_owner", "order_parameter", "pack", "staleness_weight", "unpack",
]
