"""Benchmarks, one module per command: ``python -m moe_lib.bench {cpu,train,mtp,ep,gpu}``.

Each module defines `add_parser(commands)`, which registers its subcommand and sets `run`, a function
of the parsed arguments. `main` lists the modules in `COMMANDS`; a module that is not there yet is
simply not offered.
"""

from __future__ import annotations

import argparse
import importlib
import platform
from pathlib import Path

COMMANDS = ("cpu", "train", "mtp", "ep", "gpu")


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its instruction-set flags, from /proc/cpuinfo ("flags", or "Features"
    on ARM); `platform.processor()` and no flags where there is no /proc/cpuinfo. Every benchmark
    and reproduction records them with its results."""
    model, flags = platform.processor() or platform.machine(), set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return model, flags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_lib.bench",
                                     description="Benchmarks of moe_lib; each writes JSON under benchmarks/.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.add_parser(commands)
    args = parser.parse_args(argv)
    args.run(args)
