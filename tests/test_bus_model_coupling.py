"""The bus's coupling rule and the model's external-field input describe the same physics."""

from __future__ import annotations

import math

import numpy as np
import torch

from core_model.kuramoto import KuramotoCoupling, phasors
from entanglement.coupling import external_field, peer_mean_field


def test_model_external_field_equals_bus_field():
    rng = np.random.default_rng(0)
    own = rng.uniform(0, 2 * math.pi, 8)
    peers = {f"p{i}": (rng.uniform(0, 2 * math.pi, 8), float(age)) for i, age in enumerate([0.0, 0.5, 2.0])}
    expected = external_field(own, peers, coupling=1.7, staleness_tau=1.0)  # F_a, per oscillator
    Z = torch.from_numpy(peer_mean_field(peers, coupling=1.7, num_phases=8, staleness_tau=1.0))
    step = KuramotoCoupling(dt=1.0, coupling_init=0.0)  # no internal coupling, no natural frequency
    theta = torch.from_numpy(own).float().view(1, 1, 8)
    with torch.no_grad():
        moved = step(theta, torch.zeros_like(theta), torch.zeros(1, 1, 8, 2), external=Z)
    assert np.allclose((moved - theta).view(-1).numpy(), expected, atol=1e-5)
    assert not peer_mean_field(peers, coupling=0.0, num_phases=8).any()
    assert phasors(theta).shape == (1, 1, 8, 2)
