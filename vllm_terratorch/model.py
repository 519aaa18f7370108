"""The vLLM model class behind `--model-impl terratorch`.

Request -> `TerratorchDataParser` (validate each request's tensors against the input spec, cast to
the model dtype) -> vLLM batches the requests' tensors -> `TerratorchModel.forward` (one network
call per batch, each request with its own tensors) -> `IdentityPooler` (the task output of each
request is its pooled output, `o.outputs.data`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.inputs import MultiModalDataDict, MultiModalInput, mm_input
from vllm.model_executor.layers.pooler import IdentityPooler
from vllm.model_executor.models.interfaces import IsAttentionFree, MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.interfaces_base import attn_type
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptUpdate,
    TimingContext,
)
from vllm.sequence import IntermediateTensors

from vllm_terratorch import envs
from vllm_terratorch.compat import gpu_sync_allowed, logger, mm_hashes, skip_encoder_profiling
from vllm_terratorch.compiled import CompiledForward
from vllm_terratorch.config import InputSpec, PretrainedCfg, pretrained_cfg_of
from vllm_terratorch.dummy import dummy_inputs
from vllm_terratorch.factory import build_network
from vllm_terratorch.forward import ForwardPlan, split_by_shape, task_output
from vllm_terratorch.hub import resolve_model_dir
from vllm_terratorch.inputs import validate_request_inputs
from vllm_terratorch.weights import load_folder_weights

MODALITY = "image"


def _fields(spec: InputSpec, *, shared: bool) -> dict[str, MultiModalFieldConfig]:
    """Field layout of the inputs: one item per request (`batched`), so that each request keeps its
    own tensors when vLLM stacks a batch."""
    return {
        name: MultiModalFieldConfig.shared(MODALITY, batch_size=1) if shared else MultiModalFieldConfig.batched(MODALITY)
        for name in spec.data
    }


class TensorInputItems(ModalityDataItems[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]):
    """One request's model inputs (already validated against the input spec).

    Not `DictEmbeddingItems`: these are raw inputs of the network, not precomputed embeddings that
    bypass an encoder, so they need no `--enable-mm-embeds` (the mission's `vllm serve` line has
    none) and the flag does not matter when given (vLLM's own Prithvi example sets it).
    """

    def get_count(self) -> int:
        return 1

    def get(self, index: int) -> Mapping[str, torch.Tensor]:
        # IndexError past the one item ends iteration: ModalityDataItems iterates through
        # __getitem__ (vLLM 0.26 hashes with `for item in data_items`).
        if index not in (0, -1):
            raise IndexError(f"one {MODALITY} item per request, no item {index}")
        return self.data

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return self.data


class TerratorchDataParser(MultiModalDataParser):
    """Accepts `{"image": {name: tensor, ...}}` (or the inner dict alone, as upstream did)."""

    def __init__(self, spec: InputSpec, dtype: torch.dtype, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.dtype = dtype

    def _parse_image_data(self, data: Any) -> ModalityDataItems[Any, Any] | None:
        if isinstance(data, Mapping):
            return TensorInputItems(validate_request_inputs(data, self.spec, self.dtype), MODALITY)
        if isinstance(data, (list, tuple)) and len(data) == 1 and isinstance(data[0], Mapping):
            return self._parse_image_data(data[0])
        raise ValueError(
            f"multi_modal_data['image'] must be a dict of tensors {list(self.spec.data)} "
            f"(pretrained_cfg.input.data), got {type(data).__name__}"
        )

    def parse_mm_data(self, mm_data: MultiModalDataDict) -> MultiModalDataItems:
        if MODALITY not in mm_data:
            mm_data = {MODALITY: mm_data}  # type: ignore[dict-item]
        return super().parse_mm_data(mm_data)


class TerratorchProcessingInfo(BaseProcessingInfo):
    @cached_property
    def pretrained_cfg(self) -> PretrainedCfg:
        return pretrained_cfg_of(self.get_hf_config(), self.ctx.model_config.model)

    @property
    def input_spec(self) -> InputSpec:
        return self.pretrained_cfg.input

    def get_data_parser(self) -> TerratorchDataParser:
        return TerratorchDataParser(
            self.input_spec, self.ctx.model_config.dtype, expected_hidden_size=self._get_expected_hidden_size()
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: None}


class TerratorchDummyInputsBuilder(BaseDummyInputsBuilder[TerratorchProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Any = None,  # per-modality options; differ between vLLM 0.26 and 0.32, unused
    ) -> MultiModalDataDict:
        # One request's inputs, in the model dtype; vLLM replicates the item for the batch
        # sizes it profiles and moves it to the device.
        return {MODALITY: dummy_inputs(self.info.input_spec, self.info.ctx.model_config.dtype)}


class TerratorchMultiModalProcessor(BaseMultiModalProcessor[TerratorchProcessingInfo]):
    requires_tokenizer = False

    def _get_mm_fields_config(
        self,
        hf_inputs: BatchFeature,
        hf_processor_mm_kwargs: Mapping[str, object],
        *,
        is_shared: bool = True,
    ) -> Mapping[str, MultiModalFieldConfig]:
        return _fields(self.info.input_spec, shared=is_shared)

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        return []

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        with timing_ctx.record("apply_hf_processor"):
            # Our items are passthrough-only (no HF processor runs), so they are read directly
            # rather than through the base class's private helpers, which differ between releases.
            passthrough: dict[str, object] = {}
            for items in inputs.mm_data_items.values():
                passthrough.update(items.get_passthrough_data())
            processed = BatchFeature({k: torch.as_tensor(v).unsqueeze(0) for k, v in passthrough.items()}, tensor_type="pt")
        mm_kwargs = MultiModalKwargsItems.from_hf_inputs(
            processed,
            self._get_mm_fields_config(processed, inputs.hf_processor_mm_kwargs, is_shared=False),
        )
        with timing_ctx.record("get_mm_hashes"):
            hashes = mm_hashes(inputs, self.info.model_id, self.info.ctx.get_mm_config())
        return mm_input(
            prompt_token_ids=[1],
            mm_kwargs=mm_kwargs,
            mm_hashes=hashes,
            mm_placeholders={MODALITY: [PlaceholderRange(offset=0, length=0)]},
        )


def _identical_requests(inputs: Mapping[str, Any]) -> bool:
    """Whether every request of the batch carries the same inputs (as vLLM's dummy requests do)."""
    for value in inputs.values():
        items = list(value) if isinstance(value, (torch.Tensor, list, tuple)) else [value]
        first = items[0] if items else None
        for item in items[1:]:
            if not (isinstance(item, torch.Tensor) and isinstance(first, torch.Tensor)):
                return False
            if item.shape != first.shape or not torch.equal(item, first):
                return False
    return True


def _one_row_per_token(rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`num_tokens` rows, each the first request's output, without copying.

    Served requests are one token each, so `forward` returns one row per request and token. Only
    vLLM's profiling run (`_dummy_run(max_num_tokens)`, called at start-up by vLLM 0.26's CPU
    runner and by the GPU runners) spreads `max_num_batched_tokens` tokens over `max_num_seqs`
    requests and indexes the output per token. Those requests all carry the same dummy item, so
    their outputs are equal and a zero-copy expansion of the first row answers every token,
    without allocating `max_num_batched_tokens` outputs. The network itself still ran on the full
    dummy batch, which is the memory profile that matters. (A batch padded with extra tokens whose
    requests differ keeps its one row per request: vLLM reads only the first rows of it.)
    """
    return rows[:1].expand(num_tokens, *rows.shape[1:])


def _pad_and_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    batch = tensors[0].new_zeros((len(tensors), *shape))
    for row, tensor in zip(batch, tensors):
        row[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return batch


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
        if num_tokens > len(rows) and _identical_requests(inputs):
            return _one_row_per_token(rows, num_tokens)
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
        return _pad_and_stack(results)

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
        logger.info("vllm-terratorch: loaded %d tensors from %s", loaded, folder)
        if self.compiled is not None:
            self._compile()
        return {f"network.{name}" for name, _ in self.network.named_parameters()}
