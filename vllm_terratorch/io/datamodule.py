"""The model's own datamodule as the preprocessing: the general path, for every TerraTorch datamodule
with a predict stage that reads a folder (`predict_data_root`), multi-modal TerraMind ones included,
and for TerraTorch's benchmark datamodules whose predict stage reads their dataset's `val`/`test`
split under `data_root` (Sen1Floods11, fire scars, multi-temporal crops: what Prithvi's published
fine-tunes were trained with).

What upstream's TerraMind IO processor does per request, kept: the request's files go into a
folder laid out as the datamodule looks for them, the datamodule is built from
`pretrained_cfg.data` with its predict root pointed there, `setup("predict")`, one batch,
`datamodule.aug`. So anything the datamodule does (band selection, scaling, nodata replacement,
`expand_temporal_dimension`, per-modality statistics) is exactly what the model was trained on.

What is ours: the folder is private to the request and removed afterwards; files are named so the
config's own `img_grep` / `image_grep` finds them (a request's names never reach the file
system); the datamodule is built once at start-up, so a config it refuses fails then and not on
the first request; its errors on a request's file become that request's 400. The hand-written
paths in preprocessing.py give the same bits for the datamodules they cover (tested against this
one) without a datamodule build per request (tens of milliseconds).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_terratorch.errors import ConfigError, RequestError

FIELD = "pretrained_cfg.data"
PREDICT_ROOT = "predict_data_root"
DATA_ROOT = "data_root"
TRANSFORMS = ("train_transform", "val_transform", "test_transform", "predict_transform")


@dataclass(frozen=True)
class DatasetLayout:
    """Where a benchmark datamodule's predict stage finds one sample under `data_root`.

    These datamodules take no predict folder: `setup("predict")` builds their dataset on a fixed
    split, which globs images and their label files and keeps those a split file names. So the
    request's image goes where that split's images are, with a label file of zeros beside it (the
    dataset opens it; nothing of it reaches the image) and a split file naming the sample. Taken
    from the dataset classes of the pinned TerraTorch releases (terratorch/datasets/*.py).
    """

    image: str
    label: str
    split_file: str | None = None


SAMPLE = "sample"
LAYOUTS: dict[str, DatasetLayout] = {
    # Sen1Floods11NonGeo: split "test" (predict), data_dir / label_dir / split_dir class attributes.
    "Sen1Floods11NonGeoDataModule": DatasetLayout(
        image=f"v1.1/data/flood_events/HandLabeled/S2Hand/{SAMPLE}_S2Hand.tif",
        label=f"v1.1/data/flood_events/HandLabeled/LabelHand/{SAMPLE}_LabelHand.tif",
        split_file="v1.1/splits/flood_handlabeled/flood_test_data.txt",
    ),
    # FireScarsNonGeo: split "val" -> "validation/", images *_merged.tif, labels *.mask.tif.
    "FireScarsNonGeoDataModule": DatasetLayout(
        image=f"validation/{SAMPLE}_merged.tif", label=f"validation/{SAMPLE}.mask.tif",
    ),
    # MultiTemporalCropClassification: split "val" -> "validation_chips/" + validation_data.txt.
    "MultiTemporalCropClassificationDataModule": DatasetLayout(
        image=f"validation_chips/{SAMPLE}_merged.tif", label=f"validation_chips/{SAMPLE}.mask.tif",
        split_file="validation_data.txt",
    ),
}


def layout_of(cls: type) -> DatasetLayout | None:
    """The dataset layout of a benchmark datamodule class (or a subclass of one), else None."""
    import terratorch.datamodules as datamodules

    for name, layout in LAYOUTS.items():
        known = getattr(datamodules, name, None)
        if isinstance(known, type) and issubclass(cls, known):
            return layout
    return None


def takes_predict_folder(data: Mapping[str, Any] | None) -> bool:
    """Whether the config's datamodule can be run on a folder holding one request's files: it reads
    a predict folder, or it is a benchmark datamodule whose dataset layout is known (LAYOUTS)."""
    if not data or not data.get("class_path"):
        return False
    try:
        cls = _import(str(data["class_path"]))
    except ConfigError:
        return False
    return PREDICT_ROOT in inspect.signature(cls.__init__).parameters or layout_of(cls) is not None


class DatamoduleInputs:
    """Runs the model's datamodule on one request's files: name -> bytes in, name -> array out.

    `names` are the model's image inputs. A multi-modal datamodule (`modalities` in its
    init_args) gets one file per modality, each in a sub-folder of the predict root named after
    the modality (upstream's layout); any other gets the single file in the predict root.
    """

    def __init__(self, data: Mapping[str, Any], names: list[str]) -> None:
        class_path = str(data.get("class_path") or "")
        self.name = class_path.rsplit(".", 1)[-1]
        self.cls = _import(class_path)
        self.parameters = inspect.signature(self.cls.__init__).parameters
        self.layout = None if PREDICT_ROOT in self.parameters else layout_of(self.cls)
        if PREDICT_ROOT not in self.parameters and self.layout is None:
            known = ", ".join(LAYOUTS)
            raise ConfigError(
                f"{FIELD}.class_path: {class_path!r} has no {PREDICT_ROOT} and is none of the benchmark datamodules "
                f"whose dataset layout is known ({known}), so it cannot read a request's file; fine-tune with a "
                "Generic* datamodule of TerraTorch, or serve a config naming one with the same bands, means and stds"
            )
        args = data.get("init_args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"{FIELD}.init_args: expected an object, got {args!r}")
        self.args = dict(args)
        modalities = self.args.get("modalities")
        self.multimodal = isinstance(modalities, list)
        if self.multimodal:
            if sorted(map(str, modalities)) != sorted(names):
                raise ConfigError(
                    f"the model's image inputs {names} are not the modalities of its datamodule ({modalities}, "
                    f"{FIELD}.init_args.modalities); name pretrained_cfg.input.data after them, one per modality"
                )
        elif len(names) != 1:
            raise ConfigError(f"the model takes {len(names)} images ({names}), but its datamodule {self.name} reads one")
        self.names = list(names)
        grep = self.args.get("image_grep" if self.multimodal else "img_grep")
        self.file_names = {name: _file_name(grep.get(name) if isinstance(grep, Mapping) else grep) for name in names}
        with tempfile.TemporaryDirectory(prefix="vllm-terratorch-") as scratch:
            self._build(Path(scratch))  # a config the datamodule refuses fails at start-up

    def describe(self) -> str:
        return f"the model's datamodule {self.name} (general path)"

    def run(self, files: Mapping[str, bytes], hint: str = "") -> dict[str, np.ndarray]:
        """The model-ready float32 image of each input name, without the batch dimension; `hint`
        (what the files hold against what the model takes) is added to the datamodule's errors."""
        with tempfile.TemporaryDirectory(prefix="vllm-terratorch-") as scratch:
            root = Path(scratch)
            if self.layout is not None:  # one image (a benchmark dataset reads no modalities)
                self._lay_out(root, files[self.names[0]])
            else:
                for name, data in files.items():
                    path = (root / name if self.multimodal else root) / self.file_names[name]
                    path.parent.mkdir(exist_ok=True)
                    path.write_bytes(data)
            datamodule = self._build(root)
            try:
                datamodule.batch_size = 1
                datamodule.setup("predict")
                batch = next(iter(datamodule.predict_dataloader()))
                image = datamodule.aug(batch)["image"]
            except Exception as error:  # the datamodule's own message says what it could not read
                hint = f" ({hint})" if hint else ""
                raise RequestError(f"the model's datamodule ({self.name}) could not read the input{hint}: {error}") from None
        images = image if isinstance(image, Mapping) else {self.names[0]: image}
        missing = [name for name in self.names if name not in images]
        if missing:
            raise RequestError(f"the model's datamodule ({self.name}) produced no {missing} input")
        return {name: np.asarray(images[name][0].float().numpy(), dtype=np.float32) for name in self.names}

    def _lay_out(self, root: Path, image: bytes) -> None:
        """The request's image, a zero label file of its size and the split file, as the dataset looks for them."""
        import rasterio
        from rasterio.io import MemoryFile

        assert self.layout is not None
        image_path, label_path = root / self.layout.image, root / self.layout.label
        for path in (image_path, label_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(image)
        try:
            with MemoryFile(image) as memory, memory.open() as source:
                profile = {"driver": "GTiff", "width": source.width, "height": source.height, "count": 1,
                           "dtype": "uint8", "crs": source.crs, "transform": source.transform}
        except rasterio.errors.RasterioError as error:
            raise RequestError(f"the model's datamodule ({self.name}) could not read the input: {error}") from None
        with rasterio.open(label_path, "w", **profile) as label:
            label.write(np.zeros((1, profile["height"], profile["width"]), dtype=np.uint8))
        if self.layout.split_file:
            split = root / self.layout.split_file
            split.parent.mkdir(parents=True, exist_ok=True)
            split.write_text(f"{SAMPLE}\n")

    def _build(self, root: Path) -> Any:
        args = copy.deepcopy(self.args)
        for key in TRANSFORMS:
            if args.get(key):
                args[key] = _transforms(args[key], key)
        if self.layout is not None:
            args[DATA_ROOT] = str(root)
        else:
            args[PREDICT_ROOT] = {name: str(root / name) for name in self.names} if self.multimodal else str(root)
        args["batch_size"] = 1
        # use_metadata: the dataset would parse dates and places from file names; ours come from the file.
        for key, value in (("num_workers", 0), ("check_stackability", False), ("use_metadata", False)):
            if key in self.parameters:
                args[key] = value
        try:
            return self.cls(**args)
        except Exception as error:
            raise ConfigError(f"{FIELD}: {self.name} cannot be built from its init_args: {error}") from None


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    if not module:
        module, name = "terratorch.datamodules", class_path
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{FIELD}.class_path: cannot import {class_path!r} ({error})") from None


def _transforms(value: Any, key: str) -> Any:
    """LightningCLI transform entries (`class_path` + `init_args`) as objects, as the CLI builds them."""
    if isinstance(value, Mapping) and "class_path" not in value:  # one list per modality
        return {modality: _transforms(items, key) for modality, items in value.items()}
    items = value if isinstance(value, list) else [value]
    built = []
    for item in items:
        if isinstance(item, Mapping):
            cls = _import(str(item.get("class_path", "")))
            try:
                built.append(cls(**(item.get("init_args") or {})))
            except Exception as error:
                raise ConfigError(f"{FIELD}.init_args.{key}: {item.get('class_path')!r} cannot be built: {error}") from None
        else:
            built.append(item)
    return built


def _file_name(grep: Any) -> str:
    """A name the datamodule's glob matches: `sample` + the pattern's suffix (`*_S2Hand.tif`)."""
    if not isinstance(grep, str) or grep.strip("*") == "":
        return "sample.tif"
    suffix = grep.rsplit("*", 1)[-1]
    return f"sample{suffix}" if "*" in grep else grep
