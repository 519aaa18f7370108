"""Configs and checkpoints of older TerraTorch releases on the installed one (vllm_terratorch.core.legacy)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from legacy_fixture import FIXTURE, expected_outputs, requests

from vllm_terratorch.core import legacy
from vllm_terratorch.core.config import load_config
from vllm_terratorch.core.factory import build_network
from vllm_terratorch.core.forward import ForwardPlan, task_output
from vllm_terratorch.core.weights import load_folder_weights, match_state_dict

MISSION_ARGS = {
    "model_args": {
        "backbone": "prithvi_eo_v2_300_tl",
        "decoder": "UperNetDecoder",
        "decoder_channels": 256,
        "decoder_scale_modules": True,
        "necks": [{"name": "SelectIndices", "indices": [5, 11, 17, 23]}, {"name": "ReshapeTokensToImage"}],
    },
    "loss": "ce",
}


@pytest.fixture
def installed(monkeypatch):
    """Pretend the installed TerraTorch does (True, 1.2.10) or does not (False, 1.2.13) still
    build UperNet's scale_modules."""

    def pretend(accepts_scale_modules: bool) -> None:
        monkeypatch.setattr(legacy, "upernet_accepts_scale_modules", lambda: accepts_scale_modules)

    return pretend


@pytest.fixture
def our_log(caplog):
    """Our INFO records, wherever vLLM has routed the package logger by now (once vLLM's logging
    is configured, records no longer propagate to the root logger that caplog listens on)."""
    ours = logging.getLogger("vllm_terratorch")
    level = ours.level
    ours.addHandler(caplog.handler)
    ours.setLevel(logging.INFO)
    yield caplog
    ours.removeHandler(caplog.handler)
    ours.setLevel(level)


def test_scale_modules_become_the_pyramidal_neck_where_removed(our_log, installed):
    installed(False)
    original = copy.deepcopy(MISSION_ARGS)
    translated = legacy.translate_init_args(MISSION_ARGS)
    assert MISSION_ARGS == original, "the caller's config must not change"
    model_args = translated["model_args"]
    assert "decoder_scale_modules" not in model_args
    assert model_args["necks"] == [*original["model_args"]["necks"], {"name": "LearnedInterpolateToPyramidal"}]
    assert translated["loss"] == "ce"
    assert "decoder_scale_modules=True" in our_log.text and "LearnedInterpolateToPyramidal" in our_log.text


def test_scale_modules_false_is_dropped_and_no_neck_added(installed):
    installed(False)
    args = {"model_args": {"decoder": "UperNetDecoder", "decoder_scale_modules": False, "necks": [{"name": "ReshapeTokensToImage"}]}}
    translated = legacy.translate_init_args(args)
    assert translated["model_args"] == {"decoder": "UperNetDecoder", "necks": [{"name": "ReshapeTokensToImage"}]}


def test_a_config_without_necks_gets_one(installed):
    installed(False)
    translated = legacy.translate_init_args({"model_args": {"decoder_scale_modules": True}})
    assert translated["model_args"]["necks"] == [{"name": "LearnedInterpolateToPyramidal"}]


@pytest.mark.parametrize("args", [MISSION_ARGS, {"model_args": {"decoder": "FCNDecoder"}}, {"loss": "ce"}])
def test_nothing_changes_where_the_argument_still_exists_or_is_absent(args, installed):
    installed(True)
    assert legacy.translate_init_args(args) is args
    if "decoder_scale_modules" not in args.get("model_args", {}):
        installed(False)
        assert legacy.translate_init_args(args) is args


def test_old_checkpoint_keys_move_to_the_last_pyramidal_neck(our_log):
    expected = ["neck.0.weight", "neck.2.fpn1.0.weight", "neck.2.fpn2.0.bias", "decoder.lateral_convs.0.conv.weight"]
    state = {
        "decoder.fpn1.0.weight": 1,
        "decoder.fpn2.0.bias": 2,
        "decoder.lateral_convs.0.conv.weight": 3,
        "neck.0.weight": 4,
        "decoder.fpn4.9.weight": 5,  # no home in the network: left for the strict check to report
    }
    renamed = legacy.rename_checkpoint_keys(state, expected, source="ckpt")
    assert renamed == {
        "neck.2.fpn1.0.weight": 1,
        "neck.2.fpn2.0.bias": 2,
        "decoder.lateral_convs.0.conv.weight": 3,
        "neck.0.weight": 4,
        "decoder.fpn4.9.weight": 5,
    }
    assert "2 tensors of UperNet scale modules" in our_log.text


