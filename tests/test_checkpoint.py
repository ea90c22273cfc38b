"""moe_lib.train.checkpoint: round trip with buffers; clear errors for missing, damaged, mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lib import load_checkpoint
from moe_lib.model import Transformer
from moe_lib.train.checkpoint import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    load_train_state,
    save_checkpoint,
)
from moe_lib.train.presets import TEST_MODEL


def _model(**changes) -> Transformer:
    model = Transformer(TEST_MODEL.replace(**changes))
    with torch.no_grad():
        for layer in model.moe_layers(include_mtp=True):
            layer.gate.correction_bias.normal_(0.0, 0.1)
            layer.gate.tokens_per_expert.copy_(torch.randint(0, 50, layer.gate.tokens_per_expert.shape))
    return model


@pytest.fixture
def saved(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model)
    return tmp_path, model


def test_round_trip_restores_weights_and_balancer_buffers(saved):
    path, model = saved
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.cfg == model.cfg
    state = model.state_dict()
    assert any(k.endswith("gate.correction_bias") for k in state)
    assert any(k.endswith("gate.tokens_per_expert") for k in state)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(ids), model.eval()(ids))


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=TRAIN_STATE_FILE):
        load_train_state(path)


def test_truncated_weights_name_the_file(saved):
    path, _ = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(path)


def test_corrupted_header_names_the_file(saved):
    path, _ = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[10:20] = b"#" * 10  # inside the JSON header
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(path)


def test_corrupted_tensor_data_is_detected(saved):
    path, _ = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1000] ^= 0x40  # one flipped bit in the tensor data: the header still parses
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: the SHA-256"):
        load_checkpoint(path)


def test_different_config_names_the_fields(saved):
    path, _ = saved
    diff = r"moe\.top_k: checkpoint 2, requested 3; n_layers: checkpoint 2, requested 3"
    with pytest.raises(ValueError, match=diff):
        load_checkpoint(path, config=TEST_MODEL.replace(
            n_layers=3, moe=TEST_MODEL.moe.replace(top_k=3)))
    edited = json.loads((path / CONFIG_FILE).read_text())
    edited["d_model"], edited["moe"]["d_model"] = 48, 48
    (path / CONFIG_FILE).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"different config than the model \(d_model: weights 32, model 48"):
        load_checkpoint(path)


def test_shape_mismatch_without_metadata_names_the_tensor(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn(256, 16)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    (tmp_path / CONFIG_FILE).write_text(model.cfg.to_json())
    with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape \(256, 16\) in the file"):
        load_checkpoint(tmp_path)


def test_bad_config_json_names_the_file(saved):
    path, _ = saved
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json does not hold a valid ModelConfig"):
        load_checkpoint(path)
    (path / CONFIG_FILE).write_text(json.dumps({"d_model": 32, "n_experts": 3}))
    with pytest.raises(ValueError, match=r"no field\(s\) \['n_experts'\]"):
        load_checkpoint(path)


def test_truncated_train_state_names_the_file(tmp_path):
    save_checkpoint(tmp_path, _model(), train_state={"step": 3, "x": torch.randn(1000)})
    assert load_train_state(tmp_path)["step"] == 3
    data = (tmp_path / TRAIN_STATE_FILE).read_bytes()
    (tmp_path / TRAIN_STATE_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"train_state\.pt is not a readable training state"):
        load_train_state(tmp_path)
