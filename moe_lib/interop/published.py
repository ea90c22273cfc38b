"""DeepSeek's published checkpoints: safetensors shards in the published naming, FP8 block scales.

A published checkpoint (DeepSeek-V3, R1, V2, ...) is a directory holding `config.json`,
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}) and the shards.
`load_deepseek(path)` returns a `moe_lib.model.Transformer` (optionally only its first `n_layers`
blocks); `load_deepseek_layer(path, layer)` returns the `DeepSeekMoE` of one layer (router, experts,
shared experts), reading only that layer's tensors, so one real V3 MoE layer (11 GB in FP8) can be
studied without the rest of the model. Shards are opened lazily, tensor by tensor.

Tensor names, published -> ours (N < L = num_hidden_layers, E an expert, k an MTP module):

    model.embed_tokens.weight                          embed_tokens.weight
    model.norm.weight                                  norm.weight
    lm_head.weight                                     lm_head.weight
    model.layers.N.input_layernorm.weight              layers.N.input_layernorm.weight
    model.layers.N.post_attention_layernorm.weight     layers.N.post_attention_layernorm.weight
    model.layers.N.self_attn.<p>.weight                layers.N.self_attn.<p>.weight  for <p> in
        q_proj (q_lora_rank = 0) or q_a_proj, q_a_layernorm, q_b_proj; kv_a_proj_with_mqa,
        kv_a_layernorm, kv_b_proj, o_proj
    model.layers.N.mlp.{gate,up,down}_proj.weight      layers.N.mlp.<same>  (N < first_k_dense_replace)
    model.layers.N.mlp.gate.weight                     layers.N.mlp.gate.weight
    model.layers.N.mlp.gate.e_score_correction_bias    layers.N.mlp.gate.correction_bias (float32;
                                                       zero for V2, which has none)
    model.layers.N.mlp.experts.E.gate_proj.weight      layers.N.mlp.experts.gate_up_proj[E, :I]
    model.layers.N.mlp.experts.E.up_proj.weight        layers.N.mlp.experts.gate_up_proj[E, I:]
    model.layers.N.mlp.experts.E.down_proj.weight      layers.N.mlp.experts.down_proj[E]
    model.layers.N.mlp.shared_experts.<p>.weight       layers.N.mlp.shared_experts.<p>.weight
    model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight    mtp.k.<same>
    model.layers.{L+k}.shared_head.norm.weight         mtp.k.shared_head.norm.weight
    model.layers.{L+k}.<the block names above>         mtp.k.<same>
    model.layers.{L+k}.embed_tokens.weight             not read: copies of the main model's
    model.layers.{L+k}.shared_head.head.weight         embedding and head, which MTP shares
    <name>_scale_inv                                   the block scales of an FP8 <name>
    (ours only)                                        mlp.gate.tokens_per_expert: zeros

FP8 (`quantization_config` {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}):
a `torch.float8_e4m3fn` weight Q [out, in] comes with float32 scales s = `<name>_scale_inv`
[ceil(out/128), ceil(in/128)], one per 128x128 block (edge blocks partial), and is dequantised on load:

    W[i, j] = Q[i, j] * s[i // 128, j // 128]

config.json -> ModelConfig: vocab_size, hidden_size (d_model), num_hidden_layers (n_layers),
first_k_dense_replace (n_dense_layers), intermediate_size (d_dense), num_attention_heads (n_heads),
q_lora_rank (null -> 0), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rope_theta,
rms_norm_eps (norm_eps), num_nextn_predict_layers (mtp_depth), initializer_range (init_std).
-> MoEConfig: moe_intermediate_size (d_expert), n_routed_experts, n_shared_experts,
num_experts_per_tok (top_k), n_group / topk_group, scoring_func, norm_topk_prob,
routed_scaling_factor (route_scale), and topk_method: "noaux_tc" (V3: correction bias, top-2-sum group
score), "group_limited_greedy" (V2: max group score) or "greedy" (no group limit).
Checked when present: hidden_act "silu", moe_layer_freq 1, attention_bias and tie_word_embeddings
false. Other keys (tokenizer ids, dtype, aux_loss_alpha, num_key_value_heads, which MLA does not
use, ...) do not change the forward pass and are ignored.

Context length: V3's config asks for YaRN (`rope_scaling`, factor 40 beyond 4096 tokens), which
moe_lib does not implement. DeepSeek's `inference/model.py` applies YaRN only when its max_seq_len
exceeds `original_max_position_embeddings`, so up to that length plain RoPE is what DeepSeek runs:
`max_seq_len` defaults to it, and longer requests raise ValueError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MoEConfig
from ..model import ModelConfig, Transformer
from ..moe import DeepSeekMoE
from .state import assign_state, on_meta, some_names

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

_MODEL_KEYS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
               "first_k_dense_replace": "n_dense_layers", "intermediate_size": "d_dense",
               "num_attention_heads": "n_heads", "kv_lora_rank": "kv_lora_rank",
               "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
               "v_head_dim": "v_head_dim", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"}
_MOE_KEYS = {"hidden_size": "d_model", "moe_intermediate_size": "d_expert",
             "n_routed_experts": "n_routed", "n_shared_experts": "n_shared",
             "num_experts_per_tok": "top_k", "scoring_func": "score_func",
             "norm_topk_prob": "norm_topk_prob", "routed_scaling_factor": "route_scale"}
_REQUIRED = sorted({*_MODEL_KEYS, *_MOE_KEYS, "q_lora_rank", "max_position_embeddings", "topk_method"})
_FIXED = {"hidden_act": "silu", "moe_layer_freq": 1, "attention_bias": False, "tie_word_embeddings": False}
_TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def dequantize_fp8(weight_OI: torch.Tensor, scale_inv: torch.Tensor,
                   block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W[i, j] = Q[i, j] * s[i // bo, j // bi] in float32: Q [out, in], s [ceil(out/bo), ceil(in/bi)]."""
    (n_out, n_in), (bo, bi) = weight_OI.shape, block
    blocks = (math.ceil(n_out / bo), math.ceil(n_in / bi))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(f"FP8 scales of shape {tuple(scale_inv.shape)} do not fit a weight of shape "
                         f"{(n_out, n_in)} in {bo}x{bi} blocks: expected {blocks}")
    if n_out % bo or n_in % bi:  # partial edge blocks: pad to whole blocks, dequantise, cut
        padded = weight_OI.new_zeros(blocks[0] * bo, blocks[1] * bi)
        padded[:n_out, :n_in] = weight_OI
        return dequantize_fp8(padded, scale_inv, block)[:n_out, :n_in].contiguous()
    w_OI = weight_OI.float()
    w_OI.view(blocks[0], bo, blocks[1], bi).mul_(scale_inv.float()[:, None, :, None])
    return w_OI


