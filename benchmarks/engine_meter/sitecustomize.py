"""`online.py`'s engine meter: how busy the model forward keeps the engine, measured where it runs.

vLLM runs the model in its engine-core (or worker) process, out of the benchmark's reach, and vLLM
0.32 reports no busy time of its own (its `/metrics` gauges are sampled per step, not timed). So a
server started with this folder on PYTHONPATH and `VLLM_TERRATORCH_BENCH_METER_DIR` set wraps
`TerratorchModel._forward_requests` (the network calls of one step, one output row per tile) when
vllm_terratorch/engine/model.py is imported, and each process that runs forwards writes
`<dir>/<pid>.json`: busy seconds, forwards, tiles, the largest forward. Written by a background
thread at most every 0.2 s (when it changed) and at exit, so a forward pays two clock reads and a
tuple; vLLM's processes are killed at shutdown, hence the periodic write. Without the variable
nothing is imported or wrapped: the product runs unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

_DIR = os.environ.get("VLLM_TERRATORCH_BENCH_METER_DIR")
_MODULE = "vllm_terratorch.engine.model"
_INTERVAL_S = 0.2
# (busy seconds, forwards, tiles, most tiles in one forward): replaced whole, so the writer thread
# always reads one consistent state without a lock.
_state: tuple[float, int, int, int] = (0.0, 0, 0, 0)
_error: str | None = None


def _write() -> None:
    import json

    busy, forwards, tiles, most = _state
    record = {"pid": os.getpid(), "busy_s": busy, "forwards": forwards, "tiles": tiles, "max_tiles": most, "error": _error}
    path = os.path.join(_DIR, f"{os.getpid()}.json")
    try:
        with open(path + ".tmp", "w") as handle:
            json.dump(record, handle)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def _writer() -> None:
    import time

    written = None
    while True:
        time.sleep(_INTERVAL_S)
        if (_state, _error) != written:
            written = (_state, _error)
            _write()


def _instrument(model_class: type) -> None:
    """Time every `_forward_requests` call; start the writer on the first one."""
    import atexit
    import threading
    import time

    global _error
    original = getattr(model_class, "_forward_requests", None)
    if original is None:  # renamed in the product: say so rather than report an idle engine
        _error = f"{model_class.__name__}._forward_requests not found: the engine meter measures nothing"
        _write()
        return
    started_writer: list[threading.Thread] = []

    def timed(self: Any, inputs: dict[str, Any], device: Any) -> Any:
        global _state
        if not started_writer:
            started_writer.append(threading.Thread(target=_writer, name="engine-meter", daemon=True))
            started_writer[0].start()
            atexit.register(_write)
        began = time.perf_counter()
        result = original(self, inputs, device)
        if getattr(result, "is_cuda", False):  # asynchronous on a GPU: count the kernels' time
            import torch

            torch.cuda.synchronize(result.device)
        elapsed = time.perf_counter() - began
        busy, forwards, tiles, most = _state
        _state = (busy + elapsed, forwards + 1, tiles + len(result), max(most, len(result)))
        return result

    model_class._forward_requests = timed  # type: ignore[attr-defined]


class _AfterImport:
    """A meta-path finder that lets the normal finder load `_MODULE`, then instruments it."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != _MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            _instrument(module.TerratorchModel)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _DIR:
    sys.meta_path.insert(0, _AfterImport())
