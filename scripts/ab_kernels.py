"""A/B the MoE layer of this checkout against an older commit, in alternated processes.

    .venv/bin/python scripts/ab_kernels.py 675f6f0 [--shapes 4096x256x128 ...] [--rounds 3] [--capped]

The old commit is checked out with `git worktree` under a temporary folder; each side builds its own
C++ kernels (a separate TORCH_EXTENSIONS_DIR) and is imported from its own tree (PYTHONPATH). Each
round runs one process per side, alternated, each timing the reference layer's forward (no_grad)
and forward+backward (the benchmark's `forward_backward`), medians of its repetitions; the summary
is the median over rounds and old / new, the speed-up of this checkout. `--capped` caps the
instruction set at AVX2 (oneDNN, MKL, ATen), as `bench cpu`'s avx2 level does.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from moe_lib.bench.cpu import LEVELS

ROOT = Path(__file__).resolve().parent.parent

# the timing child: run in each tree with that tree's moe_lib on the path. It builds the layer itself
# (as bench cpu's build_layers builds its moe_lib layers) and uses only what old trees have too.
CHILD = r"""
import statistics, sys, time, torch
from moe_lib.config import MoEConfig
from moe_lib.moe import DeepSeekMoE
from moe_lib.bench.cpu import forward_backward
torch.set_num_threads(int(sys.argv[5]))
T, H, I, reps = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
layer = DeepSeekMoE(MoEConfig(d_model=H, d_expert=I)).eval()
layer.gate.correction_bias.normal_(0, 0.02)
x = torch.randn(T, H, requires_grad=True)
proj = torch.randn(T, H)
params = list(layer.parameters())
def forward():
    with torch.no_grad():
        layer(x)
out = []
for fn in (forward, lambda: forward_backward(layer, x, proj, params)):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    out.append(statistics.median(times))
print(*out)
"""


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, d_model, d_expert = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: expected TOKENSxD_MODELxD_EXPERT, e.g. 4096x256x128") from None
    return tokens, d_model, d_expert


def reps_for(tokens: int, d_model: int, d_expert: int) -> int:
    """Repetitions per process: 15 at the reference shape (about 1.5 s of forward plus
    forward+backward on the 2-core Xeon of benchmarks/cpu.json), more for less work (at most 41),
    fewer for more (at least 5)."""
    work = tokens * d_model * d_expert / (4096 * 256 * 128)
    return max(5, min(41, round(15 / work)))


def run_side(tree: Path, ext_dir: Path, shape: tuple[int, int, int], threads: int,
             capped: bool) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), TORCH_EXTENSIONS_DIR=str(ext_dir))
    if capped:
        env.update(LEVELS["avx2"])
    args = [sys.executable, "-c", CHILD, *map(str, shape), str(reps_for(*shape)), str(threads)]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"timing in {tree} failed:\n{done.stderr[-2000:]}")
    forward, forward_backward = (float(v) for v in done.stdout.split()[-2:])
    return forward, forward_backward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the older commit to compare against")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape("4096x256x128")],
                        metavar="TxHxI", help="tokens x d_model x d_expert (default: 4096x256x128)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated process pairs per shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--capped", action="store_true", help="cap the instruction set at AVX2")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="moe_ab_"))
    old = work / "old"
    worktree = ["git", "-C", str(ROOT), "worktree"]
    try:
        added = subprocess.run(worktree + ["add", "--detach", "-q", str(old), args.commit],
                               capture_output=True, text=True)
        if added.returncode != 0:
            raise SystemExit(f"cannot check out {args.commit!r}: {added.stderr.strip()}")
        level = "capped at AVX2" if args.capped else "native"
        print(f"this checkout vs {args.commit}, {level}, {args.threads} threads; ms, medians")
        trees = {"new": (ROOT, work / "ext_new"), "old": (old, work / "ext_old")}
        for shape in args.shapes:
            times: dict[str, list[tuple[float, float]]] = {"new": [], "old": []}
            steps = [side for _ in range(args.rounds) for side in trees]
            for side in tqdm(steps, desc="x".join(map(str, shape)), unit="process", leave=False):
                tree, ext_dir = trees[side]
                times[side].append(run_side(tree, ext_dir, shape, args.threads, args.capped))
            med = {side: [statistics.median(t[i] for t in runs) for i in (0, 1)]
                   for side, runs in times.items()}
            cells = [f"{mode} old {med['old'][i]:8.2f} new {med['new'][i]:8.2f}"
                     f" ({med['old'][i] / med['new'][i]:.3f}x)"
                     for i, mode in enumerate(("forward", "forward+backward"))]
            print(f"{'x'.join(map(str, shape)):>14}  " + "   ".join(cells), flush=True)
    finally:
        subprocess.run(worktree + ["remove", "--force", str(old)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
