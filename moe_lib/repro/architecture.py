"""Reproduction 2: DeepSeekMoE's architecture ablation (Dai et al. 2024, arXiv 2401.06066).

Three MoE layers with the same total and the same activated expert parameters
(`moe_lib.accounting.fine_grained`, segmentation factor m = 4):

    gshard            top-2 of N experts of width d_ff (GShard-style)
    fine-grained      top-2m of mN experts of width d_ff/m
    fine + shared     1 shared expert of width d_ff/m + top-(2m-1) of mN-1 routed ones (DeepSeekMoE)

as in the paper: softmax scores, no renormalisation of the top-K weights, the expert-level balance
loss with alpha = 0.01. The routers differ in size (mN vs N rows of d_model), which is reported.

Then the paper's evaluation-time ablation on each trained "fine + shared" model: remove the shared
expert and activate one more routed expert, with every other weight unchanged (the paper: Pile loss
1.808 -> 2.414). Removing the shared expert without the extra routed expert is reported next to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..accounting import fine_grained, moe_params
from ..config import MoEConfig
from ..model import Transformer
from ..train.loop import Trainer, load_corpus, moe_modules
from . import runner

NAME = "architecture"
SEGMENTS = 4  # m: each GShard expert split into 4
BALANCE = {"score_func": "softmax", "norm_topk_prob": False, "route_scale": 1.0, "bias_update": "none",
           "aux_loss": "expert", "aux_loss_alpha": 0.01, "aux_loss_inject": False}


@dataclass(frozen=True)
class Sizes:
    """`scale` for the model and run; `d_ff` and `n_experts` / `top_k` of the GShard layer."""

    scale: runner.Scale
    d_ff: int
    n_experts: int
    top_k: int


FULL = Sizes(runner.Scale(d_model=64, n_layers=2, seq_len=128, batch_size=8, steps=480, eval_every=40,
                          eval_windows=128), d_ff=128, n_experts=16, top_k=2)
QUICK = Sizes(runner.Scale(d_model=16, n_layers=2, seq_len=16, batch_size=4, steps=6, eval_every=3,
                           eval_windows=8), d_ff=32, n_experts=8, top_k=2)

PAPERS = {
    "deepseekmoe_table1": {
        "source": "Dai et al. 2024, arXiv 2401.06066, Table 1: 2B total parameters, 100B tokens, Pile loss",
        "pile_loss": {"Dense": 2.060, "Hash": 1.932, "Switch": 1.881, "GShard": 1.867,
                      "DeepSeekMoE (1 shared + top-7 of 63 routed, 1/4-width experts)": 1.808}},
    "deepseekmoe_eval_ablation": {
        "source": "Dai et al. 2024: the trained 2B DeepSeekMoE with its shared expert disabled and one more "
                  "routed expert activated (an evaluation-time change, not a model trained without it)",
        "pile_loss": {"as trained": 1.808, "shared off, +1 routed": 2.414}},
}


def layers(sizes: Sizes) -> dict[str, MoEConfig]:
    """The three MoE layers, equal in total and activated expert parameters."""
    base = dict(d_model=sizes.scale.d_model, d_ff=sizes.d_ff, n_experts=sizes.n_experts,
                top_k=sizes.top_k, **BALANCE)
    return {"gshard": fine_grained(m=1, **base), "fine-grained": fine_grained(m=SEGMENTS, **base),
            "fine + shared": fine_grained(m=SEGMENTS, n_shared=1, **base)}


def parameter_counts(model: Transformer) -> dict:
    """Expert parameters per MoE layer (moe_lib.accounting) and whole-model totals: total counts every
    parameter; active subtracts the routed experts a token does not use."""
    moe = model.cfg.moe
    p = moe_params(moe)
    total = sum(t.numel() for t in model.parameters())
    idle = model.cfg.n_moe_layers * (p.routed - p.active_routed)
    return {"expert_total_per_layer": p.routed + p.shared,
            "expert_active_per_layer": p.active_routed + p.shared, "router_per_layer": p.router,
            "model_total": total, "model_active": total - idle}


def without_shared_expert(trainer: Trainer, extra_routed: int) -> Trainer:
    """The trained model with its shared expert removed and `extra_routed` more routed experts active;
    every other weight is the trained one (the state dict loads strictly, less the shared expert)."""
    cfg = trainer.cfg
    moe = cfg.model.moe.replace(n_shared=0, top_k=cfg.model.moe.top_k + extra_routed)
    new_cfg = cfg.replace(model=cfg.model.replace(moe=moe))
    model = Transformer(new_cfg.model)
    state = trainer.model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if ".shared_experts." not in k})
    return dataclasses.replace(trainer, cfg=new_cfg, model=model, moe=moe_modules(model))


def eval_ablation(trainer: Trainer, val_NL: torch.Tensor) -> dict:
    """Validation CE of the trained model, without its shared expert, and without it plus one routed."""
    return {"as trained": runner.evaluate(trainer, val_NL)["val_ce"],
            "shared off": runner.evaluate(without_shared_expert(trainer, 0), val_NL)["val_ce"],
            "shared off, +1 routed": runner.evaluate(without_shared_expert(trainer, 1), val_NL)["val_ce"]}


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Spread over seeds of the validation CE per variant, seed-paired differences against gshard, and
    the evaluation-time ablation's CE change (shared off + 1 routed minus as trained)."""
    grouped = runner.runs_by_variant(runs, names)
    out = {name: {"val_ce": runner.spread([r["val_ce"] for r in rs])} for name, rs in grouped.items() if rs}
    ref = grouped["gshard"]
    for name, rs in grouped.items():
        if rs and name != "gshard" and [r["seed"] for r in rs] == [r["seed"] for r in ref]:
            out[name]["minus_gshard"] = runner.paired_difference([r["val_ce"] for r in rs],
                                                                 [r["val_ce"] for r in ref])
    ablated = [r["eval_ablation"] for r in grouped["fine + shared"]]
    if ablated:
        out["eval_ablation"] = {key: runner.spread([a[key] for a in ablated]) for key in ablated[0]}
        out["eval_ablation"]["change"] = runner.paired_difference(
            [a["shared off, +1 routed"] for a in ablated], [a["as trained"] for a in ablated])
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    scale = sizes.scale if args.steps is None else dataclasses.replace(sizes.scale, steps=args.steps)
    seeds = list(range(args.seeds if args.seeds is not None else 2 if args.quick else 3))
    table = {name: runner.train_config(scale, moe) for name, moe in layers(sizes).items()}
    counts = {name: parameter_counts(Transformer(cfg.model)) for name, cfg in table.items()}
    corpus = load_corpus(table["gshard"])
    val_NL = runner.validation_set(corpus, scale.seq_len, scale.eval_windows)
    header = {"reproduction": NAME, "command": runner.command_line(args, NAME), "machine": runner.machine(),
              "setup": {"sizes": dataclasses.asdict(dataclasses.replace(sizes, scale=scale)), "seeds": seeds,
                        "variants": {name: cfg.model.moe.to_dict() for name, cfg in table.items()},
                        "base_config": table["gshard"].to_dict(), "parameters": counts,
                        "validation_tokens": val_NL[:, 1:].numel(), "corpus": corpus.describe()},
              "papers": PAPERS}
    results = runner.ResultsFile(runner.out_path(args, NAME), header, resume=args.resume)
    for seed in seeds:
        for name, cfg in table.items():
            if results.done(name, seed):
                continue
            result, trainer = runner.train_run(cfg.replace(seed=seed), corpus, val_NL, scale.eval_every)
            if name == "fine + shared":
                result["eval_ablation"] = eval_ablation(trainer, val_NL)
            results.add({"variant": name, "seed": seed, **result})
            if args.progress:
                print(f"{name:>14} seed {seed}: val CE {result['val_ce']:.4f} ({result['seconds']:.0f} s)",
                      flush=True)
    return results.finish(summarize(results.runs, list(table)))


def add_parser(commands) -> None:
    """Register `python -m moe_lib.repro architecture`."""
    parser = commands.add_parser(NAME, help="DeepSeekMoE's GShard / fine-grained / shared-expert ablation")
    runner.add_arguments(parser, NAME)
    parser.set_defaults(run=run)
