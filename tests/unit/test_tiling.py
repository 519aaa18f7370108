"""Tiling: tiles cover every pixel, stitching inverts tiling exactly, and overlaps blend without seams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vllm_terratorch.io.tiling import (
    TilingConfig,
    extract_tiles,
    plan_tiles,
    stitch,
    tiling_from_config,
)

SIZES = [(1, 1), (1, 70), (63, 64), (64, 64), (65, 130), (200, 129)]
CONFIGS = [
    dict(h_crop=32, w_crop=32, h_stride=32, w_stride=32),
    dict(h_crop=32, w_crop=32, h_stride=16, w_stride=16),
    dict(h_crop=32, w_crop=32, h_stride=24, w_stride=24),
    dict(h_crop=16, w_crop=40, h_stride=10, w_stride=40),
]


def _config(blend: bool = True, padding: str = "reflect", **crop_stride: int) -> TilingConfig:
    return TilingConfig(**crop_stride, padding=padding, blend_overlaps=blend)


def _image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, height, width)).astype(np.float32)


@pytest.mark.parametrize("blend", [True, False])
@pytest.mark.parametrize("crop_stride", CONFIGS)
@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize("padding", ["reflect", "constant", "edge"])
def test_round_trip_is_identity(height: int, width: int, crop_stride: dict, blend: bool, padding: str) -> None:
    image = _image(height, width)
    plan = plan_tiles(height, width, _config(blend, padding, **crop_stride))
    tiles = extract_tiles(image, plan)
    assert tiles.shape == (len(plan), 3, crop_stride["h_crop"], crop_stride["w_crop"])
    out = stitch(tiles, plan)
    assert out.shape == (3, height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("blend", [True, False])
def test_per_pixel_function_commutes_with_tiling(blend: bool) -> None:
    image = _image(65, 130)
    plan = plan_tiles(65, 130, _config(blend, **CONFIGS[2]))
    tiled = stitch([2 * t + 1 for t in extract_tiles(image, plan)], plan)
    np.testing.assert_allclose(tiled, 2 * image + 1, atol=1e-5)


@pytest.mark.parametrize("crop_stride", CONFIGS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_tiles_cover_every_pixel_with_fewest_tiles(height: int, width: int, crop_stride: dict) -> None:
    config = _config(**crop_stride)
    plan = plan_tiles(height, width, config)
    covered = np.zeros((plan.padded_height, plan.padded_width), dtype=int)
    for top, left in plan.origins:
        covered[top : top + config.h_crop, left : left + config.w_crop] += 1
    assert covered.shape == (plan.padded_height, plan.padded_width)  # no tile sticks out
    assert (covered[:height, :width] >= 1).all()
    # Fewest tiles: one tile, plus as many strides as it takes to reach the far edge.
    rows = 1 + max(0, -(-(height - config.h_crop) // config.h_stride))
    cols = 1 + max(0, -(-(width - config.w_crop) // config.w_stride))
    assert len(plan) == rows * cols
    assert plan.origins == tuple(sorted(plan.origins))  # row-major
    assert (plan.padded_height - config.h_crop) % config.h_stride == 0
    assert (plan.padded_width - config.w_crop) % config.w_stride == 0
    at_least = max(height, config.h_crop)
    assert plan.padded_height == at_least + (config.h_crop - at_least) % config.h_stride


def test_known_tile_counts() -> None:
    config = _config(h_crop=32, w_crop=32, h_stride=16, w_stride=16)
    plan = plan_tiles(64, 64, config)
    assert len(plan) == 9 and (plan.padded_height, plan.padded_width) == (64, 64)
    assert plan.origins[:4] == ((0, 0), (0, 16), (0, 32), (16, 0))
    small = plan_tiles(5, 7, config)
    assert len(small) == 1 and (small.padded_height, small.padded_width) == (32, 32)
    assert len(plan_tiles(65, 64, config)) == 4 * 3


@pytest.mark.parametrize(("height", "width"), [(0, 5), (5, 0), (-1, 3)])
def test_plan_rejects_empty_image(height: int, width: int) -> None:
    with pytest.raises(ValueError, match="at least 1x1"):
        plan_tiles(height, width, _config(**CONFIGS[0]))


def _constant_tiles(plan_blend: bool) -> np.ndarray:
    """A 32x64 image, crop 32 stride 16: one row of three tiles; tile i outputs i everywhere."""
    plan = plan_tiles(32, 64, _config(plan_blend, h_crop=32, w_crop=32, h_stride=16, w_stride=16))
    assert len(plan) == 3
    return stitch([np.full((32, 32), float(i)) for i in range(3)], plan)[0]


def test_blended_overlap_is_smooth_and_between_contributors() -> None:
    blended = _constant_tiles(True)
    # Overlap of tiles 0 and 1 is columns 16..31; of tiles 1 and 2, columns 32..47.
    assert ((blended[:, 16:32] > 0) & (blended[:, 16:32] < 1)).all()
    assert ((blended[:, 32:48] > 1) & (blended[:, 32:48] < 2)).all()
    np.testing.assert_allclose(blended[:, :16], 0, atol=1e-6)  # covered by one tile only
    np.testing.assert_allclose(blended[:, 48:], 2, atol=1e-6)
    assert (np.diff(blended, axis=1) >= -1e-6).all()  # a monotone cross-fade
    # Values differ by 1 between neighbouring tiles, over a 16-pixel overlap: steps of about 1/16.
    assert np.abs(np.diff(blended, axis=1)).max() <= 1 / 16 + 1e-5
    np.testing.assert_allclose(np.diff(blended, axis=0), 0)

    averaged = _constant_tiles(False)
    np.testing.assert_allclose(averaged[:, 16:32], 0.5)
    assert np.abs(np.diff(averaged, axis=1)).max() == pytest.approx(1.0)  # the seam a plain average leaves


def test_blending_is_smooth_in_2d() -> None:
    config = _config(True, h_crop=32, w_crop=32, h_stride=16, w_stride=16)
    plan = plan_tiles(64, 64, config)
    out = stitch(torch.arange(len(plan), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 32, 32), plan)[0]
    # Tile values step by 1 across columns and by 3 across rows, over 16-pixel overlaps.
    assert np.abs(np.diff(out, axis=1)).max() <= 1 / 16 + 1e-5
    assert np.abs(np.diff(out, axis=0)).max() <= 3 / 16 + 1e-5


def test_stitch_accepts_tensors_of_any_float_dtype() -> None:
    image = _image(40, 50, channels=2)
    plan = plan_tiles(40, 50, _config(h_crop=32, w_crop=32, h_stride=24, w_stride=24))
    tiles = [torch.from_numpy(t).to(torch.bfloat16) for t in extract_tiles(image, plan)]
    out = stitch(tiles, plan)
    assert out.dtype == np.float32 and out.shape == (2, 40, 50)
    expected = torch.from_numpy(image).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    stacked = stitch(torch.stack(tiles).half(), plan)  # one stacked (N, K, h, w) tensor
    np.testing.assert_allclose(stacked, expected, atol=1e-2)


def test_stitch_treats_2d_outputs_as_one_channel() -> None:
    plan = plan_tiles(20, 20, _config(h_crop=16, w_crop=16, h_stride=8, w_stride=8))
    out = stitch([np.ones((16, 16)) for _ in range(len(plan))], plan)
    assert out.shape == (1, 20, 20)
    np.testing.assert_allclose(out, 1)


def test_stitch_rejects_wrong_tile_shape() -> None:
    plan = plan_tiles(64, 64, _config(**CONFIGS[1]))
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16\), expected \(2, 32, 32\)"):
        stitch(np.zeros((len(plan), 2, 16, 16)), plan)
    tiles = [np.zeros((2, 32, 32)) for _ in range(len(plan))]
    tiles[-1] = np.zeros((3, 32, 32))
    with pytest.raises(ValueError, match=r"tile output 8 has shape \(3, 32, 32\), expected \(2, 32, 32\)"):
        stitch(tiles, plan)


def test_stitch_rejects_wrong_tile_count() -> None:
    plan = plan_tiles(64, 64, _config(**CONFIGS[1]))
    with pytest.raises(ValueError, match="expected 9 tile outputs"):
        stitch(np.zeros((8, 1, 32, 32)), plan)


def test_extract_rejects_image_of_wrong_shape() -> None:
    plan = plan_tiles(64, 64, _config(**CONFIGS[0]))
    with pytest.raises(ValueError, match=r"\(C, 64, 64\)"):
        extract_tiles(np.zeros((3, 64, 63)), plan)
    with pytest.raises(ValueError, match=r"\(C, 64, 64\)"):
        extract_tiles(np.zeros((64, 64)), plan)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("reflect", [1, 2, 3, 2, 1]), ("edge", [1, 2, 3, 3, 3]), ("constant", [1, 2, 3, 0, 0])],
)
def test_padding_modes(mode: str, expected: list[int]) -> None:
    plan = plan_tiles(1, 3, _config(padding=mode, h_crop=1, w_crop=5, h_stride=1, w_stride=5))
    tiles = extract_tiles(np.array([[[1.0, 2.0, 3.0]]]), plan)
    assert tiles[0, 0, 0].tolist() == expected


def test_reflect_padding_of_one_pixel_repeats_it() -> None:
    plan = plan_tiles(1, 1, _config(h_crop=4, w_crop=4, h_stride=4, w_stride=4))
    tiles = extract_tiles(np.full((2, 1, 1), 7.0), plan)
    assert tiles.shape == (1, 2, 4, 4) and (tiles == 7).all()


def test_from_config_shorthands_and_defaults() -> None:
    config = tiling_from_config({"crop": 64, "stride": 48, "delta": 8, "average_patches": True}, (224, 224))
    assert (config.h_crop, config.w_crop, config.h_stride, config.w_stride) == (64, 64, 48, 48)
    assert config.padding == "reflect" and config.blend_overlaps is True

    config = tiling_from_config(
        {"crop": 64, "h_crop": 32, "w_stride": 40, "stride": 16, "padding": "edge", "blend_overlaps": False},
        (224, 224),
    )
    assert (config.h_crop, config.w_crop, config.h_stride, config.w_stride) == (32, 64, 16, 40)
    assert config.padding == "edge" and config.blend_overlaps is False

    config = tiling_from_config(None, (512, 256))  # model's input size, no overlap
    assert (config.h_crop, config.w_crop, config.h_stride, config.w_stride) == (512, 256, 512, 256)
    config = tiling_from_config({"h_crop": 128, "w_crop": 96}, (512, 512))
    assert (config.h_stride, config.w_stride) == (128, 96)
    # The grid's meaning of padding=False (zeros); the terratorch scheme's: test_tiling_terratorch.py.
    assert tiling_from_config({"padding": False, "scheme": "grid"}, (8, 8)).padding == "constant"
    assert tiling_from_config({"padding": True}, (8, 8)).padding == "reflect"


@pytest.mark.parametrize(
    ("params", "field"),
    [({"crop": 32, "stride": 33}, "h_stride"), ({"crop": 32, "w_stride": 64}, "w_stride"), ({"h_crop": 0}, "h_crop")],
)
def test_from_config_rejects_bad_values(params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiling_from_config(params, (32, 32))


def test_config_rejects_unknown_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        TilingConfig(h_crop=8, w_crop=8, h_stride=8, w_stride=8, padding="wrap")


def test_sample_config_shape() -> None:
    # The shape vllm_terratorch.testing.samples writes: half-tile overlap.
    config = tiling_from_config({"h_crop": 32, "w_crop": 32, "h_stride": 16, "w_stride": 16}, (32, 32))
    for height, width in itertools.product([31, 32, 33], repeat=2):
        image = _image(height, width, channels=1)
        plan = plan_tiles(height, width, config)
        np.testing.assert_allclose(stitch(extract_tiles(image, plan), plan), image, atol=1e-6)
