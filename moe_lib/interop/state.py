"""Modules filled from state dicts without a random initialisation first.

A DeepSeek-V3 MoE layer holds 11 billion parameters: initialising them at random only to overwrite
them would take minutes and twice the memory. `on_meta` builds a module on the meta device (shapes
only, no storage) and `assign_state` then hands it the loaded tensors themselves (no copy), after
checking names and shapes. The routers' load counters (`tokens_per_expert`, which no checkpoint
stores) start at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_COUNTER = "tokens_per_expert"


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the meta device: every parameter and buffer has a shape but no storage."""
    with torch.device("meta"):
        return build()


def assign_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Give `module` (built by `on_meta`) exactly the tensors of `state`, keyed by our names.

    Raises ValueError naming the missing names, the names `module` does not have and the tensors
    whose shape differs; `source` says where `state` came from, for the message.
    Tensors keep their dtype and device; the returned module is in eval mode.
    """
    expected = module.state_dict(keep_vars=True)
    counters = [name for name in expected if name.rsplit(".", 1)[-1] == _COUNTER]
    missing = sorted(set(expected) - set(state) - set(counters))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the module: missing {some_names(missing)}, "
                         f"unexpected {some_names(unexpected)}")
    wrong = [f"{name} {tuple(state[name].shape)} (expected {tuple(expected[name].shape)})"
             for name in state if state[name].shape != expected[name].shape]
    if wrong:
        raise ValueError(f"{source} has tensors of the wrong shape: {some_names(wrong)}")
    device = next(iter(state.values())).device if state else "cpu"
    zeros = {name: torch.zeros(expected[name].shape, dtype=torch.float32, device=device)
             for name in counters}
    module.load_state_dict({**state, **zeros}, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: {some_names(left)} are not in any state dict and have no values")
    return module.eval()


def some_names(names: list[str], limit: int = 8) -> str:
    """At most `limit` names, and how many more there are."""
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
