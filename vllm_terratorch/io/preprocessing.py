"""Turn a decoded GeoTIFF into the tensor the model was trained on, following its datamodule config.

The model folder's `pretrained_cfg.data` is the LightningCLI datamodule section the model was
trained with. Its pipeline (TerraTorch 1.2, `GenericPixelWiseDataset.__getitem__` / Sen1Floods11NonGeo
then `datamodule.aug`) is, in this order:

1. read the file with `rioxarray.open_rasterio(masked=True)`: the file's nodata value and NaN become
   NaN, and NaN is replaced by `no_data_replace` (if not None; otherwise NaN reaches the model);
2. select the bands `output_bands` (by their position in `dataset_bands`);
3. cast to float32 and multiply by `constant_scale` (so the nodata replacement is scaled too);
4. `(x - mean) / std` per band (only if both means and stds are given).

The stats and band layout come from the config, never from the data (TerraTorch's own vLLM plugin
divides by 10000 when the image mean exceeds 1; we do not guess). The datamodule is not
instantiated: that would need its `data_root` and the training files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from vllm_terratorch.errors import ConfigError, InputError

FIELD = "pretrained_cfg.data"
# Datamodules whose dataset reads with rioxarray(masked=True) and takes means/stds from init_args.
PIXELWISE = {"GenericNonGeoSegmentationDataModule", "GenericNonGeoPixelwiseRegressionDataModule"}
# Reads with PIL/tifffile: no nodata masking, `no_data_replace` is accepted but never applied.
CLASSIFICATION = "GenericNonGeoClassificationDataModule"
SEN1FLOODS11 = "Sen1Floods11NonGeoDataModule"
SUPPORTED = sorted({*PIXELWISE, CLASSIFICATION, SEN1FLOODS11})


class Preprocessing(BaseModel):
    """The datamodule's test/predict pipeline for one image, reduced to plain numbers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    datamodule: str | None = None  # short class name, for messages; None = no datamodule
    band_indices: list[int] | None = None  # file band per model band; None = all bands as they are
    expected_file_bands: int | None = None  # how many bands the file must have, when known
    file_band_names: list[str] | None = None  # what the file's bands are (dataset_bands), for messages
    scale: float = 1.0
    means: list[float] | None = None  # per model band (or one for all), after selection
    stds: list[float] | None = None
    nodata_replace: float | None = None
    masks_nodata: bool = True  # the dataset turns the file's nodata value and NaN into "missing"

    def apply(self, image: np.ndarray, nodata: float | None = None) -> np.ndarray:
        """(C_file, H, W) any numeric dtype -> (C_model, H, W) float32, as the datamodule feeds the model.

        `nodata` is the file's nodata value (rasterio's `src.nodata`); like rioxarray's masked read,
        those pixels and NaN become `nodata_replace`, or NaN when the datamodule replaces nothing.
        """
        if image.ndim != 3:
            raise InputError(f"expected a (bands, height, width) image, got shape {list(image.shape)}")
        check_band_count(self, image.shape[0])
        out = image.astype(np.float32)  # always a copy
        if self.masks_nodata:
            missing = np.isnan(out)
            if nodata is not None and not np.isnan(nodata):
                missing |= image == nodata  # compared in the file's dtype, as rioxarray does
            if missing.any():
                out[missing] = np.nan if self.nodata_replace is None else self.nodata_replace
        if self.band_indices is not None:
            out = out[self.band_indices]
        out *= np.float32(self.scale)
        if self.means is not None and self.stds is not None:
            means = np.asarray(self.means, dtype=np.float32).reshape(-1, 1, 1)
            stds = np.asarray(self.stds, dtype=np.float32).reshape(-1, 1, 1)
            out = (out - means) / stds
        return out


    def for_file_bands(self, file_bands: int, model_bands: int) -> Preprocessing:
        """The pipeline for a file of `file_bands` bands (a request without `indices`).

        A file with the datamodule's file layout has its bands selected by name, as in training;
        a file with exactly the model's band count is taken as already in model order (HLS and
        many exported stacks carry just those bands); any other count cannot be placed.
        """
        expected = self.expected_file_bands
        if expected is None or file_bands == expected:
            return self
        if file_bands == model_bands:
            return self.model_copy(update={"band_indices": None, "expected_file_bands": None})
        if self.file_band_names is not None and expected != model_bands:
            layouts = (
                f"{model_bands} bands (the model's input bands, in model order) or {expected} bands "
                f"(the datamodule's dataset_bands {self.file_band_names}, selected by name)"
            )
        else:
            layouts = f"{model_bands} bands (the model's input bands, in model order)"
        raise InputError(
            f"the GeoTIFF has {file_bands} bands; this model takes {layouts}. For another layout, send "
            f"'indices': the 0-based file band for each of the model's {model_bands} bands, in model order"
        )


