"""Optional compiled kernels: a block's cached forward (decoding steps, prefills) and the phase
machinery of uncached sequences with its backward (training; ``core_model.phase_fields``).

At batch 1 on a CPU a decoding step is bound by kernel dispatch: between a block's input
projection and its attention kernel sit about thirty tiny kernels (splitting heads, RoPE,
writing k and v into the cache, and for the resonant parts the phasors, the Kuramoto mean field
and step, the gate and the attention phase features). ``csrc/phase_step.cpp`` does all of it in
one call, for the full model and the vanilla setting alike; blocks use it for every forward with
a cache, without padding and without gradients on float32 CPU tensors (decoding steps,
prefills of unpadded prompts, the Lyapunov twin's window forwards). ``csrc/phase_fields.cpp`` (same
module) serves forwards without a cache, padding or external field (training, uncached
forwards): the phasors, mean field, order parameter, gate, Kuramoto step and attention phase
features of a whole sequence, forward and backward, in two calls per block instead of about
fifty small kernels (see ``core_model/phase_fields.py``). Everything else (padded batches,
external fields in training, other devices and dtypes, autocast) runs the eager code. Both
paths compute the same equations (tests compare values to 1e-5, gradients to 1e-4). The kernels
release the GIL while they run (they touch only tensors), so a forward in another thread (the
Lyapunov twin's window on its worker) runs beside them instead of waiting for them.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja; about 30 s, once per machine: the build is cached under ``TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). If that fails the eager path is used, with one warning.
``RESO_FUSED=0`` switches the kernel off. Which path ran is visible in
``core_model.fused.status()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("phase_step.cpp", "phase_fields.cpp")]
NAME = "reso_block_step_v6"  # bump when the kernel's interface changes
_lock = threading.Lock()
_kernel: ModuleType | None = None
_state = "not loaded"


def phase_kernel() -> ModuleType | None:
    """The compiled module (``phase_step``), building it on first call; None if unavailable."""
    global _kernel, _state
    if _state != "not loaded":
        return _kernel
    with _lock:
        if _state != "not loaded":
            return _kernel
        if os.environ.get("RESO_FUSED", "1") == "0":
            _state = "off (RESO_FUSED=0)"
            return None
        from torch.utils import cpp_extension

        try:
            if not any(Path(cpp_extension._get_build_directory(NAME, verbose=False)).glob("*.so")):
                print("reso: building the fused decoding kernel (once per machine, about 30 s)",
                      file=sys.stderr, flush=True)
            _kernel = cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], extra_cflags=["-O3", "-ffp-contract=off"],
                                         verbose=False)
            _state = "fused"
        except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
            _state = f"eager (build failed: {exc!s:.200})"
            warnings.warn(f"fused decoding kernel unavailable, using the eager path: {exc!s:.500}",
                          RuntimeWarning, stacklevel=2)
    return _kernel


def status() -> str:
    """'fused', 'not loaded' (no decoding step yet), or why the eager path is used."""
    return _state
