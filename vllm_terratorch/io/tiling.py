"""Cut an image of any size into model-sized tiles, and stitch per-tile outputs back together.

A TerraTorch model takes a fixed input size, but a GeoTIFF can be any size. The IO processor plans
the tiles once (`plan_tiles`), sends every tile to the engine as one batch (`extract_tiles`), and
blends the per-pixel outputs back into an array of exactly the image's size (`stitch`). A scene too
large to hold is padded window by window with the same indices (`plan_indices`, `take_padded`) and
blended a tile row at a time (`RowStitcher`). Overlapping
tiles are weighted by a window that tapers towards each tile's edge, where a model sees the least
context, so the seams between tiles do not show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

PaddingMode = Literal["reflect", "constant", "edge"]


class TilingConfig(BaseModel):
    """Tile size (crop), step between tiles (stride), and how edges are padded and overlaps blended."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    h_crop: PositiveInt
    w_crop: PositiveInt
    h_stride: PositiveInt
    w_stride: PositiveInt
    padding: PaddingMode = "reflect"
    # True: weight tiles by a window tapering towards their edges; False: plain average.
    blend_overlaps: bool = True

    @model_validator(mode="after")
    def _stride_within_crop(self) -> TilingConfig:
        # A stride larger than the crop would leave gaps: pixels no tile covers.
        for axis in ("h", "w"):
            stride, crop = getattr(self, f"{axis}_stride"), getattr(self, f"{axis}_crop")
            if stride > crop:
                raise ValueError(
                    f"{axis}_stride ({stride}) must not exceed {axis}_crop ({crop}), "
                    "or some pixels would be covered by no tile"
                )
        return self


def tiling_from_config(params: Mapping[str, Any] | None, default_hw: tuple[int, int]) -> TilingConfig:
    """Build a `TilingConfig` from TerraTorch's `tiled_inference_parameters`.

    `h_crop`/`w_crop` override the `crop` shorthand, which overrides `default_hw` (the model's input
    size from its input spec). Strides likewise (`h_stride`/`w_stride`, then `stride`) and default to
    the crop: no overlap. TerraTorch's `padding=False` maps to zero ("constant") padding and `True`
    to "reflect". `delta`, `average_patches` and `batch_size` do not apply here and are ignored.
    """
    params = dict(params or {})
    h_crop = params.get("h_crop", params.get("crop", default_hw[0]))
    w_crop = params.get("w_crop", params.get("crop", default_hw[1]))
    fields: dict[str, Any] = {
        "h_crop": h_crop,
        "w_crop": w_crop,
        "h_stride": params.get("h_stride", params.get("stride", h_crop)),
        "w_stride": params.get("w_stride", params.get("stride", w_crop)),
    }
    padding = params.get("padding")
    if padding is not None:
        fields["padding"] = {True: "reflect", False: "constant"}.get(padding, padding)
    if params.get("blend_overlaps") is not None:
        fields["blend_overlaps"] = params["blend_overlaps"]
    return TilingConfig(**fields)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie: the image sits at the top-left of the padded image."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    origins: tuple[tuple[int, int], ...]  # (top, left) of each tile in the padded image, row-major
    config: TilingConfig

    def __len__(self) -> int:
        return len(self.origins)


def _padded_size(size: int, crop: int, stride: int) -> int:
    """Smallest size >= max(size, crop) that a whole number of strides past one crop fills exactly."""
    padded = max(size, crop)
    return padded + (-(padded - crop)) % stride


