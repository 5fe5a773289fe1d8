"""Values derived from parameters, computed once per weight version while no gradient is tracked.

In decoding a handful of tiny tensors are pure functions of the weights (a sigmoid of the blend
logits, the scaled resonance weights, a fused embedding table). Recomputing them every token
costs a kernel dispatch each, which at batch 1 on a CPU is most of what they cost. ``derived``
keeps such a value on its owner, keyed by the data pointer and version counter of every source
parameter, so an optimizer step, ``load_state_dict`` or ``.to(device)`` invalidates it. With
gradients enabled (training) it always recomputes, so autograd sees the real computation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


def version_key(sources: Sequence[torch.Tensor] | Iterable[torch.Tensor]) -> tuple:
    """What changes when any of ``sources`` is replaced, moved, cast or changed in place."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in sources)


def derived(owner: object, name: str, sources: Sequence[torch.Tensor],
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, cached on ``owner`` under ``name`` while gradients are off (module docstring)."""
    if torch.is_grad_enabled():
        return compute()
    key = version_key(sources)
    hit = owner.__dict__.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    owner.__dict__[name] = (key, value)
    return value
