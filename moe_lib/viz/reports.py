"""The committed benchmark results (`benchmarks/<name>.json`) that chapters plot."""

from __future__ import annotations

import json
from pathlib import Path


def benchmark_path(name: str) -> Path | None:
    """`benchmarks/<name>.json` of the repository, next to the `moe_lib` package or in the working
    directory or one of its parents (a chapter runs in `chapters/`); None if there is none."""
    package_root = Path(__file__).resolve().parents[2]
    for base in (package_root, Path.cwd(), *Path.cwd().parents):
        candidate = base / "benchmarks" / f"{name}.json"
        if candidate.is_file():
            return candidate
    return None


def benchmark_report(name: str) -> dict:
    """The committed report `benchmarks/<name>.json` (`benchmark_path`), loaded."""
    path = benchmark_path(name)
    if path is None:
        raise FileNotFoundError(f"no benchmarks/{name}.json next to moe_lib or above {Path.cwd()}: "
                                f"run `python -m moe_lib.bench {name}` in the repository")
    return json.loads(path.read_text())