class PublishedCheckpoint:
    """A published checkpoint directory, read lazily, tensor by tensor.

    `config` is the raw config.json, `weight_map` the index. `read` lists the tensor names read so
    far (scales included) and `shards_opened` the shard files opened, so callers can check that a
    selected-layer load touched nothing else.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = _read_json(self.path / CONFIG_FILE)
        weight_map = _read_json(self.path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{self.path / INDEX_FILE} has no 'weight_map' (tensor name -> shard file)")
        self.weight_map: dict[str, str] = weight_map
        self.block = _fp8_block(self.config)
        self.read: list[str] = []
        self.shards_opened: set[str] = set()
        self._handles: dict[str, tuple[object, set[str]]] = {}

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` in `dtype`, dequantised with its block scales if it is stored in FP8."""
        stored = self._stored(name)
        scale_name = name + "_scale_inv"
        if stored.dtype == torch.float8_e4m3fn:
            if self.block is None:
                raise ValueError(f"{name} is stored in FP8 but {CONFIG_FILE} has no quantization_config")
            if scale_name not in self.weight_map:
                raise KeyError(f"{name} is stored in FP8 but the index has no {scale_name}")
            return dequantize_fp8(stored, self._stored(scale_name), self.block).to(dtype)
        if not stored.is_floating_point() or stored.element_size() == 1:
            raise ValueError(f"{name} is stored as {stored.dtype}: expected a float type or "
                             f"float8_e4m3fn with block scales")
        if scale_name in self.weight_map:
            raise ValueError(f"{name} is stored as {stored.dtype} but has FP8 scales {scale_name}")
        return stored.to(dtype)

    def check_names(self, expected: set[str], optional: set[str] = frozenset()) -> None:
        """Raise if the index lacks a name of `expected` or holds one outside `expected | optional`
        (FP8 scales of expected names aside)."""
        missing = sorted(expected - set(self.weight_map))
        if missing:
            raise KeyError(f"{self.path / INDEX_FILE} lacks tensors that {CONFIG_FILE} implies: "
                           f"{some_names(missing)}")
        known = expected | optional
        unknown = sorted(name for name in self.weight_map
                         if name not in known and name.removesuffix("_scale_inv") not in expected)
        if unknown:
            raise ValueError(f"{self.path / INDEX_FILE} holds tensors of no known DeepSeek-V3/V2 "
                             f"parameter: {some_names(unknown)}")

    def _stored(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path / INDEX_FILE} has no tensor {name!r}")
        shard = self.weight_map[name]
        handle, names = self._handles.get(shard) or self._open(shard, name)
        if name not in names:
            raise KeyError(f"the index puts {name!r} in {shard}, but that shard does not hold it")
        self.read.append(name)
        return handle.get_tensor(name)

    def _open(self, shard: str, name: str) -> tuple[object, set[str]]:
        """Open `shard` (memory-mapped: nothing is read until a tensor is asked for)."""
        from safetensors import SafetensorError, safe_open

        file = self.path / shard
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} (holding {name!r}) does not exist")
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except SafetensorError as error:
            raise ValueError(f"shard {file} is truncated or corrupted: {error}") from None
        self._handles[shard] = handle, set(handle.keys())
        self.shards_opened.add(shard)
        return self._handles[shard]


