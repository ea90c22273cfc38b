"""Expert parallelism on torch.distributed: `ExpertParallel` shards a `DeepSeekMoE`'s routed experts
over the ranks of a process group (gloo on the CPU, NCCL on GPUs).

- `layer`: `ExpertParallel`, the wrapped layer (replicated gate and shared experts).
- `dispatch`: the all-to-all dispatch and combine, with autograd.
- `fp8`: e4m3 dispatch payloads with per-128-channel power-of-two scales.
- `redundant`: redundant experts for inference (placement from measured loads).
- `stats`: per-call traffic and load statistics.
- `cost`: a communication model of DeepSeek-V3's 64-way expert parallelism.
- `launch`: run functions on N local ranks (`LocalRanks`, `run_local`) or under torchrun.
- `demo`: the check every rank runs for `python -m moe_lib.parallel` (under torchrun or on local
  ranks) and for chapter 8: a sharded layer against the unsharded one, and its traffic.
"""

from .launch import LocalRanks, RankError, run_local
from .layer import ExpertParallel
from .redundant import Placement, plan_redundant
from .stats import EPStats

__all__ = ["EPStats", "ExpertParallel", "LocalRanks", "Placement", "RankError", "plan_redundant",
           "run_local"]
