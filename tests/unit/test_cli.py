"""`vllm-terratorch config | export | validate`: outputs, error paths and exit codes.

Subcommands run in-process through `cli.main` (one TerraTorch import for the module); the
mission's two config-generator command lines also run as real subprocesses, as users type them.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from terratorch.models.backbones.prithvi_vit import PrithviViT

from vllm_terratorch.cli import main as cli
from vllm_terratorch.errors import ConfigError
from vllm_terratorch.cli.generate import infer_input_spec
from vllm_terratorch.testing.samples import build_sample_task, sample_pretrained_cfg

CFG = sample_pretrained_cfg("segmentation", image_size=32)
SCRIPT = Path(sys.executable).parent / "vllm-terratorch"
MISSION_JSON = (
    '{"data":{"pixel_values":{"type": "torch.Tensor","shape": [6, 512, 512]},'
    '"location_coords":{"type":"torch.Tensor","shape": [1, 2]}}}'
)
MISSION_FILE_SPEC = {
    "target": "pixel_values",
    "data": {
        "pixel_values": {"type": "torch.Tensor", "shape": [6, 512, 512]},
        "location_coords": {"type": "torch.Tensor", "shape": [1, 2]},
    },
}


def ttconfig_doc(cfg: dict[str, Any] = CFG) -> dict[str, Any]:
    """A LightningCLI-style TerraTorch YAML document for a sample `pretrained_cfg`."""
    return {
        "seed_everything": cfg["seed_everything"],
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "logger": False},
        "data": copy.deepcopy(cfg["data"]),
        "model": copy.deepcopy(cfg["model"]),
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-4}},
    }


def write_yaml(path: Path, doc: dict[str, Any] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(ttconfig_doc() if doc is None else doc, sort_keys=False))
    return path


def save_lightning_checkpoint(path: Path, cfg: dict[str, Any] = CFG, seed: int = 0) -> Path:
    """What Lightning writes: `model.`-prefixed task state, hyper-parameters, optimizer state."""
    task = build_sample_task(cfg, seed)
    torch.save(
        {
            "epoch": 4,
            "global_step": 100,
            "state_dict": task.state_dict(),
            "hyper_parameters": {"model_args": cfg["model"]["init_args"]["model_args"], "lr": 1e-3},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}],
            "lr_schedulers": [],
        },
        path,
    )
    return path


def expected_config(input_spec: dict[str, Any], cfg: dict[str, Any] = CFG) -> dict[str, Any]:
    return {
        "architectures": ["Terratorch"],
        "num_classes": 0,
        "pretrained_cfg": {"seed_everything": 0, "input": input_spec, "model": cfg["model"], "data": cfg["data"]},
    }


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YAML, a Lightning checkpoint and an input-spec file, shared by the module's tests."""
    folder = tmp_path_factory.mktemp("cli")
    write_yaml(folder / "config.yaml")
    save_lightning_checkpoint(folder / "model.ckpt")
    (folder / "input.json").write_text(json.dumps(CFG["input"]))
    return folder


@pytest.fixture(scope="module")
def exported(workdir: Path) -> Path:
    out = workdir / "exported"
    args = ["export", "--ttconfig", str(workdir / "config.yaml"), "--checkpoint", str(workdir / "model.ckpt")]
    assert cli.main([*args, "-i", str(workdir / "input.json"), str(out)]) == cli.EXIT_OK
    return out


# --- config: the mission's command lines, as subprocesses ---------------------------------------


def _subprocess(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, env=os.environ.copy())


def test_mission_command_line_with_json_string(tmp_path: Path) -> None:
    write_yaml(tmp_path / "config.yaml")
    result = _subprocess([str(SCRIPT), "config", "--ttconfig", "config.yaml", "-i", MISSION_JSON], tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == expected_config(json.loads(MISSION_JSON))
    assert list(written["pretrained_cfg"]) == ["seed_everything", "input", "model", "data"]
    assert str(tmp_path / "config.json") in result.stdout
    assert "target is not set" in result.stdout  # the hint for pixel-wise networks


def test_mission_command_line_with_file_as_module(tmp_path: Path) -> None:
    write_yaml(tmp_path / "config.yaml")
    (tmp_path / "input_sample.json").write_text(json.dumps(MISSION_FILE_SPEC, indent=2))
    command = [sys.executable, "-m", "vllm_terratorch.cli.main", "config", "--ttconfig", "config.yaml", "-i", "./input_sample.json"]
    result = _subprocess(command, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "config.json").read_text()) == expected_config(MISSION_FILE_SPEC)
    again = _subprocess(command, tmp_path)
    assert again.returncode == cli.EXIT_INVALID and "--force" in again.stderr


