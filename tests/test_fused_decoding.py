"""The compiled single-token decoding step (core_model/fused.py) against the eager reference."""

from __future__ import annotations

import pytest
import torch

import core_model.block
from core_model.fused import phase_kernel, status
from core_model.model import ResoLLMModel
from model_helpers import phase_model

SWITCHES = ("prime_embedding", "kuramoto", "resonant_attention", "coherence_gating")


@pytest.fixture(scope="module")
def kernel():
    k = phase_kernel()
    if k is None:
        pytest.skip(f"no fused kernel on this machine: {status()}")
    return k


def model(seed: int = 0, **kw) -> ResoLLMModel:
    return phase_model(seed, **kw).eval()


def decode(m: ResoLLMModel, prompt: torch.Tensor, steps: int, mask=None, external=None):
    """Logits, phases and coherence of `steps` single-token steps after a prefill."""
    cache = m.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    rows = []
    with torch.inference_mode():
        out = m(prompt, cache=cache, attention_mask=mask, external_field=external)
        for t in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = m(nxt, cache=cache, external_field=external)
            rows.append((out.logits[:, -1], out.phases[:, -1] if out.phases is not None else None,
                         out.coherence))
    return rows


def eager(monkeypatch):
    monkeypatch.setattr(core_model.block, "phase_kernel", lambda: None)


@pytest.mark.parametrize("switches", [{}, *({s: False} for s in SWITCHES),
                                      {"kuramoto": False, "coherence_gating": False}, {"vanilla": True},
                                      {"rope": False}])
def test_fused_step_matches_eager(kernel, monkeypatch, switches):
    m = model(**switches)
    prompt = torch.randint(0, 263, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding in row 0
    fused = decode(m, prompt, 12, mask)
    with monkeypatch.context() as mp:
        eager(mp)
        reference = decode(m, prompt, 12, mask)
    for (lf, pf, cf), (le, pe, ce) in zip(fused, reference):
        torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
        if pe is not None:
            torch.testing.assert_close(pf, pe, rtol=1e-5, atol=1e-5)
        if ce is not None:
            torch.testing.assert_close(cf, ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 2), (1, 4, 2), (2, 4, 2)])
def test_fused_step_with_an_external_field(kernel, monkeypatch, shape):
    m = model()
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(5))  # shared or per row
    prompt = torch.randint(0, 263, (2, 5), generator=torch.Generator().manual_seed(4))
    fused = decode(m, prompt, 8, external=field)
    with monkeypatch.context() as mp:
        eager(mp)
        reference = decode(m, prompt, 8, external=field)
    no_field = decode(m, prompt, 8)
    for (lf, pf, _), (le, pe, _), (ln, _, _) in zip(fused, reference, no_field):
        torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pf, pe, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused[-1][0], no_field[-1][0])  # the field did reach the phases


