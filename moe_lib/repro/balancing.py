"""Reproduction 1: load balancing with sigmoid gating, as in Wang et al. 2024 (Loss-Free Balancing,
Table 2 and the update-rate ablation) and DeepSeek-V3 Sec. 4.5.3 (batch- vs sequence-wise aux loss).

One tiny model (the same weights at initialisation, the same data order for a given seed), the same
steps; only the balancing changes:

    none              no auxiliary loss, no bias
    seq-aux a         V3's sequence-wise loss (Eqs. 17-20), alpha = a, summed over the MoE layers
    batch-aux a       the same loss over the whole batch (V3 Sec. 4.5.3)
    loss-free u       b_i += u * sign(mean(c) - c_i) once per optimizer step (Wang et al. Alg. 1)
    proportional      b_i += u_p * (mean(c) - c_i) on the raw counts c of the step, with u_p chosen
                      as 1e-3 / mean(c): an expert 100% above the mean moves as far as one sign step
                      of u = 1e-3 (the raw-count rate has no scale-free meaning; this is our choice)

Reported per variant, with the spread over seeds: validation cross-entropy, MaxVio_global (loads over
the whole validation set) and MaxVio_batch (mean over validation batches; also over the last training
steps), each averaged over the MoE layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..train.loop import TrainConfig, load_corpus
from . import runner

NAME = "balancing"
PROPORTIONAL_REFERENCE_RATE = 1e-3  # the sign rule's u that the proportional rate is matched to


@dataclass(frozen=True)
class Sizes:
    """`scale` for the model and run; the MoE layer: E routed experts of width d_expert, top-K."""

    scale: runner.Scale
    d_expert: int
    n_routed: int
    top_k: int


FULL = Sizes(runner.Scale(d_model=64, n_layers=2, seq_len=128, batch_size=8, steps=480, eval_every=40,
                          eval_windows=128), d_expert=32, n_routed=16, top_k=4)
QUICK = Sizes(runner.Scale(d_model=16, n_layers=2, seq_len=16, batch_size=4, steps=6, eval_every=3,
                           eval_windows=8), d_expert=8, n_routed=8, top_k=2)

PAPERS = {
    "loss_free_table2": {
        "source": "Wang et al. 2024, arXiv 2408.15664, Table 2 (sigmoid gate, 2 shared + 64 routed, "
                  "6 active; 1B on 100B tokens, 3B on 200B tokens)",
        "rows": [{"model": "1B", "method": "aux loss alpha=0.001", "val_ppl": 9.56, "max_vio_global": 0.72},
                 {"model": "1B", "method": "loss-free u=0.001", "val_ppl": 9.50, "max_vio_global": 0.04},
                 {"model": "3B", "method": "aux loss alpha=0.001", "val_ppl": 7.97, "max_vio_global": 0.52},
                 {"model": "3B", "method": "loss-free u=0.001", "val_ppl": 7.92, "max_vio_global": 0.04}]},
    "loss_free_update_rate": {
        "source": "Wang et al. 2024, update-rate ablation (1B)",
        "val_ppl": {"1e-4": 9.51, "1e-3": 9.50, "1e-2": 9.51},
        "note": "u=1e-4 balances slowly early in training; u=1e-2 leaves the bias fluctuating late"},
    "loss_free_sign_vs_proportional": {
        "source": "Wang et al. 2024, ablation of the update rule (1B)",
        "max_vio": {"sign u=0.001": 0.044, "proportional (range over u)": [0.028, 0.040]},
        "note": "the proportional rule balances slightly better but gives no perplexity gain"},
    "v3_sec_4_5_3": {
        "source": "DeepSeek-V3 technical report, arXiv 2412.19437, Sec. 4.5.3",
        "val_loss": {"1B": {"seq-aux": 2.258, "loss-free": 2.253, "batch-aux": 2.253},
                     "3B": {"seq-aux": 2.085, "loss-free": 2.080, "batch-aux": 2.080}}},
}


def variants(sizes: Sizes) -> dict[str, dict]:
    """Variant name -> the MoEConfig fields it sets on top of the unbalanced base."""
    tokens = sizes.scale.batch_size * sizes.scale.seq_len
    mean_count = tokens * sizes.top_k / sizes.n_routed  # c per expert per optimizer step
    out: dict[str, dict] = {"none": {}}
    for kind in ("seq", "batch"):
        for alpha in (1e-3, 1e-2):
            out[f"{kind}-aux {alpha:g}"] = {"aux_loss": "sequence" if kind == "seq" else "batch",
                                            "aux_loss_alpha": alpha}
    for u in (1e-4, 1e-3, 1e-2):
        out[f"loss-free {u:g}"] = {"bias_update": "step", "bias_update_speed": u}
    out["proportional"] = {"bias_update": "step", "bias_update_rule": "proportional",
                           "bias_update_speed": PROPORTIONAL_REFERENCE_RATE / mean_count}
    return out


def base_config(sizes: Sizes) -> TrainConfig:
    """The unbalanced model: every block MoE with 1 shared + top-K of E routed experts, sigmoid scores,
    top-K weights renormalised and scaled by 2.5 as in V3, no group limit, no bias, no aux loss."""
    moe = MoEConfig(d_model=sizes.scale.d_model, d_expert=sizes.d_expert, n_routed=sizes.n_routed,
                    n_shared=1, top_k=sizes.top_k, score_func="sigmoid", route_scale=2.5,
                    bias_update="none", aux_loss_inject=False)
    return runner.train_config(sizes.scale, moe)


def variant_config(base: TrainConfig, changes: dict, seed: int) -> TrainConfig:
    return base.replace(seed=seed, model=base.model.replace(moe=base.model.moe.replace(**changes)))


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per variant: spread over seeds of each metric, and the seed-paired difference of validation
    CE and MaxVio_global against loss-free u=1e-3 (the papers' setting)."""
    grouped = runner.runs_by_variant(runs, names)
    metrics = ("val_ce", "max_vio_global", "max_vio_batch", "train_max_vio_batch_tail")
    out = {name: {m: runner.spread([r[m] for r in rs]) for m in metrics}
           for name, rs in grouped.items() if rs}
    ref = grouped.get("loss-free 0.001", [])
    for name, rs in grouped.items():
        if rs and ref and name != "loss-free 0.001" and [r["seed"] for r in rs] == [r["seed"] for r in ref]:
            out[name]["minus_loss_free_1e-3"] = {
                m: runner.paired_difference([r[m] for r in rs], [r[m] for r in ref])
                for m in ("val_ce", "max_vio_global")}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    if args.steps is not None:
        sizes = dataclasses.replace(sizes, scale=dataclasses.replace(sizes.scale, steps=args.steps))
    scale = sizes.scale
    seeds = list(range(args.seeds if args.seeds is not None else 2 if args.quick else 3))
    base, table = base_config(sizes), variants(sizes)
    corpus = load_corpus(base)
    val_NL = runner.validation_set(corpus, scale.seq_len, scale.eval_windows)
    header = {"reproduction": NAME, "command": runner.command_line(args, NAME), "machine": runner.machine(),
              "setup": {"sizes": dataclasses.asdict(sizes), "seeds": seeds, "variants": table,
                        "base_config": base.to_dict(), "validation_tokens": val_NL[:, 1:].numel(),
                        "corpus": corpus.describe()},
              "papers": PAPERS}
    results = runner.ResultsFile(runner.out_path(args, NAME), header, resume=args.resume)
    for seed in seeds:  # seeds outer: an interrupted sweep has every variant at the same seeds
        for name, changes in table.items():
            if results.done(name, seed):
                continue
            cfg = variant_config(base, changes, seed)
            result, _ = runner.train_run(cfg, corpus, val_NL, scale.eval_every)
            results.add({"variant": name, "seed": seed, **result})
            if args.progress:
                print(f"{name:>16} seed {seed}: val CE {result['val_ce']:.4f}  MaxVio global "
                      f"{result['max_vio_global']:.3f} batch {result['max_vio_batch']:.3f}  "
                      f"({result['seconds']:.0f} s)", flush=True)
    return results.finish(summarize(results.runs, list(table)))


def add_parser(commands) -> None:
    """Register `python -m moe_lib.repro balancing`."""
    parser = commands.add_parser(NAME, help="balancing with sigmoid gating (Loss-Free Table 2, V3 4.5.3)")
    runner.add_arguments(parser, NAME)
    parser.set_defaults(run=run)
