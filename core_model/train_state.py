"""Training checkpoints: the standard model checkpoint plus ``training_state.pt``.

``training_state.pt`` holds only tensors and plain containers (dicts, lists, tuples, numbers,
strings), written with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``,
so loading never unpickles arbitrary objects. It carries the optimizer and scheduler state, the
step counter, the data position and the random number generator states of every rank.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint

STATE_FILE = "training_state.pt"
STATE_VERSION = 1
STATE_KEYS = ("step", "optimizer", "scheduler", "data", "rng")


# --------------------------------------------------------------------------------------
# random number generators
# --------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as tensors/plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (on every rank); just this process's when not distributed."""
    mine = capture_rng_state()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)  # in-memory exchange between our own ranks
    return gathered


# --------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------
def save_training_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer, *, optimizer, scheduler,
                             step: int, data_position: dict[str, Any], rng_states: list[dict[str, Any]],
                             extra: dict[str, Any] | None = None) -> Path:
    """Write the model checkpoint and ``training_state.pt`` into ``directory``."""
    directory = Path(directory)
    model.save(directory, tokenizer)
    state = {
        "version": STATE_VERSION,
        "step": int(step),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": dict(data_position),
        "rng": rng_states,
        "extra": dict(extra or {}),
    }
    torch.save(state, directory / STATE_FILE)
    return directory


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """The contents of ``training_state.pt`` (weights-only load: no arbitrary unpickling)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing {STATE_FILE} (not a training checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a global outside the weights-only allowlist: refused, never run
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the global {found.group(1)}" if found else "objects"
        raise CheckpointError(f"{path}: refused training state: it holds {what}, not only tensors and plain "
                              "containers (not loaded)") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable training state ({str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: unsupported training state (expected version {STATE_VERSION})")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete training state (missing {', '.join(missing)})")
    return state


def load_weights_into(model: torch.nn.Module, directory: str | Path) -> None:
    """Copy a checkpoint's weights into an existing model (shapes are checked by the loader)."""
    loaded, _ = load_checkpoint(directory)
    if loaded.config.network_signature() != model.config.network_signature():
        raise CheckpointError(f"{directory}: network shape {loaded.config.network_signature()} does not match "
                              f"the model being trained {model.config.network_signature()}")
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest ``step_*`` training checkpoint under ``root`` (or ``root`` itself if it is one)."""
    root = Path(root)
    if (root / STATE_FILE).is_file():
        return root
    candidates = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return candidates[-1] if candidates else None


def export_model(checkpoint_dir: str | Path, target: str | Path) -> Path:
    """Copy the standard model files of a training checkpoint (no optimizer state) to ``target``."""
    from .checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

    checkpoint_dir, target = Path(checkpoint_dir), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        src = checkpoint_dir / name
        if not src.is_file():
            raise CheckpointError(f"{checkpoint_dir}: missing {name}")
        shutil.copy2(src, target / name)
    return target