def model_config(published: dict, max_seq_len: int | None = None, **moe_overrides) -> ModelConfig:
    """The `ModelConfig` of a published config.json (see the module docstring for the keys).

    moe_overrides: `MoEConfig` fields the checkpoint does not describe (dispatch, balancing).
    """
    limit = _context_limit(published)
    max_seq_len = limit if max_seq_len is None else max_seq_len
    if max_seq_len > limit:
        raise ValueError(f"max_seq_len={max_seq_len} needs the YaRN rope scaling of {CONFIG_FILE}, "
                         f"which moe_lib does not implement: use at most {limit}")
    fields = {ours: published[key] for key, ours in _MODEL_KEYS.items()}
    fields.update(q_lora_rank=published["q_lora_rank"] or 0, max_seq_len=max_seq_len,
                  rope_theta=float(published["rope_theta"]), norm_eps=float(published["rms_norm_eps"]),
                  mtp_depth=published.get("num_nextn_predict_layers") or 0, mtp_moe=True,
                  init_std=published.get("initializer_range", 0.02),
                  moe=moe_config(published, **moe_overrides))
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise ValueError(f"{CONFIG_FILE} does not describe a valid model: {error}") from None


def moe_config(published: dict, **overrides) -> MoEConfig:
    """The `MoEConfig` of every MoE layer of a published config.json."""
    _check_config(published)
    method = published["topk_method"]
    groups = (1, 1) if method == "greedy" else (published.get("n_group"), published.get("topk_group"))
    if not all(isinstance(g, int) and g >= 1 for g in groups):
        raise ValueError(f"{CONFIG_FILE}: topk_method={method!r} needs n_group and topk_group, got "
                         f"{groups}")
    fields = {ours: published[key] for key, ours in _MOE_KEYS.items()}
    fields.update(n_groups=groups[0], topk_groups=groups[1], route_scale=float(fields["route_scale"]),
                  group_score="top2_sum" if method == "noaux_tc" else "max")
    defaults = {} if method == "noaux_tc" else {"bias_update": "none"}
    try:
        return MoEConfig(**fields, **{**defaults, **overrides})
    except ValueError as error:
        raise ValueError(f"{CONFIG_FILE} does not describe a valid MoE layer: {error}") from None