def check_band_count(preprocessing: Preprocessing, file_bands: int) -> None:
    """Refuse a file whose band count is not the layout the datamodule was configured for."""
    expected = preprocessing.expected_file_bands
    if expected is None or file_bands == expected:
        return
    if preprocessing.file_band_names is not None:
        what = f"the model's datamodule expects {expected} (dataset_bands {preprocessing.file_band_names})"
    else:
        what = f"the model expects {expected} (its input's channel count)"
    raise InputError(f"the GeoTIFF has {file_bands} bands; {what}")


def fast_path_covers(data: Mapping[str, Any] | None) -> bool:
    """Whether the hand-written pipeline reproduces this datamodule (else the datamodule is run)."""
    if not isinstance(data, Mapping) or not data.get("class_path"):
        return True  # no datamodule: the image as it is
    class_path = str(data["class_path"])
    name = class_path.rsplit(".", 1)[-1]
    if name not in SUPPORTED or not (class_path == name or class_path.startswith("terratorch.")):
        return False
    args = data.get("init_args") or {}
    try:
        _check_transform(args, "predict_transform" if name == SEN1FLOODS11 else "test_transform")
    except ConfigError:
        return False
    return True


def preprocessing_from_config(data: Mapping[str, Any] | None, num_model_bands: int | None) -> Preprocessing:
    """Derive the pipeline from `pretrained_cfg.data` without instantiating the datamodule.

    No section or no class_path: identity on all bands. A datamodule we cannot reproduce raises
    `ConfigError` rather than silently feeding the model differently scaled data.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{FIELD}: expected a datamodule section (class_path, init_args), got {data!r}")
    class_path = data.get("class_path") if data is not None else None
    if data is None or not class_path:
        return Preprocessing(expected_file_bands=num_model_bands, masks_nodata=False)
    args = data.get("init_args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{FIELD}.init_args: expected an object, got {args!r}")
    name = str(class_path).rsplit(".", 1)[-1]
    if name not in SUPPORTED or not (str(class_path) == name or str(class_path).startswith("terratorch.")):
        raise ConfigError(
            f"{FIELD}.class_path: {class_path!r} is not a datamodule whose preprocessing vllm-terratorch "
            f"can reproduce (supported: {', '.join(SUPPORTED)}); send model-ready tensors instead"
        )
    # expand_temporal_dimension (one file of time x bands, reshaped to channels x time): the same
    # per-band normalisation, applied here to each frame of a time-series request (one file per frame).
    _check_transform(args, "predict_transform" if name == SEN1FLOODS11 else "test_transform")

    if name == SEN1FLOODS11:
        prep, bands_key = _sen1floods11(args), "bands"
    else:
        # At predict time the generic datamodules read `predict_*_bands` when given.
        file_key = "predict_dataset_bands" if args.get("predict_dataset_bands") else "dataset_bands"
        out_key = "predict_output_bands" if args.get("predict_output_bands") else "output_bands"
        dataset_bands = _expand(args.get(file_key), file_key)
        output_bands = _expand(args.get(out_key), out_key)
        indices = None
        if output_bands:
            if not dataset_bands:
                raise ConfigError(f"{FIELD}.init_args.{out_key} needs {FIELD}.init_args.{file_key}")
            unknown = [band for band in output_bands if band not in dataset_bands]
            if unknown:
                raise ConfigError(f"{FIELD}.init_args.{out_key}: {unknown} are not in {file_key} {dataset_bands}")
            indices = [dataset_bands.index(band) for band in output_bands]
        bands_key = out_key if indices is not None else file_key
        means, stds = (_stats(args.get(key), key) for key in ("means", "stds"))
        normalise = bool(means) and bool(stds)  # TerraTorch: `if means and stds`, else identity
        classification = name == CLASSIFICATION
        prep = Preprocessing(
            datamodule=name,
            band_indices=indices,
            expected_file_bands=len(dataset_bands) if dataset_bands else None,
            file_band_names=[str(band) for band in dataset_bands] if dataset_bands else None,
            scale=_number(args.get("constant_scale", 1.0), "constant_scale"),
            means=means if normalise else None,
            stds=stds if normalise else None,
            nodata_replace=None if classification else _nodata_replace(args.get("no_data_replace")),
            masks_nodata=not classification,
        )
    return _validated(prep, num_model_bands, bands_key)


def _sen1floods11(args: Mapping[str, Any]) -> Preprocessing:
    """Sen1Floods11 files hold all 13 S2 bands; `bands` are names, stats are TerraTorch constants."""
    from terratorch.datamodules.sen1floods11 import MEANS, STDS, Sen1Floods11NonGeo

    all_bands = list(Sen1Floods11NonGeo.all_band_names)
    bands = [str(getattr(band, "value", band)) for band in args.get("bands") or all_bands]
    unknown = [band for band in bands if band not in all_bands]
    if unknown:
        raise ConfigError(f"{FIELD}.init_args.bands: {unknown} are not Sen1Floods11 bands {all_bands}")
    return Preprocessing(
        datamodule=SEN1FLOODS11,
        band_indices=[all_bands.index(band) for band in bands],
        expected_file_bands=len(all_bands),
        file_band_names=all_bands,
        scale=_number(args.get("constant_scale", 0.0001), "constant_scale"),
        means=[MEANS[band] for band in bands],
        stds=[STDS[band] for band in bands],
        nodata_replace=_nodata_replace(args.get("no_data_replace", 0)),
    )


def _validated(prep: Preprocessing, num_model_bands: int | None, bands_key: str) -> Preprocessing:
    """Every length must agree: selected bands, stats and the model's input channels."""
    count = len(prep.band_indices) if prep.band_indices is not None else prep.expected_file_bands
    if num_model_bands is not None and count is not None and count != num_model_bands:
        raise ConfigError(
            f"{FIELD}.init_args.{bands_key} selects {count} bands, but the model's input spec "
            f"(pretrained_cfg.input.data, shape[0]) has {num_model_bands} channels"
        )
    count = count if count is not None else num_model_bands
    for key in ("means", "stds"):
        stats = getattr(prep, key)
        if stats is not None and count is not None and len(stats) not in (1, count):
            raise ConfigError(f"{FIELD}.init_args.{key} has {len(stats)} values for {count} model bands")
    if prep.stds is not None and 0.0 in prep.stds:
        raise ConfigError(f"{FIELD}.init_args.stds contains 0; normalising would divide by zero")
    if prep.expected_file_bands is None and prep.band_indices is None:
        return prep.model_copy(update={"expected_file_bands": num_model_bands})
    return prep


