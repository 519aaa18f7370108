"""Our class serves `Terratorch` whatever order the general plugins run in (fresh processes)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

OURS = "vllm_terratorch.engine.model.TerratorchModel"

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from vllm.model_executor.models.registry import ModelRegistry
import vllm_terratorch
from terratorch.vllm.plugins.general import register_terratorch_fix
steps = {"ours": vllm_terratorch.register, "theirs": register_terratorch_fix}
for step in sys.argv[1].split(","):
    steps[step]()
entry = ModelRegistry.models["Terratorch"]
print("SERVED_BY", f"{entry.module_name}.{entry.class_name}")
"""


def run_python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (a fresh vLLM registry), which must succeed."""
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def served_by(order: str) -> tuple[str, str]:
    result = run_python(SCRIPT, order)
    line = next(line for line in result.stdout.splitlines() if line.startswith("SERVED_BY"))
    return line.split()[1], result.stdout + result.stderr


def test_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("vllm_terratorch") == "vllm_terratorch:register"


@pytest.mark.parametrize("order", ["ours,theirs", "theirs,ours", "theirs,ours,ours,theirs"])
def test_ours_wins_in_any_order_and_logs_once(order):
    served, log = served_by(order)
    assert served == OURS
    assert log.count("architecture Terratorch is served by vllm_terratorch.engine.model:TerratorchModel") == 1


def test_vllm_plugin_loading_picks_ours():
    script = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.models.registry import ModelRegistry\n"
        "e = ModelRegistry.models['Terratorch']\n"
        "print('SERVED_BY', e.module_name + '.' + e.class_name)\n"
    )
    result = run_python(script)
    assert f"SERVED_BY {OURS}" in result.stdout


def test_io_processor_names_resolve_to_ours_although_terratorch_registers_them_too():
    names = [ep.name for ep in entry_points(group="vllm.io_processor_plugins")]
    assert names.count("terratorch_segmentation") == 2  # TerraTorch's and ours: a real clash
    script = (
        "from vllm.plugins import load_general_plugins, IO_PROCESSOR_PLUGINS_GROUP\n"
        "load_general_plugins()\n"
        "from vllm.plugins import io_processors\n"
        "plugins = io_processors.load_plugins_by_group(IO_PROCESSOR_PLUGINS_GROUP)\n"
        "for name in sorted(plugins): print('PLUGIN', name, plugins[name]())\n"
    )
    result = run_python(script)
    resolved = dict(line.split()[1:] for line in result.stdout.splitlines() if line.startswith("PLUGIN"))
    assert resolved["terratorch_segmentation"] == "vllm_terratorch.io.processor.SegmentationProcessor"
    assert resolved["terratorch_regression"] == "vllm_terratorch.io.processor.RegressionProcessor"
    assert resolved["terratorch_classification"] == "vllm_terratorch.io.processor.ClassificationProcessor"
    # TerraTorch's TerraMind processor name too: ours reads one GeoTIFF per modality.
    assert resolved["terratorch_tm_segmentation"] == "vllm_terratorch.io.processor.SegmentationProcessor"
    assert all(qualname.startswith(("vllm_terratorch.", "terratorch.")) for qualname in resolved.values())


@pytest.mark.parametrize(
    ("timeout_s", "per_request_s", "max_num_seqs", "expected"),
    [
        ("300", 0.01, 256, 256),  # 2.6 s a step: nothing to change
        ("300", 4.0, 256, 18),  # the mission's 300M model on a small CPU: 75 s of steps at most
        ("300", 200.0, 256, 1),  # one request alone is near the timeout: one per step, and a warning
        ("2", 0.08, 64, 6),
    ],
)
def test_steps_are_bounded_by_the_execute_timeout(monkeypatch, timeout_s, per_request_s, max_num_seqs, expected):
    from types import SimpleNamespace

    from vllm_terratorch.engine.compat import STEP_TIME_SHARE, limit_step_size

    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", timeout_s)
    scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs)
    limit_step_size(scheduler_config, per_request_s)
    assert scheduler_config.max_num_seqs == expected
    assert expected * per_request_s <= STEP_TIME_SHARE * float(timeout_s) or expected == 1
