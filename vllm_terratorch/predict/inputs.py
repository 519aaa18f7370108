"""Which scenes a run has, where each prediction goes, and which earlier outputs can be kept.

A scene is one GeoTIFF (`file` layout), or a folder: of T GeoTIFFs in time order (`frames`, a
multi-temporal model) or of one sub-folder per modality (`modalities`, TerraMind; the layout of
TerraTorch's TerraMind processor). The model's input spec picks the layout unless one is given.
"""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

from vllm_terratorch.errors import UsageError
from vllm_terratorch.registration import task_kind

TIFF_SUFFIXES = (".tif", ".tiff")
GLOB_CHARS = "*?["
SceneLayout = Literal["file", "frames", "modalities"]
LAYOUTS = ("auto", "file", "frames", "modalities")


def scene_layout(model_dir: Path, requested: str = "auto") -> tuple[SceneLayout, list[str]]:
    """The layout of a scene for this model, and its image inputs (the modalities, in model order)."""
    from vllm_terratorch.core.config import load_config

    spec = load_config(model_dir).pretrained_cfg.input
    images = spec.image_inputs
    if requested in ("file", "frames", "modalities"):
        if requested == "modalities" and len(images) < 2:
            raise UsageError(f"--scene-layout modalities: the model takes one image ({images}), not one per modality")
        return requested, images  # type: ignore[return-value]
    if len(images) > 1:
        return "modalities", images
    if images and len(spec.data[images[0]].shape) == 4:
        return "frames", images
    return "file", images


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES and path.is_file() and not path.name.startswith(".")


def frame_files(folder: Path) -> list[Path]:
    """The GeoTIFFs directly in a scene folder, in name order (time order for dated names)."""
    return sorted(f for f in folder.iterdir() if _is_tiff(f))


def list_scene_folders(spec: str, outdir: Path, layout: SceneLayout, modalities: list[str]) -> list[tuple[Path, PurePath]]:
    """(scene folder, path relative to the input root) for every scene folder under `spec`, sorted."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UsageError(f"--input {spec}: with the {layout} scene layout, give a folder of scene folders")

    def is_scene(folder: Path) -> bool:
        if outdir.exists() and _is_under(folder, outdir):
            return False
        if layout == "modalities":
            return all((folder / name).is_dir() for name in modalities)
        return bool(frame_files(folder))

    folders = [root, *sorted(path for path in root.rglob("*") if path.is_dir())]
    found = []
    for folder in folders:
        if is_scene(folder):
            relative = PurePath(os.path.relpath(folder, root)) if folder != root else PurePath(root.name)
            found.append((folder, relative))
    return found


@dataclass
class Item:
    """One input scene and where its prediction goes."""

    index: int
    source: Path
    relative: PurePath
    output: Path
    record: dict[str, Any] = field(default_factory=dict)


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _glob_base(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if any(char in part for char in GLOB_CHARS):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def list_inputs(spec: str, outdir: Path) -> list[tuple[Path, PurePath]]:
    """(file, path relative to the input root) for every input named by `spec`, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        base = path
        files = [f for f in path.rglob("*") if _is_tiff(f)]
    elif path.is_file() and path.suffix.lower() in TIFF_SUFFIXES:
        base, files = path.parent, [path]
    elif path.is_file():
        listed = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = Path(line).expanduser()
                listed.append(entry if entry.is_absolute() else path.parent / entry)
        files = [Path(os.path.abspath(entry)) for entry in listed]
        if not files:
            return []
        base = Path(os.path.commonpath([str(entry.parent) for entry in files]))
    elif any(char in spec for char in GLOB_CHARS):
        base = _glob_base(spec)
        files = [Path(match) for match in glob.glob(os.path.expanduser(spec), recursive=True)]
        files = [f for f in files if f.is_file()]
    else:
        raise UsageError(f"--input {spec}: no such folder, file or glob")
    found = []
    for file in files:
        if outdir.exists() and _is_under(file, outdir) and not path.is_file():
            continue  # our own outputs, when OUTDIR lies inside the input folder
        try:
            relative = PurePath(os.path.relpath(file, base))
        except ValueError:
            relative = PurePath(file.name)
        if relative.parts and relative.parts[0] == "..":
            relative = PurePath(file.name)
        found.append((file, relative))
    return sorted(found, key=lambda pair: str(pair[1]))


def output_path(outdir: Path, relative: PurePath, plugin: str) -> Path:
    return outdir.joinpath(*relative.parent.parts, f"{relative.stem}_pred{task_kind(plugin).suffix}")


def output_complete(path: Path) -> bool:
    """An earlier run's output that can be kept: JSON that parses, or a raster that opens and reads."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".json":
            return isinstance(json.loads(path.read_text()), dict)
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(path) as source:
            if source.count < 1 or source.width < 1 or source.height < 1:
                return False
            source.read(1, window=Window(source.width - 1, source.height - 1, 1, 1))
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is redone
        return False


def prepare_items(
    spec: str, outdir: Path, plugin: str, layout: SceneLayout = "file", modalities: list[str] | None = None,
) -> list[Item]:
    items: list[Item] = []
    owners: dict[Path, Item] = {}
    scenes = list_inputs(spec, outdir) if layout == "file" else list_scene_folders(spec, outdir, layout, modalities or [])
    for index, (source, relative) in enumerate(scenes):
        item = Item(index, source, relative, output_path(outdir, relative, plugin))
        item.record = {"input": str(source), "output": str(item.output), "status": "pending", "seconds": None,
                       "tiles": None, "error": None}
        if item.output in owners:
            item.record.update(status="failed", error=f"its output {item.output} is also the output of {owners[item.output].source}")
        owners.setdefault(item.output, item)
        items.append(item)
    return items


def mark_done(items: list[Item], overwrite: bool, workers: int) -> None:
    if overwrite:
        return
    candidates = [item for item in items if item.record["status"] == "pending"]
    with ThreadPoolExecutor(max(1, workers)) as threads:
        for item, complete in zip(candidates, threads.map(lambda it: output_complete(it.output), candidates)):
            if complete:
                item.record.update(status="skipped", seconds=0.0)
