"""TerraTorch YAML + input spec -> a servable `config.json` (the mission's config generator).

Upstream's `vllm_config_generator.py` copied the whole YAML (trainer and optimizer included) into
`pretrained_cfg`, wrote to `/config.json` when the YAML sat in the working directory, overwrote
silently and never checked the result. Here the YAML's `seed_everything`, `model` and `data`
sections are kept exactly as written, `${...}` interpolations are resolved (the served config has
no interpolation engine), the output is validated with the same `parse_config` the server uses,
and an existing file is only replaced with `--force`. Importing this module needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_terratorch.core.config import ARCHITECTURE, TerratorchConfig, parse_config
from vllm_terratorch.errors import ConfigError, ModelSourceError, OutputExistsError
from vllm_terratorch.files import write_atomically

# YAML sections that describe the model and its data; the rest (trainer, optimizer, ckpt_path)
# only matters for training.
KEPT_SECTIONS = ("seed_everything", "model", "data")
CONFIG_NAME = "config.json"
# ViT backbones (Prithvi included) are built for 224 x 224 unless told otherwise.
DEFAULT_IMAGE_SIZE = 224
_BAND_KEYS = ("output_bands", "bands", "dataset_bands")
_SIZE_KEYS = ("img_size", "image_size", "crop_size", "tile_size", "patch_size")


@dataclass
class GeneratedConfig:
    """A validated `config.json` and what the generator decided on the user's behalf."""

    config: dict[str, Any]
    parsed: TerratorchConfig
    notes: list[str] = field(default_factory=list)


def _contains_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_contains_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_interpolation(v) for v in value)
    return False


def _resolve_interpolations(raw: dict[str, Any], source: Path) -> dict[str, Any]:
    """Replace OmegaConf `${...}` references by their values, as LightningCLI's omegaconf mode does."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as error:
        detail = str(error).splitlines()[0]
        raise ConfigError(
            f"{source}: cannot resolve a ${{...}} interpolation: {detail}; "
            "make it point at an existing key, or write the value itself"
        ) from None
    assert isinstance(resolved, dict)
    return resolved


def read_ttconfig(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TerraTorch (LightningCLI) YAML as a plain dict, interpolations resolved."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(
            f"--ttconfig {path} does not exist (looked in {path.absolute().parent}); "
            "pass the TerraTorch YAML used to train or run the model"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"--ttconfig {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--ttconfig {path}: expected a YAML mapping with model/data sections, got {type(raw).__name__}")
    return _resolve_interpolations(raw, path) if _contains_interpolation(raw) else raw


def _load_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{where} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno}); expected e.g. "
            '\'{"target": "pixel_values", "data": {"pixel_values": {"type": "torch.Tensor", "shape": [6, 512, 512]}}}\''
        ) from None


def parse_input_argument(value: str) -> dict[str, Any]:
    """`-i/--input`: a JSON object, or the path of a file holding one (as upstream accepts both)."""
    if value.lstrip().startswith("{"):
        spec = _load_json(value, "-i/--input")
    else:
        path = Path(value)
        if not path.is_file():
            raise ModelSourceError(
                f"-i/--input {value!r} is neither a JSON object nor an existing file "
                f"(looked in {path.absolute().parent}); pass the spec inline or the path of a JSON file"
            )
        spec = _load_json(path.read_text(), f"-i/--input file {path}")
    if not isinstance(spec, dict):
        raise ConfigError(f"-i/--input must be a JSON object with a `data` field, got {type(spec).__name__}")
    return spec


def _section(mapping: Any, *keys: str) -> dict[str, Any]:
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, Mapping) else None
    return dict(mapping) if isinstance(mapping, Mapping) else {}


def _two_ints(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def _infer_bands(model_args: dict[str, Any], data_args: dict[str, Any]) -> tuple[int, str]:
    candidates = [(f"data.init_args.{key}", data_args.get(key)) for key in _BAND_KEYS]
    candidates.append(("model.init_args.model_args.backbone_bands", model_args.get("backbone_bands")))
    for where, bands in candidates:
        if isinstance(bands, Mapping):
            raise ConfigError(
                f"{where} lists bands per modality ({', '.join(map(str, bands))}); a multimodal input "
                "cannot be inferred, pass the input spec with -i"
            )
        if isinstance(bands, list) and bands:
            return len(bands), where
    raise ConfigError(
        "cannot infer the number of input bands: none of data.init_args.output_bands/bands/dataset_bands "
        "or model.init_args.model_args.backbone_bands is set; pass the input spec with -i"
    )


def _infer_size(init_args: dict[str, Any], model_args: dict[str, Any], data_args: dict[str, Any]) -> tuple[list[int], str]:
    tiling = _section(init_args, "tiled_inference_parameters")
    crop = [tiling.get("h_crop"), tiling.get("w_crop")]
    if all(isinstance(v, int) for v in crop):
        return crop, "model.init_args.tiled_inference_parameters (h_crop, w_crop)"
    size = _two_ints(model_args.get("backbone_img_size"))
    if size:
        return size, "model.init_args.model_args.backbone_img_size"
    for key in _SIZE_KEYS:
        size = _two_ints(data_args.get(key))
        if size:
            return size, f"data.init_args.{key}"
    backbone = str(model_args.get("backbone", ""))
    why = "the Prithvi backbones' default img_size" if "prithvi" in backbone.lower() else "assumed; pass -i if it differs"
    return [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE], why


def trains_without_coordinates(ttconfig: Mapping[str, Any]) -> bool:
    """Whether the YAML fine-tunes on one of TerraTorch's generic datamodules, which yield images
    and labels only: the network never saw coordinates, and serving them changes its outputs from
    what `terratorch predict` gives (Prithvi skips its coordinate embedding without them)."""
    datamodule = str(_section(ttconfig, "data").get("class_path", ""))
    return datamodule.rsplit(".", 1)[-1].startswith("Generic")


def infer_input_spec(ttconfig: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An input spec guessed from the YAML, and one note per decision saying where it came from.

    `temporal_coords` is `[1, frames, 2]`, not `[1, 2]`: Prithvi reads it as (batch, frames, 2),
    and a leading 1 is what makes the server concatenate the requests' tensors into that layout.
    """
    init_args = _section(ttconfig, "model", "init_args")
    model_args = _section(init_args, "model_args")
    data_args = _section(ttconfig, "data", "init_args")
    bands, bands_from = _infer_bands(model_args, data_args)
    size, size_from = _infer_size(init_args, model_args, data_args)
    frames = model_args.get("backbone_num_frames")
    frames = frames if isinstance(frames, int) and frames > 1 else 1
    shape = [bands, frames, *size] if frames > 1 else [bands, *size]
    tensor = "torch.Tensor"
    data: dict[str, Any] = {"pixel_values": {"type": tensor, "shape": shape}}
    notes = [f"pixel_values {shape}: {bands} bands from {bands_from}; {size[0]}x{size[1]} from {size_from}"]
    if frames > 1:
        notes.append(f"{frames} frames from model.init_args.model_args.backbone_num_frames")
    backbone = model_args.get("backbone")
    backbone = backbone if isinstance(backbone, str) else ""
    encoding = model_args.get("backbone_coords_encoding")
    encoding = [str(e) for e in encoding] if isinstance(encoding, list) else []
    # Declared even for a fine-tune that never saw them, as upstream's published configs of _tl
    # fine-tunes do (the mission's declares location_coords), but then said, with the way out.
    datamodule = str(_section(ttconfig, "data").get("class_path", ""))
    skew = (f"; note: {datamodule} gives the model no coordinates in training, so outputs will differ from "
            "`terratorch predict`'s (pass the input spec with -i, without them, for the same outputs)"
            ) if trains_without_coordinates(ttconfig) else ""
    if backbone.endswith("_tl") or "location" in encoding:
        data["location_coords"] = {"type": tensor, "shape": [1, 2]}
        why = f"backbone {backbone} ends with _tl" if backbone.endswith("_tl") else "backbone_coords_encoding has location"
        notes.append(f"location_coords [1, 2]: {why}{skew}")
    if "time" in encoding:
        data["temporal_coords"] = {"type": tensor, "shape": [1, frames, 2]}
        notes.append(f"temporal_coords [1, {frames}, 2]: backbone_coords_encoding has time{skew}")
    return {"target": "pixel_values", "data": data}, notes