# --- config: outputs, paths, overwrite --------------------------------------------------------


def test_relative_paths_resolve_from_the_working_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    write_yaml(tmp_path / "configs" / "config.yaml")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "in.json").write_text(json.dumps(MISSION_FILE_SPEC))
    (tmp_path / "existing").mkdir()
    monkeypatch.chdir(tmp_path)
    base = ["config", "--ttconfig", "configs/config.yaml", "-i", "specs/in.json"]
    assert run(base, capsys)[0] == 0
    assert (tmp_path / "configs" / "config.json").is_file()
    assert run([*base, "-o", "new/dir/model.json"], capsys)[0] == 0
    assert json.loads((tmp_path / "new" / "dir" / "model.json").read_text()) == expected_config(MISSION_FILE_SPEC)
    assert run([*base, "-o", "existing"], capsys)[0] == 0
    assert (tmp_path / "existing" / "config.json").is_file()


def test_existing_output_is_kept_without_force(tmp_path: Path, capsys) -> None:
    yaml_path = write_yaml(tmp_path / "config.yaml")
    target = tmp_path / "config.json"
    target.write_text("keep me")
    args = ["config", "--ttconfig", str(yaml_path), "-i", MISSION_JSON]
    code, _, err = run(args, capsys)
    assert code == cli.EXIT_INVALID and f"{target} already exists" in err and "--force" in err
    assert target.read_text() == "keep me"
    assert run([*args, "--force"], capsys)[0] == cli.EXIT_OK
    assert json.loads(target.read_text())["architectures"] == ["Terratorch"]
    code, _, err = run([*args, "-o", str(yaml_path), "--force"], capsys)
    assert code == cli.EXIT_INVALID and "is the --ttconfig YAML itself" in err


def test_interpolations_are_resolved(tmp_path: Path, capsys) -> None:
    doc = ttconfig_doc()
    doc["variables"] = {"bands": CFG["data"]["init_args"]["output_bands"], "size": 32}
    doc["data"]["init_args"]["output_bands"] = "${variables.bands}"
    doc["model"]["init_args"]["tiled_inference_parameters"]["h_crop"] = "${variables.size}"
    yaml_path = write_yaml(tmp_path / "config.yaml", doc)
    assert run(["config", "--ttconfig", str(yaml_path)], capsys)[0] == 0
    written = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert written["data"] == CFG["data"] and written["model"] == CFG["model"]
    assert "variables" not in written and "${" not in json.dumps(written)

    doc["data"]["init_args"]["output_bands"] = "${variables.missing}"
    write_yaml(yaml_path, doc)
    code, _, err = run(["config", "--ttconfig", str(yaml_path), "--force"], capsys)
    assert code == cli.EXIT_INVALID and "interpolation" in err and "variables.missing" in err


@pytest.mark.parametrize(
    ("input_arg", "message"),
    [
        ('{"data": {"pixel_values": {"type": "torch.Tensor", "shape": [6, 32 32]}}}', "-i/--input is not valid JSON"),
        ("missing.json", "'missing.json' is neither a JSON object nor an existing file"),
        ('{"data": {"pixel_values": {"type": "torch.Tensor", "shape": [6, -32, 32]}}}', "pretrained_cfg.input.data.pixel_values.shape.1"),
        ('{"data": {"pixel_values": {"type": "torch.Tensor", "shape": [6, 3.5, 32]}}}', "pretrained_cfg.input.data.pixel_values.shape.1"),
        ('{"data": {"pixel_values": {"type": "numpy.ndarray", "shape": [6, 32, 32]}}}', "pretrained_cfg.input.data.pixel_values.type"),
        ('{"target": "image", "data": {"pixel_values": {"type": "torch.Tensor", "shape": [6, 32, 32]}}}', "target 'image' is not one of the inputs"),
        ('{"data": {}}', "pretrained_cfg.input.data"),
        ("[1, 2]", "is neither a JSON object nor an existing file"),
    ],
    ids=["bad-json", "missing-file", "negative-shape", "float-shape", "unknown-type", "bad-target", "no-inputs", "not-object"],
)
def test_bad_input_specs_name_the_problem(tmp_path: Path, monkeypatch, capsys, input_arg: str, message: str) -> None:
    write_yaml(tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["config", "--ttconfig", "config.yaml", "-i", input_arg], capsys)
    assert code == cli.EXIT_INVALID, out
    assert message in err
    assert not (tmp_path / "config.json").exists()