def _expand(bands: Sequence[Any] | None, key: str) -> list[Any] | None:
    """TerraTorch's `generate_bands_intervals`: a 2-int pair (a JSON list) is an inclusive range."""
    if bands is None:
        return None
    out: list[Any] = []
    for band in bands:
        if isinstance(band, (list, tuple)):
            if len(band) != 2 or not all(isinstance(i, int) for i in band):
                raise ConfigError(f"{FIELD}.init_args.{key}: an interval must be two ints [start, end], got {band}")
            out.extend(range(band[0], band[1] + 1))
        else:
            out.append(getattr(band, "value", band))
    return out


def _stats(value: Any, key: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(f"{FIELD}.init_args.{key}: a file path ({value!r}) cannot be read here; inline the list")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        msg = f"{FIELD}.init_args.{key}: expected a list of numbers (one per band), got {value!r}"
        raise ConfigError(msg) from None


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{FIELD}.init_args.{key}: expected a number, got {value!r}")
    return float(value)


def _nodata_replace(value: Any) -> float | None:
    """`no_data_replace: null` means NaN / nodata pixels reach the model as NaN."""
    return None if value is None else _number(value, "no_data_replace")


def _check_transform(args: Mapping[str, Any], key: str) -> None:
    """Only ToTensorV2 (layout only) is reproducible; resizing or cropping transforms are refused."""
    for item in args.get(key) or []:
        path = item.get("class_path", "") if isinstance(item, Mapping) else str(item)
        if str(path).rsplit(".", 1)[-1] != "ToTensorV2":
            raise ConfigError(f"{FIELD}.init_args.{key}: {path!r} cannot be reproduced; only ToTensorV2 is supported")
