"""Synthetic but structured Sentinel-2-like scenes for the fine-tuning demo, labelled by a physical rule.

Each scene is a land-cover map (bare soil, with lakes and rivers, rectangular fields and urban
blocks) rendered in the six HLS/Prithvi bands with typical surface reflectances, per-pixel
variation and sensor noise, as int16 reflectance x 10000 with a UTM georeference. The label is
not the land-cover map: it is the rule a hydrologist would apply to the pixels themselves, water
where the Normalised Difference Water Index (McFeeters 1996), NDWI = (GREEN - NIR) / (GREEN + NIR),
is above zero. So mixed pixels at shores are labelled as the rule sees them, and a model that
learns the task learns that rule from the six bands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BANDS = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
GREEN, NIR = BANDS.index("GREEN"), BANDS.index("NIR_NARROW")
# Typical surface reflectance per band (BLUE..SWIR_2) of each cover, from published S2 spectra.
SPECTRA = {
    "soil": (0.08, 0.11, 0.15, 0.22, 0.30, 0.25),
    "water": (0.07, 0.06, 0.04, 0.02, 0.01, 0.005),
    "crop": (0.03, 0.07, 0.04, 0.38, 0.20, 0.10),
    "urban": (0.12, 0.13, 0.14, 0.19, 0.22, 0.20),
}
COVERS = tuple(SPECTRA)
CRS = "EPSG:32630"
PIXEL_M = 30.0


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = rng.uniform(0, 1, size=(cells + 1, cells + 1))
    axis = np.linspace(0, cells, size)
    x0 = np.minimum(axis.astype(int), cells - 1)
    t = axis - x0
    rows = coarse[x0] * (1 - t)[:, None] + coarse[x0 + 1] * t[:, None]
    return rows[:, x0] * (1 - t)[None, :] + rows[:, x0 + 1] * t[None, :]


def land_cover(size: int, seed: int) -> np.ndarray:
    """(size, size) cover indices into COVERS: soil background, fields and urban blocks as
    rectangles, lakes from a smooth field's low values and a meandering river, over everything."""
    rng = np.random.default_rng(seed)
    cover = np.zeros((size, size), dtype=np.uint8)
    for kind, count in (("crop", rng.integers(3, 7)), ("urban", rng.integers(1, 4))):
        for _ in range(count):
            h, w = rng.integers(size // 10, size // 3, size=2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            cover[top : top + h, left : left + w] = COVERS.index(kind)
    lakes = _smooth_field(rng, size, int(rng.integers(2, 5))) < rng.uniform(0.3, 0.45)
    rows = np.arange(size)[:, None]
    centre = size * rng.uniform(0.2, 0.8) + size * 0.12 * np.sin(np.arange(size) / size * rng.uniform(3, 9) + rng.uniform(0, 6))
    river = np.abs(rows - centre[None, :]) < size * rng.uniform(0.02, 0.05)
    if rng.uniform() < 0.5:
        river = river.T
    cover[lakes | river] = COVERS.index("water")
    return cover


def render(cover: np.ndarray, seed: int) -> np.ndarray:
    """(6, H, W) int16 reflectance x 10000: each cover's spectrum, mixed at edges (a 3x3 blur, as a
    sensor's point spread does), scaled per pixel (illumination, moisture) and with sensor noise."""
    rng = np.random.default_rng(seed + 10_000)
    spectra = np.array([SPECTRA[name] for name in COVERS], dtype=np.float32)  # (covers, bands)
    image = spectra[cover].transpose(2, 0, 1)  # (bands, H, W)
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
    image = sum(padded[:, dy : dy + cover.shape[0], dx : dx + cover.shape[1]] for dy in range(3) for dx in range(3)) / 9
    brightness = 0.85 + 0.3 * _smooth_field(rng, cover.shape[0], 6)[None, : cover.shape[0], : cover.shape[1]]
    image = image * brightness + rng.normal(0, 0.004, size=image.shape)
    return np.clip(image * 10000, 1, 10000).astype(np.int16)


def ndwi_water(pixels: np.ndarray) -> np.ndarray:
    """The rule's label (H, W) uint8 from (6, H, W) reflectances: 1 where NDWI > 0, else 0."""
    green, nir = pixels[GREEN].astype(np.float32), pixels[NIR].astype(np.float32)
    return ((green - nir) / np.maximum(green + nir, 1e-6) > 0).astype(np.uint8)


def write_scene(image_path: Path, size: int, seed: int, mask_path: Path | None = None,
                width: int | None = None) -> tuple[Path, np.ndarray]:
    """A scene GeoTIFF (6 bands, UTM 30N, 30 m pixels; each seed elsewhere near Valencia), and
    optionally its rule label as a single-band GeoTIFF on the same grid. Returns the path and the label.

    `size` is the height, and the width too unless `width` is given: a non-square scene is the
    top-left of a square one, so its land cover looks the same as a square scene's."""
    import rasterio
    from rasterio.transform import from_origin

    height, width = size, width or size
    side = max(height, width)
    pixels = render(land_cover(side, seed), seed)[:, :height, :width]
    label = ndwi_water(pixels)
    origin = (720000.0 + (seed % 10) * side * PIXEL_M, 4380000.0 - (seed // 10) * side * PIXEL_M)
    profile = {"driver": "GTiff", "height": height, "width": width, "crs": CRS, "transform": from_origin(*origin, PIXEL_M, PIXEL_M)}
    image_path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(image_path, "w", **profile, count=len(BANDS), dtype="int16", nodata=-9999) as target:
        target.write(pixels)
        target.descriptions = BANDS
    if mask_path is not None:
        with rasterio.open(mask_path, "w", **profile, count=1, dtype="uint8") as target:
            target.write(label[None])
    return image_path, label


def write_scene_set(root: Path, size: int, train: int, val: int, seed: int = 0) -> dict[str, list[Path]]:
    """`root/{train,val}/scene<k>_img.tif` + `scene<k>_mask.tif`, as TerraTorch's generic
    segmentation datamodule reads them (`img_grep: "*_img.tif"`, `label_grep: "*_mask.tif"`)."""
    written: dict[str, list[Path]] = {"train": [], "val": []}
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        for k in range(count):
            name = f"scene{offset + k:03d}"
            path, _ = write_scene(root / split / f"{name}_img.tif", size, seed + offset + k, root / split / f"{name}_mask.tif")
            written[split].append(path)
    return written


def band_statistics(paths: list[Path]) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of the files' reflectances (x 1e-4, as the datamodule
    scales them), for the YAML's `means` / `stds`."""
    import rasterio

    arrays = []
    for path in paths:
        with rasterio.open(path) as source:
            arrays.append(source.read().astype(np.float64) * 1e-4)
    stacked = np.concatenate([array.reshape(array.shape[0], -1) for array in arrays], axis=1)
    return stacked.mean(axis=1).round(4).tolist(), stacked.std(axis=1).round(4).tolist()
