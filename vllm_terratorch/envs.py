"""Every environment variable vllm-terratorch reads, in one place, with its default and meaning."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from vllm_terratorch.errors import ConfigError


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def strict_weights() -> bool:
    """VLLM_TERRATORCH_STRICT_WEIGHTS (default 1): a checkpoint must match the built model exactly.

    Set to 0 to load checkpoints that lack or add a few keys (the differences are still logged as
    a warning); shape mismatches are always an error.
    """
    return _flag("VLLM_TERRATORCH_STRICT_WEIGHTS", True)


def io_config_json() -> str:
    """VLLM_TERRATORCH_IO_CONFIG: JSON object configuring our IO processors (see io/settings.py).

    For compatibility, TerraTorch's TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG is read when ours
    is not set (its `output_path` key means the same thing).
    """
    return os.environ.get("VLLM_TERRATORCH_IO_CONFIG") or os.environ.get(
        "TERRATORCH_SEGMENTATION_IO_PROCESSOR_CONFIG", "{}"
    )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode() -> str | None:
    """VLLM_TERRATORCH_COMPILE (default off): serve through a `torch.compile`d forward.

    `1`/`on` means torch.compile's `default` mode; a mode name (`reduce-overhead` and
    `max-autotune` add CUDA graphs on a GPU) picks that mode; `0`/`off`/unset serves eagerly. The
    network is compiled at start-up for each batch-size bucket up to `max_num_seqs`, which makes
    start-up slower (see compiled.py for what it buys and when).
    """
    value = (os.environ.get("VLLM_TERRATORCH_COMPILE") or "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return None
    if value in ("1", "true", "yes", "on"):
        return "default"
    if value in COMPILE_MODES:
        return value
    raise ConfigError(
        f"VLLM_TERRATORCH_COMPILE={value!r} is not a compile setting; use 0/off, 1/on, or one of {', '.join(COMPILE_MODES)}"
    )


FLOAT32_PRECISIONS = ("highest", "high", "medium")


def submissions_per_turn(default: int) -> int:
    """VLLM_TERRATORCH_SUBMISSIONS_PER_TURN (default `default`, engine/pacing.py's): how many of a
    request's tiles enter the engine per event-loop turn of the API server; 0 turns the pacing off
    (vLLM's own behaviour: all of a request's tiles in one turn, the loop deaf meanwhile)."""
    value = (os.environ.get("VLLM_TERRATORCH_SUBMISSIONS_PER_TURN") or "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ConfigError(f"VLLM_TERRATORCH_SUBMISSIONS_PER_TURN={value!r} is not a whole number >= 0 (0: no pacing)")
    return int(value)


def float32_matmul_precision() -> str:
    """VLLM_FLOAT32_MATMUL_PRECISION (vLLM's own variable, default `highest`): PyTorch's float32
    matmul precision for the served model. vLLM's workers set it at start; we set it again after
    TerraTorch's import has changed it (see factory.py)."""
    value = (os.environ.get("VLLM_FLOAT32_MATMUL_PRECISION") or "highest").strip().lower()
    if value not in FLOAT32_PRECISIONS:
        raise ConfigError(
            f"VLLM_FLOAT32_MATMUL_PRECISION={value!r} is not a precision; use one of {', '.join(FLOAT32_PRECISIONS)}"
        )
    return value


# vLLM's CPU builds reserve 4 GiB of KV cache by default; an attention-free model needs none.
ENGINE_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def engine_environment(environment: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Our defaults for an engine's environment (the caller's own values win); returns `environment`."""
    for name, value in ENGINE_ENVIRONMENT.items():
        environment.setdefault(name, value)
    return environment


RESERVED_CPUS = "VLLM_CPU_NUM_OF_RESERVED_CPU"  # vLLM's: cores its CPU executor keeps for the scheduler


def reserve_no_cpu_for_the_scheduler() -> bool:
    """VLLM_CPU_NUM_OF_RESERVED_CPU (vLLM's own variable): set to 0 for a Terratorch model on CPU
    (engine/compat.py says why) unless the user set it; True if we set it."""
    if RESERVED_CPUS in os.environ:
        return False
    os.environ[RESERVED_CPUS] = "0"
    return True


CPU_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's: the cores its CPU worker's OpenMP threads are bound to


def cpu_threads_bound_by_user() -> bool:
    """VLLM_CPU_OMP_THREADS_BIND (vLLM's own variable) set by the user: then vLLM's worker process and
    its binding are kept for a Terratorch model on CPU (engine/compat.worker_in_engine_process)."""
    return bool((os.environ.get(CPU_THREADS_BIND) or "").strip())


GDAL_CACHE = "GDAL_CACHEMAX"
# `predict`'s GDAL block cache per process (MB) unless the user set GDAL_CACHEMAX: GDAL's own default
# is 5 % of RAM per process, which windowed reads of a large scene fill in every worker.
PREDICT_GDAL_CACHE_MB = "64"


def predict_gdal_cache() -> None:
    """GDAL_CACHEMAX for `predict` and its workers (set before any block is read; workers inherit it)."""
    os.environ.setdefault(GDAL_CACHE, PREDICT_GDAL_CACHE_MB)
