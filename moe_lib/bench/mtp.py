"""``python -m moe_lib.bench mtp``: the MTP modules as the draft of speculative decoding, on a checkpoint
trained with MTP (default: the shipped `checkpoints/tiny`), batch size 1, greedy, on the CPU.

- teacher-forced acceptance: on validation windows of the Python standard library corpus, the
  fraction of positions where MTP depth k's argmax equals the main model's argmax for the same
  token (what greedy verification accepts when the context is the true text), and where it equals
  the true token.
- generation: greedy continuations of validation prompts, plain (`generate`) and speculative with
  D = 1 .. mtp_depth drafts (`speculative_generate`); every output is checked to be identical to the
  plain one. Acceptance per draft position; tokens/s. An untimed round first, then timed rounds in
  which every method runs on every prompt, in an order that rotates; speedup = median over rounds
  of the per-round ratio, so a slower moment of the shared machine hits all methods alike.
- costs, at the start of every timed round (so that they see the machine the generation sees),
  medians of interleaved repetitions after the first prompt's tokens are cached: one main-model step
  (1 token and its logits), one verification forward of D+1 tokens, one MTP module step (1 token
  and its logits). Draft cost c = t_mtp / t_main, verification cost v_D = t_verify(D+1) / t_main,
  each the median over rounds of the round's ratio; predicted speedup E / (v_D + D c) from the
  measured acceptance (`speculative.predicted_speedup`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import time
from pathlib import Path

import torch

from ..model import Transformer, generate, speculative_generate
from ..model.speculative import expected_tokens, predicted_speedup
from ..train.checkpoint import load_checkpoint, load_tokenizer
from ..train.data import eval_windows, stdlib_corpus
from .cpu import machine

FULL = {"prompts": 8, "prompt_len": 32, "new_tokens": 160, "rounds": 5, "windows": 64, "cost_reps": 30}
QUICK = {"prompts": 2, "prompt_len": 16, "new_tokens": 24, "rounds": 1, "windows": 4, "cost_reps": 5}
TARGET_ACCEPTANCE = 0.85
TARGET_SPEEDUP = 1.8


@torch.no_grad()
def teacher_forced(model: Transformer, windows_NL: torch.Tensor, batch: int = 8) -> dict:
    """Accuracy of the main model, and per MTP depth k the fraction of positions whose draft argmax
    equals the main model's argmax for that token and equals the true token."""
    main_hits, agree, true, counts = 0, [0] * model.cfg.mtp_depth, [0] * model.cfg.mtp_depth, [0, 0]
    for ids_BL in windows_NL.split(batch):
        logits_BLV, depth_logits = model.forward_with_mtp(ids_BL)
        main_BL = logits_BLV.argmax(-1)  # position i predicts token i+1
        main_hits += int((main_BL[:, :-1] == ids_BL[:, 1:]).sum())
        counts[0] += ids_BL[:, 1:].numel()
        for k, logits_k in enumerate(depth_logits, start=1):
            draft_BL = logits_k.argmax(-1)  # position i predicts token i+k+1, as main position i+k
            agree[k - 1] += int((draft_BL == main_BL[:, k:]).sum())
            true[k - 1] += int((draft_BL[:, :-1] == ids_BL[:, k + 1:]).sum())
    n_L = windows_NL.shape[1]
    n = windows_NL.shape[0]
    return {"windows": n, "window_len": n_L, "main_accuracy": main_hits / counts[0],
            "depths": [{"depth": k, "agrees_with_main": agree[k - 1] / (n * (n_L - k)),
                        "equals_true_token": true[k - 1] / (n * (n_L - k - 1))}
                       for k in range(1, model.cfg.mtp_depth + 1)]}