def load_deepseek(source: str | Path | PublishedCheckpoint, n_layers: int | None = None,
                  dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
                  **moe_overrides) -> Transformer:
    """The `Transformer` of a published checkpoint, in eval mode, weights in `dtype`.

    source: the checkpoint directory, or a `PublishedCheckpoint` (to inspect what was read).
    n_layers: load only the first `n_layers` blocks (then without the MTP modules, which consume
        the last block's output): the model returns the logits of a truncated network, and
        `forward_hidden` the real hidden states entering block `n_layers`.
    max_seq_len: defaults to the longest context without YaRN (see the module docstring).
    Reads only the tensors of what it builds.
    """
    ckpt = source if isinstance(source, PublishedCheckpoint) else PublishedCheckpoint(source)
    cfg = model_config(ckpt.config, max_seq_len, **moe_overrides)
    _check_index(ckpt, cfg)
    if n_layers is not None:
        if not (isinstance(n_layers, int) and 1 <= n_layers <= cfg.n_layers):
            raise ValueError(f"n_layers={n_layers!r} is invalid: expected 1 .. {cfg.n_layers}")
        cfg = cfg.replace(n_layers=n_layers, n_dense_layers=min(cfg.n_dense_layers, n_layers),
                          mtp_depth=cfg.mtp_depth if n_layers == cfg.n_layers else 0)
    model = on_meta(lambda: Transformer(cfg))
    state = _read_state(ckpt, model, lambda name: _model_source(name, ckpt.config), dtype)
    return assign_state(model, state, f"checkpoint {ckpt.path}")


def load_deepseek_layer(source: str | Path | PublishedCheckpoint, layer: int,
                        dtype: torch.dtype = torch.float32, **moe_overrides) -> DeepSeekMoE:
    """The `DeepSeekMoE` (router, routed and shared experts) of block `layer`, in eval mode.

    source: the checkpoint directory, or a `PublishedCheckpoint` (to inspect what was read).
    layer: a MoE block, first_k_dense_replace <= layer < num_hidden_layers, or an MTP module's
        block at num_hidden_layers + k. Reads only that layer's tensors (its shards may be all
        there is on disk).
    """
    ckpt = source if isinstance(source, PublishedCheckpoint) else PublishedCheckpoint(source)
    cfg = model_config(ckpt.config, **moe_overrides)
    _check_index(ckpt, cfg)
    if not (isinstance(layer, int) and cfg.n_dense_layers <= layer < cfg.n_layers + cfg.mtp_depth):
        raise ValueError(f"layer={layer!r} is not a MoE layer of {ckpt.path}: expected "
                         f"{cfg.n_dense_layers} .. {cfg.n_layers + cfg.mtp_depth - 1} "
                         f"(layers below {cfg.n_dense_layers} are dense)")
    moe = on_meta(lambda: DeepSeekMoE(cfg.moe))
    state = _read_state(ckpt, moe, lambda name: _block_source(layer, "mlp." + name, ckpt.config), dtype)
    return assign_state(moe, state, f"layer {layer} of checkpoint {ckpt.path}")


@dataclass(frozen=True)
class _Stacked:
    """Per-expert published tensors: expert e's `parts[e]` concatenated on dim 0, experts stacked."""

    parts: tuple[tuple[str, ...], ...]


def _model_source(name: str, published: dict) -> str | _Stacked | None:
    """The published tensor(s) behind our model tensor `name` (None: zeros, not stored)."""
    head, _, rest = name.partition(".")
    if head in ("layers", "mtp"):
        index, _, rest = rest.partition(".")
        offset = published["num_hidden_layers"] if head == "mtp" else 0
        return _block_source(offset + int(index), rest, published)
    return name if name == "lm_head.weight" else "model." + name


def _block_source(layer: int, rest: str, published: dict) -> str | _Stacked | None:
    """The published tensor(s) behind `rest` (our name inside a block) of published block `layer`."""
    prefix = f"model.layers.{layer}."
    if rest == "mlp.gate.tokens_per_expert":  # ours only: load counts start at zero
        return None
    if rest == "mlp.gate.correction_bias":
        return prefix + "mlp.gate.e_score_correction_bias" if _has_bias(published) else None
    projections = {"mlp.experts.gate_up_proj": ("gate_proj", "up_proj"),
                   "mlp.experts.down_proj": ("down_proj",)}.get(rest)
    if projections:
        return _Stacked(tuple(tuple(f"{prefix}mlp.experts.{e}.{p}.weight" for p in projections)
                              for e in range(published["n_routed_experts"])))
    return prefix + rest


