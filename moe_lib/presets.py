"""Published configurations (DeepSeekMoE 16B, DeepSeek-V2, DeepSeek-V3) and the book's reference layer."""

from __future__ import annotations

from .accounting import MLAShape, ModelShape
from .config import MoEConfig

#: The book's CPU reference layer: small enough for a laptop, shaped like V3.
BOOK = MoEConfig(d_model=256, d_expert=128, n_routed=64, n_shared=1, top_k=6)

DEEPSEEK_MOE_16B = MoEConfig(d_model=2048, d_expert=1408, n_routed=64, n_shared=2, top_k=6,
                             score_func="softmax", norm_topk_prob=False, bias_update="none",
                             aux_loss="expert", aux_loss_alpha=0.001)
DEEPSEEK_V2 = MoEConfig(d_model=5120, d_expert=1536, n_routed=160, n_shared=2, top_k=6,
                        n_groups=8, topk_groups=3, score_func="softmax", norm_topk_prob=False,
                        route_scale=16.0, bias_update="none", aux_loss="expert",
                        aux_loss_alpha=0.003)
DEEPSEEK_V3 = MoEConfig(d_model=7168, d_expert=2048, n_routed=256, n_shared=1, top_k=8,
                        n_groups=8, topk_groups=4, score_func="sigmoid", norm_topk_prob=True,
                        route_scale=2.5, bias_update_speed=1e-3, aux_loss="sequence",
                        aux_loss_alpha=1e-4)

DEEPSEEK_V3_MODEL = ModelShape(vocab_size=129280, n_layers=61, n_dense_layers=3, d_dense=18432,
                               moe=DEEPSEEK_V3, mla=MLAShape())
