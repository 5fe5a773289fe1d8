"""The Reso-LLM v2 network: prime embedding -> ResoFormer blocks (with Kuramoto phases) -> head.

Read top to bottom in data-flow order. Components and their equations live in their own
modules (embedding, kuramoto, attention, gating, feedforward, block); this file composes them,
initialises the weights GPT-2 style and exposes training, decoding and checkpoint entry points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import rope_inv_freq, rope_table
from .block import BlockTrace, ResoFormerBlock
from .cache import ModelCache
from .cognition.api import CognitionMixin
from .config import ResoLLMConfig
from .embedding import PrimeTokenEmbedding

if TYPE_CHECKING:
    from .tokenizer import ResoTokenizer

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_only (the loss then covers the last position)
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # final normalised hidden state (B, T, D), every position
    phases: torch.Tensor | None = None  # final-block phases (B, T, F)
    traces: list[BlockTrace] | None = None  # per block: order parameter and gate

    @property
    def coherence(self) -> torch.Tensor | None:
        """Kuramoto order parameter of the last block's input, per position (B, T)."""
        if not self.traces or self.traces[-1].order is None:
            return None
        return self.traces[-1].order.squeeze(-1)


class ResoLLMModel(CognitionMixin, nn.Module):
    def __init__(self, config: ResoLLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = PrimeTokenEmbedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(ResoFormerBlock(config, evolve_phases=i < config.num_layers - 1)
                                    for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.dim, bias=config.bias)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.semantic.weight
        # Inference-time cognition (core_model/cognition): PRSC concept states and the 16-axis memory
        # state enter the network through these projections, added to the input embedding.
        if config.prsc.enabled:
            self.concept_proj = nn.Linear(2 * config.num_phases, config.dim, bias=False)
        if config.temporal_smf.enabled:
            self.memory_proj = nn.Linear(16, config.dim, bias=False)
        rot_dim = self.blocks[0].attn.sem_dim
        # cos/sin of every position, indexed per forward (no trigonometry per decoding step)
        self.register_buffer("rope_cs", rope_table(config.max_seq_len, rope_inv_freq(rot_dim, config.rope_base)),
                             persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith(("attn.out_proj.weight", "ffn.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        external_field: torch.Tensor | None = None,
        input_offsets: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """input_ids (B, T); targets (B, T) with -100 to ignore; attention_mask (B, T) 1 = real token
        (left padding); cache continues a decode; external_field (B, F, 2) or (F, 2): other agents'
        mean field; input_offsets (B, T, D) added to the input embedding (concepts, memory)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > (cache.max_len if cache is not None else self.config.max_seq_len):
            raise ValueError(f"sequence of {start + T} tokens exceeds the limit "
                             f"{cache.max_len if cache is not None else self.config.max_seq_len}")
        valid = attention_mask.bool() if attention_mask is not None else None
        if valid is not None and bool(valid.all()):
            valid = None

        x, theta = self.embed(input_ids)
        if input_offsets is not None:
            x = x + (input_offsets if input_offsets.dtype == x.dtype else input_offsets.to(x.dtype))
        if external_field is not None:
            external_field = external_field.to(device=x.device)
        x = self.drop(x)

        positions, attn_mask = self._positions_and_mask(B, T, valid, cache, input_ids.device)
        rope = None
        if self.config.rope:
            cs = self.rope_cs[:, positions].unsqueeze(2)  # (2, B, 1, T, rot_dim/2)
            rope = (cs if cs.dtype == x.dtype else cs.to(x.dtype)).unbind(0)

        counts = self._field_counts(B, T, valid, cache, x.device) if theta is not None else None
        # the mean fields' n, at least 1 (without padding every prefix holds a token already)
        divisors = counts.clamp(min=1) if counts is not None and valid is not None else counts
        traces = []
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x, theta, trace = block(x, theta, rope, attn_mask, valid, divisors, external_field, layer_cache, start)
            traces.append(trace)
        if cache is not None:
            cache.length = start + T
            cache.next_pos = cache.next_pos + (valid.sum(1) if valid is not None else T)  # real tokens only
            if counts is not None:
                cache.phase_count = counts[:, -1].view(-1)
            if theta is not None:
                cache.last_theta = theta.detach() if theta.requires_grad else theta

        hidden = self.ln_f(x)
        logits = self.head(hidden[:, -1:] if last_only else hidden)
        loss = None
        if targets is not None:
            if last_only:
                targets = targets[:, -1:]
            flat = targets.reshape(-1)
            # mean over the trained tokens, 0 (with a zero gradient) when every target is ignored:
            # a plain mean would be 0/0 = NaN for a block of user text under assistant-only masks
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                                   reduction="sum") / (flat != IGNORE_INDEX).sum().clamp(min=1)
        return ModelOutput(logits=logits, loss=loss, hidden=hidden, phases=theta, traces=traces)

    @staticmethod
    def _field_counts(B, T, valid, cache, device) -> torch.Tensor:
        """``n_i`` of every prefix mean field (B, T, 1, 1): valid tokens up to and including ``i``
        (0 before a row's first real token; the mean field divides by ``max(n_i, 1)``)."""
        if valid is None and T == 1 and cache is not None:  # a decoding step: one op
            return (cache.phase_count + 1.0).view(B, 1, 1, 1)
        if valid is None:
            counts = torch.arange(1, T + 1, device=device, dtype=torch.float32).expand(B, T)
        else:
            counts = valid.float().cumsum(1)
        if cache is not None:
            counts = counts + cache.phase_count.unsqueeze(1)
        return counts[:, :, None, None]

    def _positions_and_mask(self, B, T, valid, cache, device):
        """RoPE positions (B, T) and a boolean attention mask (B, 1, T, T_k), or None when plain causal."""
        offset = cache.next_pos.unsqueeze(1) if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
        if valid is None:
            positions = offset + torch.arange(T, device=device).unsqueeze(0)
        else:
            positions = offset + (valid.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None and (valid is not None or cache.key_valid is not None):
            if cache.key_valid is None:
                cache.key_valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
            start = cache.length
            cache.key_valid[:, start:start + T] = valid if valid is not None else True
            keys = cache.key_valid[:, : start + T]
            causal = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)
            own = torch.zeros(T, start + T, dtype=torch.bool, device=device)
            own[:, start:] = torch.eye(T, dtype=torch.bool, device=device)
            return positions, ((causal & keys[:, None, :]) | own).unsqueeze(1)
        if valid is None:
            return positions, None
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=device)
        return positions, ((causal & valid[:, None, :]) | eye).unsqueeze(1)

    # --- decoding entry points --------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None) -> ModelCache:
        p = next(self.parameters())
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        head_dim = self.config.head_dim
        return ModelCache.allocate(batch, self.config.num_layers, self.config.num_heads, head_dim,
                                   max_len, p.device, p.dtype)

    def generate(self, input_ids, max_new_tokens: int = 64, **kwargs):
        """Sample continuations; see :func:`core_model.generation.generate` for the options."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def generate_stream(self, input_ids, max_new_tokens: int = 64, **kwargs):
        """Yield each step's tokens as they come; see :func:`core_model.generation.generate_stream`."""
        from .generation import generate_stream

        return generate_stream(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # --- training helpers -------------------------------------------------------------
    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices only; none on norms, biases, phases and scalars."""
        decay, no_decay = [], []
        seen = set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_phase = any(k in name for k in ("phase_table", "blend_logit", "resonance", "coupling", "order_weight"))
            (no_decay if p.dim() < 2 or is_phase else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.semantic.weight.numel()
        return n

    # --- checkpoints ------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer: "ResoTokenizer | None" = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` into ``directory``."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, directory, tokenizer)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device | None = None) -> "ResoLLMModel":
        """Load a checkpoint written by :meth:`save`; mismatches are refused, nothing is unpickled."""
        from .checkpoint import load_checkpoint

        model, _ = load_checkpoint(directory, device=device)
        return model
