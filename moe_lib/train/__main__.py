"""``python -m moe_lib.train --preset tiny --out runs/tiny``: train a preset, with overrides."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..config import AUX_LOSSES
from .loop import CORPORA, train
from .presets import PRESETS, make_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.train", description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--quick", action="store_true",
                        help="the `test` preset: a few steps of a very small model (smoke test)")
    parser.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue from the state in --out")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--corpus", choices=CORPORA)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--mtp-depth", type=int, help="number of MTP modules D (0 = none)")
    parser.add_argument("--mtp-lambda", type=float, help="MTP loss weight before the switch")
    parser.add_argument("--aux-loss", choices=AUX_LOSSES, help="auxiliary balance loss")
    parser.add_argument("--aux-alpha", type=float, help="weight alpha of the auxiliary loss")
    parser.add_argument("--bias-speed", type=float, help="loss-free bias update speed u (0 = off)")
    parser.add_argument("--stop-after", type=int, help="stop after this step (resume later)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "test" if args.quick else args.preset
    changes = {name: getattr(args, name) for name in ("steps", "seed", "corpus", "batch_size",
                                                      "grad_accum", "lr", "mtp_lambda")
               if getattr(args, name) is not None}
    cfg = make_config(preset, mtp_depth=args.mtp_depth, aux_loss=args.aux_loss, aux_alpha=args.aux_alpha,
                      bias_speed=args.bias_speed, **changes)
    out = args.out or f"runs/{preset}"
    command = "python -m moe_lib.train " + shlex.join(argv)
    summary = train(cfg, out, resume=args.resume, stop_after=args.stop_after,
                    progress=not args.no_progress, command=command)
    val = summary["validation"]
    if val:
        print(f"validation cross-entropy {val['val_ce']:.4f} nats/byte (bigram baseline "
              f"{summary['bigram_val_ce']:.4f}); MaxVio_global per layer "
              + ", ".join(f"{k} {v:.3f}" for k, v in val["val_max_vio_global"].items()))
    print(f"{summary['tokens_this_run']} tokens in {summary['train_seconds']:.1f} s of training "
          f"({summary['wall_seconds']:.1f} s wall), {summary['threads']} threads")
    for prompt, text in summary.get("samples", {}).items():
        print(f"--- greedy sample after {prompt!r}:\n{prompt}{text}")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
