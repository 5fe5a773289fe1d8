"""CURVE + ZAP on the bus: who gets in and who is refused (after pyzmq's test_auth matrix)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from entanglement import (
    BusConfig,
    BusEndpoints,
    BusHub,
    BusKeys,
    HubError,
    BusNode,
    CurveKeyPair,
    NodeCredentials,
    NodeState,
    SecurityError,
)

pytestmark = pytest.mark.timeout(30)

FAST = dict(heartbeat_interval=0.05, hub_timeout=0.4, ttl=1.0, snapshot_timeout=0.3)
REFUSAL_WINDOW = 0.6  # seconds an intruder gets to try


@pytest.fixture(params=["tcp", "ipc"])
def hub(request: pytest.FixtureRequest, ipc_dir: str) -> Iterator[BusHub]:
    eps = BusEndpoints.tcp() if request.param == "tcp" else BusEndpoints.ipc(ipc_dir)
    hub = BusHub(BusConfig(endpoints=eps, **FAST)).start()
    yield hub
    hub.stop()


def assert_refused(hub: BusHub, node: BusNode) -> None:
    """The node never gets a snapshot, and what it publishes never reaches the hub."""
    try:
        node.publish("intrusion", {"value": 1})
        why = f"node {node.counters}, hub {hub.counters}"
        assert not node.wait_active(REFUSAL_WINDOW), why
        assert node.node_state is not NodeState.ACTIVE, why
        assert node.counters.received == 0, why
        assert hub.seq == 0 and hub.keys_snapshot() == {}, why
        assert node.agent_id not in hub.agents(), why
    finally:
        node.close()


def test_security_is_on_by_default() -> None:
    assert BusConfig().security == "curve"


def test_allowed_client_gets_in(hub: BusHub) -> None:
    node = BusNode("a", hub.config, hub.credentials())
    try:
        assert node.wait_active(5)
        node.publish("x", {"value": 1})
        assert node.wait_for(lambda n: "x" in n.latest("a"), 5)
        assert hub.counters.auth_denied == 0
    finally:
        node.close()


def test_client_without_curve_is_refused(hub: BusHub) -> None:
    plain = BusConfig(endpoints=hub.config.endpoints, security="none", **FAST)
    assert_refused(hub, BusNode("intruder", plain))


def test_client_with_unknown_key_is_refused_by_zap(hub: BusHub) -> None:
    assert hub.keys is not None
    stranger = NodeCredentials(hub.keys.server.public, CurveKeyPair.generate())
    assert_refused(hub, BusNode("intruder", hub.config, stranger))
    assert hub.counters.auth_denied >= 1


def test_client_with_wrong_server_key_gets_nothing(hub: BusHub) -> None:
    creds = hub.credentials()
    assert creds is not None
    wrong_server = NodeCredentials(CurveKeyPair.generate().public, creds.client)
    assert_refused(hub, BusNode("confused", hub.config, wrong_server))


def test_keys_of_another_run_are_refused(hub: BusHub) -> None:
    other_run = BusKeys.generate()
    assert_refused(hub, BusNode("intruder", hub.config, other_run.credentials()))


def test_raw_subscriber_without_curve_hears_nothing(hub: BusHub) -> None:
    legit = BusNode("a", hub.config, hub.credentials())
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.subscribe(b"")
    sub.connect(hub.config.endpoints.publish)
    try:
        assert legit.wait_active(5)
        deadline = time.monotonic() + REFUSAL_WINDOW
        while time.monotonic() < deadline:
            legit.publish("x", {"value": 1})
            assert sub.poll(20) == 0  # heartbeats and updates flow, but not to it
    finally:
        sub.close()
        ctx.term()
        legit.close()


def test_client_added_at_runtime_is_admitted(hub: BusHub) -> None:
    creds = hub.add_client("late-agent")
    node = BusNode("late", hub.config, creds)
    try:
        assert node.wait_active(5)
    finally:
        node.close()


def test_curve_without_credentials_is_a_typed_error() -> None:
    config = BusConfig(endpoints=BusEndpoints.tcp(host="127.0.0.1", ports=(1, 2, 3)))
    with pytest.raises(SecurityError, match="security='none'"):
        BusNode("a", config)


def test_security_none_is_an_explicit_opt_out() -> None:
    hub = BusHub(BusConfig(security="none", **FAST)).start()
    try:
        assert hub.keys is None and hub.credentials() is None
        node = BusNode("a", hub.config)
        assert node.wait_active(5)
        node.close()
    finally:
        hub.stop()


def test_keys_round_trip_through_plain_dicts() -> None:
    keys = BusKeys.generate(["a", "b"])
    again = BusKeys.from_dict(msgpack.unpackb(msgpack.packb(keys.to_dict())))
    assert again == keys
    creds = keys.credentials("b")
    assert NodeCredentials.from_dict(creds.to_dict()) == creds
    assert len(keys.allowed_public_keys()) == 2
    with pytest.raises(SecurityError):
        keys.credentials("nobody")
    with pytest.raises(SecurityError):
        BusKeys.from_dict({"server": {}})
    config = BusConfig(security="none")
    assert BusConfig.from_dict(config.to_dict()) == config


def test_two_hubs_cannot_share_one_context() -> None:
    ctx = zmq.Context()
    first = BusHub(BusConfig(**FAST), context=ctx).start()
    try:
        with pytest.raises(HubError, match="ZAP"):
            BusHub(BusConfig(**FAST), context=ctx).start()
    finally:
        first.stop()
        ctx.term()


def test_a_per_agent_credential_speaks_only_for_its_agent(hub: BusHub) -> None:
    """Credentials made for agent "a" publish as "a"; a node using them under another agent id
    is refused by the hub (its updates and heartbeats counted as rejected, never stored), while
    the shared run credential may still speak for any agent."""
    honest = BusNode("a", hub.config, hub.add_client("a"))
    impostor = BusNode("b", hub.config, hub.add_client("a"))  # a's keys, b's id
    shared = BusNode("c", hub.config, hub.credentials())
    try:
        assert honest.wait_active(5) and shared.wait_active(5)
        honest.publish("x", {"value": 1})
        impostor.publish("x", {"value": 2})
        shared.publish("x", {"value": 3})
        assert shared.wait_for(lambda n: {"a", "c"} <= n.peers(include_self=True), 5)
        assert wait_rejected(hub)
        assert "b" not in hub.agents() and "agent/b/x" not in hub.keys_snapshot()
        assert set(hub.keys_snapshot()) == {"agent/a/x", "agent/c/x"}
    finally:
        for node in (honest, impostor, shared):
            node.close()


def wait_rejected(hub: BusHub, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while hub.counters.rejected == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("inproc", ["collect", "snapshot"])
def test_mixed_endpoints_keep_the_hub_alive_and_the_binding_on(inproc: str) -> None:
    """One endpoint in-process, the others on tcp: the hub reads credentials only where there
    was a handshake (not over an inproc collector), and survives heartbeats either way."""
    tcp = BusEndpoints.tcp()
    eps = BusEndpoints(tcp.snapshot if inproc == "collect" else "inproc://mixed-snapshot", tcp.publish,
                       "inproc://mixed-collect" if inproc == "collect" else tcp.collect)
    hub = BusHub(BusConfig(endpoints=eps, **FAST)).start()
    honest = BusNode("a", hub.config, hub.add_client("a"), context=hub.context)
    impostor = BusNode("b", hub.config, hub.add_client("a"), context=hub.context)
    try:
        assert honest.wait_active(5)
        honest.publish("x", {"value": 1})
        impostor.publish("x", {"value": 2})
        assert honest.wait_for(lambda n: "x" in n.latest("a"), 5)
        time.sleep(3 * FAST["heartbeat_interval"])  # heartbeats of both have reached the hub
        assert hub.alive and hub.error is None
        if inproc == "snapshot":  # the collector is tcp: its credential binding holds
            assert wait_rejected(hub) and "agent/b/x" not in hub.keys_snapshot()
    finally:
        honest.close()
        impostor.close()
        hub.stop()
