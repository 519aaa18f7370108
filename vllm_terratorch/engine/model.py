"""The vLLM model class behind `--model-impl terratorch`.

Request -> `TerratorchDataParser` (engine/multimodal.py: validate each request's tensors against the
input spec, cast to the model dtype) -> vLLM batches the requests' tensors ->
`TerratorchModel.forward` (one network call per batch, each request with its own tensors) ->
`CroppingPooler` (the task output of each request is its pooled output, `o.outputs.data`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import IdentityPooler
from vllm.model_executor.models.interfaces import IsAttentionFree, MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.interfaces_base import attn_type
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from vllm_terratorch import envs
from vllm_terratorch.core.compiled import CompiledForward
from vllm_terratorch.core.config import pretrained_cfg_of
from vllm_terratorch.core.dummy import dummy_inputs
from vllm_terratorch.core.factory import build_network
from vllm_terratorch.core.forward import ForwardPlan, identical_requests, one_row_per_token, pad_and_stack, split_by_shape, task_output
from vllm_terratorch.core.hub import resolve_model_dir
from vllm_terratorch.core.kernels import float32_where_low_precision_fails
from vllm_terratorch.core.weights import load_folder_weights
from vllm_terratorch.engine.compat import gpu_sync_allowed, skip_encoder_profiling, time_weight_loading
from vllm_terratorch.core.inputs import MODALITY
from vllm_terratorch.engine.multimodal import (
    TerratorchDummyInputsBuilder,
    TerratorchMultiModalProcessor,
    TerratorchProcessingInfo,
)
from vllm_terratorch.log import logger


class CroppingPooler(IdentityPooler):
    """Each request's task output is its pooled output; padded rows (a step whose requests had
    different image sizes) are cropped back to their own shape."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_shapes: list[tuple[int, ...]] | None = None

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: Any) -> Any:
        shapes, self.pending_shapes = self.pending_shapes, None
        if shapes is None or len(shapes) != len(hidden_states):
            return super().forward(hidden_states, pooling_metadata)
        return [row[tuple(slice(0, size) for size in shape)] for row, shape in zip(hidden_states, shapes)]


