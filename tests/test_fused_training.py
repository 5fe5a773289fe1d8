"""The compiled phase machinery of uncached sequences (core_model/phase_fields.py), forward and
backward, against the eager reference (kuramoto.py, gating.py, attention.py)."""

from __future__ import annotations

import pytest
import torch

import core_model.block
from core_model.fused import phase_kernel, status
from core_model.model import ResoLLMModel
from core_model.phase_fields import phase_fields
from model_helpers import phase_model


@pytest.fixture(scope="module")
def kernel():
    k = phase_kernel()
    if k is None:
        pytest.skip(f"no fused kernel on this machine: {status()}")
    return k


def model(**kw) -> ResoLLMModel:
    return phase_model(max_seq_len=64, **kw)


def loss_and_grads(m: ResoLLMModel, ids: torch.Tensor):
    """Loss (with the coherence in the objective, so the order parameter's gradient is
    exercised too), output phases and every parameter's gradient."""
    m.zero_grad(set_to_none=True)
    out = m(ids[:, :-1], ids[:, 1:])
    loss = out.loss + (0.3 * out.coherence.mean() if out.coherence is not None else 0.0)
    loss.backward()
    return loss.detach(), out.phases.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


SWITCHES = ("prime_embedding", "kuramoto", "resonant_attention", "coherence_gating")


@pytest.mark.parametrize("switches", [{}, *({s: False} for s in SWITCHES),
                                      {"kuramoto": False, "coherence_gating": False},
                                      {"resonant_attention": False, "coherence_gating": False}, {"rope": False}])
def test_values_and_gradients_match_eager(kernel, monkeypatch, switches):
    m = model(**switches)
    ids = torch.randint(0, 263, (3, 25), generator=torch.Generator().manual_seed(1))
    calls = []
    real = core_model.block.ResoFormerBlock._sequence_step
    monkeypatch.setattr(core_model.block.ResoFormerBlock, "_sequence_step",
                        lambda self, *a: calls.append(1) or real(self, *a))
    loss, phases, grads = loss_and_grads(m, ids)
    phase_blocks = sum(b.needs_field or b.attn.resonant for b in m.blocks)  # the others have nothing to fuse
    assert phase_blocks and len(calls) == phase_blocks  # the compiled path ran
    with monkeypatch.context() as mp:
        mp.setattr(core_model.block, "phase_kernel", lambda: None)
        ref_loss, ref_phases, ref_grads = loss_and_grads(m, ids)
    assert len(calls) == phase_blocks
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phases, ref_phases, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    # the phase parameters get gradients on both paths
    assert any(k.endswith("phase_table") for k in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6 * ref_grads[name].abs().max().item(),
                                   msg=lambda s, n=name: f"{n}: {s}")


def test_training_steps_follow_the_eager_trajectory(kernel, monkeypatch):
    """A few AdamW steps on both paths end at the same weights (to float32 round-off)."""
    def train() -> dict[str, torch.Tensor]:
        m = model()
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        ids = torch.randint(0, 263, (4, 33), generator=torch.Generator().manual_seed(2))
        for _ in range(5):
            opt.zero_grad()
            m(ids[:, :-1], ids[:, 1:]).loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    fused = train()
    with monkeypatch.context() as mp:
        mp.setattr(core_model.block, "phase_kernel", lambda: None)
        reference = train()
    for name, w in fused.items():
        torch.testing.assert_close(w, reference[name], rtol=1e-4, atol=1e-5, msg=lambda s, n=name: f"{n}: {s}")


def test_kernel_refuses_what_it_cannot_read(kernel):
    B, T, F, H = 2, 5, 4, 3
    theta, K, a, res = torch.zeros(B, T, F), torch.tensor(1.0), torch.tensor(1.0), torch.ones(H)

    def call(th=theta, omega=torch.zeros(B, T, F), logit=torch.zeros(B, T, 1), resonance=res, k=K):
        return phase_fields(th, omega, logit, k, a, resonance, 0.6, 0.5, 1.0, H, True)

    call()  # well-formed
    with pytest.raises(RuntimeError, match="omega must be"):
        call(omega=torch.zeros(B, T, F + 1))
    with pytest.raises(RuntimeError, match="gate logit must be"):
        call(logit=torch.zeros(B, T + 1, 1))
    with pytest.raises(RuntimeError, match="resonance weights"):
        call(resonance=torch.ones(H + 1))
    with pytest.raises(RuntimeError, match="needs K"):
        call(k=None)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        call(th=theta.double())
    with pytest.raises(RuntimeError, match="non-empty"):
        call(th=torch.zeros(B, 0, F))


def test_second_derivatives_are_refused_not_silently_zero(kernel):
    m = model()
    ids = torch.randint(0, 263, (2, 9), generator=torch.Generator().manual_seed(3))
    loss = m(ids[:, :-1], ids[:, 1:]).loss
    (g,) = torch.autograd.grad(loss, [m.blocks[0].kuramoto.coupling], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        g.backward()


def test_bf16_autocast_trains_and_decodes_on_the_eager_path():
    """Under autocast the projections are bf16: the compiled float32 paths step aside, and the
    embedding blend mixes its float32 lookup with the bf16 projection (as on CUDA with bf16)."""
    m = model()
    ids = torch.randint(0, 263, (2, 13), generator=torch.Generator().manual_seed(4))
    reference = m(ids[:, :-1], ids[:, 1:]).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        tokens = m.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.0)
    assert abs(out.loss.item() - reference) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad
               and p.grad is not None) and m.embed.phase_table.grad is not None
    assert len(tokens[0]) == 4
