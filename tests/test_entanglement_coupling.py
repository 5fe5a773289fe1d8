"""Coupling rules, and three sets of oscillators synchronising through a real bus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from entanglement import (
    BusConfig,
    BusEndpoints,
    BusHub,
    BusNode,
    CouplingError,
    decode_phases,
    external_field,
    fold_sedenion,
    inter_agent_order,
    order_parameter,
    staleness_weight,
)

from entanglement.coupling import peer_mean_field  # the model-side form

pytestmark = pytest.mark.timeout(60)


def test_field_pulls_towards_peers_and_vanishes_without_coupling() -> None:
    own = np.zeros(4)
    peers = {"b": (np.full(4, 0.5), 0.0), "c": (np.full(4, 0.5), 0.0)}
    field = external_field(own, peers, coupling=2.0)
    np.testing.assert_allclose(field, 2.0 * np.sin(0.5))
    assert np.all(external_field(own, peers, coupling=0.0) == 0)
    assert np.all(external_field(own, {}, coupling=2.0) == 0)
    # A peer ahead pulls forward, a peer behind pulls back; symmetric peers cancel.
    sym = {"b": (np.full(4, 0.3), 0.0), "c": (np.full(4, -0.3), 0.0)}
    np.testing.assert_allclose(external_field(own, sym, coupling=1.0), 0.0, atol=1e-12)


def test_stale_peers_pull_less() -> None:
    own = np.zeros(3)
    fresh = external_field(own, {"b": (np.ones(3), 0.0)}, 1.0, staleness_tau=1.0)
    stale = external_field(own, {"b": (np.ones(3), 2.0)}, 1.0, staleness_tau=1.0)
    np.testing.assert_allclose(stale, fresh * math.exp(-2.0))
    assert staleness_weight(5.0, math.inf) == 1.0
    assert staleness_weight(-1.0, 1.0) == 1.0  # clock skew never amplifies
    with pytest.raises(CouplingError):
        staleness_weight(1.0, 0.0)


def test_shape_errors_are_typed() -> None:
    with pytest.raises(CouplingError, match="peer 'b'"):
        external_field(np.zeros(4), {"b": (np.zeros(5), 0.0)}, 1.0)
    with pytest.raises(CouplingError):
        external_field(np.zeros((2, 2)), {}, 1.0)
    with pytest.raises(CouplingError):
        fold_sedenion(np.zeros(15), {}, 0.1)
    with pytest.raises(CouplingError):
        fold_sedenion(np.zeros(16), {"b": (np.zeros(3), 0.0)}, 0.1)
    with pytest.raises(CouplingError):
        fold_sedenion(np.zeros(16), {}, 1.5)


def test_sedenion_fold_is_a_convex_step() -> None:
    own = np.zeros(16)
    peers = {"b": (np.ones(16), 0.0), "c": (3 * np.ones(16), 0.0)}
    np.testing.assert_allclose(fold_sedenion(own, peers, 0.1), 0.2)
    np.testing.assert_allclose(fold_sedenion(own, peers, 1.0), 2.0)  # the peers' mean
    np.testing.assert_array_equal(fold_sedenion(own + 5, peers, 0.0), own + 5)
    half = fold_sedenion(own, {"b": (np.ones(16), math.log(2))}, 1.0, staleness_tau=1.0)
    np.testing.assert_allclose(half, 0.5)


def test_a_peer_with_non_finite_values_is_left_out() -> None:
    """One NaN would spread to every agent and, through the accumulating fold, stay for good."""
    own = np.zeros(16)
    good = {"b": (np.ones(16), 0.0)}
    bad = {**good, "c": (np.full(16, np.nan), 0.0), "d": (np.r_[np.inf, np.zeros(15)], 0.0)}
    np.testing.assert_array_equal(fold_sedenion(own, bad, 0.5), fold_sedenion(own, good, 0.5))
    np.testing.assert_array_equal(fold_sedenion(own, {"c": bad["c"]}, 0.5), own)
    theta = np.linspace(0, 1, 16)
    np.testing.assert_array_equal(external_field(theta, bad, 0.7), external_field(theta, good, 0.7))
    np.testing.assert_array_equal(peer_mean_field(bad, 0.7, 16), peer_mean_field(good, 0.7, 16))
    assert np.all(np.isfinite(peer_mean_field({"c": bad["c"]}, 0.7, 16)))


def test_order_parameters() -> None:
    assert order_parameter(np.full(8, 1.3)) == pytest.approx(1.0)
    assert order_parameter(np.array([0.0, math.pi])) == pytest.approx(0.0, abs=1e-12)
    same = np.tile(np.linspace(0, 3, 16), (3, 1))
    assert inter_agent_order(same) == pytest.approx(1.0)
    assert inter_agent_order(np.array([[0.0], [2 * math.pi / 3], [4 * math.pi / 3]])) < 1e-9


def run_coupled_agents(coupling: float, seed: int, ipc_dir: str, steps: int = 400, n: int = 16,
                       dt: float = 0.05) -> tuple[float, int]:
    """Three agents, each N oscillators with spread natural frequencies, stepping in lockstep.

    At step t every agent publishes its phases (float32 over the bus), waits until it has every
    peer's step-t phases from its own bus replica, and integrates
    ``theta += dt * (omega + external_field(theta, peers, coupling))``. Returns the inter-agent
    order parameter averaged over the second half of the run, and the number of bus updates.
    """
    rng = np.random.default_rng(seed)
    names = ["a0", "a1", "a2"]
    omega = 1.0 + 0.5 * rng.standard_normal((3, n))
    theta = rng.uniform(0, 2 * math.pi, (3, n))
    hub = BusHub(BusConfig(endpoints=BusEndpoints.ipc(ipc_dir), heartbeat_interval=0.1, hub_timeout=2.0,
                           ttl=5.0)).start()
    nodes = [BusNode(a, hub.config, hub.credentials()) for a in names]
    order = []
    try:
        assert all(node.wait_active(5) for node in nodes)
        for t in range(steps):
            for a, node in enumerate(nodes):
                node.publish("phase", {"phases": theta[a], "step": t})

            def has_step(node: BusNode, t: int = t) -> bool:
                return all(
                    (u := node.latest(p).get("phase")) is not None and u.payload["step"] == t
                    for p in names if p != node.agent_id
                )

            assert all(node.wait_for(has_step, 5) for node in nodes), f"bus stalled at step {t}"
            new = theta.copy()
            for a, node in enumerate(nodes):
                peers = {}
                for p in names:
                    if p != node.agent_id:
                        u = node.latest(p)["phase"]
                        peers[p] = (decode_phases(u.payload["phases"]), 0.0)
                # Own phases also go through float32, like everything on the bus.
                own = theta[a].astype(np.float32).astype(np.float64)
                new[a] = own + dt * (omega[a] + external_field(own, peers, coupling, 5.0))
            theta = new
            if t >= steps // 2:
                order.append(inter_agent_order(theta))
        updates = hub.seq
    finally:
        for node in nodes:
            node.close()
        hub.stop()
    return float(np.mean(order)), updates


def test_oscillators_coupled_through_the_bus_synchronise(tmp_path_factory: pytest.TempPathFactory) -> None:
    coupled, updates = run_coupled_agents(coupling=2.0, seed=7, ipc_dir=str(tmp_path_factory.mktemp("ipc")))
    independent, _ = run_coupled_agents(coupling=0.0, seed=7, ipc_dir=str(tmp_path_factory.mktemp("ipc")))
    assert updates == 3 * 400
    assert coupled > 0.9
    # Three independent uniform phases give about 0.52 on average.
    assert independent < 0.7
