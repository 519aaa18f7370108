"""Helpers for integration tests: a real vLLM engine on CPU, the documented request form, and a
plain-PyTorch reference of the same weights."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vllm_terratorch.core.forward import ForwardPlan, task_output
from vllm_terratorch.envs import RESERVED_CPUS
from vllm_terratorch.testing.samples import build_sample_task

IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"

@contextmanager
def engine(model: Path | str, *, in_process: bool = True, **kwargs: Any) -> Iterator[Any]:
    """An offline `LLM` with the README's options, shut down on exit.

    `in_process` (default): the engine core and its worker run in this process (vLLM's "uni" executor
    with VLLM_ENABLE_V1_MULTIPROCESSING=0, as `predict` runs it): the same engine, model runner and
    scheduler, started in ~15 s instead of ~65 s (two fewer processes importing torch and vLLM),
    which is what keeps CI within its time. `in_process=False` is vLLM's default, the README's
    exact form (an engine-core process, which runs the worker: compat.worker_in_engine_process);
    test_segmentation uses it.
    """
    from vllm import LLM

    options = {
        "model_impl": "terratorch",
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "enable_mm_embeds": True,
        "gpu_memory_utilization": 0.2,
        "dtype": "float32",
    } | ({"distributed_executor_backend": "uni"} if in_process else {}) | kwargs
    # Both read while the engine is built, restored for the servers later tests start: ours, and the
    # CPU reservation our backend sets to 0 for the engine it configures (engine/compat.py).
    saved = {name: os.environ.get(name) for name in (IN_PROCESS, RESERVED_CPUS)}
    if in_process:
        os.environ[IN_PROCESS] = "0"
    try:
        llm = LLM(model=str(model), **options)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        # An engine core in this process freezes vLLM's environment reads (`enable_envs_cache`); later
        # engines of this test process must see the environment as it is then.
        import vllm.envs

        vllm.envs.disable_envs_cache()
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def module_engine(pretrained_cfg: dict[str, Any], weight_format: str = "ckpt", **engine_kwargs: Any) -> Any:
    """A module-scoped fixture: one engine over `pretrained_cfg` written to a tmp dir."""
    import pytest

    from vllm_terratorch.testing.samples import write_model_folder

    @pytest.fixture(scope="module")
    def llm(tmp_path_factory: Any) -> Iterator[Any]:
        folder = write_model_folder(tmp_path_factory.mktemp("model"), pretrained_cfg, weight_format=weight_format)  # type: ignore[arg-type]
        with engine(folder, **engine_kwargs) as running:
            yield running

    return llm


def encode(llm: Any, requests: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The documented offline request form; one output tensor per request, in order."""
    prompts = [{"prompt_token_ids": [1], "multi_modal_data": {"image": dict(r)}} for r in requests]
    return [o.outputs.data for o in llm.encode(prompts, pooling_task="plugin", use_tqdm=False)]


def reference_outputs(
    pretrained_cfg: dict[str, Any], requests: Sequence[dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Plain PyTorch: the same weights, one request at a time, no vLLM involved."""
    from vllm_terratorch.core.config import parse_pretrained_cfg

    network = build_sample_task(pretrained_cfg).model.to(dtype)
    spec = parse_pretrained_cfg(pretrained_cfg).input
    plan = ForwardPlan.for_network(spec, network)
    outputs = []
    with torch.no_grad():
        for request in requests:
            batch = {name: tensor[None] for name, tensor in request.items()}
            args, kwargs = plan.batch(batch, dtype, "cpu")
            outputs.append(task_output(network(*args, **kwargs))[0])
    return outputs


def distinct_requests(spec: dict[str, Any], count: int, seed: int = 0, size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """`count` different requests for an input spec; coordinates are plausible lon/lat."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        request = {}
        for name, tensor in spec["data"].items():
            shape = list(tensor["shape"])
            if size is not None and len(shape) >= 3:
                shape[-2:] = [size, size]
            if name == "location_coords":
                value = torch.rand(shape, generator=generator) * torch.tensor([360.0, 180.0]) - torch.tensor([180.0, 90.0])
            else:
                value = torch.randn(shape, generator=generator)
            request[name] = value
        requests.append(request)
    return requests


def assert_masks_agree(got: np.ndarray, expected: np.ndarray, what: object = "", min_agreement: float = 0.999) -> None:
    """Class masks from two runs that batched the same tiles differently agree on all but near-tie
    pixels: with more than one forward thread (every core, the CPU default) float32 sums are not
    bitwise batch-invariant, so a logit tie may break the other way."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    agreement = float((got == expected).mean())
    assert agreement >= min_agreement, (what, agreement)


def max_abs_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    assert len(outputs) == len(references)
    diffs = []
    for out, ref in zip(outputs, references):
        assert out.shape == ref.shape, (out.shape, ref.shape)
        diffs.append((out.float() - ref.float()).abs().max().item())
    return max(diffs)
