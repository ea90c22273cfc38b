"""The Python examples of README.md run as written (from the repository root) and do what they say."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_examples_run(capsys):
    blocks = _blocks()
    assert len(blocks) == 2
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        layer, model = {}, {}
        exec(compile(blocks[0], "README.md[layer]", "exec"), layer)
        exec(compile(blocks[1], "README.md[model]", "exec"), model)
    finally:
        os.chdir(cwd)
    assert layer["y"].shape == (2, 128, 256) and int(layer["moe"].last_routing.load.sum()) == 2 * 128 * 6
    assert torch.equal(model["out"], model["fast"])  # speculative decoding: the same greedy tokens
    printed = capsys.readouterr().out
    assert printed.startswith("def main(") and len(model["out"]) == len(model["prompt"]) + 64
    assert model["tok"].vocab_size == model["model"].cfg.vocab_size == 1024
