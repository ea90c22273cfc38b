"""Multi-Token Prediction (DeepSeek-V3 Sec. 2.2): D sequential modules, each predicting one more token.

Module k (k = 1..D) at position i combines the previous depth's hidden state with the embedding
of the token k places ahead, runs one transformer block, and predicts token i+k+1 with the main
model's shared embedding and output head:

    h'_{k,i} = eh_proj( [ enorm(Emb(t_{i+k})) ; hnorm(h_{k-1,i}) ] )     (V3 Eq. 21)
    h_{k,1:T-k} = Block_k(h'_{k,1:T-k})                                    (Eq. 22, causal)
    P_{k,i+k+1} = softmax(lm_head(shared_head.norm(h_{k,i})))              (Eq. 23)
    L = L_main + (lambda / D) sum_k CE_k                                   (Eqs. 24-25)

h_0 is the main model's final hidden state before its final norm. The concatenation puts the
embedding FIRST, as DeepSeek's released weights (and Megatron, torchtitan, vLLM) do; the paper's
Eq. 21 writes the hidden state first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from .block import Block
from .cache import KVCache
from .config import ModelConfig
from .norm import RMSNorm
from .rope import Rotary


class SharedHead(nn.Module):
    """The MTP module's own final norm (`shared_head.norm`); the head weight is the main model's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class MTPModule(Block):
    """One MTP depth: the Block submodules plus enorm, hnorm, eh_proj and shared_head.norm.

    forward(h_prev [B, S, H], emb [B, S, H], rotary, cache=None) -> h_k [B, S, H], where emb holds
    the embeddings of the tokens k places ahead of h_prev's positions. With a `KVCache` of one
    layer (`Transformer.new_mtp_cache`) it runs incrementally, like the main model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=cfg.mtp_moe)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev_BSH: torch.Tensor, emb_BSH: torch.Tensor, rotary: Rotary,
                cache: KVCache | None = None) -> torch.Tensor:
        x_BSH = linear(torch.cat((self.enorm(emb_BSH), self.hnorm(h_prev_BSH)), dim=-1),
                       self.eh_proj.weight)
        return super().forward(x_BSH, rotary, cache, 0)


def mtp_objective(logits_BSV: torch.Tensor, depth_logits: list[torch.Tensor], targets_BS: torch.Tensor,
                  mtp_lambda: float, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor,
                                                                       list[torch.Tensor]]:
    """L = CE_main + (lambda / D) sum_k CE_k (V3 Eq. 25). Returns (L, CE_main, [CE_1 .. CE_D]).

    targets_BS[:, i] is the token after input position i. The main logits [B, S, V] predict
    targets[:, i]; depth k's logits [B, S-k, V] at position i predict token i+k+1 of the input,
    i.e. targets[:, i+k]. Targets equal to `ignore_index` are skipped.
    """
    def ce(logits_BLV: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BLV.flatten(0, 1).float(), targets_BL.reshape(-1),
                               ignore_index=ignore_index)

    ce_main = ce(logits_BSV, targets_BS)
    ce_depths = [ce(logits_k, targets_BS[:, k:]) for k, logits_k in enumerate(depth_logits, start=1)]
    if not ce_depths:
        return ce_main, ce_main, []
    return ce_main + mtp_lambda / len(ce_depths) * torch.stack(ce_depths).sum(), ce_main, ce_depths


def mtp_loss(model, ids_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
             mtp_lambda: float = 0.3, ignore_index: int = -100):
    """`mtp_objective` of `model.forward_with_mtp` on inputs ids_BS and their next tokens targets_BS.

    Without targets, ids_BS[:, :-1] are the inputs and ids_BS[:, 1:] the targets.
    Returns (L, CE_main, [CE_1 .. CE_D]).
    """
    if targets_BS is None:
        if not isinstance(ids_BS, torch.Tensor) or ids_BS.dim() != 2 or ids_BS.shape[1] < 2:
            raise ValueError("mtp_loss without targets needs ids of shape [batch, seq] with seq >= 2, got "
                             f"{tuple(ids_BS.shape) if isinstance(ids_BS, torch.Tensor) else type(ids_BS)}")
        ids_BS, targets_BS = ids_BS[:, :-1], ids_BS[:, 1:]
    if targets_BS.shape != ids_BS.shape:
        raise ValueError(f"mtp_loss: targets of shape {tuple(targets_BS.shape)} do not match the "
                         f"inputs of shape {tuple(ids_BS.shape)}")
    logits_BSV, depth_logits = model.forward_with_mtp(ids_BS)
    return mtp_objective(logits_BSV, depth_logits, targets_BS, mtp_lambda, ignore_index)
