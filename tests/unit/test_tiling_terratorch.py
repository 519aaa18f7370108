"""The "terratorch" tiling scheme gives what TerraTorch's own `tiled_inference` (what `terratorch
predict` runs) gives on the same model and image, to float rounding; and where TerraTorch's result is
broken (a pixel it covers with no tile, an empty output), a whole, sensible one instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from terratorch.tasks.tiled_inference import tiled_inference

from vllm_terratorch.io.tiling import (
    RowStitcher,
    TilingConfig,
    _terratorch_starts,
    extract_tiles,
    padded_indices,
    plan_tiles,
    stitch,
    tiling_from_config,
)

# TerraTorch warns when it shrinks delta to half the overlap; that is one of the things compared here.
pytestmark = pytest.mark.filterwarnings("ignore:Tiled inference. delta is higher than overlap")

CHANNELS, CLASSES = 3, 4


def _model() -> torch.nn.Module:
    """A fixed random 3x3 convolution: every output pixel depends on its neighbours, so tile borders,
    padding and the blend all show in the result. It pads by reflection as TerraTorch's models pad
    their input (`pad_images`), which is what the scheme assumes for an image smaller than a tile:
    TerraTorch runs the model on that image as it is, the engine on the image brought up to a tile."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(CHANNELS, CLASSES, 3, padding=1, padding_mode="reflect")
    return conv.eval()


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(CHANNELS, height, width)).astype(np.float32)


def _ours(params: dict[str, Any], image: np.ndarray) -> np.ndarray:
    """The served path: plan, cut, one forward per tile (the engine's batch), stitch."""
    config = tiling_from_config(params, (params.get("h_crop", 32), params.get("w_crop", 32)))
    plan = plan_tiles(*image.shape[1:], config)
    with torch.no_grad():
        outputs = _model()(torch.from_numpy(extract_tiles(image, plan)))
    return stitch(outputs, plan)


