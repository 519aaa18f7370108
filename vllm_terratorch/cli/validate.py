"""Offline checks of a servable model: the config, the weights and one forward, without vLLM.

Starting vLLM to find out that a key is missing or that the input spec does not fit the network
costs minutes and hides the cause in a worker's log. These checks do what the server's start-up
does (same config validation, same offline build, same strict key matching, same calling
convention) in seconds, and say what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vllm_terratorch import envs
from vllm_terratorch.core.config import PretrainedCfg, load_config
from vllm_terratorch.core.dummy import dummy_inputs
from vllm_terratorch.errors import ConfigError, InputError, WeightsError
from vllm_terratorch.core.factory import build_network
from vllm_terratorch.core.forward import ForwardPlan, task_output
from vllm_terratorch.core.hub import resolve_model_dir
from vllm_terratorch.core.dtypes import dtype_name
from vllm_terratorch.core.weights import find_weight_files, load_folder_weights

@dataclass
class Summary:
    """What a check found, printable for people (`format`) and scripts (`as_dict`)."""

    source: str
    task_class: str
    backbone: str | None
    network_class: str
    parameters: int
    input: dict[str, Any]
    calling_convention: str
    output_shape: list[int]
    dtype: str
    weight_files: list[str] = field(default_factory=list)
    tensors_loaded: int | None = None
    strict: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}

    def format(self) -> str:
        inputs = ", ".join(f"{name} {spec['shape']}" for name, spec in self.input["data"].items())
        target = self.input.get("target") or "(none: all keywords)"
        lines = [
            f"model:              {self.source}",
            f"task class:         {self.task_class}",
            f"backbone:           {self.backbone or '(not named in model_args)'}",
            f"network:            {self.network_class}, {self.parameters:,} parameters",
            f"inputs (1 request): {inputs}; target {target}",
            f"calling convention: {self.calling_convention}",
            f"output (1 request): {self.output_shape} ({self.dtype})",
        ]
        if self.weight_files:
            mode = "strict" if self.strict else "non-strict (VLLM_TERRATORCH_STRICT_WEIGHTS=0)"
            lines.append(f"weights:            {self.tensors_loaded} tensors from {', '.join(self.weight_files)} ({mode})")
        return "\n".join(lines)


def _target_hint(plan: ForwardPlan) -> str:
    if plan.positional is not None and not plan.dict_positional:
        return ""
    return f' (input.target is not set; most TerraTorch networks need "target": "{plan.names[0]}")'


def dry_run(pretrained: PretrainedCfg, network: torch.nn.Module, dtype: torch.dtype) -> tuple[ForwardPlan, list[int]]:
    """One forward with a batch of one dummy request, exactly as the server calls the network."""
    plan = ForwardPlan.for_network(pretrained.input, network)
    batch = {name: tensor[None] for name, tensor in dummy_inputs(pretrained.input, dtype).items()}
    args, kwargs = plan.batch(batch, dtype, "cpu")
    shapes = ", ".join(f"{name} {spec.shape}" for name, spec in pretrained.input.data.items())
    try:
        with torch.no_grad():
            output = task_output(network.to(dtype).eval()(*args, **kwargs))
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the network is reported with its cause
        raise ConfigError(
            f"one dummy forward, {plan.describe()} with pretrained_cfg.input.data shapes ({shapes}), failed: "
            f"{type(error).__name__}: {error}. Check input.data (bands, size, coords) and input.target "
            "against the network's forward" + _target_hint(plan)
        ) from error
    if not torch.isfinite(output.float()).all():
        raise WeightsError(f"the dummy forward ({plan.describe()}) produced NaN or infinite values; the weights look broken")
    return plan, list(output.shape[1:])


def backbone_name(pretrained: PretrainedCfg) -> str | None:
    """`model_args.backbone` when it is a name (it can also be an inline module config)."""
    model_args = pretrained.model.init_args.get("model_args")
    backbone = model_args.get("backbone") if isinstance(model_args, dict) else None
    return backbone if isinstance(backbone, str) else None


def summarize(source: str, pretrained: PretrainedCfg, network: torch.nn.Module, dtype: torch.dtype) -> Summary:
    """Run the dummy forward on `network` (weights as they are) and describe the model."""
    plan, shape = dry_run(pretrained, network, dtype)
    return Summary(
        source=source,
        task_class=pretrained.model.class_path,
        backbone=backbone_name(pretrained),
        network_class=type(network).__name__,
        parameters=sum(p.numel() for p in network.parameters()),
        input=pretrained.input.model_dump(exclude_none=True),
        calling_convention=plan.describe(),
        output_shape=shape,
        dtype=dtype_name(dtype),
    )


def check_pretrained_cfg(pretrained: PretrainedCfg, source: str, dtype: torch.dtype = torch.float32) -> Summary:
    """Build the network (random weights, offline) and run one dummy forward: does the config fit?"""
    return summarize(source, pretrained, build_network(pretrained.model), dtype)


def validate_model(
    reference: str | os.PathLike[str], *, revision: str | None = None, dtype: torch.dtype = torch.float32
) -> Summary:
    """Everything the server checks at start-up, for a folder or (cached / reachable) Hub repo."""
    folder = resolve_model_dir(reference, revision)
    pretrained = load_config(folder).pretrained_cfg
    network = build_network(pretrained.model)
    strict = envs.strict_weights()
    loaded = load_folder_weights(network, folder, strict=strict)
    summary = summarize(str(folder), pretrained, network, dtype)
    summary.weight_files = [path.name for path in find_weight_files(folder)]
    summary.tensors_loaded = loaded
    summary.strict = strict
    return summary
