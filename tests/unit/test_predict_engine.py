"""`predict`'s one encode loop (`SceneEncoder`), as local mode and Ray mode both run it: a bad scene
fails alone, and a dead engine (vLLM's own `EngineDeadError`) fails every scene with one message
and is never called again. The engine calls are replaced by functions here (what is tested is what
predict does with the engine's answers, not the engine)."""

from __future__ import annotations

import pickle

import pytest
import torch
from vllm.v1.engine.exceptions import EngineDeadError

from vllm_terratorch.predict.engine import SceneEncoder
from vllm_terratorch.predict.on_ray import EngineActor
from vllm_terratorch.predict.tasks import ProcessorSpec, decode_scene, describe_error, from_wire
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three decoded scenes of different sizes (1, 6 and 9 tiles: TerraTorch's tiling, 64 px tiles at
    stride 48 over the image padded by delta 8) of a tiny segmentation model."""
    root = tmp_path_factory.mktemp("predict-engine")
    model = write_model_folder(root / "model", sample_pretrained_cfg("segmentation"))
    spec = ProcessorSpec(str(model), "terratorch_segmentation", "float32")
    decoded = []
    for index, (height, width) in enumerate([(64, 64), (64, 100), (100, 100)]):
        path = write_sample_geotiff(root / f"scene{index}.tif", height, width, seed=index)
        decoded.append(decode_scene(spec, index, str(path)))
    assert all(d["ok"] for d in decoded), decoded
    return decoded


class Engine:
    """Answers each prompt with its own first band; fails on the prompts of `bad`, or dies on call `dies_on`."""

    def __init__(self, bad: torch.Tensor | None = None, dies_on: int | None = None) -> None:
        self.bad, self.dies_on, self.calls = bad, dies_on, 0

    def __call__(self, prompts):
        self.calls += 1
        if self.calls == self.dies_on:
            raise EngineDeadError()
        images = [prompt["multi_modal_data"]["image"]["pixel_values"] for prompt in prompts]
        if self.bad is not None and any(torch.equal(image, self.bad) for image in images):
            raise RuntimeError("shape mismatch in the decoder")
        return [image[:1].clone() for image in images]


def tiles(scene) -> int:
    assert all(len(from_wire(wire)) == scene["count"] for wire in scene["tiles"].values())
    return scene["count"]


def test_one_call_for_many_scenes_and_each_scene_gets_its_own_tiles(scenes):
    engine = Engine()
    results = SceneEncoder(engine).run(scenes)
    assert engine.calls == 1 and [len(r.outputs) for r in results] == [tiles(s) for s in scenes] == [1, 6, 9]
    for scene, result in zip(scenes, results):
        expected = from_wire(scene["tiles"]["pixel_values"])[:, :1]
        assert all(torch.equal(out, exp) for out, exp in zip(result.outputs, expected))


def test_a_bad_scene_fails_alone(scenes):
    engine = Engine(bad=from_wire(scenes[1]["tiles"]["pixel_values"])[0].float())
    encoder = SceneEncoder(engine, torch.float32)
    results = encoder.run(scenes)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "inference failed: RuntimeError: shape mismatch in the decoder"
    assert engine.calls == 1 + 3 and encoder.fatal is None  # the batch, then scene by scene


DEAD = f"inference failed: {describe_error(EngineDeadError())}"
BAD = "inference failed: RuntimeError: shape mismatch in the decoder"


@pytest.mark.parametrize(
    ("dies_on", "errors"),
    [
        (1, [DEAD, DEAD, DEAD]),  # on the batched call
        (3, [BAD, DEAD, DEAD]),  # during the scene-by-scene retry: scene 0 failed alone before
    ],
)
def test_a_dead_engine_fails_every_scene_once_and_is_not_called_again(scenes, dies_on, errors):
    engine = Engine(bad=from_wire(scenes[0]["tiles"]["pixel_values"])[0].float(), dies_on=dies_on)
    encoder = SceneEncoder(engine, torch.float32)
    assert [r.error for r in encoder.run(scenes)] == errors
    assert engine.calls == dies_on and "EngineCore encountered an issue" in encoder.fatal
    dead = DEAD
    calls = engine.calls
    assert [r.error for r in encoder.run(scenes)] == [dead] * 3 and engine.calls == calls


def test_ray_mode_reports_engine_death_like_local_mode(scenes):
    """The Ray actor runs the same encoder: the same records, batch after batch."""
    actor = EngineActor.__new__(EngineActor)  # without starting vLLM: the engine is replaced
    actor.llm, actor.encoder = None, SceneEncoder(Engine(dies_on=1), torch.float32)
    local = SceneEncoder(Engine(dies_on=1), torch.float32).run(scenes)

    def batch(rows):
        return {"index": [s["index"] for s in rows], "target": ["out.tif"] * len(rows),
                "payload": [pickle.dumps(s) for s in rows]}

    for rows in (scenes[:2], scenes[2:]):
        answered = [pickle.loads(payload) for payload in actor(batch(rows))["payload"]]
        assert [a["error"] for a in answered] == [r.error for r in local[: len(rows)]]
        assert all(not a["ok"] for a in answered)
