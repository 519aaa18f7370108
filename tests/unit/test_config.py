"""config.json parsing: the mission's config is accepted, bad fields are named in one message."""

from __future__ import annotations

import copy
import json

import pytest

from vllm_terratorch.core.config import load_config, parse_config, parse_pretrained_cfg
from vllm_terratorch.errors import ConfigError, ModelSourceError

# The mission document's config.json, verbatim.
MISSION = {
    "architectures": ["Terratorch"],
    "num_classes": 0,
    "pretrained_cfg": {
        "seed_everything": 0,
        "input": {
            "target": "pixel_values",
            "data": {
                "pixel_values": {"type": "torch.Tensor", "shape": [6, 512, 512]},
                "location_coords": {"type": "torch.Tensor", "shape": [1, 2]},
            },
        },
        "model": {
            "class_path": "terratorch.tasks.SemanticSegmentationTask",
            "init_args": {
                "model_args": {
                    "backbone_pretrained": True,
                    "backbone": "prithvi_eo_v2_300_tl",
                    "decoder": "UperNetDecoder",
                    "decoder_channels": 256,
                    "decoder_scale_modules": True,
                    "num_classes": 2,
                    "rescale": True,
                    "backbone_bands": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"],
                    "head_dropout": 0.1,
                    "necks": [{"name": "SelectIndices", "indices": [5, 11, 17, 23]}, {"name": "ReshapeTokensToImage"}],
                },
                "model_factory": "EncoderDecoderFactory",
                "loss": "ce",
                "ignore_index": -1,
                "lr": 0.001,
                "freeze_backbone": False,
                "freeze_decoder": False,
                "plot_on_val": 10,
            },
        },
    },
}


def mutated(path: str, value):
    config = copy.deepcopy(MISSION)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return config


def test_mission_config_parses():
    config = parse_config(MISSION)
    spec = config.pretrained_cfg.input
    assert spec.target == "pixel_values"
    assert spec.data["pixel_values"].shape == [6, 512, 512]
    assert spec.keyword_names == ["location_coords"]
    assert config.pretrained_cfg.model.init_args["model_args"]["backbone"] == "prithvi_eo_v2_300_tl"
    assert config.pretrained_cfg.data is None


def test_target_is_optional():
    spec = parse_config(mutated("pretrained_cfg.input.target", KeyError)).pretrained_cfg.input
    assert spec.target is None
    assert spec.keyword_names == ["pixel_values", "location_coords"]


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("pretrained_cfg.input.data.pixel_values.shape", [6, -512, 512], "pretrained_cfg.input.data.pixel_values.shape.1"),
        ("pretrained_cfg.input.data.pixel_values.shape", [], "pretrained_cfg.input.data.pixel_values.shape"),
        ("pretrained_cfg.input.data.pixel_values.type", "numpy.ndarray", "pretrained_cfg.input.data.pixel_values.type"),
        ("pretrained_cfg.input.target", "image", "target 'image' is not one of the inputs"),
        ("pretrained_cfg.input.data", {}, "pretrained_cfg.input.data"),
        ("pretrained_cfg.model.class_path", KeyError, "pretrained_cfg.model.class_path"),
        ("pretrained_cfg.input", KeyError, "pretrained_cfg.input"),
        ("num_classes", 2, "num_classes"),
        ("architectures", ["PrithviModel"], "must contain 'Terratorch'"),
    ],
)
def test_bad_field_is_named(path, value, named):
    with pytest.raises(ConfigError) as error:
        parse_config(mutated(path, value), "model/config.json")
    message = str(error.value)
    assert named in message
    assert message.startswith("model/config.json")
    assert isinstance(error.value, ValueError)


def test_pretrained_cfg_alone():
    assert parse_pretrained_cfg(MISSION["pretrained_cfg"]).input.target == "pixel_values"
    with pytest.raises(ConfigError, match="pretrained_cfg"):
        parse_pretrained_cfg(None)


def test_load_config_from_folder_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISSION))
    assert load_config(tmp_path).num_classes == 0
    with pytest.raises(ModelSourceError, match="does not exist") as error:
        load_config(tmp_path / "missing")
    assert isinstance(error.value, FileNotFoundError)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")