def _terratorch(params: dict[str, Any], image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tiled_inference(_model(), torch.from_numpy(image)[None], **params)[0].numpy()


def _crop(crop: int, stride: int, **rest: Any) -> dict[str, Any]:
    return {"h_crop": crop, "w_crop": crop, "h_stride": stride, "w_stride": stride, **rest}


CASES = {
    "smaller than the crop": (_crop(32, 24), (20, 27)),
    "equal to the crop": (_crop(32, 24), (32, 32)),
    "larger, non-square, overlap, default delta": (_crop(32, 24), (70, 95)),
    "non-square crop and stride": ({"h_crop": 32, "w_crop": 24, "h_stride": 20, "w_stride": 16}, (75, 66)),
    "height equal to the crop, width larger": (_crop(32, 24), (32, 80)),
    "stride == crop without padding": (_crop(32, 32, padding=False), (64, 96)),
    "no padding: inner tiles cut by delta": (_crop(32, 24, padding=False, delta=3), (100, 80)),
    "replicate padding, explicit delta": (_crop(32, 20, padding="replicate", delta=2), (50, 61)),
    "constant padding": (_crop(24, 16, padding="constant"), (40, 70)),
    "explicit reflect, delta 1": (_crop(32, 24, padding="reflect", delta=1), (45, 45)),
    "no blending": (_crop(32, 24, blend_overlaps=False), (70, 50)),
    # The last tile is a stride + 1 past the one before it, and their outputs still meet.
    "a last step of stride + 1": (_crop(32, 24, delta=3), (51, 51)),
    "crop and stride shorthands": ({"crop": 16, "stride": 12, "delta": 1}, (41, 30)),
}


@pytest.mark.parametrize(("params", "size"), CASES.values(), ids=CASES.keys())
def test_equals_terratorchs_tiled_inference(params: dict[str, Any], size: tuple[int, int]) -> None:
    image = _image(*size)
    expected = _terratorch(params, image)
    assert expected.shape == (CLASSES, *size)
    np.testing.assert_allclose(_ours(params, image), expected, rtol=0, atol=1e-5)


def test_padding_true_is_reflect() -> None:
    # TerraTorch passes True on to torch, which takes no boolean padding mode: compare with "reflect".
    image = _image(70, 60)
    with pytest.raises(TypeError):
        _terratorch(_crop(32, 24, padding=True), image)
    np.testing.assert_allclose(_ours(_crop(32, 24, padding=True), image), _terratorch(_crop(32, 24), image), atol=1e-5)


def _covers_every_pixel(params: dict[str, Any], size: tuple[int, int]) -> None:
    config = tiling_from_config(params, (32, 32))
    plan = plan_tiles(*size, config)
    weights = np.zeros((plan.padded_height, plan.padded_width))
    for index, (top, left) in enumerate(plan.origins):
        weights[top : top + config.h_crop, left : left + config.w_crop] += plan.weight(index)
    top, left = plan.offset
    assert (weights[top : top + size[0], left : left + size[1]] > 0).all()
    image = _image(*size)
    np.testing.assert_allclose(stitch(extract_tiles(image, plan), plan), image, atol=1e-6)


BROKEN = {
    # TerraTorch: "Some pixels did not receive a classification!" (the last tile starts one pixel
    # past where the one before it ends).
    "stride == crop, no padding, a pixel between tiles": (_crop(32, 32, padding=False), (65, 65)),
    "one pixel more than the crop": (_crop(32, 32, padding=False), (33, 40)),
    "overlap all cut by delta, a pixel between tiles": (_crop(32, 24, delta=4), (49, 70)),
    # TerraTorch: tensors of mismatched sizes (an axis shorter than the crop, the other longer).
    "one axis shorter than the crop": (_crop(32, 24), (20, 90)),
}


@pytest.mark.parametrize(("params", "size"), BROKEN.values(), ids=BROKEN.keys())
def test_where_terratorch_fails_every_pixel_is_covered(params: dict[str, Any], size: tuple[int, int]) -> None:
    _covers_every_pixel(params, size)
    image = _image(*size)
    assert _ours(params, image).shape == (CLASSES, *size)
    try:
        expected = _terratorch(params, image)
    except RuntimeError as error:
        pytest.skip(f"TerraTorch gives no result here to compare with ({error})")
    np.testing.assert_allclose(_ours(params, image), expected, atol=1e-5)  # a TerraTorch that got fixed


@pytest.mark.parametrize(("params", "size"), [(_crop(32, 32), (64, 96)), (_crop(32, 32), (70, 50)),
                                              (_crop(32, 24, delta=0), (45, 45))])
def test_padding_by_a_delta_of_0_is_not_empty(params: dict[str, Any], size: tuple[int, int]) -> None:
    """delta 0 (stride == crop shrinks it to 0) and TerraTorch crops its padded result with [0:-0]:
    nothing. Padding by 0 is no padding: the result is TerraTorch's without padding."""
    image = _image(*size)
    padded = _terratorch(params, image)
    assert padded.shape[-2:] in ((0, 0), size)  # (0, 0): TerraTorch's bug, still there
    _covers_every_pixel(params, size)
    np.testing.assert_allclose(_ours(params, image), _terratorch({**params, "padding": False}, image), atol=1e-5)


@pytest.mark.parametrize(
    ("size", "crop", "stride", "cut", "expected"),
    [
        (100, 32, 24, 0, [0, 24, 48, 68]),  # every stride while below size - crop - 1, then flush
        (57, 32, 24, 0, [0, 25]),  # a last step of stride + 1 whose outputs still meet
        (57, 32, 24, 3, [0, 25]),  # ... less 3 on each side: still
        (57, 32, 24, 4, [0, 24, 25]),  # ... less 4: pixel 28 of the padded axis left out, one more tile
        (65, 32, 32, 0, [0, 32, 33]),  # no overlap: pixel 32 left out
        (33, 32, 32, 0, [0, 1]),  # TerraTorch's one tile would start at 1
        (32, 32, 24, 0, [0]),
    ],
)
def test_terratorch_starts(size: int, crop: int, stride: int, cut: int, expected: list[int]) -> None:
    assert _terratorch_starts(size, crop, stride, cut) == expected


def test_plan_pads_the_border_by_delta() -> None:
    plan = plan_tiles(70, 95, tiling_from_config(_crop(32, 24), (32, 32)))
    assert plan.config.scheme == "terratorch" and plan.config.effective_delta == 4  # 8, shrunk to (32 - 24) // 2
    assert plan.offset == (4, 4) and (plan.padded_height, plan.padded_width) == (78, 103)
    assert [top for top, left in plan.origins if left == 0] == [0, 24, 46]
    assert all(cut == (4, 4) for cut in plan.cuts)
    weight = plan.weight(0)
    assert weight.shape == (32, 32) and not weight.flags.writeable
    assert (weight[:4] == 0).all() and (weight[:, -4:] == 0).all() and (weight[4:-4, 4:-4] > 0).all()

    small = plan_tiles(20, 27, tiling_from_config(_crop(32, 24), (32, 32)))
    assert len(small) == 1 and small.offset == (6, 2) and small.flat == (True, True)
    assert (small.weight(0) > 0).all()


def test_without_padding_only_inner_tiles_are_cut() -> None:
    plan = plan_tiles(100, 80, tiling_from_config(_crop(32, 24, padding=False, delta=3), (32, 32)))
    assert plan.offset == (0, 0) and (plan.padded_height, plan.padded_width) == (100, 80)
    rows = sorted({top for top, _ in plan.origins})
    cols = sorted({left for _, left in plan.origins})
    for (top, left), cut in zip(plan.origins, plan.cuts, strict=True):
        inner = top not in (rows[0], rows[-1]) and left not in (cols[0], cols[-1])
        assert cut == ((3, 3) if inner else (0, 0))


def test_from_config_picks_the_scheme() -> None:
    assert tiling_from_config(None, (64, 64)).scheme == "grid"
    assert tiling_from_config({}, (64, 64)).scheme == "grid"  # TerraTorch runs no tiled inference then
    config = tiling_from_config({"crop": 64, "stride": 48}, (224, 224))
    assert (config.scheme, config.delta, config.effective_delta, config.padding, config.pad_border) == (
        "terratorch", 8, 8, "reflect", True)
    assert tiling_from_config({"crop": 64, "scheme": "grid"}, (224, 224)).scheme == "grid"
    assert tiling_from_config({"crop": 64, "stride": 60, "delta": 5}, (8, 8)).effective_delta == 2
    unpadded = tiling_from_config({"padding": False}, (8, 8))
    assert (unpadded.pad_border, unpadded.padding) == (False, "reflect")
    assert tiling_from_config({"padding": "replicate"}, (8, 8)).padding == "edge"
    assert tiling_from_config({"padding": False, "scheme": "grid"}, (8, 8)).padding == "constant"
    with pytest.raises(ValueError, match="delta"):
        tiling_from_config({"delta": -1}, (8, 8))
    # No stride given: TerraTorch's 192 where the crop allows it, as `terratorch predict` tiles then.
    defaulted = tiling_from_config({"h_crop": 256, "w_crop": 128}, (8, 8))
    assert (defaulted.h_stride, defaulted.w_stride) == (192, 128)
    assert tiling_from_config({"h_crop": 256, "scheme": "grid"}, (8, 8)).h_stride == 256


@pytest.mark.parametrize(("mode", "expected"), [
    ("reflect", [2, 1, 0, 1, 2, 1, 0]), ("edge", [0, 0, 0, 1, 2, 2, 2]), ("constant", [-1, -1, 0, 1, 2, -1, -1])])
def test_padded_indices_before_the_image(mode: str, expected: list[int]) -> None:
    assert padded_indices(3, 7, mode, before=2).tolist() == expected


def _config(**fields: Any) -> TilingConfig:
    return TilingConfig(**{"h_crop": 32, "w_crop": 32, "h_stride": 24, "w_stride": 24, "scheme": "terratorch", **fields})


@pytest.mark.parametrize("config", [
    _config(), _config(pad_border=False, delta=3), _config(h_stride=32, w_stride=32),
    _config(h_crop=24, h_stride=14, padding="constant", blend_overlaps=False), _config(delta=4),
], ids=["padded", "unpadded", "no overlap", "non-square", "filled gap"])
@pytest.mark.parametrize(("height", "width"), [(211, 97), (49, 70), (20, 90), (1, 1), (32, 33)])
def test_the_row_stitcher_gives_stitch_bit_for_bit(config: TilingConfig, height: int, width: int) -> None:
    plan = plan_tiles(height, width, config)
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(2, config.h_crop, config.w_crop, generator=generator) for _ in range(len(plan))]
    expected = stitch(outputs, plan)
    for chunk in (1, 3, 7, len(plan)):
        stitcher = RowStitcher(plan)
        rows: list[np.ndarray] = []
        for start in range(0, len(plan), chunk):
            for top, values in stitcher.add(outputs[start : start + chunk]):
                assert top == sum(part.shape[1] for part in rows) and values.shape[1] <= RowStitcher.ROWS
                rows.append(values)
        assert stitcher.done and stitcher.weights.shape == (config.h_crop, plan.padded_width)
        assert np.array_equal(np.concatenate(rows, axis=1), expected)