def test_new_layout_keys_go_back_to_the_decoder_where_the_old_argument_is_built():
    expected = ["decoder.fpn1.0.weight", "decoder.fpn2.0.bias", "neck.0.weight"]
    state = {"neck.2.fpn1.0.weight": 1, "neck.2.fpn2.0.bias": 2, "neck.0.weight": 3, "neck.2.fpn3.0.weight": 4}
    assert legacy.rename_checkpoint_keys(state, expected) == {
        "decoder.fpn1.0.weight": 1, "decoder.fpn2.0.bias": 2, "neck.0.weight": 3, "neck.2.fpn3.0.weight": 4,
    }


def test_keys_the_network_has_are_never_renamed():
    state = {"decoder.fpn1.0.weight": 1, "neck.2.fpn1.0.weight": 2}
    assert legacy.rename_checkpoint_keys(state, ["decoder.fpn1.0.weight", "neck.2.fpn1.0.weight"]) == state


def test_prefixed_old_keys_find_the_neck_under_the_same_prefix():
    renamed = legacy.rename_checkpoint_keys({"model.decoder.fpn2.0.weight": 1}, ["model.neck.1.fpn2.0.weight", "neck.3.fpn2.0.weight"])
    assert renamed == {"model.neck.1.fpn2.0.weight": 1}


@pytest.fixture(params=["installed TerraTorch", "translation forced"])
def terratorch_mode(request, installed):
    """Serve the fixture as the installed TerraTorch allows, and also through the translation
    (on 1.2.10 this proves the translated network computes what the old argument did)."""
    if request.param == "translation forced":
        installed(False)
    return request.param


def test_old_layout_checkpoint_reproduces_terratorch_1_2_10_outputs(terratorch_mode):
    config = load_config(FIXTURE / "model")
    network = build_network(config.pretrained_cfg.model).eval()
    assert load_folder_weights(network, FIXTURE / "model") == len(network.state_dict())
    translated = not legacy.upernet_accepts_scale_modules()
    assert translated == any(type(m).__name__ == "LearnedInterpolateToPyramidal" for m in network.modules())
    plan = ForwardPlan.for_network(config.pretrained_cfg.input, network)
    outputs = []
    with torch.no_grad():
        for request in requests():
            args, kwargs = plan.batch({name: tensor[None] for name, tensor in request.items()}, torch.float32, "cpu")
            outputs.append(task_output(network(*args, **kwargs)))
    assert (torch.cat(outputs) - expected_outputs()).abs().max() <= 1e-5


def test_weights_saved_in_the_new_layout_serve_where_the_old_argument_is_built(monkeypatch):
    """A folder written on TerraTorch 1.2.13 (e.g. by `export`) keeps its config's
    decoder_scale_modules but stores the neck layout; TerraTorch 1.2.10 must serve it unchanged."""
    if not legacy.upernet_accepts_scale_modules():
        pytest.skip("needs a TerraTorch that still builds decoder_scale_modules (1.2.10, the primary stack)")
    config = load_config(FIXTURE / "model")
    old = build_network(config.pretrained_cfg.model).eval()
    load_folder_weights(old, FIXTURE / "model")
    with monkeypatch.context() as patch:
        patch.setattr(legacy, "upernet_accepts_scale_modules", lambda: False)
        new = build_network(config.pretrained_cfg.model).eval()
    new.load_state_dict(match_state_dict(old.state_dict(), new.state_dict()))
    new_layout = new.state_dict()
    assert any(".fpn1." in key and key.startswith("neck.") for key in new_layout)
    again = build_network(config.pretrained_cfg.model).eval()
    again.load_state_dict(match_state_dict(new_layout, again.state_dict()))
    request = requests()[0]
    coords = request["location_coords"]
    with torch.no_grad():
        outputs = [task_output(net(request["pixel_values"][None], location_coords=coords)) for net in (old, new, again)]
    assert torch.equal(outputs[0], outputs[2]) and (outputs[0] - outputs[1]).abs().max() <= 1e-5
