"""How peers' shared state acts on an agent: pure numpy functions, no sockets, no torch.

Kuramoto field from peers
-------------------------
Agent a has N phases theta_a[k] (one per phase frequency k; agents of one run share N). Peer p,
whose last phases arrived `age_p` seconds ago, contributes with a staleness weight
``w_p = exp(-age_p / tau)``::

    F_a[k] = (K / P) * sum_p  w_p * sin(theta_p[k] - theta_a[k])

P is the number of peers, K the run's `coupling`. The model adds F_a to its phase velocity
(``theta += dt * (omega + internal + F)``), so with K > 0 oscillator k of every agent is pulled
towards oscillator k of the others; K = 0 gives F = 0 exactly (independent agents). Stale peers
pull less: a peer silent for a few tau contributes almost nothing.

The model takes the same field in mean-field form, so that it can act on every position of a
sequence (each with its own phase) without knowing the peers: ``peer_mean_field`` returns

    Z_a[k] = (K / P) * sum_p  w_p * exp(1j * theta_p[k])        as (N, 2) = (Re, Im)

and ``|Z| sin(arg Z - theta) = (K / P) sum_p w_p sin(theta_p - theta)`` is F_a evaluated at any
phase ``theta``.

Sedenion fold
-------------
Agent a's 16-dimensional memory state s_a takes a small, staleness-weighted step towards its
peers::

    s_a' = s_a + (lambda / P) * sum_p  w_p * (s_p - s_a)

With 0 <= lambda <= 1 this is a convex combination of s_a and the peers' states, so it never
overshoots; lambda = 0 leaves the memory untouched.

A peer whose phases or state hold NaN or inf is left out (P counts the peers used): one such
value would otherwise spread to every agent, and the fold, which accumulates, would never shed
it. The bus already refuses non-finite sedenion and coherence values; phases travel as raw
float32 bytes, which it does not inspect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

SEDENION_DIM = 16

PeerPhases = Mapping[str, tuple[np.ndarray, float]]  # agent -> (phases (N,), age in seconds)


class CouplingError(ValueError):
    """Shapes or parameters that the coupling rules cannot use."""


def _finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())


def staleness_weight(age_s: float, staleness_tau: float) -> float:
    """``exp(-age / tau)``; tau = inf means no decay. Negative ages (clock skew) count as 0."""
    if staleness_tau <= 0:
        raise CouplingError(f"staleness_tau must be > 0, got {staleness_tau}")
    if math.isinf(staleness_tau):
        return 1.0
    return math.exp(-max(0.0, age_s) / staleness_tau)


def external_field(
    own_phases: np.ndarray,
    peer_phases: PeerPhases,
    coupling: float,
    staleness_tau: float = math.inf,
) -> np.ndarray:
    """The Kuramoto field F_a (shape (N,), float64) an agent feels from its peers."""
    own = np.asarray(own_phases, dtype=np.float64)
    if own.ndim != 1:
        raise CouplingError(f"own phases must be 1-d, got shape {own.shape}")
    field = np.zeros_like(own)
    if coupling == 0 or not peer_phases:
        return field
    used = 0
    for agent, (phases, age) in peer_phases.items():
        theta = np.asarray(phases, dtype=np.float64)
        if theta.shape != own.shape:
            raise CouplingError(f"peer {agent!r} has phases of shape {theta.shape}, own {own.shape}")
        if _finite(theta):
            field += staleness_weight(age, staleness_tau) * np.sin(theta - own)
            used += 1
    return (coupling / used) * field if used else field


def peer_mean_field(
    peer_phases: PeerPhases,
    coupling: float,
    num_phases: int,
    staleness_tau: float = math.inf,
) -> np.ndarray:
    """The peers' weighted mean field Z_a as (N, 2) float32 (Re, Im): the model's ``external_field``."""
    field = np.zeros((num_phases, 2), dtype=np.float64)
    if coupling == 0 or not peer_phases:
        return field.astype(np.float32)
    used = 0
    for agent, (phases, age) in peer_phases.items():
        theta = np.asarray(phases, dtype=np.float64)
        if theta.shape != (num_phases,):
            raise CouplingError(f"peer {agent!r} has phases of shape {theta.shape}, expected ({num_phases},)")
        if not _finite(theta):
            continue
        w = staleness_weight(age, staleness_tau)
        field[:, 0] += w * np.cos(theta)
        field[:, 1] += w * np.sin(theta)
        used += 1
    return ((coupling / max(used, 1)) * field).astype(np.float32)


def fold_sedenion(
    own: np.ndarray,
    peers: Mapping[str, tuple[np.ndarray, float]],
    weight: float,
    staleness_tau: float = math.inf,
) -> np.ndarray:
    """The agent's 16-d memory state after folding in its peers' states (see module doc)."""
    state = np.asarray(own, dtype=np.float64)
    if state.shape != (SEDENION_DIM,):
        raise CouplingError(f"sedenion state must have shape (16,), got {state.shape}")
    if not 0.0 <= weight <= 1.0:
        raise CouplingError(f"fold weight must be in [0, 1], got {weight}")
    if weight == 0 or not peers:
        return state.copy()
    step = np.zeros(SEDENION_DIM)
    used = 0
    for agent, (peer_state, age) in peers.items():
        s = np.asarray(peer_state, dtype=np.float64)
        if s.shape != (SEDENION_DIM,):
            raise CouplingError(f"peer {agent!r} sedenion has shape {s.shape}, expected (16,)")
        if _finite(s):
            step += staleness_weight(age, staleness_tau) * (s - state)
            used += 1
    return state + (weight / used) * step if used else state.copy()


def order_parameter(phases: np.ndarray) -> float:
    """Kuramoto order parameter ``|mean_k exp(i theta_k)|`` of one set of phases."""
    return float(np.abs(np.mean(np.exp(1j * np.asarray(phases, dtype=np.float64)))))


def inter_agent_order(phases_by_agent: np.ndarray) -> float:
    """Synchrony between agents: ``mean_k |mean_a exp(i theta_a[k])|`` for shape (A, N).

    1 when every agent's k-th oscillator has the same phase; about 0.52 on average for three
    agents with independent uniform phases.
    """
    theta = np.asarray(phases_by_agent, dtype=np.float64)
    if theta.ndim != 2:
        raise CouplingError(f"expected shape (agents, N), got {theta.shape}")
    return float(np.mean(np.abs(np.mean(np.exp(1j * theta), axis=0))))
