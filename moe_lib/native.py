"""The C++ CPU kernels of `moe_lib/csrc/`, compiled on first use for this machine.

`torch.utils.cpp_extension` builds `csrc/experts_cpu.cpp` once per torch version and instruction
set (about a minute; cached in `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`) and
registers its operators as `torch.ops.moe_lib_cpu.*`. The code is compiled with AVX2 and FMA where
the CPU capability torch runs at (`torch.backends.cpu.get_cpu_capability()`, which
`ATEN_CPU_CAPABILITY` caps) includes them, else for plain x86-64.

`ops()` returns the operators, or None where they cannot be built (no C++ compiler or no `ninja`;
a warning says why, once) or are switched off with `MOE_LIB_NATIVE=0`; `moe_lib.kernels` then runs
the same tasks from Python.

The kernels' large results (1 MB and more: the gate/up product saved for the backward, the weight
gradients, dx) come from a pool of buffers they keep: freed, a buffer waits for the next call of the
same shape instead of going back to the system, which saves the page faults of a fresh mapping
(about 15% of a forward+backward at d_model 512). At most `MOE_LIB_POOL_MB` (default 1024) MB wait
in the pool; `release_pool()` frees them.

The shared expert, given with the routed experts' plan, runs in the same call as one more job
(`moe_lib.kernels.FUSE_SHARED`, from `MOE_LIB_FUSE_SHARED`, '0' runs it as a call of its own), and
the backward returns one weight gradient per expert, split experts' partial gradients added in C++.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

SOURCE = Path(__file__).with_name("csrc") / "experts_cpu.cpp"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def isa() -> str:
    """'avx2' where torch runs at AVX2 or above (and the compiler may use AVX2 and FMA), else 'default'."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "avx2" if capability.startswith(("AVX2", "AVX512")) else "default"


def enabled() -> bool:
    """Whether the native kernels may be used: MOE_LIB_NATIVE is not '0', and not inside `disabled()`."""
    return os.environ.get("MOE_LIB_NATIVE", "1") != "0" and not _STATE.get("disabled", False)


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every caller takes the Python path (as MOE_LIB_NATIVE=0 would; for
    comparisons in one process, e.g. `python -m moe_lib.bench cpu`)."""
    before = _STATE.get("disabled", False)
    _STATE["disabled"] = True
    try:
        yield
    finally:
        _STATE["disabled"] = before


def _build():
    from torch.utils.cpp_extension import load

    level = isa()
    # -fopenmp: at::parallel_for is a header template that runs serially without it; the library it
    # links, libgomp.so.1, resolves to the copy torch has already loaded (one OpenMP runtime)
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"] + (["-mavx2", "-mfma"] if level == "avx2" else [])
    load(name=f"moe_lib_cpu_{level}", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    return torch.ops.moe_lib_cpu


def ops():
    """torch.ops.moe_lib_cpu, built on first call; None if disabled or if the build failed."""
    if not enabled():
        return None
    if "ops" not in _STATE:
        with _LOCK:
            if "ops" not in _STATE:
                try:
                    _STATE["ops"] = _build()
                except Exception as error:  # no compiler, no ninja, a read-only cache: fall back
                    _STATE["ops"] = None
                    _STATE["error"] = error
                    warnings.warn(f"moe_lib's C++ CPU kernels could not be built ({type(error).__name__}: "
                                  f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
                                  "the experts run the slower Python tasks", RuntimeWarning, stacklevel=2)
    return _STATE["ops"]


def ops_for(*tensors: torch.Tensor, dtype: torch.dtype | None = torch.float32):
    """`ops()` where the native kernels may take these tensors: all on the CPU (the first of dtype
    `dtype` unless None), outside dispatch modes (FlopCounterMode, fake tensors, torch.compile's
    tracing); else None."""
    if any(t.device.type != "cpu" for t in tensors) or (dtype is not None and tensors[0].dtype != dtype):
        return None
    if is_in_torch_dispatch_mode() or torch.compiler.is_compiling():
        return None
    return ops()


def build_error() -> Exception | None:
    """Why the last build failed, if it did."""
    return _STATE.get("error")  # type: ignore[return-value]


def release_pool() -> int:
    """Frees the buffers the C++ kernels keep for reuse (see the module's docstring); returns how many
    bytes were freed (0 where the kernels are not built)."""
    built = ops()
    return 0 if built is None else int(built.pool_trim())
