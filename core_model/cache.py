"""The decoding cache: keys and values per layer (phase features included in the keys),
the Kuramoto running sums per layer, and the positions and validity of every cached token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, H, T_max, head_dim): [semantic q/k part, cos, sin] for resonant heads
    v: torch.Tensor  # (B, H, T_max, head_dim)
    phase_sum: torch.Tensor | None = None  # Kuramoto running sum of (cos, sin) theta, (B, 1, F, 2)


@dataclass
class ModelCache:
    """Pre-allocated for ``max_len`` tokens; ``length`` tokens are filled."""

    layers: list[LayerCache]
    max_len: int
    length: int = 0
    key_valid: torch.Tensor | None = None  # (B, T_max) bool, only when some token is padding
    next_pos: torch.Tensor | None = None  # (B,) position of the next token per row
    phase_count: torch.Tensor | None = None  # (B,) valid tokens so far (the n of the mean fields)
    last_theta: torch.Tensor | None = None  # (B, T, F) final-block phases of the last forward
    extras: dict = field(default_factory=dict)

    @classmethod
    def allocate(cls, batch: int, num_layers: int, num_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> "ModelCache":
        layers = [
            LayerCache(
                k=torch.empty(batch, num_heads, max_len, head_dim, device=device, dtype=dtype),
                v=torch.empty(batch, num_heads, max_len, head_dim, device=device, dtype=dtype),
            )
            for _ in range(num_layers)
        ]
        return cls(layers=layers, max_len=max_len,
                   next_pos=torch.zeros(batch, dtype=torch.long, device=device),
                   phase_count=torch.zeros(batch, dtype=torch.float32, device=device))

    @property
    def last_phases(self) -> torch.Tensor | None:
        """(B, F) final-block phases of the last token read."""
        return None if self.last_theta is None else self.last_theta[:, -1]

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def select(self, rows: torch.Tensor) -> "ModelCache":
        """A cache holding only the given batch rows (for dropping finished sequences)."""
        def pick(t):
            return _pick_rows(t, rows)
        layers = [LayerCache(pick(l.k), pick(l.v), pick(l.phase_sum)) for l in self.layers]
        return ModelCache(layers, self.max_len, self.length, pick(self.key_valid), pick(self.next_pos),
                          pick(self.phase_count), pick(self.last_theta), dict(self.extras))

    def shared_view(self) -> ModelCache:
        """This cache as it is now, sharing its tensors: ``length`` and the per-step state
        (positions, phase counts, phases, Kuramoto sums) are this moment's.

        Decoding only appends: a forward writes keys, values and validity at positions
        ``>= length`` and replaces the state tensors with new ones, never modifies them. So
        ``copy_prefix`` of the view, later and in another thread, gives this cache as it is now,
        without copying anything now (the Lyapunov twin forks the main cache this way).
        """
        return ModelCache([LayerCache(layer.k, layer.v, layer.phase_sum) for layer in self.layers], self.max_len,
                          self.length, self.key_valid, self.next_pos, self.phase_count, self.last_theta,
                          dict(self.extras))

    def copy_prefix(self, row: int = 0) -> ModelCache:
        """An independent batch-1 copy of batch row ``row``, with room for ``max_len`` tokens:
        only the ``length`` filled positions of the keys, values and validity are read."""
        n = self.length
        rows = torch.tensor([row], device=self.layers[0].k.device)

        def keys_prefix(t: torch.Tensor) -> torch.Tensor:  # (B, H, T_max, d) -> (1, H, T_max, d)
            out = t.new_empty((1, *t.shape[1:]))
            out[:, :, :n].copy_(t[row:row + 1, :, :n])
            return out

        def pick(t):
            return _pick_rows(t, rows)
        layers = [LayerCache(keys_prefix(layer.k), keys_prefix(layer.v), pick(layer.phase_sum)) for layer in self.layers]
        key_valid = None
        if self.key_valid is not None:  # (B, T_max); what follows the prefix is written before it is read
            key_valid = self.key_valid.new_ones((1, self.max_len))
            key_valid[:, :n].copy_(self.key_valid[row:row + 1, :n])
        return ModelCache(layers, self.max_len, n, key_valid, pick(self.next_pos), pick(self.phase_count),
                          pick(self.last_theta), dict(self.extras))


def _pick_rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Batch rows ``rows`` of ``t`` (a copy), None for None."""
    return None if t is None else t.index_select(0, rows)
