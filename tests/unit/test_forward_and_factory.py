"""Forward mapping (calling convention, batching) and building without any network access."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from vllm_terratorch.core.config import InputSpec, TaskSpec
from vllm_terratorch.errors import ConfigError, InputError, ModelBuildError
from vllm_terratorch.core.factory import build_network, offline_init_args
from vllm_terratorch.core.forward import ForwardPlan, split_by_shape, task_output
from vllm_terratorch.testing.samples import sample_pretrained_cfg


def spec(data: dict[str, list[int]], target: str | None = None) -> InputSpec:
    return InputSpec.model_validate({"target": target, "data": {k: {"type": "torch.Tensor", "shape": s} for k, s in data.items()}})


class Recorder(nn.Module):
    def forward(self, pixel_values, location_coords=None, temporal_coords=None):
        return {"output": pixel_values.sum(dim=(1, 2, 3)) + location_coords.sum(dim=1), "args": (pixel_values, location_coords)}


class KeywordsOnly(nn.Module):
    def forward(self, x, location_coords):
        return x.mean(dim=(1, 2, 3)) * location_coords[:, 0]


class DictInput(nn.Module):
    def forward(self, x):
        return x["s2"].mean(dim=(1, 2, 3)) + x["dem"].mean(dim=(1, 2, 3))


def test_target_positional_others_keywords_each_request_its_own():
    plan = ForwardPlan.for_network(spec({"pixel_values": [3, 4, 4], "location_coords": [1, 2]}, "pixel_values"), Recorder())
    assert plan.describe() == "forward(pixel_values, location_coords=location_coords)"
    pixels = torch.arange(3 * 48, dtype=torch.float32).reshape(3, 3, 4, 4)
    coords = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])  # vLLM stacks (1, 2) per request
    args, kwargs = plan.batch({"pixel_values": pixels, "location_coords": coords}, torch.float64, "cpu")
    assert args[0].dtype == torch.float64 and args[0].shape == (3, 3, 4, 4)
    assert kwargs["location_coords"].tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    out = task_output(Recorder()(*args, **kwargs))
    assert out.shape == (3,)


def test_no_target_all_keywords():
    plan = ForwardPlan.for_network(spec({"x": [2, 4, 4], "location_coords": [1, 2]}), KeywordsOnly())
    assert plan.describe() == "forward(x=x, location_coords=location_coords)"
    args, kwargs = plan.batch({"x": torch.ones(2, 2, 4, 4), "location_coords": torch.ones(2, 1, 2)}, torch.float32, "cpu")
    assert args == () and set(kwargs) == {"x", "location_coords"}


def test_no_target_single_input_goes_positionally_and_multi_input_as_dict():
    assert ForwardPlan.for_network(spec({"image": [2, 4, 4]}), DictInput()).positional == "image"
    plan = ForwardPlan.for_network(spec({"s2": [2, 4, 4], "dem": [1, 4, 4]}), DictInput())
    assert plan.describe() == "forward({s2, dem})"
    args, kwargs = plan.batch({"s2": torch.ones(2, 2, 4, 4), "dem": torch.ones(2, 1, 4, 4)}, torch.float32, "cpu")
    assert DictInput()(*args, **kwargs).shape == (2,)


def test_no_target_with_unknown_keywords_is_a_config_error():
    with pytest.raises(ConfigError, match="accepts no keyword"):
        ForwardPlan.for_network(spec({"x": [2, 4, 4], "location_coords": [1, 2], "dem": [1, 4, 4]}), KeywordsOnly())


def test_split_by_shape_restores_groups():
    items = [torch.zeros(2, 4, 4), torch.zeros(2, 8, 8), torch.zeros(2, 4, 4)]
    coords = torch.zeros(3, 1, 2)
    groups = split_by_shape({"pixel_values": items, "location_coords": coords}, ["pixel_values", "location_coords"])
    assert [indices for indices, _ in groups] == [[0, 2], [1]]
    assert groups[0][1]["pixel_values"].shape == (2, 2, 4, 4)
    same = split_by_shape({"pixel_values": torch.zeros(3, 2, 4, 4)}, ["pixel_values"])
    assert len(same) == 1 and same[0][0] == [0, 1, 2]


def test_task_output_and_missing_input():
    assert task_output(torch.ones(1)).shape == (1,)
    with pytest.raises(InputError, match="no `output` tensor"):
        task_output({"logits": 1})
    plan = ForwardPlan(names=("a",))
    with pytest.raises(InputError, match="no 'a' input"):
        plan.batch({}, torch.float32, "cpu")


def test_offline_init_args_turns_every_pretrained_switch_off():
    args = {"model_args": {"backbone_pretrained": True, "pretrained": True, "backbone": "x"}, "lr": 1}
    offline = offline_init_args(args)
    assert offline["model_args"] == {"backbone_pretrained": False, "pretrained": False, "backbone": "x"}
    assert args["model_args"]["backbone_pretrained"] is True  # caller's dict untouched


def test_mission_shaped_model_builds_with_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model construction tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = sample_pretrained_cfg("segmentation", image_size=32)
    assert cfg["model"]["init_args"]["model_args"]["backbone_pretrained"] is True
    network = build_network(TaskSpec.model_validate(cfg["model"]))
    assert not network.training
    out = network(torch.zeros(1, 6, 32, 32), location_coords=torch.zeros(1, 2)).output
    assert out.shape == (1, 2, 32, 32)


def test_unknown_task_and_bad_init_args():
    with pytest.raises(ModelBuildError, match="cannot import module 'terratorch.no_such'"):
        build_network(TaskSpec(class_path="terratorch.no_such.Task"))
    with pytest.raises(ModelBuildError, match="has no class 'NoSuchTask'"):
        build_network(TaskSpec(class_path="NoSuchTask"))
    with pytest.raises(ModelBuildError, match="could not build"):
        build_network(TaskSpec(class_path="terratorch.tasks.SemanticSegmentationTask", init_args={"model_args": {"backbone": "no_such_backbone"}, "model_factory": "EncoderDecoderFactory"}))


class PixelWiseLike(nn.Module):
    """The signature of TerraTorch's PixelWiseModel.forward."""

    def forward(self, x, **kwargs):
        return x.mean(dim=(1, 2, 3)) + kwargs["location_coords"][:, 0]


