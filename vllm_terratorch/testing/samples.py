"""Small servable model folders with real TerraTorch architectures and random weights.

Used by `make demo`, the tests and the benchmarks, so that none of them downloads anything: the
network is built with TerraTorch's own factory (the real Prithvi code, a tiny configuration) and
its random weights are saved the way fine-tunes ship them (Lightning checkpoint by default).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch

from vllm_terratorch.core.config import parse_config
from vllm_terratorch.core.factory import build_task

SampleTask = Literal["segmentation", "regression", "classification"]
WeightFormat = Literal["ckpt", "pt", "state_dict", "safetensors"]

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
# Sen1Floods11-like statistics, in the datamodule's layout (one value per band).
MEANS = [0.1412, 0.1368, 0.1215, 0.2549, 0.1977, 0.1253]
STDS = [0.0737, 0.0735, 0.0813, 0.1005, 0.0983, 0.0850]


def _prithvi_args(backbone: str, indices: list[int]) -> dict[str, Any]:
    return {
        # As in the mission's config: building must still not download anything.
        "backbone_pretrained": True,
        "backbone": backbone,
        "backbone_bands": list(BANDS),
        "necks": [{"name": "SelectIndices", "indices": indices}, {"name": "ReshapeTokensToImage"}],
    }


def _datamodule(image_size: int, kind: str, num_classes: int | None) -> dict[str, Any]:
    classes = {} if num_classes is None else {"num_classes": num_classes}
    return {
        "class_path": f"terratorch.datamodules.GenericNonGeo{kind}DataModule",
        "init_args": {
            "batch_size": 4,
            "num_workers": 0,
            # The fine-tune's training folders, as its YAML names them: never read when serving.
            **{f"{split}_data_root": f"data/{split}" for split in ("train", "val", "test")},
            **classes,
            "dataset_bands": list(BANDS),
            "output_bands": list(BANDS),
            "rgb_indices": [2, 1, 0],
            # Files hold Sentinel-2 L2A digital numbers (reflectance x 10000), as Sen1Floods11's do.
            "constant_scale": 0.0001,
            "means": list(MEANS),
            "stds": list(STDS),
            "img_grep": "*_S2Hand.tif",
            "label_grep": "*_LabelHand.tif",
            "no_data_replace": 0,
            "no_label_replace": -1,
        },
    }


def sample_pretrained_cfg(
    task: SampleTask = "segmentation",
    *,
    image_size: int = 64,
    backbone: str = "prithvi_eo_v2_tiny_tl",
    indices: list[int] | None = None,
    decoder_channels: int = 16,
    num_classes: int | None = None,
    frames: int | None = None,
) -> dict[str, Any]:
    """A `pretrained_cfg` in the mission document's layout, for one of three task kinds.

    `frames`: a multi-temporal model (Prithvi's `backbone_num_frames`): image input (C, T, H, W),
    `temporal_coords` (1, T, 2) and time + location coordinate encodings, as TerraTorch's
    multi-temporal crop configs have them.

    segmentation: the mission's Sen1Floods11 config (UperNet, decoder_scale_modules, target
    pixel_values + location_coords). regression: pixel-wise, no target (all inputs keywords).
    classification: ClassificationTask with an identity decoder.
    """
    indices = indices or [1, 3, 5, 11]
    time_dims = [frames] if frames else []
    image = {"type": "torch.Tensor", "shape": [len(BANDS), *time_dims, image_size, image_size]}
    coords = {"type": "torch.Tensor", "shape": [1, 2]}
    model_args = _prithvi_args(backbone, indices)
    if frames:
        model_args |= {"backbone_num_frames": frames, "backbone_coords_encoding": ["time", "location"]}
    if task == "segmentation":
        model_args |= {
            "decoder": "UperNetDecoder",
            "decoder_channels": decoder_channels,
            "decoder_scale_modules": True,
            "num_classes": num_classes or 2,
            "rescale": True,
            "head_dropout": 0.1,
        }
        input_spec = {"target": "pixel_values", "data": {"pixel_values": image, "location_coords": coords}}
        class_path, extra, data = "terratorch.tasks.SemanticSegmentationTask", {"loss": "ce", "ignore_index": -1}, "Segmentation"
    elif task == "regression":
        model_args |= {"decoder": "UNetDecoder", "decoder_channels": [32, 16, 8, 4], "head_dropout": 0.0}
        model_args["necks"] = model_args["necks"] + [{"name": "LearnedInterpolateToPyramidal"}]
        # No target: every input is passed by keyword, `forward(x=..., location_coords=...)`.
        input_spec = {"data": {"x": image, "location_coords": coords}}
        class_path, extra, data = "terratorch.tasks.PixelwiseRegressionTask", {"loss": "rmse"}, "PixelwiseRegression"
    elif task == "classification":
        model_args |= {"decoder": "IdentityDecoder", "num_classes": num_classes or 3, "head_dropout": 0.0}
        model_args["necks"] = [{"name": "SelectIndices", "indices": [indices[-1]]}, {"name": "ReshapeTokensToImage"}]
        input_spec = {"target": "pixel_values", "data": {"pixel_values": image}}
        class_path, extra, data = "terratorch.tasks.ClassificationTask", {"loss": "ce"}, "Classification"
    else:
        raise ValueError(f"unknown sample task {task!r}; expected segmentation, regression or classification")
    if frames:
        # [1, T, 2], as `vllm-terratorch config` infers it for a multi-temporal Prithvi
        input_spec["data"]["temporal_coords"] = {"type": "torch.Tensor", "shape": [1, frames, 2]}
        for neck in model_args["necks"]:
            if neck["name"] == "ReshapeTokensToImage":  # tokens of T frames -> one (T x D) feature map
                neck["effective_time_dim"] = frames
    # Pixel-wise tasks: overlapping tiles for images larger than the model input (IO processors).
    # ClassificationTask takes no such argument.
    stride = image_size * 3 // 4
    tiling = {} if task == "classification" else {
        "tiled_inference_parameters": {"h_crop": image_size, "w_crop": image_size, "h_stride": stride, "w_stride": stride}
    }
    return {
        "seed_everything": 0,
        "input": input_spec,
        "model": {
            "class_path": class_path,
            "init_args": {
                "model_args": model_args,
                "model_factory": "EncoderDecoderFactory",
                "lr": 0.001,
                "freeze_backbone": False,
                "freeze_decoder": False,
                **extra,
                **tiling,
            },
        },
        "data": _datamodule(image_size, data, model_args.get("num_classes")),
    }


# TerraMind's input modalities (bands per modality fixed by its patch embeddings), with statistics
# in the units files carry them (S2 L2A digital numbers, S1 RTC backscatter, DEM metres).
TERRAMIND_BANDS = {"S2L2A": 12, "S1RTC": 2, "S1GRD": 2, "DEM": 1}
TERRAMIND_STATS = {
    "S2L2A": ([1390.5, 1503.3, 1718.0, 1853.9, 2199.1, 2779.9, 2987.2, 3083.2, 3132.4, 3162.0, 2424.9, 1857.9],
              [2106.8, 2141.1, 2038.6, 2134.6, 2085.3, 1889.4, 1820.3, 1871.3, 1753.1, 1797.7, 1434.3, 1334.3]),
    "S1RTC": ([-10.93, -17.33], [4.39, 4.17]),
    "S1GRD": ([-12.59, -20.26], [5.26, 5.91]),
    "DEM": ([670.66], [951.27]),
}


def sample_terramind_cfg(
    modalities: tuple[str, ...] = ("S2L2A", "S1RTC"), *, image_size: int = 64, num_classes: int = 2,
) -> dict[str, Any]:
    """A multi-modal TerraMind segmentation `pretrained_cfg` (TerraTorch's smallest TerraMind
    backbone), read by `GenericMultiModalDataModule` as TerraMind fine-tunes are: one image input
    per modality, named after it, forward gets the dict of modalities."""
    unknown = [name for name in modalities if name not in TERRAMIND_BANDS]
    if unknown:
        raise ValueError(f"unknown TerraMind modalities {unknown}; expected some of {list(TERRAMIND_BANDS)}")
    names = list(modalities)
    stride = image_size * 3 // 4
    return {
        "seed_everything": 0,
        "input": {"data": {name: {"type": "torch.Tensor", "shape": [TERRAMIND_BANDS[name], image_size, image_size]}
                           for name in names}},
        "model": {
            "class_path": "terratorch.tasks.SemanticSegmentationTask",
            "init_args": {
                "model_factory": "EncoderDecoderFactory",
                "model_args": {
                    "backbone": "terramind_v1_tiny",
                    "backbone_pretrained": True,  # as fine-tunes ship it; building turns it off
                    "backbone_modalities": names,
                    "necks": [
                        {"name": "SelectIndices", "indices": [2, 5, 8, 11]},
                        {"name": "ReshapeTokensToImage", "remove_cls_token": False},
                        {"name": "LearnedInterpolateToPyramidal"},
                    ],
                    "decoder": "UNetDecoder",
                    "decoder_channels": [64, 32, 16, 8],
                    "num_classes": num_classes,
                    "head_dropout": 0.0,
                },
                "loss": "ce",
                "ignore_index": -1,
                "lr": 0.0001,
                "tiled_inference_parameters": {"h_crop": image_size, "w_crop": image_size, "h_stride": stride, "w_stride": stride},
            },
        },
        "data": {
            "class_path": "terratorch.datamodules.GenericMultiModalDataModule",
            "init_args": {
                "task": "segmentation",
                "batch_size": 8,
                "num_workers": 0,
                "modalities": names,
                # The training folders of the fine-tune: never read when serving.
                **{f"{split}_data_root": {name: f"data/{split}/{name}" for name in names} for split in ("train", "val", "test")},
                **{f"{split}_label_data_root": f"data/{split}/label" for split in ("train", "val", "test")},
                "image_grep": {name: f"*_{name}.tif" for name in names},
                "label_grep": "*_label.tif",
                "means": {name: TERRAMIND_STATS[name][0] for name in names},
                "stds": {name: TERRAMIND_STATS[name][1] for name in names},
                "num_classes": num_classes,
                "no_data_replace": 0,
                "no_label_replace": -1,
            },
        },
    }


def build_sample_task(pretrained_cfg: dict[str, Any], seed: int = 0) -> Any:
    """The Lightning task of `pretrained_cfg` with seeded random weights (never downloaded)."""
    config = parse_config({"architectures": ["Terratorch"], "num_classes": 0, "pretrained_cfg": pretrained_cfg})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        task = build_task(config.pretrained_cfg.model)
        # Random, not default, values everywhere (norms and biases included), so that a weight
        # that fails to load shows up as a different output; scaled to each tensor's own spread
        # so that predictions vary across the image instead of collapsing to one class.
        for parameter in task.parameters():
            spread = float(parameter.detach().std()) if parameter.numel() > 1 else 0.0
            parameter.data.add_(torch.randn_like(parameter) * max(spread, 0.05))
    return task.eval()


def write_model_folder(
    folder: str | Path,
    pretrained_cfg: dict[str, Any],
    *,
    weight_format: WeightFormat = "ckpt",
    seed: int = 0,
) -> Path:
    """Write `config.json` + weights of a randomly initialised task; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = build_sample_task(pretrained_cfg, seed)
    config = {"architectures": ["Terratorch"], "num_classes": 0, "pretrained_cfg": copy.deepcopy(pretrained_cfg)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    task_state = {name: tensor.detach().clone() for name, tensor in task.state_dict().items()}
    if weight_format == "ckpt":
        # A Lightning checkpoint: `model.`-prefixed task state plus non-tensor training state.
        torch.save(
            {
                "epoch": 3,
                "global_step": 120,
                "pytorch-lightning_version": "2.5.0",
                "state_dict": task_state,
                "hyper_parameters": {"model_args": pretrained_cfg["model"]["init_args"]["model_args"], "optimizer": _TrainingNote("AdamW")},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001}]}],
            },
            folder / "model.ckpt",
        )
    elif weight_format == "pt":
        torch.save({"state_dict": task_state}, folder / "model.pt")
    elif weight_format == "state_dict":
        torch.save(task.model.state_dict(), folder / "pytorch_model.pth")
    elif weight_format == "safetensors":
        from safetensors.torch import save_file

        network_state = {name: tensor.contiguous() for name, tensor in task.model.state_dict().items()}
        save_file(network_state, str(folder / "model.safetensors"))
    else:
        raise ValueError(f"unknown weight format {weight_format!r}")
    return folder


