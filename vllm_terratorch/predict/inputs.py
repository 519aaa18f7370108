"""Which scenes a run has, where each prediction goes, and which earlier outputs can be kept."""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from vllm_terratorch.errors import UsageError
from vllm_terratorch.registration import task_kind

TIFF_SUFFIXES = (".tif", ".tiff")
GLOB_CHARS = "*?["


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
        files = [f for f in path.rglob("*") if f.suffix.lower() in TIFF_SUFFIXES and f.is_file() and not f.name.startswith(".")]
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


def prepare_items(spec: str, outdir: Path, plugin: str) -> list[Item]:
    items: list[Item] = []
    owners: dict[Path, Item] = {}
    for index, (source, relative) in enumerate(list_inputs(spec, outdir)):
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
