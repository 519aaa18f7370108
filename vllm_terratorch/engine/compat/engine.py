"""Shims where vLLM configures and runs the engine for our architecture: the CPU defaults
(float32, every core), the eager forward, the step budget, encoder profiling, multimodal hashes
and GPU syncs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vllm_terratorch import envs
from vllm_terratorch.core.config import ARCHITECTURE
from vllm_terratorch.engine.compat.patching import GUARD_MARK, wrap_once
from vllm_terratorch.log import logger


def _is_ours(hf_config: Any) -> bool:
    """Whether a model's (Hugging Face) config names our architecture: the test every shim here
    applies before it changes anything, so other models pass through unchanged."""
    return ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])


def terratorch_cpu_defaults() -> None:
    """Two defaults for a Terratorch model on CPU, applied where vLLM resolves the model's config.

    **float32, not vLLM's float16.** vLLM resolves `dtype="auto"` for a float32 (or undeclared)
    pooling model to float16 on every platform that lists it. On CPU, TerraTorch networks run
    several times slower in float16, and one step of the mission's 300M model at 512x512 then
    outlasts vLLM's execute-model timeout, which kills the engine. So "auto" with no `torch_dtype` in
    config.json (or a float32 one) becomes float32; an explicit `--dtype` and a float16/bfloat16
    config pass through unchanged.

    **Every core for the forward.** vLLM's CPU executor reserves a core per worker for its
    scheduler process (`VLLM_CPU_NUM_OF_RESERVED_CPU`, default 1 on x86/Arm) and binds the worker's
    OpenMP threads to the rest: half of a 2-core machine, measured at 0.52x a plain PyTorch forward
    at the machine's threads. A pooling model's scheduler does little per step (one step per batch
    of tiles, no KV cache; measured: 12 % of one core while the worker is busy, none when idle), so
    we set the variable to 0 for this process and the engine processes it starts (measured: 0.96x),
    unless the user set it (their value always wins); vLLM's own thread binding is left as it is
    (`VLLM_CPU_OMP_THREADS_BIND`).

    Both only on CPU, only for the `Terratorch` architecture; every other model and platform passes
    through unchanged. (vLLM 0.26 and 0.32: module-level `vllm.config.model._get_and_verify_dtype(
    model_id, config, dtype, **kwargs)`, looked up at call time by `ModelConfig.__post_init__`, which
    runs after general plugins are loaded and before the engine processes start; their executor
    reads the variable when it binds threads.)
    """
    import torch
    from vllm.config import model as model_config

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        def resolved(model_id: str, config: Any, dtype: Any, *args: Any, **kwargs: Any) -> Any:
            from vllm.platforms import current_platform

            if _is_ours(config) and current_platform.is_cpu():
                declared = config.__dict__.get("dtype", config.__dict__.get("torch_dtype"))
                if isinstance(dtype, str) and dtype.lower() == "auto" and declared in (None, "float32", torch.float32):
                    logger.info(
                        "vllm-terratorch: serving %s in float32 on CPU (vLLM's default would be float16, several "
                        "times slower here); pass --dtype float16 or bfloat16 to override",
                        model_id,
                    )
                    dtype = "float32"
                if envs.reserve_no_cpu_for_the_scheduler():
                    logger.info(
                        "vllm-terratorch: the forward of %s gets every CPU core (%s=0: no core reserved for vLLM's "
                        "scheduler, which a pooling model keeps mostly idle); set %s to override",
                        model_id, envs.RESERVED_CPUS, envs.RESERVED_CPUS,
                    )
            return current(model_id, config, dtype, *args, **kwargs)

        return resolved

    wrap_once(model_config, "_get_and_verify_dtype", wrap)


def worker_in_engine_process() -> None:
    """On CPU, a Terratorch model's worker runs inside vLLM's engine-core process, not a third one.

    vLLM's CPU platform turns a single worker's `uni` executor into `mp` whenever the engine core
    has its own process (always for `vllm serve`, by default for `LLM`), so that its worker process
    can start with vLLM's OpenMP binding in its environment. For our model that costs more than it
    gives: one more process to start, every step's inputs and outputs copied through a
    shared-memory queue, and the binding itself pins every thread the worker starts (the engine's
    own included) to the cores of the OpenMP threads. Measured on the 2-core VM, tiny model
    (benchmarks/README.md): `vllm serve` ready 5-12 s sooner; 512x512 scenes at concurrency 16
    1.27-1.29x the requests/s (121 tiles per step), 128x128 ones 0.89-0.93x (the engine core's own
    threads then share the process with the forward); `LLM.encode` 0.94x a plain forward where the
    separate worker reached 0.86x. Unbound, because binding this process's threads
    (`GOMP_CPU_AFFINITY`) used 1.6-1.7 cores of 2 instead of 1.9. The forward then runs at
    PyTorch's default thread count in a process that has vLLM's `LD_PRELOAD`, as a plain PyTorch
    loop would.

    So after the platform's check, `mp` goes back to `uni` for our architecture when the check
    forced it, logged. Kept as vLLM has it: an explicit `--distributed-executor-backend mp`, a
    thread binding the user asked for (`VLLM_CPU_OMP_THREADS_BIND`), more than one worker or
    data-parallel engine. Installed only on CPU. (vLLM 0.26 and 0.32: `CpuPlatform.
    check_and_update_config(vllm_config)`, called on the `current_platform` instance by
    `VllmConfig.__post_init__`, in the process that builds the config, before any engine process
    starts.)
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        def checked(vllm_config: Any) -> None:
            parallel = vllm_config.parallel_config
            requested = parallel.distributed_executor_backend
            current(vllm_config)
            model_config = vllm_config.model_config
            ours = model_config is not None and _is_ours(model_config.hf_config)
            single = parallel.world_size == 1 and parallel.data_parallel_size == 1
            forced = requested == "uni" and parallel.distributed_executor_backend == "mp"
            if ours and single and forced and not envs.cpu_threads_bound_by_user():
                parallel.distributed_executor_backend = "uni"
                logger.info(
                    "vllm-terratorch: the CPU worker of %s runs inside vLLM's engine-core process, its threads "
                    "unbound (no worker process, no shared-memory copy per step); pass --distributed-executor-backend "
                    "mp or set %s for vLLM's own layout", model_config.model, envs.CPU_THREADS_BIND,
                )

        return checked

    wrap_once(current_platform, "check_and_update_config", wrap)