class _TrainingNote:
    """A non-tensor object as Lightning checkpoints carry (refused by `weights_only=True`)."""

    def __init__(self, name: str) -> None:
        self.name = name


def write_sample_geotiff(
    path: str | Path,
    height: int,
    width: int,
    *,
    bands: int = len(BANDS),
    seed: int = 0,
    crs: str = "EPSG:32629",
    origin: tuple[float, float] = (725000.0, 4375000.0),
    pixel_size: float = 30.0,
    nodata: int | None = -9999,
    date: str | None = None,
) -> Path:
    """A Sentinel-2-like int16 GeoTIFF (reflectance x 10000) with a UTM georeference.

    The default origin lies near Valencia, the mission document's example scene. The content is
    smooth random fields (not white noise), so predictions have structure worth looking at.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(200, 4000, size=(1, bands, height // 16 + 2, width // 16 + 2)))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)[0]
    image = (smooth.numpy() + rng.normal(0, 50, size=(bands, height, width))).clip(0, 10000).astype(np.int16)
    path = Path(path)
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": bands, "dtype": "int16",
        "crs": crs, "transform": from_origin(origin[0], origin[1], pixel_size, pixel_size),
    }
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as target:
        target.write(image)
        if date is not None:  # "YYYY-MM-DD": the acquisition time, as TIFF writes it
            target.update_tags(TIFFTAG_DATETIME=date.replace("-", ":") + " 10:30:00")
    return path