def build_config(ttconfig: Mapping[str, Any], input_spec: Mapping[str, Any], source: str = "config.json") -> GeneratedConfig:
    """`config.json` in the mission's layout, validated as the server will validate it."""
    pretrained: dict[str, Any] = {}
    if "seed_everything" in ttconfig:
        pretrained["seed_everything"] = ttconfig["seed_everything"]
    pretrained["input"] = dict(input_spec)
    pretrained |= {key: ttconfig[key] for key in KEPT_SECTIONS[1:] if key in ttconfig}
    config = {"architectures": [ARCHITECTURE], "num_classes": 0, "pretrained_cfg": pretrained}
    parsed = parse_config(config, source)
    # As validated: `"512"` or `512.0` become 512, so the server reads exactly what was checked.
    pretrained["input"] = parsed.pretrained_cfg.input.model_dump(exclude_none=True)
    notes = []
    if parsed.pretrained_cfg.input.target is None:
        notes.append(
            "input.target is not set: inputs go by keyword where the network's forward accepts them, "
            "else its single image input goes positionally (see README); --check runs the network to verify"
        )
    left_out = [str(key) for key in ttconfig if key not in KEPT_SECTIONS]
    if left_out:
        notes.append(f"left out of pretrained_cfg (not needed to serve): {', '.join(left_out)}")
    return GeneratedConfig(config, parsed, notes)


def generate_config(ttconfig_path: str | os.PathLike[str], input_arg: str | None) -> GeneratedConfig:
    """Read the YAML and the `-i` spec (or infer it) and return the validated config."""
    ttconfig = read_ttconfig(ttconfig_path)
    notes: list[str] = []
    if input_arg is None:
        spec, inferred = infer_input_spec(ttconfig)
        notes += ["input spec inferred from the YAML (pass -i to set it):", *(f"  {n}" for n in inferred)]
    else:
        spec = parse_input_argument(input_arg)
    generated = build_config(ttconfig, spec, source=f"config generated from {ttconfig_path}")
    generated.notes[:0] = notes
    return generated


def output_path(ttconfig_path: str | os.PathLike[str], output: str | os.PathLike[str] | None) -> Path:
    """Where to write: `-o` (a folder means `folder/config.json`), else beside the YAML."""
    if output is None:
        return Path(ttconfig_path).parent / CONFIG_NAME
    path = Path(output)
    return path / CONFIG_NAME if path.is_dir() else path


def write_config(config: Mapping[str, Any], path: Path, *, force: bool = False, protect: Path | None = None) -> Path:
    """Write `config.json`; an existing file is replaced only with `force`, the YAML never."""
    if protect is not None and path.resolve() == Path(protect).resolve():
        raise OutputExistsError(f"-o/--output {path} is the --ttconfig YAML itself; choose another output file")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it, or -o to write elsewhere")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; pass a file name with -o")
    write_atomically(path, json.dumps(config, indent=2) + "\n")
    return path
