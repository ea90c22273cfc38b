"""Checkpoints: a directory with `config.json` (the `ModelConfig`) and `model.safetensors` (weights and
buffers, including every router's correction bias and accumulated loads), plus `train_state.pt`
(optimizer, scheduler, RNG states, data position) when training can resume from it, and
`tokenizer.json` when the model reads BPE ids (`load_tokenizer`; without it the ids are bytes).

The safetensors metadata repeats the config and records a SHA-256 of the tensor data, so a checkpoint
whose files disagree, or whose weights were damaged after saving, is refused with a message naming
the file and the problem instead of loading silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model import ModelConfig, Transformer
from .tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer

__all__ = ["load_checkpoint", "load_tokenizer", "save_checkpoint"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"


def save_checkpoint(directory: str | Path, model: Transformer, train_state: dict | None = None,
                    tokenizer: ByteTokenizer | None = None) -> Path:
    """Write `model` (and, if given, the training state and the tokenizer, as tokenizer.json) to
    `directory`; returns the directory.

    Files are written to a temporary name and renamed, so an interrupted save never leaves a
    half-written file under the final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = unique_state(model)
    metadata = {"format": "moe_lib", "config": model.cfg.to_json(), "sha256": tensor_digest(tensors)}
    _atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(model.cfg.to_json() + "\n"))
    if tokenizer is not None:
        if tokenizer.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size "
                             f"is {model.cfg.vocab_size}")
        save_tokenizer(tokenizer, directory)
    if train_state is not None:
        _atomic(directory / TRAIN_STATE_FILE, lambda tmp: torch.save(train_state, tmp))
    return directory


def load_checkpoint(path: str | Path, config: ModelConfig | None = None) -> Transformer:
    """The model saved in directory `path`, in eval mode, with `.cfg` from its `config.json`.

    If `config` is given, the checkpoint must have been saved with exactly that config; otherwise a
    ValueError names the differing fields. Missing, truncated or corrupted files raise errors that
    name the file.
    """
    directory = Path(path)
    cfg = read_config(directory)
    if config is not None and config != cfg:
        raise ValueError(f"checkpoint {directory} was saved with a different config: "
                         f"{format_diff(config_diff(cfg, config), 'checkpoint', 'requested')}")
    model = Transformer(cfg)
    load_weights(model, directory)
    return model.eval()


def read_config(directory: Path) -> ModelConfig:
    """The `ModelConfig` in `directory/config.json`, with errors that name the file."""
    _require_files(directory, (CONFIG_FILE, WEIGHTS_FILE))
    file = directory / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{file} does not hold a valid ModelConfig: {err}") from err


def load_weights(model: Transformer, directory: str | Path) -> None:
    """Load `directory/model.safetensors` into `model` after checking config, names, shapes and digest."""
    file = Path(directory) / WEIGHTS_FILE
    _require_files(Path(directory), (WEIGHTS_FILE,))
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers/data
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                         f"{err}") from err
    if "config" in metadata:
        diff = config_diff(ModelConfig.from_dict(json.loads(metadata["config"])), model.cfg)
        if diff:
            raise ValueError(f"{file} holds weights of a different config than the model "
                             f"({format_diff(diff, 'weights', 'model')})")
    expected = unique_state(model)
    _check_names_and_shapes(file, tensors, expected)
    if "sha256" in metadata and tensor_digest(tensors) != metadata["sha256"]:
        raise ValueError(f"{file} is corrupted: the SHA-256 of its tensor data does not match the one "
                         "recorded when it was saved")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(tensors[name])


def load_train_state(directory: str | Path) -> dict:
    """The training state saved next to the weights (optimizer, scheduler, RNG, data position)."""
    file = Path(directory) / TRAIN_STATE_FILE
    _require_files(Path(directory), (TRAIN_STATE_FILE,))
    try:
        return torch.load(file, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError for damaged files
        raise ValueError(f"{file} is not a readable training state (truncated or corrupted?): "
                         f"{err}") from err


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tensor shared by several modules (the MTP modules' embedding
    and head are the main model's) is kept once, under its first name."""
    seen: set[tuple[int, int, tuple]] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_diff(a, b) -> dict[str, tuple]:
    """{field: (value in a, value in b)} for every differing field of two configs (anything with
    `to_dict`); nested fields as "moe.top_k", "model.moe.top_k"."""
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(flat_a.keys() | flat_b.keys())
            if flat_a.get(k) != flat_b.get(k)}


def format_diff(diff: dict[str, tuple], left: str, right: str) -> str:
    return "; ".join(f"{k}: {left} {a!r}, {right} {b!r}" for k, (a, b) in diff.items())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _check_names_and_shapes(file: Path, tensors: dict, expected: dict) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)} in the "
                             f"file but {tuple(tensor.shape)} in the model built from the config")


def _require_files(directory: Path, names: tuple[str, ...]) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint directory {directory} lacks {', '.join(missing)} "
                                f"(a checkpoint holds {CONFIG_FILE} and {WEIGHTS_FILE}, plus "
                                f"{TRAIN_STATE_FILE} to resume training)")


def _atomic(final: Path, write) -> None:
    tmp = final.with_name(final.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, final)
