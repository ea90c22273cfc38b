"""A communication model of expert parallelism at DeepSeek-V3's scale, fed by our router's decisions.

The set-up of DeepSeek-V3 (arXiv 2412.19437, Secs. 3.2.2 and 3.3): 64-way expert parallelism over
8 nodes of 8 GPUs, 256 routed experts (4 per GPU), hidden size 7168, top-8 routing limited to M = 4
nodes, dispatch in FP8, combine in BF16. The model predicts the time of one layer's dispatch and
combine from where our real router (`moe_lib.router.route`) sends sampled tokens.

Assumptions, each a simplification the reader can change:

A1. Bandwidth per GPU and direction: NVLink 160 GB/s and InfiniBand (IB) 50 GB/s, as DeepSeek-V3
    states (`Cluster.v3`). `Cluster.deepep` uses DeepEP's measured bandwidths instead (H800, 4096
    tokens, hidden 7168, top-8: 153/158 GB/s intra-node dispatch/combine, 51/50 GB/s inter-node
    RDMA at EP64), as a cross-check. Bandwidth is all there is: no latency, no congestion, no
    protocol overhead, no overlap with computation.
A2. Two hops, as V3 dispatches: a token crosses IB at most once per destination node, to the GPU
    with the same in-node index as its source GPU, and NVLink forwards it from there to every
    other GPU of that node that hosts one of its experts. Tokens for GPUs of the source's own node go
    over NVLink directly. A GPU that hosts several of a token's experts receives it once. The
    combine is the same traffic in the opposite direction.
A3. The IB and NVLink hops overlap fully (pipelined chunks), so a GPU's time is
    max(IB bytes / IB bandwidth, NVLink bytes / NVLink bandwidth), where a link's bytes are the
    larger of what the GPU sends and receives on it; an all-to-all lasts as long as its busiest GPU.
A4. Payload per token copy: FP8 dispatch = H bytes + one float32 scale per 128 channels (7392 bytes
    for H = 7168), BF16 dispatch = 2H; combine = 2H (BF16). The routing metadata (K ids and
    weights, under 2%) is left out.
A5. Routing: sampled tokens with logits = noise + skew x a fixed per-expert preference
    (`moe_lib.synthetic.skewed_logits`; skew 0 is a balanced router, as loss-free balancing
    keeps V3's), routed by `moe_lib.router.route` with V3's config (sigmoid scores, top-8) and
    the node limit under study. Sampled token i belongs to GPU i mod 64. Traffic is scaled from
    the sample to `tokens_per_gpu` tokens per GPU (default 4096, DeepEP's benchmark), so the
    busiest GPU's share carries the sample's noise (a few percent at 256 tokens per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import MoEConfig
from ..presets import DEEPSEEK_V3
from ..router import route
from ..synthetic import skewed_logits
from . import fp8
from .redundant import Placement, plan_redundant


@dataclass(frozen=True)
class Cluster:
    """Nodes of GPUs and per-GPU bandwidths (GB/s = 1e9 bytes/s) for dispatch and combine."""

    nodes: int = 8
    gpus_per_node: int = 8
    nvlink_dispatch: float = 160.0
    nvlink_combine: float = 160.0
    ib_dispatch: float = 50.0
    ib_combine: float = 50.0

    @staticmethod
    def v3(nodes: int = 8) -> Cluster:
        """DeepSeek-V3's figures: NVLink 160 GB/s, IB 50 GB/s per GPU (Sec. 3.2.2)."""
        return Cluster(nodes=nodes)

    @staticmethod
    def deepep(nodes: int = 8) -> Cluster:
        """DeepEP's measured bandwidths on H800 (intra-node EP8, inter-node EP64), as a cross-check."""
        return Cluster(nodes, 8, 153.0, 158.0, 51.0, 50.0)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Traffic:
    """Token copies per GPU on each link, for the sampled tokens, plus per-token routing facts.

    ib_out_G / ib_in_G / nv_out_G / nv_in_G [G]: copies sent / received over IB and NVLink.
    nodes_per_token, experts_per_node, gpus_per_node: means over tokens (per reached node).
    gpu_load_G [G]: (token, expert) pairs each GPU computes; tokens: the sample size.
    """

    ib_out_G: torch.Tensor
    ib_in_G: torch.Tensor
    nv_out_G: torch.Tensor
    nv_in_G: torch.Tensor
    gpu_load_G: torch.Tensor
    nodes_per_token: float
    experts_per_node: float
    gpus_per_node: float
    tokens: int

    @property
    def load_imbalance(self) -> float:
        load = self.gpu_load_G.double()
        return (load.max() / load.mean()).item()


