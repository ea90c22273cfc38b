"""Training presets: `tiny` (the shipped checkpoint: under 10 minutes on 2 CPU cores) and `test`
(seconds, byte-level).

Both use DeepSeek-V3's MoE recipe at small scale: sigmoid gating with the loss-free bias updated once
per optimizer step (bias_update="step"), group-limited routing, one shared expert, route scale 2.5,
and MTP modules.

`tiny` was chosen by measurement on the stdlib corpus (1 thread; validation CE in nats per byte):
- at equal tokens and cost, 32 experts of width 32 (top-4) reached 2.29 after 410k tokens where 16
  of width 64 reached 2.37, and 6 layers 2.31 at 20% more time;
- lr 3e-3 beat 6e-3 and 1e-2 (2.42, 2.65 after 100 steps);
- smaller batches learned more per token: 1.2M tokens gave 1.53 with 4 windows per step and 1.59
  with 8;
- bias speed 1e-2 kept MaxVio_global near 1.0 where 1e-3 left 4 to 6.5 after 100 steps, at equal
  loss: a run of ~1000 steps needs the larger speed (V3's 1e-3 served ~10^5 steps);
- the MTP blocks use a dense FFN (`mtp_moe=False`): a cheaper draft for speculative decoding;
- byte-level BPE with 1024 ids (`tokenizer="bpe"`) over bytes, 2 threads: at 1100 steps each, bytes
  reached 1.609 nats per byte and BPE 1.365 (an exploratory run with an off-the-shelf BPE trainer
  and GPT-2's chunking; 2.7 bytes per id; a step costs about 1.3x more for the larger head), and
  greedy samples went from "the the the" to Python's structure (imports, defs, docstrings) though
  they still loop. 1600 steps fit the 10 minutes with a margin (8.3 minutes
  wall on the 2-core machine of the shipped run): 1.31 nats per byte. 2.4M parameters in all
  (9.6 MB in float32, under the 10 MB budget).
"""

from __future__ import annotations

from ..config import MoEConfig
from ..model import ModelConfig
from .loop import TrainConfig

TINY_MODEL = ModelConfig(
    vocab_size=1024, d_model=128, n_layers=4, n_dense_layers=1, d_dense=384, n_heads=4, q_lora_rank=0,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256,
    moe=MoEConfig(d_model=128, d_expert=32, n_routed=32, n_shared=1, top_k=4, n_groups=4, topk_groups=2,
                  score_func="sigmoid", route_scale=2.5, bias_update="step", bias_update_speed=1e-2,
                  aux_loss_inject=False),
    mtp_depth=2, mtp_moe=False)

TEST_MODEL = ModelConfig(
    vocab_size=256, d_model=32, n_layers=2, n_dense_layers=1, d_dense=64, n_heads=2, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=32,
    moe=MoEConfig(d_model=32, d_expert=16, n_routed=8, n_shared=1, top_k=2, n_groups=4, topk_groups=2,
                  score_func="sigmoid", route_scale=2.5, bias_update="step", bias_update_speed=1e-2,
                  aux_loss_inject=False),
    mtp_depth=1)

PRESETS = {
    "tiny": TrainConfig(model=TINY_MODEL, tokenizer="bpe", steps=1600, batch_size=4, grad_accum=1, lr=3e-3,
                        warmup_steps=50, eval_every=100, eval_windows=64, log_every=10,
                        checkpoint_every=100,
                        sample_prompts=("import os\nimport ", "class Reader:\n    def __init__(self, ",
                                        "        if ", "    def ", "def main(", "# Copyright",
                                        "    return ", "for i in range(", '"""Utilities for',
                                        "try:\n    "),
                        sample_tokens=120),
    "test": TrainConfig(model=TEST_MODEL, steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2,
                        eval_every=3, eval_windows=8, log_every=1, sample_prompts=("def ",),
                        sample_tokens=8),
}


def make_config(preset: str = "tiny", *, mtp_depth: int | None = None, aux_loss: str | None = None,
                aux_alpha: float | None = None, bias_speed: float | None = None, **changes) -> TrainConfig:
    """A preset with changes: TrainConfig fields by name (steps=, seed=, ...) plus the model knobs
    that experiments vary: MTP depth, auxiliary loss and its alpha, loss-free bias speed (0 = off)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    moe = cfg.model.moe
    if aux_loss is not None or aux_alpha is not None:
        moe = moe.replace(aux_loss=aux_loss or moe.aux_loss, aux_loss_inject=False,
                          aux_loss_alpha=moe.aux_loss_alpha if aux_alpha is None else aux_alpha)
    if bias_speed is not None:
        moe = moe.replace(bias_update="step" if bias_speed > 0 else "none", bias_update_speed=bias_speed)
    model = cfg.model.replace(moe=moe, **({} if mtp_depth is None else {"mtp_depth": mtp_depth}))
    return cfg.replace(model=model, **changes)
