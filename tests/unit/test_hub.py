"""Model references: local folders, and Hub repo ids served from a warm cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json

import pytest

from vllm_terratorch.errors import ModelSourceError
from vllm_terratorch.core.hub import resolve_model_dir

REPO = "ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def warm_cache(root, revision_name="main"):
    """The layout huggingface_hub leaves after a download: refs/<name> -> snapshots/<commit>/files."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["Terratorch"]}))
    (snapshot / "model.pt").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / revision_name).write_text(COMMIT)
    return snapshot


def test_local_folder(tmp_path):
    assert resolve_model_dir(tmp_path) == tmp_path


def test_repo_id_from_warm_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = warm_cache(tmp_path)
    folder = resolve_model_dir(REPO, cache_dir=str(tmp_path))
    assert folder.resolve() == snapshot.resolve()
    assert (folder / "model.pt").read_bytes() == b"weights"
    assert resolve_model_dir(REPO, revision=COMMIT, cache_dir=str(tmp_path)).resolve() == snapshot.resolve()


def test_cold_cache_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="Download it once with network access") as error:
        resolve_model_dir(REPO, cache_dir=str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)


def test_paths_that_do_not_exist(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing" / "model"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_dir(tmp_path / "file.txt")
