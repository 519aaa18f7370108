"""Output targets: only new files inside the allowed roots, never through a link, every bad
`out_path` refused before anything is written (io/outputs.py)."""

from __future__ import annotations

import os

import pytest

from vllm_terratorch.errors import OutputPathError, RequestError
from vllm_terratorch.io.outputs import OutputPolicy


@pytest.fixture
def roots(tmp_path):
    out, shared, private = tmp_path / "out", tmp_path / "shared", tmp_path / "private"
    for folder in (out, shared, private):
        folder.mkdir()
    return out, shared, private


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_default_and_relative_names(roots):
    out, _, _ = roots
    policy = OutputPolicy([out])
    assert policy.target(None, "pooling-abc").path == out / "pooling-abc.tiff"
    target = policy.target("sub/deeper/result.tif", "r1")
    assert target.path == out / "sub" / "deeper" / "result.tif" and not (out / "sub").exists()  # nothing created yet
    assert policy.write(target, b"one") == out / "sub" / "deeper" / "result.tif"
    assert (out / "sub" / "deeper" / "result.tif").read_bytes() == b"one"
    hostile = policy.target(None, "../../etc/cron.d/x")
    assert hostile.path.parent == out and ".." not in hostile.name
    assert files_under(out) == ["sub", "sub/deeper", "sub/deeper/result.tif"]  # no temp files left


def test_existing_directories_get_the_request_id_as_upstream(roots):
    out, shared, _ = roots
    policy = OutputPolicy([out, shared])
    (out / "batch").mkdir()
    assert policy.target("batch", "req-7").path == out / "batch" / "req-7.tiff"
    assert policy.target(str(shared), "req-7").path == shared / "req-7.tiff"
    assert policy.target(str(out), "req-7").path == out / "req-7.tiff"
    (shared / "req-7.tiff").write_bytes(b"earlier")
    renamed = policy.target(str(shared), "req-7")
    assert renamed.path.parent == shared and renamed.name.startswith("req-7-")  # never overwritten
    policy.write(renamed, b"new")
    assert (shared / "req-7.tiff").read_bytes() == b"earlier"


@pytest.mark.parametrize(
    ("out_path", "words"),
    [
        ("../x.tif", "without '..'"),
        ("a/../../x.tif", "without '..'"),
        ("a\\..\\x.tif", "not a usable path"),
        ("bad\0name.tif", "not a usable path"),
        ("   ", "not a usable path"),
        ("/etc", "outside the server's output folders"),
        ("/nonexistent/path/that/does/not/exist", "outside the server's output folders"),
        ("taken.tif", "already exists"),
        ("taken.tif/x.tif", "which is a file, not a folder"),
        ("taken.tif/deeper/x.tif", "which is a file, not a folder"),
        ("x" * 300 + ".tif", "longer than 255 bytes"),
        ("sub/" + "y" * 256 + "/x.tif", "longer than 255 bytes"),
        ("/".join(["d" * 200] * 25) + "/x.tif", "longer than the file system allows"),
    ],
)
def test_bad_out_paths_are_refused_before_anything_is_written(roots, out_path, words):
    out, _, _ = roots
    (out / "taken.tif").write_bytes(b"do not overwrite")
    with pytest.raises(OutputPathError, match=words) as raised:
        OutputPolicy([out]).target(out_path, "r")
    assert isinstance(raised.value, RequestError) and isinstance(raised.value, ValueError)  # HTTP 400
    assert files_under(out) == ["taken.tif"]
    assert (out / "taken.tif").read_bytes() == b"do not overwrite"


def test_absolute_out_path_must_be_an_existing_directory_inside_a_root(roots):
    out, shared, private = roots
    policy = OutputPolicy([out, shared])
    with pytest.raises(OutputPathError, match="outside"):
        policy.target(str(private), "r")
    with pytest.raises(OutputPathError, match="not an existing directory"):
        policy.target(str(shared / "missing"), "r")
    with pytest.raises(OutputPathError, match="not an existing directory"):
        policy.target(str(shared / "file.tif"), "r")


def test_read_only_folders_are_refused_even_for_root(roots):
    out, _, _ = roots
    (out / "readonly").mkdir()
    (out / "readonly").chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="cannot write"):
            OutputPolicy([out]).target("readonly", "r")
        with pytest.raises(OutputPathError, match="cannot write"):
            OutputPolicy([out]).target("readonly/new/x.tif", "r")
    finally:
        (out / "readonly").chmod(0o755)


@pytest.mark.parametrize("level", ["first", "middle", "last-folder", "file"])
def test_links_at_every_level_cannot_lead_outside(roots, level):
    """A link inside the output folder pointing elsewhere is resolved before the check."""
    out, _, private = roots
    (out / "a" / "b").mkdir(parents=True)
    if level == "first":
        os.symlink(private, out / "link")
        out_path = "link/x.tif"
    elif level == "middle":
        os.symlink(private, out / "a" / "link")
        out_path = "a/link/b/x.tif"
    elif level == "last-folder":
        os.symlink(private, out / "a" / "b" / "link")
        out_path = "a/b/link"
    else:
        os.symlink(private / "x.tif", out / "a" / "x.tif")  # a dangling link at the file name
        out_path = "a/x.tif"
    policy = OutputPolicy([out])
    with pytest.raises(OutputPathError, match="outside|already exists"):
        policy.target(out_path, "r")
    assert list(private.iterdir()) == []


def test_links_that_stay_inside_are_followed_once_resolved(roots):
    out, _, _ = roots
    (out / "real").mkdir()
    os.symlink(out / "real", out / "alias")
    target = OutputPolicy([out]).target("alias/x.tif", "r")
    assert target.path == out / "real" / "x.tif"


def test_a_link_swapped_in_after_the_check_cannot_redirect_the_write(roots):
    out, _, private = roots
    policy = OutputPolicy([out])
    (out / "sub").mkdir()
    target = policy.target("sub/x.tif", "r")
    (out / "sub").rmdir()
    os.symlink(private, out / "sub")  # the race: a link replaces the checked folder
    with pytest.raises(OutputPathError, match="changed into a link"):
        policy.write(target, b"data")
    assert list(private.iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["sub"]


def test_a_file_created_after_the_check_is_never_replaced(roots):
    out, _, _ = roots
    policy = OutputPolicy([out])
    target = policy.target("x.tif", "r")
    (out / "x.tif").write_bytes(b"first")
    with pytest.raises(OutputPathError, match="already exists"):
        policy.write(target, b"second")
    os.symlink(out / "elsewhere.tif", out / "y.tif")
    with pytest.raises(OutputPathError, match="already exists"):
        policy.target("y.tif", "r")
    assert (out / "x.tif").read_bytes() == b"first" and not (out / "elsewhere.tif").exists()
    assert sorted(p.name for p in out.iterdir()) == ["x.tif", "y.tif"]  # no temp files left
