"""`pretrained_cfg.model` -> a TerraTorch task and its network, never downloading anything.

We build the Lightning task named by `class_path` (so any TerraTorch task works, classification
included, unlike the in-tree model's two-task lookup), then serve its `model` attribute. Weights
come from the served checkpoint, so every "pretrained" switch is turned off first: building a
fine-tune must not fetch backbone weights from the Hub.
"""

from __future__ import annotations

import copy
import importlib
import logging
from typing import Any

import torch

from vllm_terratorch import envs
from vllm_terratorch.core.config import TaskSpec
from vllm_terratorch.errors import ModelBuildError
from vllm_terratorch.core.legacy import translate_init_args

logger = logging.getLogger(__name__)

# model_args switches that make TerraTorch factories fetch weights while building.
PRETRAINED_SWITCHES = ("backbone_pretrained", "pretrained", "encoder_pretrained")
_SHORT_NAME_MODULE = "terratorch.tasks"


def resolve_task_class(class_path: str) -> type:
    """Import the task class; a bare name (LightningCLI shorthand) is looked up in terratorch.tasks."""
    module_name, _, class_name = class_path.rpartition(".")
    module_name = module_name or _SHORT_NAME_MODULE
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelBuildError(
            f"pretrained_cfg.model.class_path {class_path!r}: cannot import module {module_name!r} ({error}); "
            "expected a TerraTorch task such as terratorch.tasks.SemanticSegmentationTask"
        ) from None
    task_class = getattr(module, class_name, None)
    if not isinstance(task_class, type):
        raise ModelBuildError(
            f"pretrained_cfg.model.class_path {class_path!r}: {module_name} has no class {class_name!r}"
        )
    return task_class


def offline_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """A copy of `init_args` with every pretrained-weights switch in `model_args` turned off."""
    args = copy.deepcopy(init_args)
    model_args = args.get("model_args")
    if isinstance(model_args, dict):
        for switch in PRETRAINED_SWITCHES:
            if model_args.get(switch):
                logger.info("Building with %s=False: weights come from the served checkpoint", switch)
                model_args[switch] = False
    return args


# TerraTorch's Clay v1.5 backbone module, imported with `terratorch` whatever model is built, calls
# `torch.set_float32_matmul_precision("medium")` process-wide (TerraTorch 1.2.x).
def float32_precision_as_configured() -> None:
    """Put PyTorch's float32 matmul precision back to `VLLM_FLOAT32_MATMUL_PRECISION` (vLLM's value).

    Why: "medium" lets PyTorch run float32 matmuls and convolutions in bfloat16 (oneDNN on CPUs
    with AMX: a float32 ConvTranspose2d is then ~1e-2 off) or TF32 (GPUs). vLLM sets its configured
    value ("highest" unless the user chose otherwise) when a worker starts, but TerraTorch can be
    imported later, and in a process without a vLLM worker (the CLI's checks, a user's reference)
    nothing sets it back. So a float32 model computes in float32 everywhere; a faster dtype is
    `--dtype bfloat16`.
    """
    wanted = envs.float32_matmul_precision()
    if torch.get_float32_matmul_precision() != wanted:
        logger.debug("Float32 matmul precision back to %r (TerraTorch's import had changed it)", wanted)
        torch.set_float32_matmul_precision(wanted)


def build_task(spec: TaskSpec) -> Any:
    """Instantiate the Lightning task of `spec` in eval mode (older-TerraTorch arguments translated)."""
    try:
        task_class = resolve_task_class(spec.class_path)
        task = task_class(**translate_init_args(offline_init_args(spec.init_args)))
    except ModelBuildError:
        raise
    except Exception as error:  # noqa: BLE001 - TerraTorch raises bare Exceptions for bad args
        raise ModelBuildError(
            f"TerraTorch could not build {spec.class_path} from pretrained_cfg.model.init_args: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        float32_precision_as_configured()  # by now every TerraTorch module the task needs is imported
    return task.eval()


def build_network(spec: TaskSpec) -> torch.nn.Module:
    """The network the task serves (`task.model`), detached from the Lightning task."""
    task = build_task(spec)
    network = getattr(task, "model", None)
    if not isinstance(network, torch.nn.Module):
        raise ModelBuildError(f"{spec.class_path} built no `model` network to serve")
    return network.eval()
