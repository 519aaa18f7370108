"""The engine side of `predict`, shared by local and Ray mode: starting vLLM, and the one encode loop.

`SceneEncoder` is the only place that turns decoded scenes into an engine call and back; both modes
use it, so a bad scene is isolated, and a dead engine is reported, in the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_terratorch import envs
from vllm_terratorch.core.config import load_config
from vllm_terratorch.errors import ConfigError, UsageError
from vllm_terratorch.predict.tasks import build_prompts, describe_error
from vllm_terratorch.registration import PLUGINS, kind_for_task

# Engine options predict sets itself (the passthrough may override them). No multimodal processor
# cache: a run's tiles never repeat, and vLLM would keep up to 4 GiB of them (a whole scene's worth).
ENGINE_DEFAULTS = {"model_impl": "terratorch", "skip_tokenizer_init": True, "enforce_eager": True,
                   "mm_processor_cache_gb": 0}


def plugin_for_model(model_dir: Path) -> str:
    class_path = load_config(model_dir).pretrained_cfg.model.class_path
    kind = kind_for_task(class_path)
    if kind is None:
        raise ConfigError(
            f"{model_dir}: cannot tell the IO processor from pretrained_cfg.model.class_path {class_path!r}; "
            f"pass --io-processor-plugin ({', '.join(PLUGINS)})"
        )
    return kind.plugin


def engine_kwargs(args: argparse.Namespace, model_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": str(model_dir), **ENGINE_DEFAULTS, "dtype": args.dtype}
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return kwargs | options


def create_engine(kwargs: dict[str, Any]) -> Any:
    """`LLM(**kwargs)`. On CPU the engine runs inside this process by default (measured here: about
    1.5x the scenes/s of vLLM's engine-core + worker processes, and a faster start); pass
    `--distributed-executor-backend mp` or set VLLM_ENABLE_V1_MULTIPROCESSING=1 to opt out."""
    envs.engine_environment()
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and kwargs.get("distributed_executor_backend", "uni") == "uni":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = {"distributed_executor_backend": "uni", **kwargs}
        # In-process, vLLM's CPU worker warns on every request batch that it ignores
        # torch.set_num_threads (called by vLLM's own multimodal input processing): drop that line.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_drop_set_num_threads_warning)
    return LLM(**kwargs)


def _drop_set_num_threads_warning(record: logging.LogRecord) -> bool:
    return "torch.set_num_threads" not in record.getMessage()


def shutdown_engine(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def check_engine_options(options: dict[str, Any]) -> None:
    """Every passthrough name must be a field of vLLM's EngineArgs (typos fail before any work)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {item.name for item in dataclasses.fields(EngineArgs)}
    unknown = sorted(name for name in options if name not in known)
    if unknown:
        raise UsageError(
            "unknown option(s) " + ", ".join("--" + name.replace("_", "-") for name in unknown)
            + " (neither a predict option nor a vLLM engine argument)"
        )
    for name in ("model", "io_processor_plugin"):
        if name in options:
            raise UsageError(f"--{name.replace('_', '-')} cannot be passed to the engine here")


def default_max_num_seqs() -> int:
    """vLLM's own default `max_num_seqs` for an offline engine on this machine's platform.

    Ray mode sizes its engine calls before any engine exists; on a cluster whose driver has no GPU
    this is vLLM's non-GPU default (a smaller batch than the GPU actors would pick, never a larger one).
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    return EngineArgs.get_batch_defaults(1)[1][UsageContext.LLM_CLASS]


def engine_encode(llm: Any) -> Callable[[list[dict[str, Any]]], list[Any]]:
    """The engine call: one output tensor per prompt, in order (pooling through our IO processor)."""

    def encode(prompts: list[dict[str, Any]]) -> list[Any]:
        return [output.outputs.data for output in llm.encode(prompts, pooling_task="plugin", use_tqdm=False)]

    return encode


def is_engine_dead(error: BaseException) -> bool:
    """vLLM's EngineDeadError (engine core gone): no later call can succeed."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(error).__mro__)


@dataclass
class Encoded:
    """One scene's result from the engine: its tile outputs, or why it has none."""

    ok: bool
    outputs: list[Any] | None = None
    error: str | None = None


class SceneEncoder:
    """Encode the tiles of many decoded scenes in one engine call.

    If the call fails, the scenes are retried one by one, so one bad scene does not fail its
    batch-mates. If the engine died (or dies during the retries), every scene of this and every
    later call fails with that one message, without calling the engine again.
    """

    def __init__(self, encode: Callable[[list[dict[str, Any]]], list[Any]], dtype: Any = None) -> None:
        self.encode_fn = encode
        self.dtype = dtype
        self.fatal: str | None = None
        self.busy_s = 0.0
        self.calls = 0
        self.tiles = 0

    def _timed_encode(self, prompts: list[dict[str, Any]]) -> list[Any]:
        start = time.monotonic()
        try:
            outputs = self.encode_fn(prompts)
        finally:
            self.busy_s += time.monotonic() - start
            self.calls += 1
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(prompts)} tiles")
        return outputs

    def run(self, scenes: Sequence[dict[str, Any]]) -> list[Encoded]:
        """One `Encoded` per decoded scene (`decode_scene`'s dict with `ok` true), in order."""
        if self.fatal:
            return [Encoded(False, error=f"inference failed: {self.fatal}") for _ in scenes]
        prompts_per_scene = [build_prompts(decoded, self.dtype) for decoded in scenes]
        prompts = [prompt for scene in prompts_per_scene for prompt in scene]
        if not prompts:
            return [Encoded(True, outputs=[]) for _ in scenes]
        try:
            outputs = self._timed_encode(prompts)
        except Exception as error:  # noqa: BLE001 - reported per scene
            if is_engine_dead(error):
                self.fatal = describe_error(error)
            if self.fatal or len(scenes) == 1:
                return [Encoded(False, error=f"inference failed: {self.fatal or describe_error(error)}") for _ in scenes]
            return [result for decoded in scenes for result in self.run([decoded])]
        self.tiles += len(prompts)
        results, offset = [], 0
        for scene in prompts_per_scene:
            results.append(Encoded(True, outputs=outputs[offset : offset + len(scene)]))
            offset += len(scene)
        return results