def plan_tiles(height: int, width: int, config: TilingConfig) -> TilePlan:
    """Plan the fewest tiles, at the configured stride, that cover every pixel of a (height, width) image."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    c = config
    padded_h = _padded_size(height, c.h_crop, c.h_stride)
    padded_w = _padded_size(width, c.w_crop, c.w_stride)
    origins = tuple(
        (top, left)
        for top in range(0, padded_h - c.h_crop + 1, c.h_stride)
        for left in range(0, padded_w - c.w_crop + 1, c.w_stride)
    )
    return TilePlan(height, width, padded_h, padded_w, origins, config)


def padded_indices(size: int, padded: int, mode: PaddingMode) -> np.ndarray:
    """For each position along one axis of the padded image, the image position it repeats (-1: a
    zero, constant-mode pad). This is np.pad's bottom/right padding written as indices, so a window
    of a file can be padded alone exactly as the whole image would be."""
    # There is nothing to mirror in a 1-pixel axis: repeat the pixel instead.
    if mode == "reflect" and size == 1:
        mode = "edge"
    index = np.arange(size)
    if padded == size:
        return index
    if mode == "constant":
        return np.concatenate([index, np.full(padded - size, -1)])
    return np.pad(index, (0, padded - size), mode=mode)


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive indices as a slice (a view, no copy), else the indices."""
    if len(index) and index[0] >= 0 and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return np.maximum(index, 0)