@attn_type("attention_free")
@MULTIMODAL_REGISTRY.register_processor(
    TerratorchMultiModalProcessor,
    info=TerratorchProcessingInfo,
    dummy_inputs=TerratorchDummyInputsBuilder,
)
class TerratorchModel(nn.Module, IsAttentionFree, SupportsMultiModal):
    """Any TerraTorch task, built from `pretrained_cfg`, served as a vLLM pooling model."""

    supports_multimodal_raw_input_only = True
    is_pooling_model = True
    reads_its_own_weights = True  # load_weights never reads vLLM's iterator (compat.time_weight_loading)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith(MODALITY):
            return None
        raise ValueError(f"TerraTorch models take {MODALITY!r} inputs only, not {modality!r}")

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        self.model_reference = model_config.model
        self.revision = model_config.revision
        self.download_dir = vllm_config.load_config.download_dir
        self.pretrained_cfg = pretrained_cfg_of(model_config.hf_config, model_config.model)
        self.dtype = model_config.dtype
        self.network = build_network(self.pretrained_cfg.model).to(dtype=self.dtype)
        self.plan = ForwardPlan.for_network(self.pretrained_cfg.input, self.network)
        self.pooler = CroppingPooler()
        skip_encoder_profiling(vllm_config)
        time_weight_loading()
        mode = envs.compile_mode()
        self.compiled = CompiledForward(self.network, mode, vllm_config.scheduler_config.max_num_seqs) if mode else None
        self._output_shape: tuple[int, ...] | None = None  # of the last successful forward
        # A forward's time per request, measured once at start-up (`measure_seconds_per_request`):
        # what a step of N requests costs, so the engine keeps its steps inside vLLM's timeout.
        self.seconds_per_request = 0.0
        logger.info(
            "vllm-terratorch: serving %s (%s) in %s as %s (%d torch threads)",
            self.pretrained_cfg.model.class_path,
            type(self.network).__name__,
            self.dtype,
            self.plan.describe(),
            torch.get_num_threads(),
        )

    def get_language_model(self) -> nn.Module:
        # vLLM 0.21-0.26 ask multimodal models for their language model while loading.
        return self

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The one placeholder token per request carries no information.
        return torch.empty((input_ids.shape[0], 0), device=input_ids.device, dtype=self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **inputs: Any,
    ) -> torch.Tensor | list[torch.Tensor]:
        rows = self._forward_requests(inputs, positions.device)
        num_tokens = positions.shape[0]
        if num_tokens > len(rows) and identical_requests(inputs):
            return one_row_per_token(rows, num_tokens)
        return rows

    def _forward_requests(self, inputs: dict[str, Any], device: torch.device) -> torch.Tensor:
        """One output row per request in the batch."""
        groups = split_by_shape(inputs, self.plan.names)
        outputs: list[torch.Tensor | None] = [None] * sum(len(indices) for indices, _ in groups)
        with gpu_sync_allowed():
            for indices, group in groups:
                args, kwargs = self.plan.batch(group, self.dtype, device)
                result = self._run(args, kwargs, len(indices))
                if len(groups) == 1:
                    return result
                for row, index in enumerate(indices):
                    outputs[index] = result[row]
        results = [out for out in outputs if out is not None]
        if len({tuple(out.shape) for out in results}) == 1:
            return torch.stack(results)
        # vLLM's runner needs one tensor: pad to a common shape, and let the pooler crop each
        # request's output back to its own shape.
        self.pooler.pending_shapes = [tuple(out.shape) for out in results]
        return pad_and_stack(results)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], count: int) -> torch.Tensor:
        """One network call; a failure fails only these requests (NaN outputs), not the engine.

        An exception here would stop vLLM's engine for every client. Inputs are validated
        against the spec before they get here, but a network can still refuse some sizes (a 8x8
        image is too small for a Prithvi + UperNet) or hit a runtime error.
        """
        try:
            if self.compiled is not None and self.compiled.accepts(args, kwargs, count):
                result = self.compiled(args, kwargs, count)
            else:
                result = task_output(self.network(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - any failure must stay with these requests
            if self._output_shape is None:
                raise
            shapes = [tuple(t.shape[1:]) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            logger.error(
                "vllm-terratorch: the network failed on %d request(s) with input shapes %s (%s: %s); "
                "their outputs are NaN",
                count, shapes, type(error).__name__, error,
            )
            return torch.full((count, *self._output_shape), float("nan"), dtype=self.dtype, device=self._device())
        self._output_shape = tuple(result.shape[1:])
        return result

    def measure_seconds_per_request(self, batch: int) -> float:
        """Time one forward of `batch` dummy requests (after one warm-up call), once; per request.

        Asked by the engine core before it builds its scheduler, so that it can bound the step size;
        measured here because not every vLLM runner runs the model before serving (the CPU runner
        does not profile)."""
        if self.seconds_per_request == 0.0:
            one = dummy_inputs(self.pretrained_cfg.input, self.dtype, self._device())
            inputs = {name: t.expand(batch, *t.shape).contiguous() for name, t in one.items()}
            with torch.inference_mode(), gpu_sync_allowed():
                args, kwargs = self.plan.batch(inputs, self.dtype, self._device())
                for timed in (False, True):
                    started = time.perf_counter()
                    self._run(args, kwargs, batch)
                    if timed:
                        self.seconds_per_request = (time.perf_counter() - started) / batch
            # The thread count the forward really runs at, once vLLM's start-up has had its say (on
            # CPU vLLM 0.32 logs "Reducing Torch threads ... to 1", which its CPU worker then skips).
            logger.info(
                "vllm-terratorch: a forward of %d dummy requests took %.3f s at %d torch threads",
                batch, self.seconds_per_request * batch, torch.get_num_threads(),
            )
        return self.seconds_per_request

    def _compile(self) -> None:
        """Compile every batch bucket now that the weights are in place (freezing captures them).

        A network that cannot be compiled is still served, eagerly: the opt-in is about speed,
        and the log says why it did not apply.
        """
        assert self.compiled is not None
        one = dummy_inputs(self.pretrained_cfg.input, self.dtype, self._device())

        def make_batch(size: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return self.plan.batch({name: t.expand(size, *t.shape).contiguous() for name, t in one.items()}, self.dtype, self._device())

        try:
            with gpu_sync_allowed():
                self.compiled.warm_up(make_batch)
        except Exception as error:  # noqa: BLE001 - compilation is an optimisation; eager always works
            logger.warning(
                "vllm-terratorch: VLLM_TERRATORCH_COMPILE=%s could not compile %s (%s: %s); serving eagerly",
                self.compiled.mode, type(self.network).__name__, type(error).__name__, str(error).splitlines()[0] if str(error) else "",
            )
            self.compiled = None

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # vLLM's iterator reads only safetensors/.bin/.pt with weights_only and no Lightning
        # `model.` prefixes; we read the model folder ourselves (all formats, strict check) and
        # never consume `weights`, so vLLM reads no file twice.
        folder = resolve_model_dir(self.model_reference, self.revision, self.download_dir)
        loaded = load_folder_weights(self.network, folder, strict=envs.strict_weights())
        self.network.to(dtype=self.dtype)
        float32_where_low_precision_fails(self.network)  # CPU kernels that get bf16 convolutions wrong
        logger.info("vllm-terratorch: loaded %d tensors from %s", loaded, folder)
        if self.compiled is not None:
            self._compile()
        return {f"network.{name}" for name, _ in self.network.named_parameters()}
