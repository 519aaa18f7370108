"""Convolutions a CPU gets wrong in bfloat16 are found by probing and computed in float32."""

from __future__ import annotations

import torch
from torch import nn

from vllm_terratorch.core.kernels import TOLERANCE, float32_where_low_precision_fails


def relative_error(network: nn.Module, x: torch.Tensor, exact: torch.Tensor) -> float:
    with torch.no_grad():
        return float((network(x.to(torch.bfloat16)).float() - exact).abs().max() / exact.abs().max())


def test_prithvis_patch_embedding_is_right_in_bfloat16_after_the_probe():
    """Prithvi's Conv3d patch embedding (6 bands, 1x16x16): oneDNN's AMX bf16 kernel is ~100% off."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(6, 64, (1, 16, 16), stride=(1, 16, 16)))
    x = torch.randn(2, 6, 1, 128, 128)
    with torch.no_grad():
        exact = network(x)
    network.to(torch.bfloat16)
    float32_where_low_precision_fails(network)
    assert relative_error(network, x, exact) <= TOLERANCE  # on every CPU, switched or not
    assert network[0].weight.dtype == torch.bfloat16  # the weights stay as served


class WrongInLowPrecision(nn.Conv2d):
    """A kernel that is wrong in bfloat16 only (what AMX CPUs do for some shapes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.flip(-1) if x.dtype == torch.bfloat16 else out


def test_a_wrong_kernel_is_switched_to_float32_and_a_right_one_is_kept():
    torch.manual_seed(0)
    network = nn.Sequential(WrongInLowPrecision(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        exact = network(x)
    network.to(torch.bfloat16)
    assert relative_error(network, x, exact) > 0.5
    assert float32_where_low_precision_fails(network) == ["0"]
    assert relative_error(network, x, exact) <= TOLERANCE
    with torch.no_grad():
        assert network(x.to(torch.bfloat16)).dtype == torch.bfloat16  # the model's dtype flows on


def test_float32_networks_are_left_alone():
    network = nn.Sequential(WrongInLowPrecision(4, 8, 3))
    assert float32_where_low_precision_fails(network) == []  # float32: nothing to do


def test_dilated_convolutions_are_probed_with_inputs_large_enough():
    """A dilated kernel spans d * (k - 1) + 1 pixels: the probe input must hold it (no padding here)."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(8, 8, 3, dilation=4))
    network.to(torch.bfloat16)
    assert float32_where_low_precision_fails(network) == []