def eager_forward() -> None:
    """A Terratorch model runs its forward eagerly in vLLM: vLLM's own CUDA graphs would replay
    the dummy inputs' outputs for every request.

    Our model takes its inputs as raw multimodal tensors handed straight to `forward`
    (`supports_multimodal_raw_input_only`). Without `--enforce-eager`, vLLM's GPU runner wraps the
    model in its `CUDAGraphWrapper` and captures `forward` with the dummy batch's tensors; that
    wrapper "does not store persistent buffers or copy any runtime inputs" (its docstring): only the
    runner's own buffers (token ids, positions) are refilled before a replay, never the raw inputs,
    so every request would get the output of the dummy inputs, or of freed memory. TerraTorch
    networks also synchronise with the GPU inside `forward` (e.g. `.item()` in interpolation), which
    a capture refuses. So `enforce_eager` is set for `Terratorch`, logged; CUDA graphs that take each
    batch's inputs are our compiled forward's (`VLLM_TERRATORCH_COMPILE=reduce-overhead`). On CPU it
    skips vLLM's Dynamo tracing, which finds nothing of ours to compile. (vLLM 0.26 and 0.32:
    `MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)` runs early in
    `VllmConfig.__post_init__`, before `enforce_eager` turns compilation and graphs off; an entry
    vLLM may add for the architecture still runs first.)
    """
    try:
        from vllm.model_executor.models import config as model_configs
    except ImportError:
        return
    config_map = getattr(model_configs, "MODELS_CONFIG_MAP", None)
    if config_map is None or getattr(config_map.get(ARCHITECTURE), GUARD_MARK, False):
        return
    earlier = config_map.get(ARCHITECTURE)

    class TerratorchEagerConfig(getattr(model_configs, "VerifyAndUpdateConfig", object)):  # type: ignore[misc]
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            if earlier is not None:
                earlier.verify_and_update_config(vllm_config)
            model_config = vllm_config.model_config
            if not model_config.enforce_eager:
                logger.info(
                    "vllm-terratorch: running %s eagerly (as --enforce-eager): vLLM's CUDA graphs would replay "
                    "their dummy inputs for a model that takes raw input tensors; for CUDA graphs that take each "
                    "batch's inputs, set VLLM_TERRATORCH_COMPILE=reduce-overhead",
                    model_config.model,
                )
                model_config.enforce_eager = True

    setattr(TerratorchEagerConfig, GUARD_MARK, True)
    config_map[ARCHITECTURE] = TerratorchEagerConfig


