"""What every reproduction shares: train one configuration with the library's `Trainer` on a fixed
validation set, summarise seeds, compare variants seed by seed, record the machine, and write the
results file after every run so that an interrupted sweep loses nothing (`--resume` continues it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

from ..bench import cpu_info
from ..config import MoEConfig
from ..model import ModelConfig
from ..train.data import Corpus, eval_windows
from ..train.loop import TrainConfig, Trainer

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
              "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


@dataclass(frozen=True)
class Scale:
    """Model and run sizes shared by the variants of a reproduction (the papers train 1B-3B
    parameter models on 100B-200B tokens; these are far smaller)."""

    d_model: int
    n_layers: int
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int
    eval_windows: int


def train_config(scale: Scale, moe: MoEConfig) -> TrainConfig:
    """A byte-level model of `scale` whose every block uses the MoE layer `moe` (MLA attention with
    2 heads, no dense block, no MTP), AdamW at 3e-3 with 10% warmup and cosine decay."""
    half_head = scale.d_model // 4
    model = ModelConfig(vocab_size=256, d_model=scale.d_model, n_layers=scale.n_layers, n_dense_layers=0,
                        d_dense=3 * scale.d_model, n_heads=2, kv_lora_rank=scale.d_model // 2,
                        qk_nope_head_dim=half_head, qk_rope_head_dim=half_head, v_head_dim=2 * half_head,
                        max_seq_len=scale.seq_len, moe=moe)
    return TrainConfig(model=model, steps=scale.steps, batch_size=scale.batch_size, lr=3e-3,
                       warmup_steps=max(1, scale.steps // 10), eval_every=scale.eval_every,
                       eval_windows=scale.eval_windows)


def machine() -> dict:
    """CPU model, its SIMD flags, cores, torch threads and version, load average and date (UTC)."""
    cpu, flags = cpu_info()
    return {"cpu": cpu, "simd_flags": [f for f in SIMD_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def layer_mean(per_layer: dict[str, float]) -> float:
    """The mean over MoE layers of a per-layer metric (the papers average MaxVio over layers)."""
    return sum(per_layer.values()) / len(per_layer)


def validation_set(corpus: Corpus, seq_len: int, n_windows: int) -> torch.Tensor:
    """`n_windows` evenly spaced validation windows of seq_len + 1 tokens, the same for every run."""
    return eval_windows(corpus.val, seq_len, n_windows)


def evaluate(trainer: Trainer, val_NL: torch.Tensor) -> dict:
    """Validation CE and MaxVio (global: loads over the whole set; batch: mean over its batches of
    `batch_size` windows), per MoE layer and averaged over layers."""
    ev = trainer.evaluate(val_NL)
    return {"val_ce": ev["val_ce"],
            "max_vio_global": layer_mean(ev["val_max_vio_global"]),
            "max_vio_batch": layer_mean(ev["val_max_vio_batch"]),
            "per_layer": {"max_vio_global": ev["val_max_vio_global"],
                          "max_vio_batch": ev["val_max_vio_batch"]}}


def train_run(cfg: TrainConfig, corpus: Corpus, val_NL: torch.Tensor, eval_every: int,
              tail_fraction: float = 0.2) -> tuple[dict, Trainer]:
    """Train `cfg` from scratch; evaluate every `eval_every` steps and at the end.

    Returns (result, trainer): the result holds the final validation metrics, the validation curve,
    the training MaxVio_batch (mean over layers) averaged over the last `tail_fraction` of the steps,
    and the seconds it took; the trainer holds the trained model.
    """
    start = time.perf_counter()
    trainer = Trainer.create(cfg, corpus)
    curve, train_vio = [], []
    for _ in range(cfg.steps):
        record = trainer.train_step()
        train_vio.append(layer_mean(record["max_vio_batch"]))
        if trainer.step % eval_every == 0 or trainer.step == cfg.steps:
            ev = evaluate(trainer, val_NL)
            curve.append({"step": trainer.step, "train_ce": record["ce"], "val_ce": ev["val_ce"],
                          "max_vio_global": ev["max_vio_global"], "max_vio_batch": ev["max_vio_batch"]})
    tail = train_vio[-max(1, round(tail_fraction * len(train_vio))):]
    result = {**ev, "train_max_vio_batch_tail": sum(tail) / len(tail), "curve": curve,
              "seconds": time.perf_counter() - start}
    return result, trainer


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min, max and the values themselves."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """a - b seed by seed (the same seed means the same initial weights and data order): mean, the
    two-sided `level` t-interval of the mean, and `resolved` = the interval excludes 0."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "half_width": None, "resolved": None, "n": len(diffs)}
    t = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1))
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "half_width": half, "resolved": abs(mean) > half, "n": len(diffs)}


class ResultsFile:
    """The JSON results of a sweep, rewritten (atomically) after every run.

    `header` describes the sweep (command, machine, scale, papers' numbers); `runs` is the list of
    finished runs, each with "variant" and "seed"; `complete` turns true with `finish(summary)`.
    With resume=True, runs already in an existing file with the same `header["setup"]` are kept.
    """

    def __init__(self, path: str | Path, header: dict, resume: bool = False):
        self.path, self.header, self.runs = Path(path), header, []
        if resume and self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("setup") != json.loads(json.dumps(header["setup"])):
                raise ValueError(f"cannot resume {self.path}: it was written with another setup")
            self.runs = old.get("runs", [])

    def done(self, variant: str, seed: int) -> bool:
        return any(r["variant"] == variant and r["seed"] == seed for r in self.runs)

    def add(self, run: dict) -> None:
        self.runs.append(run)
        self._write({"complete": False})

    def finish(self, summary: dict) -> dict:
        return self._write({"complete": True, "summary": summary})

    def _write(self, extra: dict) -> dict:
        data = {**self.header, "machine_at_end": machine(), "runs": self.runs, **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.path)
        return data


def runs_by_variant(runs: Sequence[dict], variants: Sequence[str]) -> dict[str, list[dict]]:
    """Runs grouped by variant in `variants` order, each group sorted by seed."""
    return {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in variants}


def add_arguments(parser, name: str) -> None:
    """The options every reproduction takes."""
    parser.add_argument("--quick", action="store_true",
                        help="a toy model for a few steps and 2 seeds: a smoke test of seconds")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads oversubscribe)")
    parser.add_argument("--out", default=None,
                        help=f"JSON output (default benchmarks/repro_{name}.json; with --quick "
                             f"repro_{name}_quick.json)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of an existing --out")
    parser.add_argument("--progress", action="store_true", help="print a line per finished run")


def out_path(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path(f"repro_{name}_quick.json") if args.quick else Path(f"benchmarks/repro_{name}.json")


def command_line(args, name: str) -> str:
    """The command that reproduces this file (the options that were given)."""
    parts = ["python -m moe_lib.repro", name] + (["--quick"] if args.quick else [])
    for option in ("seeds", "steps", "threads"):
        if getattr(args, option) is not None:
            parts += [f"--{option}", str(getattr(args, option))]
    return " ".join(parts + ["--out", str(out_path(args, name))])
