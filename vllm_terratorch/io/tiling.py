"""Cut an image of any size into model-sized tiles, and stitch per-tile outputs back together.

A TerraTorch model takes a fixed input size, but a GeoTIFF can be any size. The IO processor plans
the tiles once (`plan_tiles`), sends every tile to the engine as one batch (`extract_tiles`), and
blends the per-pixel outputs back into an array of exactly the image's size (`stitch`). A scene too
large to hold is padded window by window with the same indices (`plan_indices`, `take_padded`) and
blended a tile row at a time (`RowStitcher`). Two schemes place and blend the tiles:

- "terratorch" (models whose config has `tiled_inference_parameters`) does what TerraTorch's
  `tiled_inference` does, so a served output equals `terratorch predict` on the same fine-tune: the
  image padded by `delta` on every side, tiles every stride plus one flush with the far edge, each
  tile's output less `delta` pixels at its borders, weighted by TerraTorch's cosine blend mask. Where
  TerraTorch's own result is broken (a pixel no tile covers, an empty output) it covers every pixel.
- "grid" (models without) pads at the bottom/right to whole strides, cross-fades overlaps linearly.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, model_validator

PaddingMode = Literal["reflect", "constant", "edge"]
TilingScheme = Literal["grid", "terratorch"]
TERRATORCH_STRIDE = 192  # tiled_inference's default stride


class TilingConfig(BaseModel):
    """Tile size (crop), step between tiles (stride), and how edges are padded and overlaps blended."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    h_crop: PositiveInt
    w_crop: PositiveInt
    h_stride: PositiveInt
    w_stride: PositiveInt
    scheme: TilingScheme = "grid"
    # The mode the image is padded with (terratorch: its border; grid: at the bottom/right).
    padding: PaddingMode = "reflect"
    # True: weight tiles by a window tapering towards their edges; False: plain average.
    blend_overlaps: bool = True
    # terratorch only. `delta`: pixels cut off each side of a tile's output, where the model saw the
    # least context (TerraTorch's default: 8, shrunk as it shrinks it, `effective_delta`).
    # `pad_border`: pad the image by `delta` first, so its own border is not cut off (TerraTorch's
    # `padding` other than False); False: the tiles along the image's border keep their whole output.
    delta: NonNegativeInt = 8
    pad_border: bool = True

    @model_validator(mode="after")
    def _stride_within_crop(self) -> TilingConfig:
        # A stride larger than the crop would leave gaps: pixels no tile covers.
        for axis, stride, crop in (("h", self.h_stride, self.h_crop), ("w", self.w_stride, self.w_crop)):
            if stride > crop:
                raise ValueError(f"{axis}_stride ({stride}) must not exceed {axis}_crop ({crop}), "
                                 "or some pixels would be covered by no tile")
        return self

    @property
    def effective_delta(self) -> int:
        """`delta`, shrunk as TerraTorch shrinks it to half the smaller overlap (or pixels go uncovered)."""
        return min(self.delta, (self.h_crop - self.h_stride) // 2, (self.w_crop - self.w_stride) // 2)


def tiling_from_config(params: Mapping[str, Any] | None, default_hw: tuple[int, int]) -> TilingConfig:
    """Build a `TilingConfig` from TerraTorch's `tiled_inference_parameters`.

    With parameters, tiles as TerraTorch's `tiled_inference` does (`scheme` "terratorch") unless
    they say `scheme: grid`; without (None or empty: TerraTorch then tiles nothing), the grid.
    `h_crop`/`w_crop` override the `crop` shorthand, which overrides `default_hw` (the model's input
    size, from its input spec: TerraTorch's own default, 224, is not taken). Strides likewise
    (`h_stride`/`w_stride`, then `stride`), else TerraTorch's default, 192, where the crop is at
    least that (terratorch), else the crop.
    `padding`: torch's mode names ("reflect", "replicate", "constant") or numpy's ("edge"); True is
    "reflect" (TerraTorch fails on True: torch takes no boolean mode). False: the terratorch scheme
    pads no border (`pad_border=False`), the grid pads with zeros. `delta` and `blend_overlaps` are
    taken; `average_patches` (always averaged here), `batch_size` and `verbose` do not apply.
    """
    params = dict(params or {})
    h_crop = params.get("h_crop", params.get("crop", default_hw[0]))
    w_crop = params.get("w_crop", params.get("crop", default_hw[1]))
    scheme = params.get("scheme", "terratorch" if params else "grid")
    fallback = (min(TERRATORCH_STRIDE, h_crop), min(TERRATORCH_STRIDE, w_crop)) if scheme == "terratorch" else (h_crop, w_crop)
    fields: dict[str, Any] = {"scheme": scheme, "h_crop": h_crop, "w_crop": w_crop,
                              "h_stride": params.get("h_stride", params.get("stride", fallback[0])),
                              "w_stride": params.get("w_stride", params.get("stride", fallback[1]))}
    padding = params.get("padding")
    if padding is False and scheme == "terratorch":
        fields["pad_border"] = False
    elif padding is not None:
        # torch.nn.functional.pad's names (TerraTorch's) for numpy's
        fields["padding"] = {True: "reflect", False: "constant", "replicate": "edge"}.get(padding, padding)
    fields |= {name: params[name] for name in ("blend_overlaps", "delta") if params.get(name) is not None}
    return TilingConfig(**fields)


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie: the image sits at `offset` (top, left) of the padded image.
    terratorch scheme: `cuts`, per tile, the pixels cut off each side of its output (rows, columns);
    `flat`, the axes along which one tile covers an image padded up to it, weighted evenly."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    origins: tuple[tuple[int, int], ...]  # (top, left) of each tile in the padded image, row-major
    config: TilingConfig
    offset: tuple[int, int] = (0, 0)
    cuts: tuple[tuple[int, int], ...] = ()
    flat: tuple[bool, bool] = (False, False)

    def __len__(self) -> int:
        return len(self.origins)

    def weight(self, index: int) -> np.ndarray:
        """Tile `index`'s (h_crop, w_crop) blend weight: 0 where its output is cut off (read-only)."""
        if self.config.scheme == "grid":
            return _grid_weight(self.config)
        return _terratorch_weight(self.config, *self.cuts[index], *self.flat)


def _terratorch_starts(size: int, crop: int, stride: int, cut: int = 0) -> list[int]:
    """Tile starts along an axis of `size` (padded) pixels, as TerraTorch's `get_input_chips` places
    them: every `stride` while below `size - crop - 1`, then one flush with the end. That last step
    can be `stride + 1`: where it leaves a pixel between the last two outputs (less `cut` pixels at
    each end), TerraTorch raises; one more tile, a pixel before the last, fills it here. Likewise at
    `size == crop + 1`, where TerraTorch's one tile starts at 1, missing pixel 0."""
    starts = [*range(0, size - crop - 1, stride), size - crop]
    if starts[0] > 0:
        return [0, *starts]
    if len(starts) > 1 and starts[-1] - starts[-2] > crop - 2 * cut:
        starts.insert(-1, size - crop - 1)
    return starts


def _plan_grid(height: int, width: int, config: TilingConfig) -> TilePlan:
    """The fewest tiles, from the top-left: each axis padded to the smallest size >= max(size, crop)
    that a whole number of strides past one crop fills exactly."""
    c = config
    padded_h, padded_w = (max(size, crop) + (crop - max(size, crop)) % stride
                          for size, crop, stride in ((height, c.h_crop, c.h_stride), (width, c.w_crop, c.w_stride)))
    origins = tuple(itertools.product(range(0, padded_h - c.h_crop + 1, c.h_stride),
                                      range(0, padded_w - c.w_crop + 1, c.w_stride)))
    return TilePlan(height, width, padded_h, padded_w, origins, config)


def _plan_terratorch(height: int, width: int, config: TilingConfig) -> TilePlan:
    """TerraTorch's tiles (`tiled_inference`), row-major. An image no larger than a tile is one tile:
    TerraTorch runs its model on the image as it is, which a fixed-size engine cannot, so the image
    is padded up to the tile, centred, as TerraTorch's models pad their input (`pad_images`). So is
    an axis still shorter than a tile after the border padding (where TerraTorch fails)."""
    c, delta = config, config.effective_delta
    sizes, crops, strides = (height, width), (c.h_crop, c.w_crop), (c.h_stride, c.w_stride)
    border = delta if c.pad_border else 0
    whole = height <= c.h_crop and width <= c.w_crop
    flat = tuple(whole or size + 2 * border < crop for size, crop in zip(sizes, crops))
    before = tuple((crop - size) // 2 if f else border for size, crop, f in zip(sizes, crops, flat))
    padded = tuple(crop if f else size + 2 * border for size, crop, f in zip(sizes, crops, flat))
    # Without border padding TerraTorch cuts only tiles inside the border, by at most half the
    # overlap: that never opens a gap beside the uncut last tile, so place them as uncut tiles.
    rows, cols = ([0] if f else _terratorch_starts(*axis, border)
                  for f, axis in zip(flat, zip(padded, crops, strides)))
    origins = tuple(itertools.product(rows, cols))
    if c.pad_border:
        cuts = (tuple(0 if f else delta for f in flat),) * len(origins)
    else:
        edges = (rows[0], rows[-1]), (cols[0], cols[-1])
        cuts = tuple((delta, delta) if top not in edges[0] and left not in edges[1] else (0, 0)
                     for top, left in origins)
    return TilePlan(height, width, padded[0], padded[1], origins, config, before, cuts, flat)


def plan_tiles(height: int, width: int, config: TilingConfig) -> TilePlan:
    """Plan the tiles that cover every pixel of a (height, width) image: the fewest at the configured
    stride (grid), or TerraTorch's (terratorch)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    plan = _plan_terratorch if config.scheme == "terratorch" else _plan_grid
    return plan(height, width, config)


def padded_indices(size: int, padded: int, mode: PaddingMode, before: int = 0) -> np.ndarray:
    """For each position along one axis of the padded image, the image position it repeats (-1: a
    zero, constant-mode pad): np.pad's padding (`before` ahead of the image, the rest after it) as
    indices, so a window of a file can be padded alone exactly as the whole image would be."""
    # There is nothing to mirror in a 1-pixel axis: repeat the pixel instead.
    if mode == "reflect" and size == 1:
        mode = "edge"
    index = np.arange(size)
    after = padded - size - before
    if (before, after) == (0, 0):
        return index
    if mode == "constant":
        return np.concatenate([np.full(before, -1), index, np.full(after, -1)])
    return np.pad(index, (before, after), mode=mode)


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
    """`padded_indices` of the plan's rows and columns. A `flat` axis is filled by reflection whatever
    `padding` says: TerraTorch's models pad their input so (`pad_images`, `padding="reflect"`)."""
    modes = ["reflect" if flat else plan.config.padding for flat in plan.flat]
    return (padded_indices(plan.height, plan.padded_height, modes[0], plan.offset[0]),
            padded_indices(plan.width, plan.padded_width, modes[1], plan.offset[1]))


def extract_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Cut a (C, H, W) image into the plan's tiles: (N, C, h_crop, w_crop), padded as the plan says."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[1:] != (plan.height, plan.width):
        raise ValueError(f"expected an image of shape (C, {plan.height}, {plan.width}), got {image.shape}")
    rows, cols = plan_indices(plan)
    padded = image if (len(rows), len(cols)) == image.shape[1:] else take_padded(image, rows, cols)
    h, w = plan.config.h_crop, plan.config.w_crop
    return np.stack([padded[:, top : top + h, left : left + w] for top, left in plan.origins])


def _window(crop: int, stride: int, blend: bool) -> np.ndarray:
    """1-D grid tile weights: a linear ramp over the overlap at each end, never zero, flat in the middle.
    Where two tiles overlap, their ramps sum to a constant, so the blend is a linear cross-fade.
    The ramp never reaches zero, so a pixel that only one tile covers still gets that tile's value."""
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
    tiles = [tile[None] if tile.ndim == 2 else tile for tile in map(_as_numpy, outputs)]
    if channels is None:
        channels = tiles[0].shape[0] if tiles else 1
    expected = (channels, c.h_crop, c.w_crop)
    for index, tile in enumerate(tiles, start=first):
        if tile.shape != expected:
            raise ValueError(f"tile output {index} has shape {tile.shape}, expected {expected} ((K, h_crop, w_crop) "
                             "or (h_crop, w_crop)): outputs must be at the tile's resolution")
    return tiles


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # cached weights are shared between plans
    return array


@lru_cache(maxsize=64)
def _grid_weight(config: TilingConfig) -> np.ndarray:
    """The grid scheme's weight, the same for every tile."""
    c, blend = config, config.blend_overlaps
    return _read_only(np.outer(_window(c.h_crop, c.h_stride, blend), _window(c.w_crop, c.w_stride, blend)))


def _terratorch_window(crop: int, stride: int, cut: int, flat: bool, blend: bool) -> np.ndarray:
    """1-D weights of the `crop - 2 * cut` pixels a tile keeps: TerraTorch's `get_blend_mask`, float32
    (a raised-cosine ramp over the overlap less the cut, at each end); `flat` or no `blend`: even."""
    window = np.ones(crop - 2 * cut, np.float32)
    overlap = min(crop // 2, crop - stride) - cut
    if blend and not flat and overlap > 0:
        ramp = (np.cos(np.pi * np.arange(1, overlap + 1) / (overlap + 1)) / 2 + 0.5).astype(np.float32)
        window[:overlap] = ramp[::-1]
        window[-overlap:] = ramp
    return window


@lru_cache(maxsize=256)
def _terratorch_weight(config: TilingConfig, cut_h: int, cut_w: int, flat_h: bool, flat_w: bool) -> np.ndarray:
    """A terratorch tile's weight: the blend mask over the output it keeps (+1e-6 when blending, as
    TerraTorch adds, so that no pixel is left at ~0), 0 over the `cut_h`/`cut_w` pixels cut off."""
    c = config
    mask = np.outer(_terratorch_window(c.h_crop, c.h_stride, cut_h, flat_h, c.blend_overlaps),
                    _terratorch_window(c.w_crop, c.w_stride, cut_w, flat_w, c.blend_overlaps))
    if c.blend_overlaps:
        mask += np.float32(1e-6)
    weight = np.zeros((c.h_crop, c.w_crop))
    weight[cut_h : c.h_crop - cut_h, cut_w : c.w_crop - cut_w] = mask
    return _read_only(weight)


def _image_region(plan: TilePlan) -> tuple[slice, slice]:
    """Where the image lies in the padded image."""
    top, left = plan.offset
    return slice(top, top + plan.height), slice(left, left + plan.width)


def stitch(outputs: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor, plan: TilePlan) -> np.ndarray:
    """Blend per-tile outputs, each (K, h_crop, w_crop) or (h_crop, w_crop), into one (K, H, W) float32 array."""
    if len(outputs) != len(plan):
        raise ValueError(f"expected {len(plan)} tile outputs (one per tile), got {len(outputs)}")
    tiles, c = _tile_arrays(list(outputs), plan), plan.config
    total = np.zeros((tiles[0].shape[0] if tiles else 1, plan.padded_height, plan.padded_width))
    weights = np.zeros((plan.padded_height, plan.padded_width))
    for index, ((top, left), tile) in enumerate(zip(plan.origins, tiles, strict=True)):
        weight = plan.weight(index)
        total[:, top : top + c.h_crop, left : left + c.w_crop] += tile * weight
        weights[top : top + c.h_crop, left : left + c.w_crop] += weight
    # Only the image: padding that only cut-off outputs reached has no weight at all.
    rows, cols = _image_region(plan)
    return (total[:, rows, cols] / weights[rows, cols]).astype(np.float32)


class RowStitcher:
    """`stitch` for outputs too large to hold: tile outputs are added in plan order, and each band of
    rows that no later tile covers leaves at once as float32 (K, rows, W), at most `ROWS` rows per
    band, the values `stitch` gives there bit for bit (the same sums, in the same order). Only the
    accumulator rows a later tile can still reach are kept: K x h_crop x padded width, allocated
    once, whatever the image height."""

    ROWS = 128

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.added = 0  # tiles added so far
        self.base = 0  # padded-image row of the first accumulator row
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
            weight = plan.weight(self.added)
            self.total[:, row : row + c.h_crop, left : left + c.w_crop] += tile * weight
            self.weights[row : row + c.h_crop, left : left + c.w_crop] += weight
            self.added += 1
            following = plan.origins[self.added][0] if self.added < len(plan) else plan.padded_height
            if following > top:  # a tile row is complete: rows above the next one (<= h_crop) are final
                finished.extend(self._flush(following - self.base))
        return finished

    def _flush(self, count: int) -> list[tuple[int, np.ndarray]]:
        """Emit the image rows among the `count` held rows at the top, and drop those rows."""
        (rows, cols), bands = _image_region(self.plan), []
        top = rows.start
        for first in range(max(self.base, top), min(self.base + count, rows.stop), self.ROWS):
            held = slice(first - self.base, min(first + self.ROWS, self.base + count, rows.stop) - self.base)
            values = np.empty((self.total.shape[0], held.stop - held.start, self.plan.width), np.float32)
            values[...] = self.total[:, held, cols] / self.weights[held, cols]
            bands.append((first - top, values))
        kept = self.total.shape[1] - count  # rows a later tile still reaches move to the top
        for held in (self.total, self.weights):
            held[..., :kept, :] = held[..., count:, :].copy()
            held[..., kept:, :] = 0
        self.base += count
        return bands


def cut_tiles(image: np.ndarray, plan: TilePlan) -> torch.Tensor:
    """The plan's tiles of a (C, H, W) or (C, T, H, W) image; time steps are cut as extra channels."""
    if image.ndim == 3:
        return torch.from_numpy(extract_tiles(image, plan))
    channels, frames = image.shape[:2]
    flat = extract_tiles(image.reshape(channels * frames, *image.shape[2:]), plan)
    return torch.from_numpy(flat.reshape(len(flat), channels, frames, *flat.shape[2:]))