# A step may use this share of vLLM's execute-model timeout; the rest is margin, because later steps
# can be slower than the measured one (a busier machine: on CPU the API server's decoding and
# encoding share the cores with the worker; larger inputs).
STEP_TIME_SHARE = 0.25


# Dummy requests our model times at start-up, for the step bound.
MEASURED_BATCH = 4


def _seconds_per_request(worker: Any, batch: int) -> float | None:
    """Run in each worker (`collective_rpc`): our model's slowest forward per request, if it is ours."""
    model = worker.model_runner.get_model()
    measure = getattr(model, "measure_seconds_per_request", None)
    return measure(batch) if measure is not None else None


def steps_within_the_execute_timeout() -> None:
    """Schedule at most as many requests per step as finish well inside vLLM's execute-model timeout.

    With a separate worker process (`mp`), vLLM waits `VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS` (300 s)
    for one step, then declares the engine dead and the server stops for every client (our CPU
    default runs the worker in the engine core, which has no such timeout; the bound then still
    keeps each step, and so every request's wait behind it, short). A pooling step runs every
    scheduled request (for us: every tile) in one forward, up to `--max-num-seqs` of them, so a heavy model on a CPU
    outlasts the timeout under load or with one large scene. The engine core builds its scheduler
    right after `EngineCore._initialize_kv_caches` (vLLM 0.26 and 0.32); we wrap that step, ask the
    workers to time our forward on `MEASURED_BATCH` dummy requests, and lower
    `scheduler_config.max_num_seqs`, which the scheduler reads, so that a full step takes at most
    `STEP_TIME_SHARE` of the timeout. Requests are then spread over more steps; none fails. Applied in the engine-core process, where vLLM has
    imported `vllm.v1.engine.core` before it loads plugins; other processes import nothing for it.
    """
    core = sys.modules.get("vllm.v1.engine.core")
    EngineCore = getattr(core, "EngineCore", None)  # noqa: N806 - a class
    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        def initialize_kv_caches(self: Any, vllm_config: Any) -> Any:
            result = current(self, vllm_config)
            if _is_ours(vllm_config.model_config.hf_config):
                try:
                    batch = min(MEASURED_BATCH, vllm_config.scheduler_config.max_num_seqs)
                    measured = [s for s in self.model_executor.collective_rpc(_seconds_per_request, args=(batch,)) if s]
                except Exception as error:  # noqa: BLE001 - a missing measurement must not stop the engine
                    logger.warning("vllm-terratorch: could not read the profiled step time (%s); steps are not bounded", error)
                    return result
                logger.debug("vllm-terratorch: profiled forward per request: %s s", measured)
                if measured:
                    limit_step_size(vllm_config.scheduler_config, max(measured))
            return result

        return initialize_kv_caches

    wrap_once(EngineCore, "_initialize_kv_caches", wrap)


def limit_step_size(scheduler_config: Any, seconds_per_request: float) -> None:
    """Lower `max_num_seqs` so that a full step stays within `STEP_TIME_SHARE` of the timeout."""
    import vllm.envs as vllm_envs

    timeout_s = float(vllm_envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS)
    fitting = max(1, int(STEP_TIME_SHARE * timeout_s / max(seconds_per_request, 1e-9)))
    scheduled = scheduler_config.max_num_seqs
    if fitting >= scheduled:
        logger.info(
            "vllm-terratorch: a step of %d requests (--max-num-seqs) takes about %.1f s (%.3f s each, measured at "
            "start-up), within vLLM's execute-model timeout (%g s)", scheduled, scheduled * seconds_per_request,
            seconds_per_request, timeout_s,
        )
        return
    if seconds_per_request > STEP_TIME_SHARE * timeout_s:
        logger.warning(
            "vllm-terratorch: one request takes %.1f s in this model's forward here, more than %.0f%% of vLLM's "
            "execute-model timeout (%g s, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS); raise that timeout or use a "
            "faster device", seconds_per_request, 100 * STEP_TIME_SHARE, timeout_s,
        )
    logger.warning(
        "vllm-terratorch: a step of %d requests (--max-num-seqs) would take about %.0f s, beyond %.0f%% of "
        "vLLM's execute-model timeout (%g s, VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS), after which the engine "
        "stops; scheduling at most %d requests per step instead (%.2f s each, measured at start-up)",
        scheduled, scheduled * seconds_per_request, 100 * STEP_TIME_SHARE, timeout_s, fitting, seconds_per_request,
    )
    scheduler_config.max_num_seqs = fitting