def test_bad_input_spec_file_is_named(tmp_path: Path, capsys) -> None:
    write_yaml(tmp_path / "config.yaml")
    (tmp_path / "in.json").write_text("{not json")
    code, _, err = run(["config", "--ttconfig", str(tmp_path / "config.yaml"), "-i", str(tmp_path / "in.json")], capsys)
    assert code == cli.EXIT_INVALID and f"-i/--input file {tmp_path / 'in.json'} is not valid JSON" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("model: [unclosed", "is not valid YAML"),
        ("- just\n- a list\n", "expected a YAML mapping"),
        ("seed_everything: 0\ndata: {}\n", "pretrained_cfg.model: Field required"),
        ("model:\n  init_args: {}\n", "pretrained_cfg.model.class_path: Field required"),
    ],
    ids=["missing", "invalid-yaml", "not-mapping", "no-model", "no-class-path"],
)
def test_bad_yaml_is_reported(tmp_path: Path, capsys, content: str | None, message: str) -> None:
    yaml_path = tmp_path / "config.yaml"
    if content is not None:
        yaml_path.write_text(content)
    code, _, err = run(["config", "--ttconfig", str(yaml_path), "-i", MISSION_JSON], capsys)
    assert code == cli.EXIT_INVALID and message in err


# --- config: input-spec inference -----------------------------------------------------------------


def test_input_spec_is_inferred_and_printed(tmp_path: Path, capsys) -> None:
    yaml_path = write_yaml(tmp_path / "config.yaml")
    code, out, _ = run(["config", "--ttconfig", str(yaml_path)], capsys)
    assert code == 0
    spec = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]["input"]
    assert spec == CFG["input"]  # 6 bands, 32 x 32 tiles, location coordinates of a _tl backbone
    assert "data.init_args.output_bands" in out and "tiled_inference_parameters" in out and "ends with _tl" in out
    # ... from a generic datamodule, which gave the fine-tune none: said, with the way to parity
    assert "GenericNonGeoSegmentationDataModule gives the model no coordinates in training" in out and "-i" in out
    assert "left out of pretrained_cfg (not needed to serve): trainer, optimizer" in out


def _doc(model_args: dict[str, Any] | None = None, data_args: dict[str, Any] | None = None, tiling: bool = False) -> dict[str, Any]:
    doc = ttconfig_doc()
    init_args = doc["model"]["init_args"]
    if not tiling:
        del init_args["tiled_inference_parameters"]
    init_args["model_args"] = {"backbone": "prithvi_eo_v2_300", **(model_args or {})}
    doc["data"]["init_args"] = data_args or {}
    return doc


# The size Prithvi's ViT is built for when a config names none (what the generator must infer).
PRITHVI_SIZE = inspect.signature(PrithviViT).parameters["img_size"].default


@pytest.mark.parametrize(
    ("doc", "pixel_shape", "extra"),
    [
        (_doc({"backbone_bands": ["B"] * 4}), [4, PRITHVI_SIZE, PRITHVI_SIZE], {}),
        (_doc({"backbone_bands": ["B"] * 4}, {"bands": ["B"] * 3, "img_size": 256}), [3, 256, 256], {}),
        (_doc({"backbone_bands": ["B"] * 4}, {"dataset_bands": ["B"] * 5, "crop_size": [128, 96]}), [5, 128, 96], {}),
        (_doc({"backbone_bands": ["B"] * 6, "backbone_img_size": 512}, {"img_size": 256}), [6, 512, 512], {}),
        (_doc({"backbone_bands": ["B"] * 6, "backbone_coords_encoding": ["location"]}), [6, PRITHVI_SIZE, PRITHVI_SIZE],
         {"location_coords": [1, 2]}),
        (
            _doc({"backbone_bands": ["B"] * 6, "backbone_coords_encoding": ["time", "location"], "backbone_num_frames": 3}),
            [6, 3, PRITHVI_SIZE, PRITHVI_SIZE],
            {"location_coords": [1, 2], "temporal_coords": [1, 3, 2]},
        ),
    ],
    ids=["backbone-bands-default-size", "datamodule-bands-img-size", "dataset-bands-crop", "backbone-img-size", "location", "time-frames"],
)
def test_inference_sources(doc: dict[str, Any], pixel_shape: list[int], extra: dict[str, list[int]]) -> None:
    spec, notes = infer_input_spec(doc)
    assert spec["target"] == "pixel_values"
    assert {name: t["shape"] for name, t in spec["data"].items()} == {"pixel_values": pixel_shape, **extra}
    assert all(t["type"] == "torch.Tensor" for t in spec["data"].values())
    assert len(notes) >= 1


