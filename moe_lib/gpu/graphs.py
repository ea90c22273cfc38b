"""The whole MoE layer without host synchronisation, and its capture as a CUDA graph for decoding.

`DeepSeekMoE.forward` checks its router logits for NaN/inf, records routing statistics and, in
training, counts the loss-free loads with a bincount behind a boolean mask: all of these read device
values on the host (see `moe_lib.gpu.syncs`). `moe_forward` computes the same output from the
library's pure routing functions and `dispatch_device`, counts the loads with a scatter-add, and
reads nothing back:

    y = sum_k w_{t,k} Expert_{e_{t,k}}(x_t) + Shared(x_t)      (V3 Eq. 12, without the residual)

so a decoding step of fixed batch size can be captured once and replayed (`GraphedMoE`): one launch
instead of a few dozen, the same output. On CUDA the shared expert can run on a side stream,
concurrently with the routing and the routed experts.
"""

from __future__ import annotations

import torch

from ..balance import apply_bias_update
from ..kernels import linear
from ..router import combine_weights, router_scores, select_experts
from .grouped import dispatch_device


def moe_forward(layer, x: torch.Tensor, side_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """`layer(x)` of a dropless `DeepSeekMoE` with no host synchronisation (no input check, no
    `last_routing`).

    side_stream: a CUDA stream for the shared expert, or None to run everything on the current one.
    Differentiable. In training mode it counts the loads for the loss-free bias on the device (a
    scatter-add into `gate.tokens_per_expert`; `bias_update="forward"` also applies the update);
    auxiliary losses are left to `DeepSeekMoE.forward`.
    """
    cfg = layer.cfg
    if cfg.capacity_factor is not None:
        raise ValueError(f"moe_forward supports dropless layers only (capacity_factor=None, as in V3), "
                         f"got capacity_factor={cfg.capacity_factor}")
    if layer.training and cfg.aux_loss != "none":
        raise ValueError(f"moe_forward computes no auxiliary loss (aux_loss={cfg.aux_loss!r}): train "
                         f"with DeepSeekMoE.forward, or use aux_loss='none'")
    x_TH = x.reshape(-1, cfg.d_model)
    overlap = side_stream is not None and layer.shared_experts is not None
    if overlap:
        shared_TH = _start_shared(side_stream, layer.shared_experts, x_TH)
    dtype = torch.promote_types(x.dtype, torch.float32)  # route in fp32 at least, as the Router does
    scores_TE = router_scores(linear(x_TH.to(dtype), layer.gate.weight.to(dtype)), cfg.score_func)
    with torch.no_grad():
        indices_TK = select_experts(scores_TE, layer.gate.correction_bias, cfg.top_k, *cfg.selection_groups)
    weights_TK = combine_weights(scores_TE, indices_TK, cfg.norm_topk_prob, cfg.route_scale)
    if layer.training and cfg.bias_update != "none":
        count_loads(layer.gate, indices_TK)
        if cfg.bias_update == "forward":
            apply_bias_update(layer.gate)
    y_TH = dispatch_device(x_TH, indices_TK, weights_TK, layer.experts)
    if overlap:
        torch.cuda.current_stream().wait_stream(side_stream)
        shared_TH.record_stream(torch.cuda.current_stream())  # read here, allocated on the side stream
        y_TH = y_TH + shared_TH
    elif layer.shared_experts is not None:
        y_TH = y_TH + layer.shared_experts(x_TH)
    return y_TH.view(x.shape)


@torch.no_grad()
def count_loads(router, indices_TK: torch.Tensor) -> None:
    """tokens_per_expert += tokens routed to each expert, as one scatter-add (no bincount, whose size
    the host would have to read; every index is valid in a dropless layer)."""
    ones_N = torch.ones(indices_TK.numel(), device=indices_TK.device, dtype=router.tokens_per_expert.dtype)
    router.tokens_per_expert.index_add_(0, indices_TK.reshape(-1), ones_N)


def _start_shared(stream: torch.cuda.Stream, shared_experts, x_TH: torch.Tensor) -> torch.Tensor:
    """Queue the shared expert on `stream` after the work queued so far; the caller joins it."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        shared_TH = shared_experts(x_TH)
    x_TH.record_stream(stream)  # x must outlive the side stream's use of it
    return shared_TH


class GraphedMoE:
    """`moe_forward(layer, x)` captured as one CUDA graph for inputs shaped like `example` (inference).

    Call it with a tensor of that shape: the input is copied into the graph's static buffer, the graph
    replayed, and the graph's static output returned (overwritten by the next call: clone it to
    keep it). Weights and the correction bias are read in place, so `update_bias` and optimizer steps
    are seen by later replays; a new shape needs a new capture.
    """

    def __init__(self, layer, example: torch.Tensor, side_stream: bool = True, warmup: int = 3):
        self.stream = torch.cuda.Stream() if side_stream else None
        self.x = example.detach().clone()
        capture_stream = torch.cuda.Stream()
        capture_stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(capture_stream):
            for _ in range(warmup):  # kernels chosen and memory pooled before capture
                moe_forward(layer, self.x, self.stream)
        torch.cuda.current_stream().wait_stream(capture_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.y = moe_forward(layer, self.x, self.stream)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.graph.replay()
        return self.y
