"""`vllm-terratorch export` end to end: YAML + Lightning checkpoint -> folder -> real engine.

The exported folder must serve the checkpoint's network: a real vLLM engine over it gives, for
distinct batched requests, what the checkpoint's task gives in plain PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import distinct_requests, encode, engine, max_abs_diff, reference_outputs

from vllm_terratorch.testing.samples import build_sample_task, sample_pretrained_cfg

pytestmark = pytest.mark.integration
CFG = sample_pretrained_cfg("segmentation")
SCRIPT = Path(sys.executable).parent / "vllm-terratorch"


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run's leftovers (YAML, Lightning checkpoint, input spec), exported by the CLI."""
    work = tmp_path_factory.mktemp("export")
    doc = {
        "seed_everything": 0,
        "trainer": {"accelerator": "auto", "max_epochs": 50, "precision": "16-mixed"},
        "data": CFG["data"],
        "model": CFG["model"],
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-4, "weight_decay": 0.05}},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    task = build_sample_task(CFG)
    torch.save(
        {
            "epoch": 49,
            "state_dict": task.state_dict(),
            "hyper_parameters": {"model_args": CFG["model"]["init_args"]["model_args"]},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        },
        work / "best.ckpt",
    )
    (work / "input_sample.json").write_text(json.dumps(CFG["input"], indent=2))
    args = ["export", "--ttconfig", "config.yaml", "--checkpoint", "best.ckpt", "-i", "./input_sample.json", "served"]
    result = _cli(args, work)
    assert result.returncode == 0, result.stderr
    return work / "served"


def test_validate_accepts_the_export(exported: Path) -> None:
    result = _cli(["validate", str(exported), "--json"], exported.parent)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["weight_files"] == ["model.safetensors"] and report["output_shape"] == [2, 64, 64]


def test_exported_folder_serves_the_checkpoint(exported: Path) -> None:
    requests = distinct_requests(CFG["input"], 10, seed=5)
    with engine(exported, max_num_seqs=4) as llm:
        outputs = encode(llm, requests)
    assert [tuple(o.shape) for o in outputs] == [(2, 64, 64)] * 10
    assert max_abs_diff(outputs[1:], outputs[:-1]) > 1e-3  # distinct requests, distinct outputs
    assert max_abs_diff(outputs, reference_outputs(CFG, requests)) <= 1e-4