def _check_index(ckpt: PublishedCheckpoint, cfg: ModelConfig) -> None:
    """Raise unless the index holds every tensor a checkpoint of `cfg` has, and nothing else than
    those, their FP8 scales and the MTP modules' copies of the embedding and head."""
    expected = set()
    for name in on_meta(lambda: Transformer(cfg)).state_dict():
        source = _model_source(name, ckpt.config)
        if isinstance(source, _Stacked):
            expected.update(part for parts in source.parts for part in parts)
        elif source is not None:
            expected.add(source)
    copies = {f"model.layers.{cfg.n_layers + k}.{name}" for k in range(cfg.mtp_depth)
              for name in _MTP_COPIES}
    ckpt.check_names(expected, copies)


def _read_state(ckpt: PublishedCheckpoint, module: torch.nn.Module, source_of,
                dtype: torch.dtype) -> dict:
    """Our state dict of `module` (on meta), read tensor by tensor; router buffers stay float32."""
    state = {}
    for name, meta in module.state_dict().items():
        source = source_of(name)
        wanted = torch.float32 if name.endswith(("correction_bias", "tokens_per_expert")) else dtype
        if source is None:
            state[name] = torch.zeros(meta.shape, dtype=wanted)
        elif isinstance(source, _Stacked):
            state[name] = _read_stacked(ckpt, source, meta.shape, wanted)
        else:
            state[name] = _checked(ckpt.tensor(source, wanted), meta.shape, source)
    return state


def _read_stacked(ckpt: PublishedCheckpoint, source: _Stacked, shape: torch.Size,
                  dtype: torch.dtype) -> torch.Tensor:
    """Fill [E, rows, cols] tensor by tensor (no list of E tensors held at once)."""
    out = torch.empty(shape, dtype=dtype)
    rows = shape[1] // len(source.parts[0])
    for e, parts in enumerate(source.parts):
        for j, name in enumerate(parts):
            out[e, j * rows:(j + 1) * rows] = _checked(ckpt.tensor(name, dtype), (rows, shape[2]), name)
    return out


def _checked(tensor: torch.Tensor, shape, name: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, but {CONFIG_FILE} implies "
                         f"{tuple(shape)}")
    return tensor


def _has_bias(published: dict) -> bool:
    return published["topk_method"] == "noaux_tc"


def _check_config(published: dict) -> None:
    missing = [key for key in _REQUIRED if key not in published]
    if missing:
        raise ValueError(f"{CONFIG_FILE} lacks the key(s) {missing}")
    for key, wanted in _FIXED.items():
        if key in published and published[key] != wanted:
            raise ValueError(f"{CONFIG_FILE}: {key}={published[key]!r} is not supported: expected "
                             f"{wanted!r}")
    if published["topk_method"] not in _TOPK_METHODS:
        raise ValueError(f"{CONFIG_FILE}: topk_method={published['topk_method']!r} is not supported: "
                         f"expected one of {_TOPK_METHODS}")
    if _has_bias(published) and published["scoring_func"] != "sigmoid":
        raise ValueError(f"{CONFIG_FILE}: topk_method='noaux_tc' expects scoring_func='sigmoid', got "
                         f"{published['scoring_func']!r}")


def _context_limit(published: dict) -> int:
    """The longest context plain RoPE serves: original_max_position_embeddings under YaRN."""
    scaling = published.get("rope_scaling")
    if not scaling:
        return published["max_position_embeddings"]
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "yarn" or "original_max_position_embeddings" not in scaling:
        raise ValueError(f"{CONFIG_FILE}: rope_scaling={scaling!r} is not supported: expected none or "
                         f"YaRN with original_max_position_embeddings")
    return min(scaling["original_max_position_embeddings"], published["max_position_embeddings"])


def _fp8_block(published: dict) -> tuple[int, int] | None:
    """The FP8 block shape of `quantization_config`, or None for an unquantised checkpoint."""
    quant = published.get("quantization_config")
    if quant is None:
        return None
    block = quant.get("weight_block_size")
    if (quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3"
            or not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                         for b in block))):
        raise ValueError(f"{CONFIG_FILE}: quantization_config={quant!r} is not supported: expected "
                         f"quant_method 'fp8', fmt 'e4m3' and weight_block_size [rows, cols]")
    return tuple(block)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: a published checkpoint directory holds "
                                f"{CONFIG_FILE}, {INDEX_FILE} and the safetensors shards")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from None