def time_weight_loading() -> None:
    """Start vLLM's "Loading weights took X seconds" clock when its loader hands weights to our model.

    vLLM's `DefaultModelLoader` (0.26 and 0.32) records the start when its weights iterator is first
    read. Our model reads its folder itself (every format, strict check) and never reads that
    iterator (`TerratorchModel.load_weights`), so the start stayed 0.0 and the log reported the
    time since an arbitrary clock origin (seen: "Loading weights took 5858.99 seconds" for a
    model that loaded in milliseconds). Models that read the iterator (`reads_its_own_weights`
    false) keep vLLM's clock. Installed when our model is built: vLLM has imported the loader then.
    """
    import time

    module = sys.modules.get("vllm.model_executor.model_loader.default_loader")
    loader = getattr(module, "DefaultModelLoader", None)

    def wrap(current: Callable[..., Any]) -> Callable[..., Any]:
        def load_weights(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(model, "reads_its_own_weights", False) and getattr(self, "counter_before_loading_weights", None) == 0.0:
                self.counter_before_loading_weights = time.perf_counter()
            return current(self, model, *args, **kwargs)

        return load_weights

    wrap_once(loader, "load_weights", wrap)


def skip_encoder_profiling(vllm_config: Any) -> None:
    """Turn off vLLM's multimodal-encoder profiling for our model; the forward profile stays.

    The encoder profile builds `mm_max_items_per_batch` dummy items, computed from the tokens each
    item takes, which is 0 for our inputs (one placeholder of length 0): the runner then fails
    with `StopIteration` in `_get_mm_dummy_batch` ("profiled with 0 image items"). vLLM 0.26's
    CPU runner always profiles, as do the GPU runners of 0.26 and 0.32; vLLM 0.32's CPU runner
    skips it in eager mode, which is why the in-tree model starts there and not on 0.26. We have
    no encoder tower to profile (inputs go straight to `forward`), and the dummy forward that
    follows still runs the network on `max_num_seqs` dummy requests, which is the memory profile
    that matters. The runner reads the flag from the config object the model is built with, after
    the model is built.
    """
    mm_config = getattr(vllm_config.model_config, "multimodal_config", None)
    if mm_config is not None and hasattr(mm_config, "skip_mm_profiling"):
        mm_config.skip_mm_profiling = True


def mm_hashes(inputs: Any, model_id: str, mm_config: Any) -> Any:
    """Hashes of a request's multimodal items, for vLLM's processor cache.

    vLLM 0.32 hashes with a configurable algorithm (`MultiModalConfig.mm_hasher_algorithm`,
    passed to `ProcessorInputs.get_mm_hashes(model_id, algorithm)`); vLLM 0.26 has one
    algorithm and `get_mm_hashes(model_id)`.
    """
    algorithm = getattr(mm_config, "mm_hasher_algorithm", None)
    if algorithm is None:  # vLLM 0.26
        return inputs.get_mm_hashes(model_id)
    return inputs.get_mm_hashes(model_id, algorithm)


@contextmanager


def gpu_sync_allowed() -> Iterator[None]:
    """TerraTorch networks synchronise with the GPU internally (e.g. `.item()` in interpolation).

    vLLM >= 0.30 can flag such syncs in debug mode; this context marks them as expected. Older
    releases have no such check, so the context is a no-op there.
    """
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed as allowed
    except ImportError:  # vLLM < 0.30
        yield
        return
    with allowed():
        yield
