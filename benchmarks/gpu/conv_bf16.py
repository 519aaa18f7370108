"""Which kernel runs a bf16 convolution, and why (#19 item 3f).

The H200 profile of Prithvi-300M + UperNet (benchmarks/README.md) showed every bf16 convolution
leaving cuDNN for PyTorch's slow fallbacks (`_slow_conv2d_forward` + `im2col`,
`slow_conv_transpose2d`, `slow_conv_dilated3d`), while fp32 ran on cuDNN. This times and profiles
the network's four convolution kinds alone, in fp32 and bf16, contiguous and channels_last, before
and after `import terratorch` (which may change backend flags), and records the flags that decide
the choice (cuDNN enabled/version/benchmark/deterministic, TF32, the input and weight dtype and
layout). Writes `<output>/conv-bf16.json`.

    python benchmarks/gpu/conv_bf16.py --output OUT            # GPU; on CPU it runs the same, for a dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The convolution kinds of Prithvi-EO-2.0 + UperNet at 512² (batch 8): Conv3d patch embedding,
# UperNet 1x1 and 3x3, the scale modules' 2x2 transposed convolution.
CASES: dict[str, tuple[type[nn.Module], dict[str, Any], tuple[int, ...]]] = {
    "conv3d_patch_embed": (nn.Conv3d, {"in_channels": 6, "out_channels": 1024, "kernel_size": (1, 16, 16), "stride": (1, 16, 16)},
                           (8, 6, 1, 512, 512)),
    "conv2d_1x1": (nn.Conv2d, {"in_channels": 1024, "out_channels": 256, "kernel_size": 1}, (8, 1024, 32, 32)),
    "conv2d_3x3": (nn.Conv2d, {"in_channels": 256, "out_channels": 256, "kernel_size": 3, "padding": 1}, (8, 256, 128, 128)),
    "conv_transpose2d_2x2": (nn.ConvTranspose2d, {"in_channels": 1024, "out_channels": 512, "kernel_size": 2, "stride": 2},
                             (8, 1024, 32, 32)),
}


def backend_flags() -> dict[str, Any]:
    cudnn = torch.backends.cudnn
    return {
        "cudnn_available": cudnn.is_available(),
        "cudnn_enabled": cudnn.enabled,
        "cudnn_version": cudnn.version() if cudnn.is_available() else None,
        "cudnn_benchmark": cudnn.benchmark,
        "cudnn_deterministic": cudnn.deterministic,
        "cudnn_allow_tf32": cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
    }


def run_case(name: str, dtype: torch.dtype, channels_last: bool, device: str, scale: float, batch: int, repeats: int) -> dict[str, Any]:
    layer_type, kwargs, shape = CASES[name]
    shape = (batch, *shape[1:-2], *(max(16, round(d * scale)) for d in shape[-2:]))  # the batch and spatial sizes scaled
    layer = layer_type(**kwargs).to(device=device, dtype=dtype).eval()
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        layer, x = layer.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        for _ in range(min(2, repeats)):
            layer(x)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            layer(x)
        sync()
        seconds = (time.perf_counter() - started) / repeats
        with torch.profiler.profile(activities=activities) as profile:
            layer(x)
            sync()
    ops = sorted({e.key for e in profile.key_averages() if e.key.startswith("aten::")})
    kernels = sorted({e.key for e in profile.key_averages() if device == "cuda" and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA})
    slow = [op for op in ops if "slow" in op or "im2col" in op or "vol2col" in op]
    return {
        "case": name, "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last, "input_shape": list(shape),
        "weight_dtype": str(layer.weight.dtype).removeprefix("torch."), "input_contiguous": x.is_contiguous(),
        "ms": seconds * 1e3, "aten_ops": ops, "slow_fallback_ops": slow, "kernels": kernels[:12],
        "uses_cudnn": any("cudnn" in op for op in ops) or any("cudnn" in k.lower() or "sm90" in k for k in kernels),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=None, help="spatial size factor (default 1 on a GPU, 1/8 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on a GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 5 on a GPU, 1 on CPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On a CPU this is a dry run of the script, sized so that it stays one: a CPU without native
    # bf16 takes PyTorch's slow fallbacks (CI's: slow_conv3d, 128 ms a call where this VM's oneDNN
    # takes 1.5 ms), and at batch 8 x 8 calls the 32 cases ran past the step's 240 s there.
    gpu = device == "cuda"
    scale = args.scale or (1.0 if gpu else 0.125)
    batch = args.batch or (8 if gpu else 1)
    repeats = args.repeats or (5 if gpu else 1)
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "scale": scale, "batch": batch, "repeats": repeats,
                               "flags_before_terratorch": backend_flags()}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    rows = []
    for phase in ("before_terratorch", "after_terratorch"):
        if phase == "after_terratorch":
            import terratorch  # noqa: F401 - the question is whether importing it changes the choice

            results["flags_after_terratorch"] = backend_flags()
        for name in CASES:
            for dtype in (torch.float32, torch.bfloat16):
                for channels_last in (False, True):
                    try:
                        rows.append({"phase": phase, **run_case(name, dtype, channels_last, device, scale, batch, repeats)})
                    except Exception as error:  # noqa: BLE001 - one case that cannot run is reported
                        rows.append({"phase": phase, "case": name, "dtype": str(dtype), "channels_last": channels_last,
                                     "error": f"{type(error).__name__}: {error}"[:500]})
    results["cases"] = rows
    results["changed_by_terratorch_import"] = {
        key: [results["flags_before_terratorch"][key], value]
        for key, value in results["flags_after_terratorch"].items() if results["flags_before_terratorch"][key] != value
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "conv-bf16.json").write_text(json.dumps(results, indent=2, default=str))
    for row in rows:
        print(f"{row['phase']:>18} {row['case']:>22} {row['dtype']:>9} cl={row['channels_last']!s:5} "
              + (f"{row['ms']:8.3f} ms slow={row['slow_fallback_ops']} cudnn={row['uses_cudnn']}" if "ms" in row else row["error"]))
    print("flags changed by import terratorch:", results["changed_by_terratorch_import"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
