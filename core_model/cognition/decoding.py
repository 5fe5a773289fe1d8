"""The cognitive decoding loop: cached decoding with stability, agency, PRSC, memory and SR.

One forward per step, as in ``core_model.generation``: prefill ``model(ids, cache=...)``, then
``model(next_token, cache=...)``. The Lyapunov twin (``lyapunov.py``) opens a window on the cache
as it is right after the prefill and then every ``lyapunov_every`` steps.

Attention intensity for the foci is the last layer's attention of the latest query over the
cached keys (the query recorded by that attention module, see ``_AttentionProbe``).

Nothing in decoding reads the foci, so a foci update during the loop only records its moment
(the context length, a copy of that query, the step); the foci of every moment are computed
after the last step, in order, from what each moment saw: the cache only appends, so keys, hidden
states, surprisals and word pieces before a moment's length are the same then as at the end.
The result is the same as computing them in the loop, without that work in the loop.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..fused import phase_kernel
from ..generation import SamplingParams, eval_mode, sample_from, sampling_logits
from .agency import AttentionFocus, SteeringTable, compute_foci
from .api import ConceptInput, memory_offset, reference_hidden
from .lyapunov import LyapunovTwin
from .resonance import StochasticResonance
from .stability import DIVERGENT, CHAOTIC, PredictiveStability, TemperatureController


@dataclass
class DecodeTrace:
    tokens: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    lyapunov: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    coherence: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    goals_achieved: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    noise_steps: int = 0
    halted: bool = False
    elapsed_ms: float = 0.0


def _entropy(z: np.ndarray, masked: bool = False) -> float:
    """``H = -sum p ln p`` of ``softmax(z)``: ``logsumexp(z) - sum p z``; nan if ``z`` is not finite
    (a diverging model), except, when ``masked``, for the -inf entries that top-k / top-p put there
    (left out; still nan if all are)."""
    if not np.isfinite(z).all():
        if not masked or np.isnan(z).any() or np.isposinf(z).any() or np.isneginf(z).all():
            return float("nan")
        z = z[np.isfinite(z)]
    e = np.exp(z - z.max())
    s = float(e.sum())
    return math.log(s) + float(z.max()) - float(np.dot(e, z)) / s


class _Rows:
    """Rows of one width, one per step, in a buffer allocated once. A push keeps a reference to
    the row, a (width,) tensor or a (1, ..., width) one holding one row (a step's output as it
    is, without indexing it), and the rows are copied in batches of up to ``BATCH`` (one stack
    per batch instead of a copy per step; no step's output stays alive longer than a batch)."""

    BATCH = 16

    def __init__(self, steps: int, width: int, device) -> None:
        self.buffer = torch.empty(max(steps, 1), width, device=device)
        self.count = 0
        self._pending: list[torch.Tensor] = []

    def push(self, row: torch.Tensor) -> None:
        self._pending.append(row)
        self.count += 1
        if len(self._pending) == self.BATCH:
            self._flush()

    def view(self) -> torch.Tensor:
        """The rows pushed so far, (count, width)."""
        if self._pending:
            self._flush()
        return self.buffer[:self.count]

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        rows = self.buffer[self.count - len(pending):self.count]
        if pending[0].dim() > 1:  # (1, ..., width) each: concatenated along the leading dimension
            rows = rows.view(len(pending), *pending[0].shape[1:])
            join = torch.cat
        else:
            join = torch.stack
        if pending[0].dtype == rows.dtype:
            join(pending, out=rows)
        else:  # e.g. half-precision outputs into the float32 buffer
            rows.copy_(join(pending))


class _Surprisal:
    """Surprisal ``-ln p(x_t | x_<t)`` of every context token under the model's raw logits (no
    goal bias, no temperature), ``ln V`` for the first; the generated tokens' values are computed
    in batches, when the foci read them (in float64, like a per-step ``logsumexp``)."""

    def __init__(self, prompt_logits: torch.Tensor, prompt_ids: torch.Tensor, V: int, steps: int) -> None:
        logp = prompt_logits.double().log_softmax(-1)  # (T0, V)
        self.done = np.concatenate([[math.log(V)], (-logp[:-1].gather(1, prompt_ids[1:, None])[:, 0]).cpu().numpy()])
        self.rows = _Rows(steps, V, prompt_logits.device)  # raw logits of the steps
        self.tokens: list[int] = []
        self.computed = 0  # steps whose surprisal is in ``done``

    def push(self, raw_logits: torch.Tensor, token: int) -> None:
        self.rows.push(raw_logits)
        self.tokens.append(token)

    def values(self, n: int) -> np.ndarray:
        """The first ``n`` surprisals, (n,) float64."""
        if len(self.done) < n and self.computed < len(self.tokens):
            z = self.rows.view()[self.computed:].double()
            picked = z.gather(1, torch.tensor(self.tokens[self.computed:], device=z.device)[:, None])[:, 0]
            self.done = np.concatenate([self.done, (z.logsumexp(-1) - picked).cpu().numpy()])
            self.computed = len(self.tokens)
        return self.done[:n]


class _HiddenTrail:
    """The final hidden states of the context: the prompt's (T0, D), then one row per token fed
    back (the foci and the goals read them)."""

    def __init__(self, prompt_hidden: torch.Tensor, steps: int) -> None:
        self.prompt = prompt_hidden.float()
        self.gen = _Rows(steps, prompt_hidden.shape[-1], prompt_hidden.device)

    @property
    def fed(self) -> int:
        return self.gen.count

    def push(self, hidden: torch.Tensor) -> None:
        """``hidden``: (D,) or (1, 1, D), the final hidden state of the token fed back."""
        self.gen.push(hidden)

    def generated_sum(self) -> torch.Tensor:
        """Sum of the rows of the tokens fed back so far (D,)."""
        return self.gen.view().sum(0)

    def rows(self, n: int) -> np.ndarray:
        """The first ``n`` context rows, (n, D) float32."""
        return torch.cat([self.prompt, self.gen.view()])[:n].cpu().numpy()


class _AttentionProbe:
    """Holds the last attention module's most recent query of the main trajectory.

    While a probe is attached the module records the finished queries (phase features included)
    of forwards run in the probe's thread, on the eager and the fused decoding path alike (the
    Lyapunov twin's window forwards run on a worker thread and are not recorded); ``capture`` takes the
    latest one right after a main-trajectory forward.
    """

    def __init__(self, attn) -> None:
        self.attn = attn
        self.q: torch.Tensor | None = None
        attn.record_query = threading.get_ident()

    def capture(self) -> None:
        self.q = self.attn.last_query

    def remove(self) -> None:
        self.attn.record_query = None
        self.attn.last_query = None


class _Rollback:
    """What a generation changes in the session while it runs (the repetition window, the goals'
    progress, and the foci, written at the end), so a generation that fails leaves the session
    as it found it: a retry with the same seed then matches a clean run. The rest (stability,
    phases, the step counter) is written only once the generation has succeeded."""

    def __init__(self, session) -> None:
        self.session = session
        self.repetition = list(session.repetition.tokens)
        self.goals = [(g, list(g.covered), g.status, g.progress, g.stall, g.achieved_at)
                      for g in session.agency.goals]
        self.foci = list(session.agency.foci)
        self.held_since = dict(session.agency.held_since)

    def restore(self) -> None:
        s = self.session
        s.repetition.clear()
        for t in self.repetition:
            s.repetition.push(t)
        for g, covered, status, progress, stall, achieved_at in self.goals:
            g.covered, g.status, g.progress, g.stall, g.achieved_at = covered, status, progress, stall, achieved_at
        s.agency.foci, s.agency.held_since = self.foci, self.held_since


class CognitiveDecoder:
    """Runs one generation against ``model.session`` (see module docstring); one that raises
    leaves the session as it was. The caller holds ``api.generation_lock(model)`` (generations on
    one model take turns), as ``ResoLLMInference.generate_ids`` does."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tok = tokenizer
        self.session = model.session

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], max_new: int, params: SamplingParams, seed: int,
            stop_ids: frozenset[int], halt_on_instability: bool | None = None) -> DecodeTrace:
        rollback = _Rollback(self.session)
        try:
            with eval_mode(self.model):
                return self._run(prompt_ids, max_new, params, seed, stop_ids, halt_on_instability)
        except BaseException:  # restored, then re-raised
            rollback.restore()
            raise

    def _run(self, prompt_ids: list[int], max_new: int, params: SamplingParams, seed: int,
             stop_ids: frozenset[int], halt_on_instability: bool | None) -> DecodeTrace:
        model, session = self.model, self.session
        cfg = session.config
        V = model.config.vocab_size
        device = next(model.parameters()).device
        trace = DecodeTrace()
        phase_kernel()  # load (or, once per machine, build) the fused decoding step before timing
        started = time.perf_counter()
        limit = model.config.max_seq_len
        if len(prompt_ids) + max_new > limit:
            # The prompt keeps at least half the window (all of it when shorter), the new tokens
            # the rest: a max_length near max_seq_len must not cut the prompt to nothing.
            keep = min(len(prompt_ids), max(limit - max_new, limit // 2, 1), max(limit - 1, 1))
            if keep < len(prompt_ids):
                trace.warnings.append(f"step 0: prompt truncated to its last {keep} tokens (max_seq_len {limit})")
                prompt_ids = prompt_ids[-keep:]
            if max_new > limit - len(prompt_ids):
                max_new = max(limit - len(prompt_ids), 1)
                trace.warnings.append(f"step 0: at most {max_new} new tokens fit after the prompt "
                                      f"(max_seq_len {limit})")
        stab_on = cfg.stability.enabled
        lyap_on = stab_on and cfg.stability.lyapunov
        agency_on = cfg.agency.enabled
        halt = cfg.stability.halt_on_instability if halt_on_instability is None else halt_on_instability
        goals = [g for g in session.agency.active_goals()] if agency_on else []
        for g in goals:  # coverage is of this output (agency.py): none of its words are in it yet
            g.covered = [False] * len(g.words)
        run_goals = list(goals)  # the foci's relevance uses every goal this generation started with

        concepts = ConceptInput(model)
        mem = memory_offset(model)
        mem_step = mem.view(1, 1, -1) if mem is not None else None  # the usual step offset
        T0 = len(prompt_ids)
        ids = torch.tensor([prompt_ids], device=device)
        offsets = self._offsets(1, concepts.offsets(prompt_ids, 0), mem, T0)
        probe = _AttentionProbe(model.blocks[-1].attn) if agency_on else None
        sr = StochasticResonance(cfg.stochastic_resonance, model.blocks, seed + 1)
        twin: LyapunovTwin | None = None
        try:
            tracker = PredictiveStability(cfg.stability, V)
            tracker.start()
            twin = LyapunovTwin(model, cfg.stability, tracker, seed) if lyap_on else None
            cache = model.new_cache(1, T0 + max_new)
            out = model(ids, cache=cache, input_offsets=offsets, last_only=not agency_on)
            if probe is not None:
                probe.capture()
            if twin is not None:
                twin.fork(cache)
            controller = TemperatureController(cfg.stability, params.temperature)
            if agency_on:
                surprisal = _Surprisal(out.logits[0], ids[0], V, max_new)
                hidden_rows = _HiddenTrail(out.hidden[0], max_new)
                ref = reference_hidden(model) if goals else None
                moments = [_FociMoment.now(probe, T0, 0)]  # computed after the last step
            generator = torch.Generator(device=device).manual_seed(seed)
            history = torch.tensor([prompt_ids], device=device) if params.repetition_penalty != 1.0 else None
            filtered = history is not None or params.top_k is not None or params.top_p is not None
            boundary_ids = self.tok.boundary_ids() if goals else None
            steering = SteeringTable(V, cfg.agency.goal_bias, device)
            steering.reset(goals)
            context = list(prompt_ids)
            for step in range(max_new):
                raw = out.logits[0, -1].float()
                logits = raw
                if goals:
                    dense = steering.bias(context[-32:], context[-1] in boundary_ids)
                    if dense is not None:  # one dense add: fewer kernels than a clone and an indexed add
                        logits = raw + dense
                temp = controller.temperature if stab_on else params.temperature
                final = sampling_logits(logits[None], params, history, temp)
                nxt = int(sample_from(final, temp, generator)[0])
                if filtered:  # the entropy of what is sampled: penalised, top-k / top-p masked
                    entropy = _entropy(final[0].cpu().numpy().astype(np.float64), masked=True)
                else:
                    z = logits.cpu().numpy().astype(np.float64)  # numpy: a few us for V floats
                    entropy = _entropy(z / temp if temp > 0 else z)
                coh = out.coherence
                trace.tokens.append(nxt)
                context.append(nxt)
                trace.entropy.append(entropy)
                trace.temperature.append(temp)
                if coh is not None:
                    trace.coherence.append(float(coh[0, -1]))
                if stab_on:
                    state = tracker.observe(step, entropy, trace.tokens, finite=math.isfinite(entropy))
                    trace.lyapunov.append(state.lyapunov)
                    controller.update(state.entropy_norm if state.entropy_norm is not None else 1.0,
                                      tracker.unstable, state.label == "periodic")
                session.repetition.push(nxt)
                rep = session.repetition.score()
                trace.repetition.append(rep)
                noise = sr.update(rep)
                trace.noise_steps += int(noise)
                if history is not None:
                    history = torch.cat([history, torch.tensor([[nxt]], device=device)], dim=1)
                if agency_on:
                    surprisal.push(raw, nxt)
                last = step == max_new - 1 or nxt in stop_ids
                if stab_on and halt and step + 1 >= cfg.stability.min_tokens_before_halt \
                        and tracker.state.label in (CHAOTIC, DIVERGENT):
                    trace.halted = True
                    tracker.warnings.append(f"step {step}: halted on {tracker.state.label} dynamics")
                    last = True
                if last:
                    break
                inp = torch.tensor([[nxt]], device=device)
                concept = concepts.offsets(context, len(context) - 1)
                step_offset = mem_step if concept is None else self._offsets(1, concept, mem, 1)
                out = model(inp, cache=cache, input_offsets=step_offset)
                if probe is not None:
                    probe.capture()
                if twin is not None:
                    twin.step(nxt, step_offset, cache, out.hidden, noise)
                if agency_on:
                    hidden_rows.push(out.hidden)  # (1, 1, D)
                    if goals and (step + 1) % cfg.agency.update_every == 0:
                        goals = self._update_goals(goals, hidden_rows, ref, trace)
                        steering.reset(goals)
                    if (step + 1) % cfg.agency.foci_every == 0:
                        moments.append(_FociMoment.now(probe, len(context), step + 1))
            if agency_on:
                n = len(trace.tokens)
                if goals:
                    self._update_goals(goals, hidden_rows, ref, trace)
                moments.append(_FociMoment.now(probe, T0 + hidden_rows.fed, n))  # the tokens read
                self._update_foci(moments, cache, context, surprisal, hidden_rows, run_goals, ref)
            if twin is not None:
                # the worker must finish before the model is free again; a window read after the
                # last step updates the final exponent (not the per-step trace)
                twin.close()
                tracker.refresh(max(len(trace.tokens) - 1, 0))
            if stab_on:
                session.stability = tracker.state
            trace.warnings.extend(tracker.warnings)
            if cache.last_phases is not None:
                session.phases = cache.last_phases[0].float().cpu().tolist()
        finally:  # each step runs even if the one before it is interrupted (a second Ctrl-C)
            try:
                if twin is not None:
                    twin.close(read=False)  # after an error: just stop the worker
            finally:
                try:
                    sr.off()
                finally:
                    if probe is not None:
                        probe.remove()
        session.step += len(trace.tokens)
        trace.elapsed_ms = (time.perf_counter() - started) * 1000
        return trace

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _offsets(B: int, concept: torch.Tensor | None, mem: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Concept offsets (T, D) plus the memory offset (D,), as (B, T, D); None when both are absent."""
        if concept is None and mem is None:
            return None
        off = concept if concept is not None else mem.expand(T, -1)
        if concept is not None and mem is not None:
            off = off + mem
        return off.unsqueeze(0).expand(B, -1, -1)

    def _update_goals(self, goals, hidden: _HiddenTrail, ref, trace: DecodeTrace):
        n = hidden.fed
        mean = hidden.generated_sum().cpu().numpy() / n - ref if n > 0 else None
        text = self.tok.decode(trace.tokens)
        step = self.session.step + len(trace.tokens)
        for g in goals:
            if g.update(mean, text, self.session.config.agency.achievement_threshold, step):
                trace.goals_achieved.append(g.description)
                trace.warnings.append(f"step {len(trace.tokens) - 1}: goal achieved: {g.description!r} "
                                      f"(progress {g.progress:.2f})")
        return [g for g in goals if g.status == "active"]

    def _update_foci(self, moments: list["_FociMoment"], cache, context: list[int], surprisal: _Surprisal,
                     hidden_rows: _HiddenTrail, goals, ref) -> None:
        """The foci of each recorded moment, in order (``held_since`` carries from one to the next);
        ``ref`` is the reference hidden state the goals are measured against (None without goals)."""
        cfg = self.session.config.agency
        L_max = max(m.length for m in moments)
        pieces = self.tok.decode_pieces(context[:L_max])
        all_hidden = hidden_rows.rows(L_max)
        if goals:
            all_hidden = all_hidden - ref
        all_surprisal = surprisal.values(L_max)
        store = self.session.concepts
        concepts_in = store.occurring_in if len(store) else (lambda ids: [])
        weights = (cfg.novelty_weight, cfg.relevance_weight, cfg.intensity_weight)
        agency = self.session.agency
        for m in moments:
            L = m.length
            intensity = m.intensity(cache.layers[-1], cache.key_valid)
            scored = compute_foci(pieces[:L], context[:L], all_surprisal[:L], intensity, all_hidden[:L], goals,
                                  concepts_in, weights, cfg.max_foci, math.log(self.model.config.vocab_size))
            now = self.session.step + m.step
            keys = [f"{f['type']}:{f['target']}" for f in scored]
            agency.held_since = {k: agency.held_since.get(k, now) for k in keys}
            agency.foci = [AttentionFocus(duration=now - agency.held_since[k], **f) for k, f in zip(keys, scored)]


@dataclass
class _FociMoment:
    """A foci update recorded during decoding: the context length then, a copy of the latest
    query then (None without one), and the step count."""

    length: int
    query: torch.Tensor | None
    step: int

    @classmethod
    def now(cls, probe: _AttentionProbe, length: int, step: int) -> "_FociMoment":
        return cls(length, None if probe.q is None else probe.q[:1, :, -1:].clone(), step)

    @torch.no_grad()
    def intensity(self, cache_layer, key_valid: torch.Tensor | None) -> np.ndarray:
        """softmax(q . k / sqrt(d)) of the moment's query over the first ``length`` cached keys,
        averaged over heads: (length,) (zeros without a query)."""
        if self.query is None:
            return np.zeros(self.length)
        q, L = self.query, self.length  # q: (1, H, 1, d)
        scores = (q @ cache_layer.k[:1, :, :L].transpose(-1, -2)).squeeze(2) / math.sqrt(q.shape[-1])  # (1, H, L)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:1, None, :L], float("-inf"))
        return scores.float().softmax(-1).mean(1)[0].cpu().numpy()