def test_no_target_one_image_goes_positionally_like_the_missions_example():
    # The mission's config generator example has no target: pixel_values + location_coords.
    plan = ForwardPlan.for_network(spec({"pixel_values": [6, 4, 4], "location_coords": [1, 2]}), PixelWiseLike())
    assert plan.describe() == "forward(pixel_values, location_coords=location_coords)"
    args, kwargs = plan.batch({"pixel_values": torch.ones(2, 6, 4, 4), "location_coords": torch.ones(2, 1, 2)}, torch.float32, "cpu")
    assert PixelWiseLike()(*args, **kwargs).shape == (2,)


def test_no_target_keywords_the_network_refuses():
    class Strict(nn.Module):
        def forward(self, x, location_coords=None):
            return x

    with pytest.raises(ConfigError, match=r"accepts no keyword\(s\) \['dem'\]"):
        ForwardPlan.for_network(spec({"pixel_values": [6, 4, 4], "dem": [1, 2]}), Strict())


def test_only_a_batch_of_identical_requests_is_expanded_per_token():
    # vLLM's profiling run spreads many tokens over identical dummy requests and reads the output
    # per token; a real batch with more tokens than requests (padding) must keep its own rows.
    from vllm_terratorch.core.forward import identical_requests, one_row_per_token

    image = torch.rand(6, 8, 8)
    same = {"pixel_values": torch.stack([image, image, image]), "location_coords": [torch.zeros(1, 2)] * 3}
    assert identical_requests(same)
    differing = {"pixel_values": torch.stack([image, image, image + 1]), "location_coords": [torch.zeros(1, 2)] * 3}
    assert not identical_requests(differing)
    mixed_sizes = {"pixel_values": [image, torch.rand(6, 16, 16)]}
    assert not identical_requests(mixed_sizes)

    rows = torch.rand(3, 2, 4)
    expanded = one_row_per_token(rows, 10)
    assert expanded.shape == (10, 2, 4) and torch.equal(expanded[9], rows[0])
    assert expanded.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()  # no copy


def test_a_built_task_computes_float32_at_vllms_configured_precision(monkeypatch):
    """TerraTorch's import switches PyTorch to "medium" float32 matmul precision (bf16 on AMX CPUs,
    TF32 on GPUs, inside float32 models); building a task puts vLLM's configured value back."""
    import terratorch.models  # noqa: F401 - the import that sets "medium"

    from vllm_terratorch.core.config import parse_pretrained_cfg
    from vllm_terratorch.core.factory import build_network
    from vllm_terratorch.testing.samples import sample_pretrained_cfg

    spec = parse_pretrained_cfg(sample_pretrained_cfg("segmentation")).model
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        build_network(spec)
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"  # what oneDNN reads
        monkeypatch.setenv("VLLM_FLOAT32_MATMUL_PRECISION", "high")
        build_network(spec)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
