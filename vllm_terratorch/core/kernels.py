"""Convolutions that a CPU computes wrongly in low precision run in float32 instead.

Why: on CPUs with AMX (Intel Sapphire Rapids and later), oneDNN's bfloat16 kernels for strided
"patchify" convolutions return values unrelated to the input for some shapes; Prithvi's
patch embedding (Conv3d, kernel = stride = 1x16x16, 6 bands) is one, found with torch 2.11 and 2.13:
relative error ~1.0, where bfloat16 rounding gives ~0.004. A bf16 model then predicts garbage while
looking healthy. Which shapes fail depends on the CPU and oneDNN build, so each convolution of the
served network is probed once, with its own weights, against a float32 computation; one that
fails keeps its low-precision weights but computes in float32 (its input and output keep the
model's dtype). These are embedding layers, a small share of the forward's time.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from vllm_terratorch.core.dtypes import dtype_name

logger = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
# bfloat16 rounding of a convolution is ~0.4% of its largest output; a broken kernel is ~100%.
TOLERANCE = 0.05
# Probe sizes: outputs per spatial dim (small and larger inputs take different kernels).
PROBE_OUTPUTS = (4, 12)


def _float32_forward(module: _ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The convolution computed in float32 (weights cast on the fly: patch embeddings are small)."""
    bias = None if module.bias is None else module.bias.float()
    return module._conv_forward(x.float(), module.weight.float(), bias).to(x.dtype)


def _probe_error(module: _ConvNd, outputs: int, generator: torch.Generator) -> float:
    """Relative error of the module's low-precision forward on a random input with `outputs` per dim."""
    extents = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
    size = [e + s * (outputs - 1) for e, s in zip(extents, module.stride, strict=True)]
    x = torch.randn(1, module.in_channels, *size, generator=generator).to(module.weight.device)
    with torch.no_grad():
        low = module(x.to(module.weight.dtype)).float()
        exact = _float32_forward(module, x)
    return float((low - exact).abs().max()) / (float(exact.abs().max()) or 1.0)


def float32_where_low_precision_fails(network: nn.Module) -> list[str]:
    """Probe every convolution of a CPU network in bf16/fp16; the ones that fail compute in float32.

    Returns the names of the modules switched (empty on GPUs, in float32, and where every kernel is right).
    """
    switched: list[str] = []
    generator = torch.Generator().manual_seed(0)
    for name, module in network.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or module.padding_mode != "zeros":
            continue  # transposed convolutions were found right; other padding modes pad before the kernel
        if module.weight.device.type != "cpu" or module.weight.dtype not in LOW_PRECISION:
            continue
        error = max(_probe_error(module, outputs, generator) for outputs in PROBE_OUTPUTS)
        if error > TOLERANCE:
            module.forward = types.MethodType(_float32_forward, module)  # type: ignore[method-assign]
            switched.append(name)
            logger.warning(
                "vllm-terratorch: %s (%s, kernel %s, stride %s) computes wrongly in %s on this CPU (relative error "
                "%.2f, oneDNN); it runs in float32 instead", name, type(module).__name__, tuple(module.kernel_size),
                tuple(module.stride), dtype_name(module.weight.dtype), error,
            )
    return switched
