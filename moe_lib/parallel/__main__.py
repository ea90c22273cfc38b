"""``python -m moe_lib.parallel``: shard a layer, check it against the unsharded one, print the traffic.

Under torchrun every process is one rank (NCCL on GPUs, gloo on the CPU):

    torchrun --nproc-per-node 4 -m moe_lib.parallel --ranks-per-node 2 --max-nodes 1

Without torchrun it starts `--ranks` local gloo ranks itself. Rank r gets (r + 1) * tokens // ranks
tokens (uneven on purpose); with --max-nodes the router is node-limited (V3) over the group's nodes.
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from .demo import report, run_demo
from .launch import LocalRanks, init_from_env


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.parallel",
                                     description="Check an expert-parallel layer against the unsharded one.")
    parser.add_argument("--ranks", type=int, default=4, help="local ranks to start without torchrun")
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the last rank")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--max-nodes", type=int, default=None, help="node-limited routing: M nodes")
    parser.add_argument("--fp8", action="store_true", help="FP8 (e4m3) dispatch")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    options = dict(tokens=args.tokens, ranks_per_node=args.ranks_per_node, max_nodes=args.max_nodes,
                   fp8_dispatch=args.fp8, experts=args.experts, top_k=args.top_k, d_model=args.d_model,
                   seed=args.seed)
    if "RANK" in os.environ:                      # under torchrun: this process is one rank
        init_from_env()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, run_demo(**options))
        if dist.get_rank() == 0:
            print(report(gathered))
        dist.destroy_process_group()
    else:
        with LocalRanks(args.ranks) as ranks:
            print(report(ranks.run(run_demo, **options)))


if __name__ == "__main__":
    main()
