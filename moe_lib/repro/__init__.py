"""Small-scale reproductions of the papers' headline results, one module per command:
``python -m moe_lib.repro {balancing,architecture} [--quick] [--seeds N] [--out PATH]``.

`balancing`: Wang et al. 2024 Table 2 and its update-rate ablation, DeepSeek-V3 Sec. 4.5.3.
`architecture`: DeepSeekMoE's GShard vs fine-grained vs fine-grained + shared ablation, and its
evaluation-time ablation of the shared expert. Each writes a JSON file (command, machine, setup, the
papers' numbers, every run, a summary over seeds) after every finished run; `moe_lib.viz.repro` plots it.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = ("balancing", "architecture")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.repro", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)
