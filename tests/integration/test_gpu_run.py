"""The GPU machine's script (benchmarks/gpu/run.sh, #19) dry-run on CPU with tiny sizes, so the few
minutes of a lent GPU are never lost to a typo: every step runs and exits 0, what comes back fits in
a device call (at most 8 files), and the engine step's outputs (eager, and without --enforce-eager)
equal the plain forward. Run with the vLLM release the kit carries to the GPU. No timing asserts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# The vLLM release benchmarks/gpu/kit.sh carries to the GPU (as its lock records it).
KIT_VLLM = next(r for r in json.loads((ROOT / "benchmarks/gpu/kit.lock.json").read_text())["requested"]
                if r.startswith("vllm==")).removeprefix("vllm==")


@pytest.mark.skipif(vllm.__version__ != KIT_VLLM, reason=f"the GPU kit carries vLLM {KIT_VLLM}")
def test_gpu_run_script_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "PYTHON": sys.executable, "RUN_BUDGET_S": "1500"}  # no step skipped on a slow CI machine
    result = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=1600, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    summary = json.loads((out / "summary.json").read_text())
    steps = {step["step"]: step for step in summary["steps"]}
    assert list(steps) == ["engine", "conv", "bf16-b8", "online", "fp32-b8", "bf16-b32"]
    assert {name: step["rc"] for name, step in steps.items() if step["rc"] != 0} == {}, [s.get("log_tail") for s in steps.values()]
    assert set(summary["results"]) | {"summary.json", "logs.tar.xz"} == set(files)
    assert summary["packages"]["terratorch"] and summary["packages"]["torch"]

    engine = json.loads((out / "offline-tiny-64-float32-b4.json").read_text())
    assert set(engine["paths"]) == {"raw", "ours", "graphs"}
    for path in ("ours", "graphs"):
        assert engine["paths"][path]["max_abs_diff_vs_raw"] <= 1e-4
    # Without --enforce-eager our backend says it runs eagerly (engine/compat.eager_forward).
    assert any("eagerly (as --enforce-eager)" in line for line in steps["engine"]["log_lines"])
    conv = json.loads((out / "conv-bf16.json").read_text())
    assert {row["case"] for row in conv["cases"] if "ms" in row} == {"conv3d_patch_embed", "conv2d_1x1", "conv2d_3x3", "conv_transpose2d_2x2"}
    online = json.loads((out / "online-64px.json").read_text())
    assert [level["errors"] for level in online["levels"]] == [0, 0]
