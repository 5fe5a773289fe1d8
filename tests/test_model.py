"""The resonant network: switches, physics, fused attention, gradients, cached decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core_model.attention import ResonantAttention, rope_inv_freq, rope_tables
from core_model.config import ResoLLMConfig
from core_model.kuramoto import KuramotoCoupling, global_order_parameter, prefix_mean_field, phasors
from core_model.model import ResoLLMModel

SWITCHES = ("prime_embedding", "kuramoto", "resonant_attention", "coherence_gating")


def tiny(**kw) -> ResoLLMConfig:
    base = dict(vocab_size=263, dim=64, num_layers=2, num_heads=4, num_phases=4, max_seq_len=128)
    base.update(kw)
    return ResoLLMConfig(**base)


def build(seed: int = 0, **kw) -> ResoLLMModel:
    torch.manual_seed(seed)
    return ResoLLMModel(tiny(**kw)).eval()


def ids(B=2, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 263, (B, T), generator=g)


def only(name: str) -> dict:
    return {s: s == name for s in SWITCHES}


def test_all_switches_off_is_exactly_vanilla():
    off = build(**{s: False for s in SWITCHES})
    van = build(vanilla=True)
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in van.state_dict().items()}
    x = ids()
    assert torch.equal(off(x).logits, van(x).logits)


@pytest.mark.parametrize("name", ["prime_embedding", "coherence_gating"])
def test_component_on_changes_logits_and_neutralised_equals_vanilla(name):
    van = build(vanilla=True)
    model = build(**only(name))
    state = van.state_dict()
    for i, b in enumerate(model.blocks):  # vanilla rows first; the gate row keeps its own init
        state[f"blocks.{i}.in_proj.weight"] = torch.cat([state[f"blocks.{i}.in_proj.weight"], b.in_rows("gate")])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing  # the component's own parameters
    x = ids()
    assert not torch.allclose(model(x).logits, van(x).logits, atol=1e-5)
    with torch.no_grad():  # neutralise the component: exactly the vanilla computation again
        if name == "prime_embedding":
            model.embed.blend_logit.fill_(-float("inf"))
        else:
            for b in model.blocks:
                b.in_rows("gate").zero_()
                b.gate.order_weight.zero_()
    assert torch.equal(model(x).logits, van(x).logits)


def test_resonant_attention_on_changes_logits_and_zero_lambda_ignores_phases():
    model = build(**only("resonant_attention"))
    x = ids()
    base = model(x).logits
    with torch.no_grad():
        for b in model.blocks:
            b.attn.resonance.zero_()
        zero = model(x).logits
        model.embed.phase_table.uniform_(0, 2 * math.pi)  # other phases, lambda 0: nothing changes
        assert torch.allclose(model(x).logits, zero, atol=1e-6)
    assert not torch.allclose(base, zero, atol=1e-5)


def test_kuramoto_changes_what_phase_consumers_see():
    with_k = build(resonant_attention=True, kuramoto=True, prime_embedding=False, coherence_gating=False)
    without = build(resonant_attention=True, kuramoto=False, prime_embedding=False, coherence_gating=False)
    state = with_k.state_dict()
    for i, b in enumerate(with_k.blocks):  # the model without Kuramoto has no omega rows
        state[f"blocks.{i}.in_proj.weight"] = b.in_rows("qkv")
    assert with_k.blocks[-1].kuramoto is None  # nothing reads the last block's phases
    without.load_state_dict(state, strict=False)
    x = ids()
    assert not torch.allclose(with_k(x).logits, without(x).logits, atol=1e-5)
    with torch.no_grad():  # dt * (omega + K pull) = 0: phases stay, logits equal the model without it
        for b in with_k.blocks[:-1]:
            b.in_rows("omega").zero_()
            b.kuramoto.coupling.zero_()
    assert torch.allclose(with_k(x).logits, without(x).logits, atol=1e-6)


def test_stochastic_resonance_hook_changes_logits_only_when_on():
    model = build()
    x = ids()
    clean = model(x).logits
    for b in model.blocks:
        b.ffn.noise_amplitude = 0.5
        b.ffn.noise_generator = torch.Generator().manual_seed(0)
    noisy = model(x).logits
    assert not torch.allclose(clean, noisy, atol=1e-5)
    for b in model.blocks:
        b.ffn.noise_amplitude = 0.0
    assert torch.equal(model(x).logits, clean)


def test_external_field_changes_the_phases():
    model = build()
    x = ids(B=1)
    field = torch.tensor([[0.8, 0.3]] * 4)  # (F, 2): real, imag of the peers' mean field
    a, b = model(x), model(x, external_field=field)
    assert not torch.allclose(a.phases, b.phases) and not torch.allclose(a.logits, b.logits)


@pytest.mark.parametrize("coupling, expect_sync", [(4.0, True), (0.0, False)])
def test_kuramoto_order_parameter_rises_only_with_coupling(coupling, expect_sync):
    torch.manual_seed(0)
    step = KuramotoCoupling(dt=0.2, coupling_init=coupling)
    # spread natural frequencies without coupling; none with it
    omega = torch.randn(1, 64, 8) * (0.0 if expect_sync else 0.5)
    theta = torch.rand(1, 64, 8) * 2 * math.pi
    r0 = float(global_order_parameter(theta))
    counts = torch.arange(1, 65, dtype=torch.float32).view(1, 64, 1, 1)
    with torch.no_grad():
        for _ in range(60):
            z, _ = prefix_mean_field(phasors(theta), counts)
            theta = step(theta, omega, z)
    r = float(global_order_parameter(theta))
    if expect_sync:
        assert r > 0.9 > r0 + 0.3
    else:
        assert r < 0.45


def test_prefix_field_is_causal_and_incremental():
    theta = torch.rand(2, 10, 4) * 6
    n = torch.arange(1, 11, dtype=torch.float32).view(1, 10, 1, 1)
    full, _ = prefix_mean_field(phasors(theta), n)
    head, running = prefix_mean_field(phasors(theta[:, :6]), n[:, :6])
    tail, _ = prefix_mean_field(phasors(theta[:, 6:]), n[:, 6:], past_sum=running)
    assert torch.allclose(torch.cat([head, tail], 1), full, atol=1e-6)
    explicit = torch.stack([phasors(theta[:, : i + 1]).mean(1) for i in range(10)], 1)
    assert torch.allclose(full, explicit, atol=1e-6)
    theta2 = theta.clone()
    theta2[:, 7:] += 1.0  # the future does not move the past
    assert torch.allclose(prefix_mean_field(phasors(theta2), n)[0][:, :7], full[:, :7])


def test_fused_resonance_equals_explicit_softmax():
    torch.manual_seed(0)
    cfg = tiny(resonant_attention=True, dim=64, num_heads=4, num_phases=4)
    attn = ResonantAttention(cfg).eval()
    with torch.no_grad():
        attn.resonance.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    B, T = 2, 12
    theta = torch.rand(B, T, 4) * 2 * math.pi
    rope = rope_tables(torch.arange(T).expand(B, T), rope_inv_freq(attn.sem_dim, 10000.0))
    qkv = torch.randn(B, T, attn.qkv_width)
    fused = attn(qkv, phasors(theta), rope, None)
    scores = attn.explicit_scores(qkv, theta, rope)  # s*QK^T + lambda*R, (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    v = attn.split_heads(qkv)[2]
    explicit = attn.out_proj((probs @ v).transpose(1, 2).reshape(B, T, -1))
    assert torch.allclose(fused, explicit, atol=1e-5)
    # and R really is mean_k cos(theta_ik - theta_jk)
    R = torch.cos(theta[:, :, None] - theta[:, None]).mean(-1)
    assert torch.allclose(R[:, 3, 3], torch.ones(B))


def test_gradients_reach_every_resonant_parameter():
    model = build(dropout=0.0).train()
    x = ids()
    loss = model(x[:, :-1], x[:, 1:]).loss
    loss.backward()
    names = ["embed.phase_table", "embed.blend_logit", "blocks.0.attn.resonance", "blocks.0.kuramoto.coupling",
             "blocks.0.in_proj.weight", "blocks.1.gate.order_weight"]
    params = dict(model.named_parameters())
    for n in names:
        g = params[n].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    # every network parameter is trained by the LM loss (inference-time projections excepted)
    unused = [n for n, p in params.items() if p.grad is None and not n.startswith(("concept_proj", "memory_proj"))]
    assert not unused


@pytest.mark.parametrize("vanilla", [False, True])
def test_cached_generation_matches_full_recomputation(vanilla):
    model = build(vanilla=vanilla)
    prompts = [[5, 9, 33, 40, 2, 7], [8, 1]]
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3}):
        cached = model.generate(prompts, max_new_tokens=30, seed=3, **kw)
        full = model.generate(prompts, max_new_tokens=30, seed=3, use_cache=False, **kw)
        assert cached == full and all(len(o) == 30 for o in cached)
        if kw["temperature"] == 0.0:  # left padding does not change a row's greedy output
            assert model.generate([prompts[1]], max_new_tokens=30, seed=3, **kw)[0] == cached[1]


def test_cached_logits_match_full_forward():
    model = build()
    x = ids(B=2, T=20)
    full = model(x).logits
    cache = model.new_cache(2, 32)
    parts = [model(x[:, :12], cache=cache).logits]
    for t in range(12, 20):
        parts.append(model(x[:, t:t + 1], cache=cache).logits)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_generation_is_seeded_and_stops_at_eos():
    model = build()
    a = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=11)
    b = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=11)
    c = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=12)
    assert a == b and a != c
    eos = a[0][4]
    stopped = model.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, seed=11, eos_id=eos)
    assert stopped[0] == a[0][: a[0].index(eos) + 1]


def test_streamed_generation_equals_generate_and_leaves_grad_mode_alone():
    model = build()
    model.train()
    prompts = [[1, 2, 3], [4, 5]]
    full = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=11)
    eos = full[1][3]  # row 1 stops at its 4th token, row 0 goes on (unless it emits eos too)
    expected = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=11, eos_id=eos)
    stream = model.generate_stream(prompts, max_new_tokens=12, temperature=1.0, seed=11, eos_id=eos)
    rows: list[list[int]] = [[], []]
    steps = 0
    for tokens in stream:
        steps += 1
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # the caller's mode between steps
        assert not model.training  # eval while the stream is open
        for r, t in enumerate(tokens):
            if t is not None:
                rows[r].append(t)
    assert rows == expected and steps == max(len(r) for r in expected)
    assert rows[1][-1] == eos and len(rows[1]) <= 4
    assert model.training  # restored when the stream ends
    with pytest.raises(ValueError, match="max_new_tokens"):  # checked at the call, before any step
        model.generate_stream(prompts, max_new_tokens=-1)


def test_eval_mode_switches_only_when_a_module_trains_and_restores_each_modules_mode():
    from core_model.generation import eval_mode

    model = build()
    for top, inner in ((True, True), (False, False), (False, True)):  # training, eval, mixed
        model.train(top)
        model.blocks[0].train(inner)
        modes = [m.training for m in model.modules()]
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
        # each module as it was: a block frozen in eval mode inside a training model stays so
        assert [m.training for m in model.modules()] == modes
    calls = []
    model.eval()
    model.train = lambda mode=True: calls.append(mode)  # an all-eval model is not walked at all
    with eval_mode(model):
        pass
    assert calls == []


def test_loss_ignores_masked_targets_and_sequence_limit_is_enforced():
    model = build()
    x = ids(B=1, T=16)
    t = x.clone()
    t[:, :8] = -100
    out = model(x, t)
    manual = F.cross_entropy(out.logits[0, 8:], x[0, 8:])
    assert torch.allclose(out.loss, manual, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_chunked_prefill_with_an_all_padding_chunk_matches_one_forward():
    model = build()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 20, 21]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    full = model(ids, attention_mask=mask).logits
    cache = model.new_cache(2, 8)
    first = model(ids[:, :3], attention_mask=mask[:, :3], cache=cache).logits
    assert cache.phase_count.tolist() == [3.0, 0.0] and cache.next_pos.tolist() == [3, 0]
    second = model(ids[:, 3:], attention_mask=mask[:, 3:], cache=cache).logits
    got = torch.cat([first, second], 1)
    assert torch.allclose(got[0], full[0], atol=1e-5) and torch.allclose(got[1, 4:], full[1, 4:], atol=1e-5)


def test_generation_limits_and_padding_free_repetition_penalty():
    model = build(max_seq_len=32)
    with pytest.raises(ValueError, match="does not fit in max_seq_len 32"):
        model.generate([[1] * 30], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([[1, 2]], max_new_tokens=-1)
    assert len(model.generate([[1] * 30], max_new_tokens=3)[0]) == 3
    alone = model.generate([[7, 8]], max_new_tokens=6, temperature=0.0, repetition_penalty=1.5)[0]
    pad = alone[0]  # padding with the very token the short prompt picks first must not penalise it
    batched = model.generate([[1, 2, 3, 4, 5], [7, 8]], max_new_tokens=6, temperature=0.0,
                             repetition_penalty=1.5, pad_id=pad)[1]
    assert batched == alone


def test_last_only_loss_and_bf16_weights():
    model = build()
    x = ids(B=2, T=10)
    out = model(x, x, last_only=True)
    assert out.logits.shape == (2, 1, 263) and out.hidden.shape[1] == 10
    assert torch.allclose(out.loss, F.cross_entropy(model(x).logits[:, -1], x[:, -1]), atol=1e-5)
    half = build().to(torch.bfloat16)
    assert half(x).logits.dtype == torch.bfloat16 and torch.isfinite(half(x).logits.float()).all()
