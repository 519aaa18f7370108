"""Checkpoint formats -> the network's state dict; strict key checks; inert unpickling."""

from __future__ import annotations

import pickle

import pytest
import torch

from vllm_terratorch.errors import ModelSourceError, WeightsError
from vllm_terratorch.core.factory import build_network
from vllm_terratorch.core.config import load_config
from vllm_terratorch.testing.samples import build_sample_task, sample_pretrained_cfg, write_model_folder
from vllm_terratorch.core.weights import find_weight_files, load_checkpoint, match_state_dict, read_state_dict

CFG = sample_pretrained_cfg("segmentation", image_size=32)


@pytest.fixture(scope="module")
def expected_state():
    return {k: v.clone() for k, v in build_sample_task(CFG, seed=7).model.state_dict().items()}


@pytest.mark.parametrize("weight_format", ["ckpt", "pt", "state_dict", "safetensors"])
def test_every_format_loads_the_same_weights(tmp_path, weight_format, expected_state):
    folder = write_model_folder(tmp_path, CFG, weight_format=weight_format, seed=7)
    network = build_network(load_config(folder).pretrained_cfg.model)
    state = match_state_dict(load_checkpoint(folder), network.state_dict())
    assert state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(state[name], tensor), name


def test_lightning_checkpoint_objects_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"model.w": torch.ones(2)}, "callbacks": Payload()}, tmp_path / "model.ckpt")
    state = read_state_dict(tmp_path / "model.ckpt")
    assert list(state) == ["model.w"] and torch.equal(state["model.w"], torch.ones(2))
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_listed():
    expected = {f"layer{i}.weight": torch.zeros(2) for i in range(8)}
    state = {f"model.layer{i}.weight": torch.zeros(2) for i in range(1, 8)} | {"model.extra.bias": torch.zeros(1)}
    with pytest.raises(WeightsError) as error:
        match_state_dict(state, expected, source="ckpt")
    message = str(error.value)
    assert "1 model tensors missing from the checkpoint: layer0.weight" in message
    assert "1 checkpoint tensors the model does not have: extra.bias" in message
    relaxed = match_state_dict(state, expected, strict=False)
    assert "layer0.weight" not in relaxed and "layer1.weight" in relaxed


def test_shape_mismatch_is_an_error_even_when_relaxed():
    with pytest.raises(WeightsError, match=r"decoder.w \(3,\) vs model \(2,\)"):
        match_state_dict({"decoder.w": torch.zeros(3)}, {"decoder.w": torch.zeros(2)}, strict=False)


def test_position_embedding_of_other_size_keeps_the_models():
    expected = {"encoder.pos_embed": torch.ones(1, 5, 4)}
    state = match_state_dict({"encoder.pos_embed": torch.zeros(1, 9, 4)}, expected)
    assert torch.equal(state["encoder.pos_embed"], expected["encoder.pos_embed"])


def test_many_missing_keys_are_abbreviated():
    expected = {f"k{i:02d}": torch.zeros(1) for i in range(12)}
    with pytest.raises(WeightsError, match="k00, k01, k02, k03, k04 and 7 more"):
        match_state_dict({}, expected)


def test_folder_problems(tmp_path):
    with pytest.raises(ModelSourceError, match="has no weights") as error:
        find_weight_files(tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    torch.save({"a": torch.zeros(1)}, tmp_path / "a.ckpt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "b.ckpt")
    with pytest.raises(ModelSourceError, match="several"):
        find_weight_files(tmp_path)


def test_corrupt_and_empty_checkpoints(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="model.pt"):
        read_state_dict(tmp_path / "model.pt")
    torch.save({"epoch": 1, "hyper_parameters": {"lr": 0.1}}, tmp_path / "empty.ckpt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_state_dict(tmp_path / "empty.ckpt")
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps("nope"))
    with pytest.raises(WeightsError, match="model.safetensors"):
        read_state_dict(tmp_path / "model.safetensors")