def test_each_compiled_path_is_taken_only_where_it_applies(kernel, monkeypatch):
    """Cached, unpadded, no gradients: the decoding kernel. Uncached, unpadded, no external field:
    the sequence kernel (core_model/phase_fields.py). Everything else: eager."""
    calls = {"decode": 0, "sequence": 0}
    for name, method in (("decode", "_decode_step"), ("sequence", "_sequence_step")):
        real = getattr(core_model.block.ResoFormerBlock, method)

        def counting(self, *args, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(core_model.block.ResoFormerBlock, method, counting)
    m = model()
    n = len(m.blocks)
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3]]))  # no cache: sequence kernel
        assert calls == {"decode": 0, "sequence": n}
        m(torch.tensor([[1, 2, 3]]), external_field=torch.zeros(4, 2))  # external field: eager
        m(torch.tensor([[0, 1, 2], [3, 4, 5]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))  # padding
        assert calls == {"decode": 0, "sequence": n}
        cache = m.new_cache(1, 16)
        m(torch.tensor([[1, 2, 3]]), cache=cache)  # a prefill with a cache: decoding kernel
        m(torch.tensor([[4]]), cache=cache)
        assert calls == {"decode": 2 * n, "sequence": n}
        cache = m.new_cache(2, 16)
        m(torch.tensor([[0, 1, 2], [3, 4, 5]]), cache=cache, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
        assert calls == {"decode": 2 * n, "sequence": n}  # padding: eager
    cache = m.new_cache(1, 16)
    m(torch.tensor([[1, 2, 3]]), cache=cache)
    m(torch.tensor([[4]]), cache=cache)  # gradients on, with a cache: eager
    assert calls == {"decode": 2 * n, "sequence": n} and status() == "fused"
    m(torch.tensor([[1, 2, 3]]))  # gradients on, no cache (training): sequence kernel
    assert calls == {"decode": 2 * n, "sequence": 2 * n}


def test_fused_multi_token_forwards_match_eager(kernel, monkeypatch):
    """Prefill of an unpadded prompt, then chunks of several tokens (the twin's catch-ups)."""
    m = model()
    ids = torch.randint(0, 263, (2, 20), generator=torch.Generator().manual_seed(6))
    field = torch.randn(4, 2, generator=torch.Generator().manual_seed(7))

    def run():
        cache = m.new_cache(2, 20)
        outs = []
        with torch.inference_mode():
            for a, b in ((0, 7), (7, 8), (8, 13), (13, 20)):
                out = m(ids[:, a:b], cache=cache, external_field=field)
                outs.append((out.logits, out.phases, out.coherence))
        return outs

    fused = run()
    with monkeypatch.context() as mp:
        eager(mp)
        reference = run()
    for f, r in zip(fused, reference):
        for a, b in zip(f, r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_shapes_it_cannot_read(kernel):
    m = model()
    block, B, F = m.blocks[0], 2, 4
    cache = m.new_cache(B, 8).layers[0]
    proj = torch.zeros(B, 1, block.in_proj.out_features)
    theta, past, count = torch.zeros(B, 1, F), torch.zeros(B, 1, F, 2), torch.ones(B, 1, 1, 1)
    attn = block.attn
    cos = sin = torch.ones(B, 1, 1, attn.sem_dim // 2)
    args = dict(omega=block.in_widths[0], gate=block.in_widths[0] + block.in_widths[1])

    def call(pos=0, ext=None, th=theta):
        return kernel.block_step(proj, attn.num_heads, attn.sem_dim, attn.head_dim, cos, sin, cache.k, cache.v,
                                 pos, th, args["omega"], args["gate"], past, count, ext, attn.resonance,
                                 1.0, block.kuramoto.coupling, 0.1, block.gate.order_weight, 0.6)

    call()  # well-formed
    with pytest.raises(RuntimeError, match="cache shape or position"):
        call(pos=8)
    with pytest.raises(RuntimeError, match="external field"):
        call(ext=torch.zeros(1, F, 2))
    with pytest.raises(RuntimeError, match="block_step: head layout"):  # F read from theta
        call(th=torch.zeros(B, 1, F + 1))


def test_attention_foci_are_the_same_on_both_paths(kernel, monkeypatch):
    """The foci read the last query of the main trajectory, which the fused step records too."""
    from core_model.inference import ResoLLMInference
    from core_model.tokenizer import create_default_tokenizer

    tok = create_default_tokenizer()

    def foci():
        m = model(max_seq_len=128)
        engine = ResoLLMInference(m, tok, temperature=0.0)
        engine.generate("The garden was full of flowers and", max_length=20, seed=0, stop_at_eos=False)
        return [(f.target, f.intensity) for f in m.get_attention_foci()]

    fused = foci()
    with monkeypatch.context() as mp:
        eager(mp)
        reference = foci()
    assert [t for t, _ in fused] == [t for t, _ in reference] and fused
    for (_, a), (_, b) in zip(fused, reference):
        assert a == pytest.approx(b, abs=1e-5)
