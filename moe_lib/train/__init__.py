"""Training: data (corpora, byte tokens, windows, bigram baseline), the loop, checkpoints, presets.

`python -m moe_lib.train --preset tiny --out runs/tiny` from the shell, `train(PRESETS["tiny"],
"runs/tiny")` from Python.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .loop import TrainConfig, train
from .presets import PRESETS

__all__ = ["PRESETS", "TrainConfig", "load_checkpoint", "save_checkpoint", "train"]