def take_padded(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`image[..., rows, cols]` (last two axes), zero where an index is negative (a view where
    neither axis is padded)."""
    out = image[..., _as_slice(rows), :][..., _as_slice(cols)]
    if (rows < 0).any():
        out[..., rows < 0, :] = 0
    if (cols < 0).any():
        out[..., cols < 0] = 0
    return out


def plan_indices(plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
    """`padded_indices` of the plan's rows and columns."""
    mode = plan.config.padding
    return (padded_indices(plan.height, plan.padded_height, mode), padded_indices(plan.width, plan.padded_width, mode))


def extract_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Cut a (C, H, W) image into the plan's tiles: (N, C, h_crop, w_crop), padded at bottom/right."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[1:] != (plan.height, plan.width):
        raise ValueError(f"expected an image of shape (C, {plan.height}, {plan.width}), got {image.shape}")
    rows, cols = plan_indices(plan)
    padded = image if (len(rows), len(cols)) == image.shape[1:] else take_padded(image, rows, cols)
    h, w = plan.config.h_crop, plan.config.w_crop
    return np.stack([padded[:, top : top + h, left : left + w] for top, left in plan.origins])


def _window(crop: int, stride: int, blend: bool) -> np.ndarray:
    """1-D tile weights: a linear ramp over the overlap at each end, never zero, flat in the middle.

    Where two tiles overlap, their ramps sum to a constant, so the blend is a linear cross-fade.
    The ramp never reaches zero, so a pixel that only one tile covers still gets that tile's value.
    """
    overlap = crop - stride
    if not blend or overlap == 0:
        return np.ones(crop)
    distance = np.minimum(np.arange(crop), np.arange(crop)[::-1]) + 0.5
    return np.minimum(distance / overlap, 1.0)


def _as_numpy(tile: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tile, torch.Tensor):
        # numpy has no bfloat16; float32 holds every float dtype a model returns.
        return tile.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(tile, dtype=np.float32)


def _tile_arrays(outputs: Sequence[np.ndarray | torch.Tensor], plan: TilePlan, first: int = 0,
                 channels: int | None = None) -> list[np.ndarray]:
    """Tile outputs as (K, h_crop, w_crop) float32 arrays, checked; `first`: the first one's tile index."""
    c = plan.config
    tiles = [_as_numpy(tile) for tile in outputs]
    tiles = [tile[None] if tile.ndim == 2 else tile for tile in tiles]
    if channels is None:
        channels = tiles[0].shape[0] if tiles else 1
    expected = (channels, c.h_crop, c.w_crop)
    for index, tile in enumerate(tiles, start=first):
        if tile.shape != expected:
            raise ValueError(
                f"tile output {index} has shape {tile.shape}, expected {expected} "
                "((K, h_crop, w_crop) or (h_crop, w_crop)): outputs must be at the tile's resolution"
            )
    return tiles


def _tile_weight(config: TilingConfig) -> np.ndarray:
    c = config
    return np.outer(_window(c.h_crop, c.h_stride, c.blend_overlaps), _window(c.w_crop, c.w_stride, c.blend_overlaps))


def stitch(
    outputs: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor, plan: TilePlan
) -> np.ndarray:
    """Blend per-tile outputs, each (K, h_crop, w_crop) or (h_crop, w_crop), into one (K, H, W) float32 array."""
    if len(outputs) != len(plan):
        raise ValueError(f"expected {len(plan)} tile outputs (one per tile), got {len(outputs)}")
    tiles = _tile_arrays(list(outputs), plan)
    c = plan.config
    channels = tiles[0].shape[0] if tiles else 1
    weight = _tile_weight(c)
    total = np.zeros((channels, plan.padded_height, plan.padded_width))
    weights = np.zeros((plan.padded_height, plan.padded_width))
    for (top, left), tile in zip(plan.origins, tiles, strict=True):
        total[:, top : top + c.h_crop, left : left + c.w_crop] += tile * weight
        weights[top : top + c.h_crop, left : left + c.w_crop] += weight
    return (total / weights)[:, : plan.height, : plan.width].astype(np.float32)


class RowStitcher:
    """`stitch` for outputs too large to hold: tile outputs are added in plan order, and each band of
    rows that no later tile covers leaves at once as float32 (K, rows, W), at most `ROWS` rows per
    band, the values `stitch` gives there bit for bit (the same sums, in the same order). Only the
    accumulator rows a later tile can still reach are kept: K x h_crop x padded width, allocated
    once, whatever the image height."""

    ROWS = 128

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.weight = _tile_weight(plan.config)
        self.added = 0  # tiles added so far
        self.base = 0  # image row of the first accumulator row
        self.channels: int | None = None
        self.total = np.zeros((0, plan.config.h_crop, plan.padded_width))
        self.weights = np.zeros((plan.config.h_crop, plan.padded_width))

    @property
    def done(self) -> bool:
        return self.added == len(self.plan)

    def add(self, outputs: Sequence[np.ndarray | torch.Tensor]) -> list[tuple[int, np.ndarray]]:
        """Add the next tiles' outputs; returns the finished row bands as (first row, values)."""
        plan, c = self.plan, self.plan.config
        if self.added + len(outputs) > len(plan):
            raise ValueError(f"expected {len(plan)} tile outputs (one per tile), got more")
        tiles = _tile_arrays(list(outputs), plan, self.added, self.channels)
        finished: list[tuple[int, np.ndarray]] = []
        for tile in tiles:
            if self.channels is None:
                self.channels = tile.shape[0]
                self.total = np.zeros((self.channels, c.h_crop, plan.padded_width))
            top, left = plan.origins[self.added]
            row = top - self.base  # 0 <= row, row + h_crop <= h_crop: tiles of one tile row start at base
            self.total[:, row : row + c.h_crop, left : left + c.w_crop] += tile * self.weight
            self.weights[row : row + c.h_crop, left : left + c.w_crop] += self.weight
            self.added += 1
            following = plan.origins[self.added][0] if self.added < len(plan) else plan.padded_height
            end = min(following, plan.height)
            if following > top and end > self.base:  # a tile row is complete: rows above the next one are final
                finished.extend(self._flush(end - self.base))
        return finished

    def _flush(self, count: int) -> list[tuple[int, np.ndarray]]:
        width = self.plan.width
        bands = []
        for first in range(0, count, self.ROWS):
            rows = slice(first, min(first + self.ROWS, count))
            values = np.empty((self.total.shape[0], rows.stop - rows.start, width), np.float32)
            values[...] = self.total[:, rows, :width] / self.weights[rows, :width]
            bands.append((self.base + first, values))
        kept = self.total.shape[1] - count  # rows a later tile still reaches move to the top
        self.total[:, :kept] = self.total[:, count:].copy()
        self.total[:, kept:] = 0
        self.weights[:kept] = self.weights[count:].copy()
        self.weights[kept:] = 0
        self.base += count
        return bands


def cut_tiles(image: np.ndarray, plan: TilePlan) -> torch.Tensor:
    """The plan's tiles of a (C, H, W) or (C, T, H, W) image; time steps are cut as extra channels."""
    if image.ndim == 3:
        return torch.from_numpy(extract_tiles(image, plan))
    channels, frames = image.shape[:2]
    flat = extract_tiles(image.reshape(channels * frames, *image.shape[2:]), plan)
    return torch.from_numpy(flat.reshape(len(flat), channels, frames, *flat.shape[2:]))
