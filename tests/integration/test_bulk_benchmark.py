"""CI smoke run of benchmarks/bulk.py (#20 item 3): every tool on the same checkpoint and scenes,
the JSON schema and that the outputs are the same kind of class mask. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BULK = Path(__file__).resolve().parents[2] / "benchmarks" / "bulk.py"


def test_bulk_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BULK), "--sizes", "300x260,256x384", "--scenes", "2", "--fit-epochs", "1",
         "--no-startup-run", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "bulk-2scenes.json").read_text())
    assert (tmp_path / "bulk-2scenes.png").stat().st_size > 0
    assert set(results["paths"]) == {"terratorch", "ours", "ours-ray", "torch"}
    for name, entry in results["paths"].items():
        assert "error" not in entry, (name, entry.get("error"))
        assert entry["wall_s"] > 0 and entry["mpix_per_s"]["median"] > 0
    # Local and Ray run the same engine path: the same masks up to a 2-thread forward's rounding.
    assert results["paths"]["ours-ray"]["agreement_with_ours"]["pixels"] >= 0.999
    # The same network and tiles without location_coords, and TerraTorch's own tiling: masks of the
    # same scenes (a one-epoch model disagrees near tile edges and class boundaries).
    for name in ("torch", "terratorch"):
        agreement = results["paths"][name]["agreement_with_ours"]
        assert 0.6 <= agreement["worst_scene"] <= agreement["pixels"] <= 1.0, (name, agreement)
    assert set(results["ours_speed_vs"]) == {"terratorch", "ours-ray", "torch"}
    assert results["paths"]["torch"]["loop"]["forward_s"] > 0
