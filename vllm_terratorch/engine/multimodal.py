"""How vLLM's multimodal machinery carries a TerraTorch request: one "image" item per request, whose
fields are the model's named input tensors, validated and cast when the request is parsed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.inputs import MultiModalDataDict, MultiModalInput, mm_input
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

from vllm_terratorch.core.config import InputSpec, PretrainedCfg, pretrained_cfg_of
from vllm_terratorch.core.dummy import dummy_inputs
from vllm_terratorch.core.inputs import MODALITY, PROMPT_TOKEN_IDS, validate_request_inputs
from vllm_terratorch.engine.compat import mm_hashes



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
            prompt_token_ids=list(PROMPT_TOKEN_IDS),
            mm_kwargs=mm_kwargs,
            mm_hashes=hashes,
            mm_placeholders={MODALITY: [PlaceholderRange(offset=0, length=0)]},
        )
