"""Request validation and dummy inputs against an input spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_terratorch.core.config import InputSpec
from vllm_terratorch.core.dummy import dummy_inputs
from vllm_terratorch.errors import InputError
from vllm_terratorch.core.inputs import validate_request_inputs

SPEC = InputSpec.model_validate(
    {
        "target": "pixel_values",
        "data": {
            "pixel_values": {"type": "torch.Tensor", "shape": [6, 32, 32]},
            "location_coords": {"type": "torch.Tensor", "shape": [1, 2]},
        },
    }
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dummy_inputs_follow_spec_and_dtype(dtype):
    inputs = dummy_inputs(SPEC, dtype)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {"pixel_values": (6, 32, 32), "location_coords": (1, 2)}
    assert {v.dtype for v in inputs.values()} == {dtype}
    assert torch.equal(inputs["pixel_values"], dummy_inputs(SPEC, dtype)["pixel_values"])  # deterministic
    assert inputs["pixel_values"].std() > 0.5  # not constant


def test_dummy_inputs_device():
    assert {v.device.type for v in dummy_inputs(SPEC, torch.float32, "meta").values()} == {"meta"}


def test_valid_request_is_cast_to_model_dtype():
    tensors = validate_request_inputs(
        {"pixel_values": np.zeros((6, 32, 32), dtype=np.float64), "location_coords": [[12, 45]]}, SPEC, torch.bfloat16
    )
    assert tensors["pixel_values"].dtype == torch.bfloat16
    assert tensors["location_coords"].tolist() == [[12.0, 45.0]]


def test_leading_batch_dim_and_other_spatial_size_are_accepted():
    tensors = validate_request_inputs(
        {"pixel_values": torch.zeros(1, 6, 48, 40), "location_coords": torch.zeros(1, 2)}, SPEC, torch.float32
    )
    assert tuple(tensors["pixel_values"].shape) == (6, 48, 40)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pixel_values": torch.zeros(6, 32, 32)}, "missing ['location_coords']"),
        ({"pixel_values": torch.zeros(6, 32, 32), "location_coords": torch.zeros(1, 2), "dem": torch.zeros(1)}, "unknown ['dem']"),
        ({"pixel_values": torch.zeros(4, 32, 32), "location_coords": torch.zeros(1, 2)}, "pixel_values.shape) is [6, 32, 32]"),
        ({"pixel_values": torch.zeros(6, 32), "location_coords": torch.zeros(1, 2)}, "has shape [6, 32]"),
        ({"pixel_values": torch.zeros(6, 0, 32), "location_coords": torch.zeros(1, 2)}, "has shape [6, 0, 32]"),
        ({"pixel_values": torch.zeros(6, 32, 32), "location_coords": torch.zeros(2)}, "location_coords"),
        ({"pixel_values": "abc", "location_coords": torch.zeros(1, 2)}, "expected a torch.Tensor"),
        ({"pixel_values": torch.zeros(6, 32, 32, dtype=torch.complex64), "location_coords": torch.zeros(1, 2)}, "real numbers"),
        ([torch.zeros(6, 32, 32)], "expected a dict"),
    ],
)
def test_bad_requests_name_the_problem(data, message):
    with pytest.raises(InputError) as error:
        validate_request_inputs(data, SPEC, torch.float32)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)