def test_inference_without_bands_or_with_modalities_fails() -> None:
    with pytest.raises(ConfigError, match="cannot infer the number of input bands.*pass the input spec with -i"):
        infer_input_spec(_doc())
    with pytest.raises(ConfigError, match="data.init_args.bands lists bands per modality"):
        infer_input_spec(_doc(data_args={"bands": {"S2L2A": ["B02"], "S1RTC": ["VV"]}}))


# --- config --check ------------------------------------------------------------------------------


def test_check_builds_and_runs_the_network(workdir: Path, tmp_path: Path, capsys) -> None:
    args = ["config", "--ttconfig", str(workdir / "config.yaml"), "-o", str(tmp_path / "c.json"), "--check"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "check passed" in out and "forward(pixel_values, location_coords=location_coords)" in out
    assert "output (1 request): [2, 32, 32]" in out


def test_check_reports_unknown_class_path_and_writes_nothing(tmp_path: Path, capsys) -> None:
    doc = ttconfig_doc()
    doc["model"]["class_path"] = "terratorch.tasks.NoSuchTask"
    yaml_path = write_yaml(tmp_path / "config.yaml", doc)
    code, _, err = run(["config", "--ttconfig", str(yaml_path), "--check"], capsys)
    assert code == cli.EXIT_INVALID
    assert "pretrained_cfg.model.class_path 'terratorch.tasks.NoSuchTask'" in err
    assert not (tmp_path / "config.json").exists()


def test_missions_no_target_spec_passes_the_check(workdir: Path, tmp_path: Path, capsys) -> None:
    # The mission's first generator example has no target; the image then goes positionally.
    spec = {"data": {"pixel_values": CFG["input"]["data"]["pixel_values"], "location_coords": {"type": "torch.Tensor", "shape": [1, 2]}}}
    args = ["config", "--ttconfig", str(workdir / "config.yaml"), "-i", json.dumps(spec), "-o", str(tmp_path / "c.json"), "--check"]
    code, _, err = run(args, capsys)
    assert code == cli.EXIT_OK, err


def test_check_reports_a_calling_convention_that_does_not_fit(workdir: Path, tmp_path: Path, capsys) -> None:
    spec = {"data": {"image": CFG["input"]["data"]["pixel_values"], "dem": {"type": "torch.Tensor", "shape": [1, 64, 64]}}}
    args = ["config", "--ttconfig", str(workdir / "config.yaml"), "-i", json.dumps(spec), "-o", str(tmp_path / "c.json"), "--check"]
    code, _, err = run(args, capsys)
    assert code == cli.EXIT_INVALID
    assert "one dummy forward" in err


# --- usage, help, serve --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nonsense"],
        ["config"],
        ["config", "--ttconfig", "c.yaml", "--bogus"],
        ["export", "--ttconfig", "c.yaml", "out"],
        ["export", "--ttconfig", "c.yaml", "--checkpoint", "m.ckpt", "--dtype", "int8", "out"],
        ["validate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys) -> None:
    code, _, err = run(args, capsys)
    assert code == cli.EXIT_USAGE and "usage:" in err


@pytest.mark.parametrize("command", [[], ["config"], ["export"], ["validate"]])
def test_help_has_examples(command: list[str], capsys) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == cli.EXIT_OK and "examples:" in out
    if command == ["config"]:
        assert "vllm-terratorch config --ttconfig config.yaml -i ./input_sample.json" in out


def test_serve_passes_every_argument_to_vllm_untouched(monkeypatch) -> None:
    import vllm_terratorch.cli.serve as vllm_cli

    seen: list[list[str]] = []
    monkeypatch.setattr(vllm_cli, "main", lambda argv: seen.append(list(argv)) or 0)
    argv = ["serve", "some/model", "--model-impl", "terratorch", "--help", "-i", "--force"]
    assert cli.main(argv) == 0
    assert seen == [argv]


# --- export --------------------------------------------------------------------------------------


def test_export_writes_network_weights_config_and_readme(workdir: Path, exported: Path) -> None:
    from safetensors import safe_open

    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((exported / "config.json").read_text()) == expected_config(CFG["input"])
    network = build_sample_task(CFG).model.state_dict()
    with safe_open(str(exported / "model.safetensors"), "pt") as stored:
        keys = set(stored.keys())
        assert keys == set(network)  # network only: no `model.` prefix, no optimizer state
        for name in keys:
            assert torch.equal(stored.get_tensor(name), network[name]), name
    readme = (exported / "README.md").read_text()
    assert f"vllm serve {exported.resolve()}" in readme and "--model-impl terratorch" in readme
    assert "--io-processor-plugin terratorch_segmentation" in readme


def test_export_casts_to_bf16(workdir: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    args = ["export", "--ttconfig", str(workdir / "config.yaml"), "--checkpoint", str(workdir / "model.ckpt"), "--dtype", "bf16", "--skip-check", str(out)]
    code, out_text, err = run(args, capsys)
    assert code == 0, err
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "(bfloat16)" in out_text


def test_export_refuses_a_non_empty_folder(workdir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--ttconfig", str(workdir / "config.yaml"), "--checkpoint", str(workdir / "model.ckpt"), "--skip-check", str(out)]
    code, _, err = run(args, capsys)
    assert code == cli.EXIT_INVALID and "is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")
    code, _, err = run([*args, "--force"], capsys)
    assert code == cli.EXIT_INVALID and "model-00001-of-00002.safetensors" in err
    (out / "model-00001-of-00002.safetensors").unlink()
    assert run([*args, "--force"], capsys)[0] == cli.EXIT_OK
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_export_refuses_weights_that_do_not_fit(workdir: Path, tmp_path: Path, capsys) -> None:
    other = save_lightning_checkpoint(tmp_path / "other.ckpt", sample_pretrained_cfg("segmentation", image_size=32, decoder_channels=8))
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    base = ["export", "--ttconfig", str(workdir / "config.yaml"), "--skip-check"]
    code, _, err = run([*base, "--checkpoint", str(other), str(tmp_path / "a")], capsys)
    assert code == cli.EXIT_INVALID and "does not fit the model built from pretrained_cfg.model" in err and "shape mismatch" in err
    code, _, err = run([*base, "--checkpoint", str(tmp_path / "missing.ckpt"), str(tmp_path / "b")], capsys)
    assert code == cli.EXIT_INVALID and "--checkpoint" in err and "does not exist" in err
    code, _, err = run([*base, "--checkpoint", str(tmp_path / "garbage.ckpt"), str(tmp_path / "c")], capsys)
    assert code == cli.EXIT_INVALID and "cannot read checkpoint" in err
    assert not any((tmp_path / name).exists() for name in "abc")


# --- validate ------------------------------------------------------------------------------------


def test_validate_prints_a_summary(exported: Path, capsys) -> None:
    code, out, err = run(["validate", str(exported)], capsys)
    assert code == 0, err
    for fragment in (
        "terratorch.tasks.SemanticSegmentationTask",
        "prithvi_eo_v2_tiny_tl",
        "PixelWiseModel",
        "forward(pixel_values, location_coords=location_coords)",
        "output (1 request): [2, 32, 32]",
        "from model.safetensors (strict)",
        "valid: ready to serve",
    ):
        assert fragment in out


def test_validate_json(workdir: Path, capsys) -> None:
    # A folder as training leaves it: config.json beside the Lightning checkpoint.
    folder = workdir / "with-ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(expected_config(CFG["input"])))
    (folder / "model.ckpt").symlink_to(workdir / "model.ckpt")
    code, out, _ = run(["validate", str(folder), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] is True
    assert report["task_class"] == "terratorch.tasks.SemanticSegmentationTask"
    assert report["input"] == CFG["input"] and report["output_shape"] == [2, 32, 32]
    assert report["parameters"] > 0 and report["weight_files"] == ["model.ckpt"]
    assert report["tensors_loaded"] == len(build_sample_task(CFG).model.state_dict())


def test_validate_failures(workdir: Path, exported: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    code, _, err = run(["validate", str(tmp_path / "nowhere")], capsys)
    assert code == cli.EXIT_INVALID and "does not exist" in err

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    code, _, err = run(["validate", str(no_config)], capsys)
    assert code == cli.EXIT_INVALID and "config.json does not exist" in err

    bad_field = tmp_path / "bad-field"
    bad_field.mkdir()
    config = expected_config(copy.deepcopy(CFG["input"]))
    config["pretrained_cfg"]["input"]["data"]["pixel_values"]["shape"] = [6, 0, 32]
    (bad_field / "config.json").write_text(json.dumps(config))
    code, _, err = run(["validate", str(bad_field)], capsys)
    assert code == cli.EXIT_INVALID and "pretrained_cfg.input.data.pixel_values.shape.1" in err

    missing_key = tmp_path / "missing-key"
    missing_key.mkdir()
    (missing_key / "config.json").write_text((exported / "config.json").read_text())
    tensors = load_file(str(exported / "model.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(missing_key / "model.safetensors"))
    code, out, _ = run(["validate", str(missing_key), "--json"], capsys)
    report = json.loads(out)
    assert code == cli.EXIT_INVALID and report["ok"] is False and report["error"] == "WeightsError"
    assert f"1 model tensors missing from the checkpoint: {dropped}" in report["message"]
