"""Typed model of a servable TerraTorch `config.json`.

The config is validated once, at start-up, so that a bad field fails with one message naming the
field, instead of a traceback from deep inside TerraTorch or vLLM's profiling run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from vllm_terratorch.errors import ConfigError, ModelSourceError

ARCHITECTURE = "Terratorch"


class TensorSpec(BaseModel):
    """One named model input: what one request carries under that name."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["torch.Tensor"]
    shape: list[PositiveInt] = Field(min_length=1)


# Inputs Prithvi-style models take beside the image, derived from the file by the IO processors.
COORDINATE_INPUTS = ("location_coords", "temporal_coords")


class InputSpec(BaseModel):
    """`pretrained_cfg.input`: the model's inputs and which one (if any) is positional."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = None
    data: dict[str, TensorSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _target_is_an_input(self) -> InputSpec:
        if self.target is not None and self.target not in self.data:
            raise ValueError(
                f"target {self.target!r} is not one of the inputs in data ({sorted(self.data)}); "
                "name one of them, or omit target to pass every input as a keyword"
            )
        return self

    @property
    def image_inputs(self) -> list[str]:
        """The image inputs (tiled by the IO processors): the target, else every input of rank >= 3
        that is not one of Prithvi's coordinate inputs (`temporal_coords` is [1, T, 2] for T frames).
        More than one: a multi-modal model (TerraMind), one image per modality."""
        if self.target is not None:
            return [self.target]
        return [name for name, tensor in self.data.items() if len(tensor.shape) >= 3 and name not in COORDINATE_INPUTS]

    @property
    def image_input(self) -> str:
        """The single image input of a one-image model."""
        images = self.image_inputs
        if len(images) != 1:
            raise ConfigError(
                f"pretrained_cfg.input: cannot tell which input is the image ({list(self.data)}); set input.target"
            )
        return images[0]

    @property
    def keyword_names(self) -> list[str]:
        """Inputs passed to `forward` as keywords (all but the target)."""
        return [name for name in self.data if name != self.target]


class TaskSpec(BaseModel):
    """`pretrained_cfg.model`: a LightningCLI-style task (`class_path` + `init_args`)."""

    model_config = ConfigDict(extra="allow")

    class_path: str = Field(min_length=1)
    init_args: dict[str, Any] = Field(default_factory=dict)


class PretrainedCfg(BaseModel):
    """`pretrained_cfg`: the TerraTorch YAML's model/data sections plus the input spec."""

    model_config = ConfigDict(extra="allow")

    seed_everything: int | None = None
    input: InputSpec
    model: TaskSpec
    data: dict[str, Any] | None = None


class TerratorchConfig(BaseModel):
    """The whole `config.json` of a servable TerraTorch model."""

    model_config = ConfigDict(extra="allow")

    architectures: list[str]
    num_classes: Literal[0]
    pretrained_cfg: PretrainedCfg

    @model_validator(mode="after")
    def _is_terratorch(self) -> TerratorchConfig:
        if ARCHITECTURE not in self.architectures:
            raise ValueError(f"must contain {ARCHITECTURE!r}, got {self.architectures}")
        return self


def describe_validation_error(error: ValidationError, root: str | None = None) -> str:
    """Every problem pydantic found, with its dotted field path (below `root`, if given).

    Without `root` (files): one indented line per problem, with the value given. With `root`
    (a request's `data`): one line for all, `; `-separated, since it goes into one HTTP error.
    """
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if root is not None:
            parts.append(f"{root}.{where}: {item['msg']}" if where else f"{root}: {item['msg']}")
            continue
        got = item.get("input")
        got_text = f" (got {json.dumps(got, default=str)[:80]})" if item["type"] != "missing" else ""
        parts.append(f"  {where or '(top level)'}: {item['msg']}{got_text}")
    return "; ".join(parts) if root is not None else "\n".join(parts)


def parse_config(raw: Any, source: str = "config.json") -> TerratorchConfig:
    """Validate a decoded `config.json`; raise `ConfigError` naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    try:
        return TerratorchConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(
            f"{source} is not a servable TerraTorch config:\n{describe_validation_error(error)}\n"
            'Expected architectures ["Terratorch"], num_classes 0 and a pretrained_cfg with '
            "input.data (name -> {type: torch.Tensor, shape: [positive ints]}) and "
            "model.class_path; see the README."
        ) from None


def parse_pretrained_cfg(raw: Any, source: str = "pretrained_cfg") -> PretrainedCfg:
    """Validate just the `pretrained_cfg` section (what vLLM's hf_config carries)."""
    config = parse_config(
        {"architectures": [ARCHITECTURE], "num_classes": 0, "pretrained_cfg": raw}, source
    )
    return config.pretrained_cfg


def pretrained_cfg_of(hf_config: Any, model: str) -> PretrainedCfg:
    """The validated `pretrained_cfg` of the config vLLM loaded for `model`."""
    return parse_pretrained_cfg(hf_config.to_dict().get("pretrained_cfg"), source=f"{model}: config.json pretrained_cfg")


def load_config(path: str | Path) -> TerratorchConfig:
    """Read and validate a `config.json` file (or the one inside a model folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"{path} does not exist; a servable model folder needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    return parse_config(raw, str(path))
