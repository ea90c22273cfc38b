"""The training loop: AdamW, warmup + cosine, gradient accumulation, MTP and auxiliary losses,
loss-free balancing once per optimizer step, periodic validation, JSON-lines metrics, resume.

One optimizer step, with A micro-batches of B windows of S + 1 tokens each:

    for each micro-batch:  L = CE_main + (lambda_t / D) sum_k CE_k + sum_layers L_aux     (V3 Eq. 25)
                           (L / A).backward();  loads c_i += tokens routed to expert i
    clip the gradient norm;  AdamW step;  learning-rate schedule step
    b_i += gamma * sign(mean(c) - c_i)   in every router, ONCE, on the loads of all A micro-batches

The MTP weight lambda_t is `mtp_lambda` for the first `mtp_lambda_switch` fraction of the steps and
`mtp_lambda_final` after (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1). Auxiliary losses are
read from each layer (`aux_loss_inject=False`) and added to L, so they are scaled by 1/A like the
rest of the loss (an injected gradient would not be).

Everything that determines the trajectory (weights, optimizer moments, scheduler, router bias and
loads, RNG states, the data position) is saved in checkpoints, so a resumed run is bit-identical
to an uninterrupted one on the same machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm import tqdm

from ..balance import LoadMonitor, load_cv, max_vio, update_bias
from ..model import ModelConfig, Transformer, generate
from ..model.mtp import mtp_objective
from ..moe import DeepSeekMoE
from . import checkpoint
from .data import (
    Corpus,
    Windows,
    bigram_cross_entropy,
    bytes_per_token,
    eval_windows,
    stdlib_corpus,
    synthetic_corpus,
)
from .tokenizer import KINDS as TOKENIZERS
from .tokenizer import BPETokenizer, ByteTokenizer

CORPORA = ("stdlib", "synthetic")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TRAIN_CONFIG_FILE = "train_config.json"
# Fields that only change what is measured or written, never the training trajectory.
OBSERVATION_FIELDS = ("log_every", "eval_every", "eval_windows", "checkpoint_every", "sample_prompts",
                      "sample_tokens")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    model: the `ModelConfig`; its `moe` must use bias_update "step" (the loop calls `update_bias`)
        or "none", and aux_loss_inject=False when an auxiliary loss is on.
    corpus: "stdlib" (the Python standard library, split by file) or "synthetic" (four domains).
    tokenizer: "bytes" (model.vocab_size 256) or "bpe" (a byte-level BPE with model.vocab_size ids,
        trained at the start of the run on the train split, deterministically, and saved with the
        checkpoints as tokenizer.json).
    steps / batch_size / grad_accum: optimizer steps; windows per micro-batch; micro-batches per step.
    lr, min_lr_ratio, warmup_steps: linear warmup to lr, then cosine decay to min_lr_ratio * lr.
    weight_decay, betas, eps: AdamW (decay on matrices and embeddings only, not on norm weights).
    grad_clip: max global gradient norm (0 = no clipping).
    mtp_lambda / mtp_lambda_final / mtp_lambda_switch: MTP loss weight schedule (see module doc).
    eval_every / eval_windows: validate every so many steps on that many evenly spaced validation
        windows (0 = all non-overlapping windows). log_every: metrics line every so many steps.
    checkpoint_every: save the resumable state every so many steps (0 = only at the end).
    sample_prompts / sample_tokens: greedy samples generated at the end, for the summary.
    """

    model: ModelConfig
    corpus: str = "stdlib"
    tokenizer: str = "bytes"
    val_fraction: float = 0.05
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch: float = 0.7
    eval_every: int = 100
    eval_windows: int = 64
    log_every: int = 10
    checkpoint_every: int = 0
    sample_prompts: tuple[str, ...] = ("def ", "class ", "import ")
    sample_tokens: int = 160

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # from JSON
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        _check(isinstance(self.model, ModelConfig), "model", self.model, "a ModelConfig")
        _check(self.corpus in CORPORA, "corpus", self.corpus, f"one of {CORPORA}")
        _check(self.tokenizer in TOKENIZERS, "tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
        vocab = self.model.vocab_size
        _check(self.tokenizer != "bytes" or vocab == 256, "model.vocab_size", vocab,
               "256 with tokenizer='bytes' (one id per byte)")
        _check(self.tokenizer != "bpe" or vocab > 256, "model.vocab_size", vocab,
               "more than 256 with tokenizer='bpe' (256 byte ids plus the merges)")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every", "sample_tokens"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                   getattr(self, name), "a positive integer")
        for name in ("seed", "warmup_steps", "eval_windows", "checkpoint_every"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                   getattr(self, name), "an integer >= 0")
        _check(self.lr > 0, "lr", self.lr, "a positive number")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0 (0 = no clipping)")
        _check(0 <= self.mtp_lambda_switch <= 1, "mtp_lambda_switch", self.mtp_lambda_switch,
               "a fraction of the steps in [0, 1]")
        moe = self.model.moe
        _check(moe.bias_update in ("step", "none"), "model.moe.bias_update", moe.bias_update,
               "'step' (updated once per optimizer step by the loop) or 'none'")
        _check(moe.aux_loss == "none" or not moe.aux_loss_inject, "model.moe.aux_loss_inject",
               moe.aux_loss_inject, "False when an auxiliary loss is on (the loop adds it to the loss, "
               "scaled by 1/grad_accum like the rest; an injected gradient would not be scaled)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.max_seq_len

    def replace(self, **changes) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected {allowed}.")


# --- schedules (pure functions of the step) --------------------------------------------------------

def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based):
    (step + 1) / warmup during warmup, then min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2 with p the
    fraction of the post-warmup steps done."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def mtp_lambda_at(step: int, cfg: TrainConfig) -> float:
    """lambda of the MTP loss at `step`: mtp_lambda, then mtp_lambda_final after the switch."""
    return cfg.mtp_lambda if step < cfg.mtp_lambda_switch * cfg.steps else cfg.mtp_lambda_final


# --- building blocks -------------------------------------------------------------------------------

def load_corpus(cfg: TrainConfig) -> Corpus:
    """The byte-level corpus of `cfg` (see `prepare_data` for its tokens)."""
    if cfg.corpus == "synthetic":
        return synthetic_corpus(seed=cfg.seed)
    return stdlib_corpus(val_fraction=cfg.val_fraction)


def build_tokenizer(cfg: TrainConfig, corpus: Corpus) -> ByteTokenizer:
    """Bytes, or the BPE of `cfg.model.vocab_size` ids trained on the train split of `corpus`."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    return BPETokenizer.train(corpus.documents("train"), cfg.model.vocab_size)


def prepare_data(cfg: TrainConfig) -> tuple[Corpus, ByteTokenizer]:
    """The corpus of `cfg` in the ids of its tokenizer, and that tokenizer."""
    corpus = load_corpus(cfg)
    tokenizer = build_tokenizer(cfg, corpus)
    return corpus.tokenized(tokenizer), tokenizer


def moe_modules(model: torch.nn.Module) -> dict[str, DeepSeekMoE]:
    """Every MoE layer by module name ("layers.1.mlp", "mtp.0.mlp", ...), main model first."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DeepSeekMoE)}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions (matrices, embeddings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio))


def model_losses(model: Transformer, batch_BL: torch.Tensor, mtp_lambda: float):
    """(L incl. MTP, CE_main, [CE_k]) on windows [B, S + 1]: inputs batch[:, :-1], targets batch[:, 1:]."""
    ids_BS, targets_BS = batch_BL[:, :-1], batch_BL[:, 1:]
    if model.cfg.mtp_depth:
        logits_BSV, depth_logits = model.forward_with_mtp(ids_BS)
    else:
        logits_BSV, depth_logits = model(ids_BS), []
    return mtp_objective(logits_BSV, depth_logits, targets_BS, mtp_lambda)


@dataclass
class Trainer:
    """The state of one run: model, optimizer, scheduler, data position, step."""

    cfg: TrainConfig
    model: Transformer
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    windows: Windows
    step: int = 0
    moe: dict[str, DeepSeekMoE] = field(default_factory=dict)
    tokenizer: ByteTokenizer = field(default_factory=ByteTokenizer)

    @classmethod
    def create(cls, cfg: TrainConfig, corpus: Corpus, tokenizer: ByteTokenizer | None = None) -> Trainer:
        """A fresh run on `corpus` (already in the ids of `tokenizer`; default bytes)."""
        tokenizer = tokenizer or ByteTokenizer()
        if tokenizer.vocab_size != cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                             f"{cfg.model.vocab_size}")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg)
        windows = Windows(corpus.train, cfg.model.max_seq_len, cfg.batch_size, seed=cfg.seed)
        return cls(cfg, model, optimizer, build_scheduler(optimizer, cfg), windows,
                   moe=moe_modules(model), tokenizer=tokenizer)

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics."""
        cfg, model = self.cfg, self.model
        model.train()
        lam = mtp_lambda_at(self.step, cfg)
        loads = {name: torch.zeros(m.cfg.n_routed) for name, m in self.moe.items()}
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "ce_mtp": [0.0] * cfg.model.mtp_depth}
        for _ in range(cfg.grad_accum):
            loss, ce_main, ce_depths = model_losses(model, self.windows.next_batch(), lam)
            aux = sum((m.aux_loss for m in self.moe.values() if m.cfg.aux_loss != "none"),
                      start=torch.zeros(()))
            ((loss + aux) / cfg.grad_accum).backward()
            for name, m in self.moe.items():
                loads[name] += m.last_routing.load.float()
            sums["loss"] += (loss + aux).item() / cfg.grad_accum
            sums["ce"] += ce_main.item() / cfg.grad_accum
            sums["aux"] += aux.item() / cfg.grad_accum
            for k, ce_k in enumerate(ce_depths):
                sums["ce_mtp"][k] += ce_k.item() / cfg.grad_accum
        lr = self.optimizer.param_groups[0]["lr"]
        with record_function("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        with record_function("balancing"):
            update_bias(model)  # once per optimizer step, on the loads of all micro-batches
        self.step += 1
        return {"step": self.step, "lr": lr, "mtp_lambda": lam, **sums, "grad_norm": grad_norm.item(),
                "max_vio_batch": {n: max_vio(c) for n, c in loads.items()},
                "cv_batch": {n: load_cv(c) for n, c in loads.items()},
                "bias_norm": {n: m.gate.correction_bias.norm().item() for n, m in self.moe.items()},
                "bias": {n: [round(b, 6) for b in m.gate.correction_bias.tolist()]
                         for n, m in self.moe.items()}}

    @torch.no_grad()
    def evaluate(self, windows_NL: torch.Tensor) -> dict:
        """Validation CE (main and per MTP depth, mean per token) and MaxVio/CV over the windows."""
        model = self.model.eval()
        monitors = {name: LoadMonitor(m.cfg.n_routed) for name, m in self.moe.items()}
        ce, ce_mtp, n = 0.0, [0.0] * self.cfg.model.mtp_depth, 0
        for batch_BL in windows_NL.split(self.cfg.batch_size):
            _, ce_main, ce_depths = model_losses(model, batch_BL, 0.0)
            ce += ce_main.item() * len(batch_BL)
            for k, ce_k in enumerate(ce_depths):
                ce_mtp[k] += ce_k.item() * len(batch_BL)
            n += len(batch_BL)
            for name, m in self.moe.items():
                monitors[name].update(m.last_routing.load)
        return {"val_ce": ce / n, "val_ce_mtp": [c / n for c in ce_mtp],
                "val_max_vio_global": {k: m.max_vio_global for k, m in monitors.items()},
                "val_max_vio_batch": {k: m.max_vio_batch for k, m in monitors.items()},
                "val_cv_global": {k: m.cv_global for k, m in monitors.items()}}

    def state_dict(self) -> dict:
        """Everything besides the weights that a bit-identical resume needs."""
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data": self.windows.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "train_config": json.dumps(self.cfg.to_dict())}

    def save(self, out_dir: Path) -> None:
        checkpoint.save_checkpoint(out_dir, self.model, self.state_dict(), tokenizer=self.tokenizer)

    def resume(self, out_dir: Path) -> None:
        """Restore the state saved in `out_dir`; its TrainConfig must match except observation fields."""
        state = checkpoint.load_train_state(out_dir)
        saved = TrainConfig.from_dict(json.loads(state["train_config"]))
        diff = {k: v for k, v in checkpoint.config_diff(saved, self.cfg).items()
                if k.split(".")[0] not in OBSERVATION_FIELDS}
        if diff:
            raise ValueError(f"cannot resume from {out_dir}: it was trained with a different config: "
                             f"{checkpoint.format_diff(diff, 'checkpoint', 'now')}")
        saved_tokenizer = checkpoint.load_tokenizer(out_dir)
        if saved_tokenizer != self.tokenizer:
            raise ValueError(f"cannot resume from {out_dir}: its tokenizer.json differs from the "
                             f"tokenizer trained now ({saved_tokenizer!r} vs {self.tokenizer!r}): "
                             "the corpus on this machine changed")
        checkpoint.load_weights(self.model, out_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.windows.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        self.step = int(state["step"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# --- the run ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, command: str | None = None) -> dict:
    """Train `cfg`, writing checkpoints, `metrics.jsonl` and `summary.json` to `out_dir`.

    resume: continue from the state in `out_dir` (bit-identical to not having stopped).
    stop_after: stop (and save) after this optimizer step, as if interrupted; the schedules still run
        to `cfg.steps`. Returns the summary (also written to summary.json).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_time, load_before = time.perf_counter(), os.getloadavg()
    corpus, tokenizer = prepare_data(cfg)
    val_NL = eval_windows(corpus.val, cfg.model.max_seq_len, cfg.eval_windows or None)
    trainer = Trainer.create(cfg, corpus, tokenizer)
    if resume:
        trainer.resume(out_dir)
    (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics = _open_metrics(out_dir / METRICS_FILE, trainer.step)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    train_seconds, tokens, record, evaluation = 0.0, 0, {}, {}
    bar = tqdm(range(trainer.step, end), desc="train", unit="step", disable=not progress,
               initial=trainer.step, total=end)
    with metrics:
        for _ in bar:
            t0 = time.perf_counter()
            record = trainer.train_step()
            elapsed = time.perf_counter() - t0
            train_seconds, tokens = train_seconds + elapsed, tokens + cfg.tokens_per_step
            record["tokens_per_s"] = cfg.tokens_per_step / elapsed
            bar.set_postfix(loss=f"{record['ce']:.3f}",
                            maxvio=f"{_mean(record['max_vio_batch'].values()):.2f}")
            step = trainer.step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluation = trainer.evaluate(val_NL)
                record.update(evaluation)
            if step % cfg.log_every == 0 or "val_ce" in record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != end:
                trainer.save(out_dir)
    trainer.save(out_dir)
    bpt = bytes_per_token(val_NL, tokenizer)
    bigram = bigram_cross_entropy(corpus.train, val_NL, vocab_size=tokenizer.vocab_size)
    if "val_ce" in evaluation:
        evaluation = {**evaluation, "val_ce_per_byte": evaluation["val_ce"] / bpt}
    summary = {"command": command, "steps_done": trainer.step, "steps": cfg.steps,
               "corpus": corpus.describe(),
               "tokenizer": tokenizer.kind, "val_bytes_per_token": bpt,
               "bigram_val_ce": bigram, "bigram_val_ce_per_byte": bigram / bpt,
               "final": {k: v for k, v in record.items() if not k.startswith("val_") and k != "bias"},
               "validation": evaluation,
               "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start_time,
               "tokens_this_run": tokens, "tokens_per_s": tokens / train_seconds if train_seconds else None,
               "threads": torch.get_num_threads(), "load_average_before_after": [load_before[0],
                                                                                  os.getloadavg()[0]],
               "torch": torch.__version__, "config": cfg.to_dict()}
    if trainer.step == cfg.steps:
        summary["samples"] = samples(trainer.model, cfg.sample_prompts, cfg.sample_tokens, tokenizer)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def samples(model: Transformer, prompts: tuple[str, ...], n_tokens: int,
            tokenizer: ByteTokenizer | None = None) -> dict[str, str]:
    """Greedy continuations of each prompt (`n_tokens` ids of `tokenizer`, default bytes), as text."""
    tokenizer = tokenizer or ByteTokenizer()
    model.eval()
    out = {}
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        n = min(n_tokens, model.cfg.max_seq_len - len(ids))
        out[prompt] = tokenizer.decode(generate(model, ids, n)[len(ids):])
    return out


def _open_metrics(path: Path, step: int):
    """The metrics file for appending, without lines after `step` (left by a run resumed earlier)."""
    kept = []
    if step and path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
