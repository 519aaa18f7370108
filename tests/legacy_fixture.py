"""The committed old-layout checkpoint (tests/fixtures/legacy_scale_modules), for unit and integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_scale_modules"


def copy_model(target: Path) -> Path:
    """A private copy of the fixture's model folder (nothing may write into the repo)."""
    return Path(shutil.copytree(FIXTURE / "model", target / "legacy-model"))


def requests() -> list[dict[str, torch.Tensor]]:
    """The two requests the expected outputs were computed from, in the per-request form."""
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    return [{name: tensor[i] for name, tensor in inputs.items()} for i in range(len(inputs["pixel_values"]))]


def expected_outputs() -> torch.Tensor:
    """What TerraTorch 1.2.10 computed from `requests()` (see make_fixture.py)."""
    return load_file(str(FIXTURE / "expected.safetensors"))["output"]