@dataclass(frozen=True)
class CommCost:
    """Predicted per-layer times (microseconds; per link: the busiest GPU on that link) and the
    busiest GPU's dispatch bytes on each link."""

    dispatch_us: float
    combine_us: float
    dispatch_ib_us: float
    dispatch_nvlink_us: float
    combine_ib_us: float
    combine_nvlink_us: float
    ib_bytes: float
    nvlink_bytes: float
    traffic: Traffic

    @property
    def bound(self) -> str:
        """Which link sets the dispatch time."""
        return "IB" if self.dispatch_ib_us >= self.dispatch_nvlink_us else "NVLink"


def v3_routing_config(top_k: int = 8, max_nodes: int | None = 4, nodes: int = 8) -> MoEConfig:
    """V3's router (sigmoid, 256 experts) with node-limited routing to `max_nodes` of `nodes` nodes
    (None: no limit). V3's own 8 groups / 4 kept ARE this limit with nodes = 8 (K/M = 2)."""
    cfg = DEEPSEEK_V3.replace(top_k=top_k, n_groups=1, topk_groups=1)
    if max_nodes is None:
        return cfg
    return cfg.replace(route_limit="node", limit_units=nodes, limit_max=max_nodes)


@lru_cache(maxsize=64)
def sample_routing(cfg: MoEConfig, n_tokens: int, skew: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Expert ids [T, K] of `n_tokens` synthetic tokens routed by `moe_lib.router.route` (A5).

    Cached (widgets ask for the same routing many times): treat the result as read-only.
    """
    logits_TE = skewed_logits(n_tokens, cfg.n_routed, skew, torch.Generator().manual_seed(seed))
    return route(logits_TE, None, cfg).indices


def traffic(indices_TK: torch.Tensor, cluster: Cluster, n_experts: int,
            placement: Placement | None = None) -> Traffic:
    """Where the sampled tokens' copies travel under the two-hop scheme (A2).

    `placement` maps experts to GPUs (default: contiguous blocks, E / G per GPU); with redundant
    experts a copied expert's tokens are split between its copies (`Placement.assign`).
    """
    n_gpus, per_node = cluster.gpus, cluster.gpus_per_node
    placement = placement or Placement.contiguous(n_experts, n_gpus)
    gpu_TK = placement.assign(indices_TK) // placement.slots_per_rank
    n_tokens = gpu_TK.shape[0]
    hit_TG = torch.zeros(n_tokens, n_gpus, dtype=torch.bool).scatter_(1, gpu_TK, True)  # GPUs reached
    hit_TN = hit_TG.view(n_tokens, cluster.nodes, per_node).any(dim=2)  # [T, N] nodes reached
    source_T = torch.arange(n_tokens) % n_gpus
    source_node_T, source_index_T = source_T // per_node, source_T % per_node
    node_N = torch.arange(cluster.nodes)
    remote_TN = hit_TN & (node_N != source_node_T.unsqueeze(1))
    landing_TN = node_N * per_node + source_index_T.unsqueeze(1)        # IB lands on the same index
    ib_out = torch.bincount(source_T, weights=remote_TN.sum(dim=1).double(), minlength=n_gpus)
    ib_in = torch.bincount(landing_TN[remote_TN], minlength=n_gpus).double()
    # NVLink: from the landing GPU (remote nodes) or the source (own node) to every other GPU reached
    gpu_G = torch.arange(n_gpus)
    sender_TG = torch.where(gpu_G // per_node == source_node_T.unsqueeze(1), source_T.unsqueeze(1),
                            landing_TN[:, gpu_G // per_node])
    nv_TG = hit_TG & (sender_TG != gpu_G)
    nv_out = torch.bincount(sender_TG[nv_TG], minlength=n_gpus).double()
    nv_in = nv_TG.sum(dim=0).double()
    nodes_T = hit_TN.sum(dim=1).double()
    gpus_T = hit_TG.sum(dim=1).double()
    return Traffic(ib_out, ib_in, nv_out, nv_in, torch.bincount(gpu_TK.flatten(), minlength=n_gpus),
                   nodes_T.mean().item(), (indices_TK.shape[1] / nodes_T).mean().item(),
                   (gpus_T / nodes_T).mean().item(), n_tokens)


def comm_cost(tr: Traffic, cluster: Cluster, d_model: int = 7168, tokens_per_gpu: int = 4096,
              fp8_dispatch: bool = True) -> CommCost:
    """Dispatch and combine time of one layer (A1, A3, A4), scaled to `tokens_per_gpu` tokens."""
    scale = tokens_per_gpu * cluster.gpus / tr.tokens
    dispatch_bytes = fp8.payload_bytes(d_model) if fp8_dispatch else 2 * d_model
    combine_bytes = 2 * d_model
    ib_copies = torch.maximum(tr.ib_out_G, tr.ib_in_G) * scale
    nv_copies = torch.maximum(tr.nv_out_G, tr.nv_in_G) * scale

    def seconds(copies, payload, bandwidth):
        return copies * payload / (bandwidth * 1e9)

    d_ib, d_nv = seconds(ib_copies, dispatch_bytes, cluster.ib_dispatch), seconds(
        nv_copies, dispatch_bytes, cluster.nvlink_dispatch)
    c_ib, c_nv = seconds(ib_copies, combine_bytes, cluster.ib_combine), seconds(
        nv_copies, combine_bytes, cluster.nvlink_combine)
    return CommCost(torch.maximum(d_ib, d_nv).max().item() * 1e6,
                    torch.maximum(c_ib, c_nv).max().item() * 1e6,
                    d_ib.max().item() * 1e6, d_nv.max().item() * 1e6, c_ib.max().item() * 1e6,
                    c_nv.max().item() * 1e6,
                    (ib_copies.max() * dispatch_bytes).item(), (nv_copies.max() * dispatch_bytes).item(), tr)


def predict(nodes: int = 8, max_nodes: int | None = 4, skew: float = 0.0, fp8_dispatch: bool = True,
            redundant_slots: int = 0, top_k: int = 8, cluster: Cluster | None = None,
            tokens_per_gpu: int = 4096, sample_per_gpu: int = 256, seed: int = 0) -> CommCost:
    """The whole model for one setting: sample and route tokens, place experts, price the traffic.

    redundant_slots: extra expert slots per GPU filled by `plan_redundant` from the sample's expert
    loads, copies kept on their expert's node (V3 Sec. 3.4; an inference feature).
    """
    cluster = cluster or Cluster.v3(nodes)
    cfg = v3_routing_config(top_k, max_nodes, cluster.nodes)
    indices_TK = sample_routing(cfg, sample_per_gpu * cluster.gpus, skew, seed)
    placement = None
    if redundant_slots:
        load_E = torch.bincount(indices_TK.flatten(), minlength=cfg.n_routed)
        placement = plan_redundant(load_E, cluster.gpus, redundant_slots, cluster.gpus_per_node)
    return comm_cost(traffic(indices_TK, cluster, cfg.n_routed, placement), cluster, cfg.d_model,
                     tokens_per_gpu, fp8_dispatch)


def expected_nodes_uniform(n_experts: int, nodes: int, top_k: int) -> float:
    """Mean distinct nodes of K distinct experts drawn uniformly: N (1 - C(E - E/N, K) / C(E, K))."""
    miss = 1.0
    per_node = n_experts // nodes
    for i in range(top_k):
        miss *= (n_experts - per_node - i) / (n_experts - i)
    return nodes * (1 - miss)
