"""Which operations of a function make the host wait for the device, found on any device.

On a GPU, the host queues kernels and runs ahead. It must stop and wait whenever it needs a value
the device computes: a Python number (`.item()`, `.tolist()`, `if tensor:`, `int(tensor)`), or an
output whose *shape* depends on the data (`nonzero`, boolean-mask indexing, `bincount`, `unique`).
Such a wait empties the queue, and none is allowed inside a CUDA-graph capture.

`host_syncs(fn, *args)` runs `fn` under a dispatch mode that records those operations. It works on
CPU tensors, where nothing actually waits, so the test suite can check GPU code without a GPU;
on CUDA, `torch.cuda.set_sync_debug_mode("error")` is the ground truth. Not seen here: copies from
pageable host memory to the device, which also block (`torch.tensor(list, device="cuda")`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
#: aten operations whose result the host needs: a scalar, or the size of a data-dependent output
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten.argwhere.default, aten.masked_select.default,
            aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
#: Tensor methods that copy values to the host without an aten operation on the CPU
SYNC_METHODS = ("tolist",)


def _bool_index(func, args) -> bool:
    """Boolean-mask indexing (x[mask] or x[mask] = v) has a data-dependent size: a hidden nonzero."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(t is not None and t.dtype == torch.bool for t in args[1])


class _SyncRecorder(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.found.append(str(func.overloadpacket.__name__))
        elif _bool_index(func, args):
            self.found.append(f"{func.overloadpacket.__name__} with a boolean mask")
        return func(*args, **kwargs)


class _MethodRecorder(TorchFunctionMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in SYNC_METHODS:
            self.found.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_syncs(fn: Callable, *args, **kwargs) -> list[str]:
    """Run fn(*args, **kwargs) and return the host-synchronising operations it called, in order."""
    found: list[str] = []
    with _MethodRecorder(found), _SyncRecorder(found):
        fn(*args, **kwargs)
    return found