@torch.no_grad()
def step_costs(model: Transformer, prompt_1S: torch.Tensor, depths: list[int], reps: int,
               inner: int = 5) -> dict:
    """Median ms of one main-model step, one verification forward of D+1 tokens and one MTP step,
    each after the prompt's tokens are cached, timed in interleaved repetitions of `inner` calls."""
    cache, mtp_cache = model.new_cache(1), model.new_mtp_cache(1)
    h_1SH = model.forward_hidden(prompt_1S, cache)
    model.mtp_forward(1, h_1SH[:, :-1], prompt_1S[:, 1:], mtp_cache)
    n, n_mtp = cache.length, mtp_cache.length

    def main_step() -> None:
        model(prompt_1S[:, -1:], cache)[:, -1].argmax(-1)
        cache.truncate(n)

    def verify(d: int):
        def run() -> None:
            model(prompt_1S[:, -d - 1:], cache).argmax(-1)
            cache.truncate(n)
        return run

    def mtp_step() -> None:
        model.mtp_head(1, model.mtp_forward(1, h_1SH[:, -1:], prompt_1S[:, -1:], mtp_cache)[:, -1]).argmax(-1)
        mtp_cache.truncate(n_mtp)

    calls = {"main_step": main_step, "mtp_step": mtp_step, **{f"verify_{d + 1}": verify(d) for d in depths}}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(reps + 1):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                calls[name]()
            if r:  # the first repetition warms up
                times[name].append((time.perf_counter() - start) / inner)
    return {"context": n, "reps": reps, "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()}}


def generation(model: Transformer, prompts_NS: torch.Tensor, new_tokens: int, depths: list[int],
               rounds: int, cost_reps: int) -> tuple[dict, dict]:
    """Plain and speculative greedy generation of every prompt: statistics, equality, tokens/s; and
    the step costs (`step_costs`), measured at the start of every timed round so that they see the
    same machine as the generation. Returns (generation, costs)."""
    methods = [0, *depths]  # 0: plain
    stats, mismatches = {}, {d: 0 for d in depths}
    for d in depths:  # untimed round: outputs, acceptance statistics (deterministic in greedy mode)
        total = None
        for prompt in prompts_NS:
            out, s = speculative_generate(model, prompt, new_tokens, depth=d)
            mismatches[d] += not torch.equal(out, generate(model, prompt, new_tokens))
            total = s if total is None else total + s
        stats[d] = total
    seconds = {m: [0.0] * rounds for m in methods}
    cost_rounds = []
    for r in range(rounds):
        cost_rounds.append(step_costs(model, prompts_NS[:1], depths, cost_reps))
        for i, prompt in enumerate(prompts_NS):
            shift = (r + i) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                start = time.perf_counter()
                if m == 0:
                    generate(model, prompt, new_tokens)
                else:
                    speculative_generate(model, prompt, new_tokens, depth=m)
                seconds[m][r] += time.perf_counter() - start
    n_tokens = len(prompts_NS) * new_tokens
    plain_tps = [n_tokens / s for s in seconds[0]]
    result = {"plain_tokens_per_s": statistics.median(plain_tps), "plain_tokens_per_s_rounds": plain_tps,
              "speculative": {}}
    for d in depths:
        tps = [n_tokens / s for s in seconds[d]]
        result["speculative"][str(d)] = {
            **stats[d].to_dict(), "outputs_differing_from_plain": mismatches[d],
            "tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": tps,
            "speedup": statistics.median(a / b for a, b in zip(seconds[0], seconds[d], strict=True))}
    names = list(cost_rounds[0]["ms"])
    costs = {"context": cost_rounds[0]["context"], "reps_per_round": cost_reps,
             "ms": {name: statistics.median(c["ms"][name] for c in cost_rounds) for name in names},
             "ms_rounds": [c["ms"] for c in cost_rounds]}
    return result, costs


def predictions(gen: dict, costs: dict) -> dict:
    """Speedup predicted from the measured acceptance and costs, per depth; the cost ratios c and v
    are medians over the rounds of each round's ratio."""
    def ratio(name: str) -> float:
        return statistics.median(ms[name] / ms["main_step"] for ms in costs["ms_rounds"])

    c = ratio("mtp_step")
    out = {"draft_cost_c": c}
    for d, g in gen["speculative"].items():
        v = ratio(f"verify_{int(d) + 1}")
        rates = g["conditional_acceptance"]
        out[d] = {"verify_cost_v": v, "expected_tokens_per_step": expected_tokens(rates),
                  "expected_tokens_iid": expected_tokens(rates[0], int(d)),
                  "speedup_predicted": predicted_speedup(rates, int(d), c, v),
                  "speedup_predicted_v1": predicted_speedup(rates, int(d), c, 1.0)}
    return out


def run_mtp_bench(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    size = {**(QUICK if args.quick else FULL),
            **{k: getattr(args, k) for k in FULL if getattr(args, k, None) is not None}}
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    if cfg.mtp_depth == 0:
        raise ValueError(f"checkpoint {args.checkpoint} has no MTP modules (mtp_depth=0)")
    depths = list(range(1, cfg.mtp_depth + 1))
    prompt_len = min(size["prompt_len"], cfg.max_seq_len // 2)
    new_tokens = min(size["new_tokens"], cfg.max_seq_len - prompt_len)
    load_before = os.getloadavg()[0]
    tokenizer = load_tokenizer(args.checkpoint)
    val = stdlib_corpus().tokenized(tokenizer).val
    windows = eval_windows(val, min(cfg.max_seq_len, 256) - 1, size["windows"])
    prompts = eval_windows(val, prompt_len - 1, size["prompts"] + 2)[1:-1]  # not the very first tokens
    tf = teacher_forced(model, windows)
    gen, costs = generation(model, prompts, new_tokens, depths, size["rounds"], size["cost_reps"])
    out = args.out or (None if args.quick else "benchmarks/mtp.json")
    report = {"benchmark": "mtp", "quick": args.quick, "checkpoint": str(args.checkpoint),
              "config": cfg.to_dict(), "tokenizer": tokenizer.kind,
              "machine": {**machine(), "date": datetime.date.today().isoformat()},
              "command": command(args),
              "settings": {**size, "prompt_len": prompt_len, "new_tokens": new_tokens,
                           "threads": args.threads, "decoding": "greedy, batch size 1"},
              "targets": {"acceptance": TARGET_ACCEPTANCE, "speedup": TARGET_SPEEDUP},
              "teacher_forced": tf, "costs": costs, "generation": gen,
              "prediction": predictions(gen, costs),
              "load_average_before_after": [load_before, os.getloadavg()[0]],
              "method": __doc__.split("\n\n", 1)[1].strip()}
    print(format_report(report))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["--checkpoint", str(args.checkpoint), "--threads", str(args.threads)]
    parts += ["--quick"] if args.quick else []
    for name in FULL:
        if getattr(args, name, None) is not None:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return "python -m moe_lib.bench mtp " + shlex.join(parts)


def format_report(r: dict) -> str:
    m, gen, pred, ms = r["machine"], r["generation"], r["prediction"], r["costs"]["ms"]
    s = r["settings"]
    lines = [f"checkpoint {r['checkpoint']}: MTP depth {r['config']['mtp_depth']}"
             f"{' (quick)' if r['quick'] else ''}; {m['cpu']}, {s['threads']} thread(s), torch {m['torch']}",
             f"teacher-forced on {r['teacher_forced']['windows']} validation windows of "
             f"{r['teacher_forced']['window_len']} tokens: main model top-1 accuracy "
             f"{r['teacher_forced']['main_accuracy']:.3f}"]
    for t in r["teacher_forced"]["depths"]:
        lines.append(f"  depth {t['depth']}: draft argmax = main argmax {t['agrees_with_main']:.3f}, "
                     f"= true token {t['equals_true_token']:.3f}")
    lines.append(f"costs after {r['costs']['context']} cached tokens: main step {ms['main_step']:.2f} ms, "
                 f"MTP step {ms['mtp_step']:.2f} ms (c = {pred['draft_cost_c']:.2f}), "
                 + ", ".join(f"verify {k.split('_')[1]} tokens {v:.2f} ms" for k, v in ms.items()
                             if k.startswith("verify")))
    lines.append(f"generation: {s['prompts']} prompts x {s['new_tokens']} new tokens, greedy; plain "
                 f"{gen['plain_tokens_per_s']:.1f} tokens/s")
    for d, g in gen["speculative"].items():
        p = pred[d]
        cond = "" if d == "1" else f" (given the previous accepted: {_join(g['conditional_acceptance'])})"
        lines.append(f"  D={d}: acceptance per position {_join(g['acceptance'])}{cond}; "
                     f"{g['tokens_per_step']:.2f} tokens per verification; {g['tokens_per_s']:.1f} tokens/s, "
                     f"speedup {g['speedup']:.2f}x (predicted E/(v+Dc) = {p['expected_tokens_per_step']:.2f}"
                     f"/({p['verify_cost_v']:.2f}+{d}*{pred['draft_cost_c']:.2f}) = "
                     f"{p['speedup_predicted']:.2f}x); "
                     f"outputs differing from plain: {g['outputs_differing_from_plain']}")
    one = gen["speculative"]["1"]
    lines += [f"acceptance: {one['acceptance'][0]:.3f}", f"speedup: {one['speedup']:.2f}"]
    return "\n".join(lines)


def _join(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def add_parser(commands) -> None:
    """Register `python -m moe_lib.bench mtp`."""
    bench = commands.add_parser("mtp", help="MTP speculative decoding: acceptance, tokens/s, speedup")
    bench.add_argument("--checkpoint", default="checkpoints/tiny",
                       help="checkpoint directory of a model with MTP modules (default checkpoints/tiny)")
    bench.add_argument("--quick", action="store_true",
                       help="2 short prompts, 1 round, 4 windows: a smoke test (writes only with --out)")
    bench.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: batch-1 decoding of a small model is latency bound)")
    for name, help_text in (("prompts", "number of prompts"), ("prompt_len", "prompt tokens"),
                            ("new_tokens", "tokens generated per prompt"), ("rounds", "timed rounds"),
                            ("windows", "teacher-forced validation windows"),
                            ("cost_reps", "repetitions of the step-cost timings")):
        bench.add_argument("--" + name.replace("_", "-"), type=int, dest=name,
                           help=f"{help_text} (default {FULL[name]}, --quick {QUICK[name]})")
    bench.add_argument("--out", default=None,
                       help="JSON output path (default benchmarks/mtp.json; with --quick: none)")
    bench.set_defaults(run=run_mtp_bench)

