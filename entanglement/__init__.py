"""The entanglement bus: agents share oscillator phases and sedenion state over ZeroMQ.

A Clone-pattern (Clustered Hashmap Protocol) state bus: one `BusHub` per run sequences and
republishes every agent's updates; each agent runs a `BusNode` that keeps a replica of the
whole map. Messages are msgpack with a typed schema decoded by msgspec (`entanglement.message`), connections CURVE-encrypted and
ZAP-authenticated by default (`entanglement.security`), and `entanglement.coupling` turns
peers' state into the external Kuramoto field and the sedenion fold. This package knows
nothing of Ray or of the model; `agents/` wires them together.

Typical use (the hub in one place, one node per agent, anywhere)::

    hub = BusHub(BusConfig(endpoints=BusEndpoints.tcp())).start()   # CURVE keys made here
    config, creds = hub.config.to_dict(), hub.credentials().to_dict()  # hand these over (Ray)

    node = BusNode("a1", BusConfig.from_dict(config), NodeCredentials.from_dict(creds))
    node.publish("phase", {"phases": theta, "coherence": r, "step": t})  # theta: float32 array
    peers = {p: (decode_phases(u.payload["phases"]), time.time() - u.timestamp)
             for p in node.peers() if (u := node.latest(p).get("phase"))}
    field = external_field(theta, peers, coupling=K, staleness_tau=1.0)  # a plain array
    node.close(); hub.stop()
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
    StatePayload,
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
    "NodeCounters", "NodeCredentials", "NodeError", "NodeState", "SecurityError", "StatePayload", "StateUpdate",
    "agent_key", "decode_phases", "encode_phases", "external_field", "fold_sedenion",
    "inter_agent_order", "key_owner", "order_parameter", "pack", "staleness_weight", "unpack",
]
