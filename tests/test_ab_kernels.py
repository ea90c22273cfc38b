"""scripts/ab_kernels.py: its shape parsing, and its timing child against this checkout."""
import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ab_kernels", ROOT / "scripts" / "ab_kernels.py")
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def test_parse_shape():
    assert ab.parse_shape("4096x256x128") == (4096, 256, 128)
    assert ab.parse_shape("16384X512X256") == (16384, 512, 256)
    for bad in ("4096x256", "4096x256x128x1", "ax256x128", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="TOKENSxD_MODELxD_EXPERT"):
            ab.parse_shape(bad)


def test_reps_scale_with_the_work():
    assert ab.reps_for(4096, 256, 128) == 15
    assert ab.reps_for(64, 32, 16) == 41  # capped: tiny shapes
    assert ab.reps_for(16384, 512, 256) == 5  # floor: large shapes
    assert ab.reps_for(1024, 256, 128) > ab.reps_for(4096, 256, 128)


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        ab.main(["HEAD", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_child_times_this_checkout():
    """The child the script runs in each tree works against this tree's API and prints two
    positive times (forward, forward+backward) in ms."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", ab.CHILD, "64", "32", "16", "2", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    forward, forward_backward = (float(v) for v in done.stdout.split()[-2:])
    assert forward > 0 and forward_backward > 0
