"""Per-call statistics of expert parallelism: who sent what to whom, and how even the work was.

`ExpertParallel` fills an `EPStats` after every forward (when built with `stats=True`): each rank
contributes its row of the traffic matrices and its routing counts, and one all_gather gives every
rank the whole picture. Ranks r and r' are on the same node when r // ranks_per_node equals
r' // ranks_per_node; the diagonal of the matrices never leaves its rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class EPStats:
    """One forward of an `ExpertParallel` layer, over every rank of its group.

    tokens_RR [W, W]: tokens rank i sent to rank j (once per rank, however many of its experts
        live there). pairs_RR [W, W]: (token, expert) pairs, the expert work rank j did for rank i.
    dispatch_bytes_RR / combine_bytes_RR [W, W]: bytes of the dispatch payload (tokens, plus FP8
        scales, expert ids and weights) and of the combine payload (per-token partial sums).
    nodes_per_token / max_nodes_per_token: distinct nodes a token's experts live on (mean, max).
    times: this rank's seconds in each phase of the forward (route, dispatch, experts, combine).
    """

    tokens_RR: torch.Tensor
    pairs_RR: torch.Tensor
    dispatch_bytes_RR: torch.Tensor
    combine_bytes_RR: torch.Tensor
    ranks_per_node: int
    nodes_per_token: float
    max_nodes_per_token: int
    times: dict[str, float] = field(default_factory=dict)

    @property
    def n_ranks(self) -> int:
        return self.tokens_RR.shape[0]

    def same_node_RR(self) -> torch.Tensor:
        """[W, W] bool: both ranks on one node."""
        node_R = torch.arange(self.n_ranks) // self.ranks_per_node
        return node_R.unsqueeze(1) == node_R.unsqueeze(0)

    def _split(self, matrix_RR: torch.Tensor) -> tuple[int, int]:
        """(intra-node, inter-node) totals of a matrix, the diagonal excluded."""
        off_RR = ~torch.eye(self.n_ranks, dtype=torch.bool)
        same_RR = self.same_node_RR()
        return int(matrix_RR[off_RR & same_RR].sum()), int(matrix_RR[~same_RR].sum())

    @property
    def intra_node_bytes(self) -> int:
        """Dispatch + combine bytes between different ranks of one node (NVLink in V3)."""
        return sum(self._split(m)[0] for m in (self.dispatch_bytes_RR, self.combine_bytes_RR))

    @property
    def inter_node_bytes(self) -> int:
        """Dispatch + combine bytes between nodes (InfiniBand in V3)."""
        return sum(self._split(m)[1] for m in (self.dispatch_bytes_RR, self.combine_bytes_RR))

    @property
    def rank_load(self) -> torch.Tensor:
        """(token, expert) pairs each rank computed: the column sums of pairs_RR."""
        return self.pairs_RR.sum(dim=0)

    @property
    def load_imbalance(self) -> float:
        """Busiest rank's load / mean rank load (1 = even; the all-to-all waits for the busiest)."""
        load_R = self.rank_load.double()
        return (load_R.max() / load_R.mean().clamp(min=1e-12)).item()

    def summary(self) -> dict:
        """Rounded headline numbers (no timings), for printing."""
        return {"tokens sent to other ranks": int(self.tokens_RR.sum() - self.tokens_RR.diagonal().sum()),
                "intra-node bytes": self.intra_node_bytes, "inter-node bytes": self.inter_node_bytes,
                "nodes per token": round(self.nodes_per_token, 3),
                "max nodes per token": self.max_nodes_per_token,
                "max/mean rank load": round(self.load_imbalance, 3)}


def gather_stats(row: dict[str, torch.Tensor], nodes_T: torch.Tensor, ranks_per_node: int,
                 times: dict[str, float], group: dist.ProcessGroup | None) -> EPStats:
    """All-gather every rank's rows ({name: [W] counts}) and node counts per token into `EPStats`.

    The message lives on the device of the counts (the collective backend's device).
    """
    names = ("tokens", "pairs", "dispatch_bytes", "combine_bytes")
    top = nodes_T.max() if nodes_T.numel() else nodes_T.new_tensor(0)
    nodes = torch.stack([nodes_T.sum(), nodes_T.new_tensor(nodes_T.numel()), top]).double()
    local = torch.cat([row[n].double() for n in names] + [nodes])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    n = len(row["tokens"])
    matrices = [table[:, i * n:(i + 1) * n].round().long() for i in range(len(names))]
    node_sum, token_count, node_max = table[:, -3].sum(), table[:, -2].sum(), table[:, -1].max()
    return EPStats(*matrices, ranks_per_node=ranks_per_node,
                   nodes_per_token=float(node_sum / token_count.clamp(min=1)),
                   max_nodes_per_token=int(node_max), times=times)


def format_matrix(matrix_RR: torch.Tensor) -> str:
    """A [W, W] integer matrix as aligned text, rows = senders, columns = receivers."""
    width = max(len(str(int(v))) for v in matrix_RR.flatten().tolist() + [matrix_RR.shape[0]]) + 1
    header = " " * 6 + "".join(f"{j:>{width}}" for j in range(matrix_RR.shape[1]))
    rows = [f"{i:>5} " + "".join(f"{int(v):>{width}}" for v in row)
            for i, row in enumerate(matrix_RR.tolist())]
    return "\n".join([header, *rows])
