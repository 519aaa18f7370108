"""A served request too large to hold (io/streaming.py, issue #18): which requests are streamed, that
the streamed answer is the in-memory answer bit for bit, and that the output follows the server's
output rules (checked before any model time, never overwriting, never through a link, nothing
left behind on failure)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from vllm_terratorch.core.config import parse_pretrained_cfg
from vllm_terratorch.errors import OutputPathError, RequestError
from vllm_terratorch.io.schema import GeoTiffRequest
from vllm_terratorch.io.settings import IOSettings
from vllm_terratorch.io.streaming import StreamedRequest
from vllm_terratorch.io.tasks import ClassificationPipeline, SegmentationPipeline
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_sample_geotiff

TILE = 64  # the sample model's tile; stride 48


def make(tmp_path: Path, max_pixels: int = 10_000, cls=SegmentationPipeline, task="segmentation", **settings):
    media, outputs = tmp_path / "media", tmp_path / "outputs"
    media.mkdir(parents=True, exist_ok=True)
    outputs.mkdir(parents=True, exist_ok=True)
    io = IOSettings(output_path=outputs, max_pixels=max_pixels, **settings)
    return cls(parse_pretrained_cfg(sample_pretrained_cfg(task)), torch.float32, io, str(media)), media, outputs


def payload(path: Path, **extra) -> dict:
    return {"data": str(path), "data_format": "path", "out_data_format": "path", **extra}


def outputs_for(prompts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, TILE, TILE, generator=generator) for _ in prompts]


def run(stream: StreamedRequest, outputs) -> tuple:
    offset = 0
    for start, stop in stream.chunks:
        prompts = stream.prompts(start, stop)
        assert len(prompts) == stop - start
        stream.add(outputs[offset : offset + len(prompts)])
        offset += len(prompts)
    return stream.finish()


def test_only_path_requests_over_the_limits_with_path_outputs_are_streamed(tmp_path):
    pipeline, media, _ = make(tmp_path, max_pixels=10_000)
    big = write_sample_geotiff(media / "big.tif", 150, 131)  # 19650 px > 10000
    small = write_sample_geotiff(media / "small.tif", 64, 64)
    assert StreamedRequest.open(pipeline, payload(small), "r0") is None
    assert StreamedRequest.open(pipeline, payload(big, out_data_format="b64_json"), "r1") is None
    b64 = {"data": base64.b64encode(big.read_bytes()).decode(), "data_format": "b64_json", "out_data_format": "path"}
    assert StreamedRequest.open(pipeline, b64, "r2") is None  # arrives whole: its cap stands
    assert StreamedRequest.open(pipeline, payload(media / "missing.tif"), "r3") is None  # the in-memory path says why
    assert StreamedRequest.open(pipeline, payload(tmp_path / "outside.tif"), "r4") is None
    assert StreamedRequest.open(pipeline, {"data": 1}, "r5") is None
    stream = StreamedRequest.open(pipeline, payload(big), "r6")
    assert stream is not None
    stream.abort()
    # a file over max_bytes (but few pixels) is streamed too; so is one over max_raster_bytes
    for settings in ({"max_bytes": 1024}, {"max_raster_bytes": 45_000}):
        pipeline, media, _ = make(tmp_path / next(iter(settings)), max_pixels=10**8, **settings)
        small = write_sample_geotiff(media / "small.tif", 64, 64)
        stream = StreamedRequest.open(pipeline, payload(small), "r7")
        assert stream is not None
        stream.abort()
    classify, media, _ = make(tmp_path / "cls", cls=ClassificationPipeline, task="classification")
    write_sample_geotiff(media / "big.tif", 150, 131)
    assert StreamedRequest.open(classify, payload(media / "big.tif"), "r8") is None  # JSON answers are not streamed


@pytest.mark.parametrize("encoding", ["ids", "terratorch"])
def test_a_streamed_answer_is_the_in_memory_answer(tmp_path, encoding):
    pipeline, media, outputs_dir = make(tmp_path, max_pixels=3 * 2 * TILE * TILE, mask_encoding=encoding)
    path = write_sample_geotiff(media / "scene.tif", 300, 131, seed=3)
    whole, *_ = make(tmp_path / "whole", max_pixels=10**8, mask_encoding=encoding)  # what the server holds whole
    prompts, pending = whole.prepare(path.read_bytes(), GeoTiffRequest(**payload(path)))
    outputs = outputs_for(prompts)
    expected = whole.complete(outputs, pending)

    stream = StreamedRequest.open(pipeline, payload(path), "req-1")
    assert stream.chunk_tiles == 3 and len(stream.chunks) == -(-len(prompts) // 3)
    streamed_prompts = [p for start, stop in stream.chunks for p in stream.prompts(start, stop)]
    for mine, theirs in zip(streamed_prompts, prompts, strict=True):
        for name, value in theirs["multi_modal_data"]["image"].items():
            assert torch.equal(mine["multi_modal_data"]["image"][name], value)
    stream.abort()

    stream = StreamedRequest.open(pipeline, payload(path), "req-2")
    answer = run(stream, outputs)
    assert answer.data_format == "path" and Path(answer.data) == outputs_dir / "req-2.tiff"
    assert set(answer.timings) == {"decode_s", "engine_s", "encode_s"}
    with rasterio.MemoryFile(expected).open() as want, rasterio.open(answer.data) as got:
        np.testing.assert_array_equal(got.read(), want.read())
        assert (got.crs, got.transform, got.nodata) == (want.crs, want.transform, want.nodata)
    assert sorted(p.name for p in outputs_dir.iterdir()) == ["req-2.tiff"]  # no temporary file left


def test_a_streamed_output_follows_the_output_rules(tmp_path):
    pipeline, media, outputs_dir = make(tmp_path)
    path = write_sample_geotiff(media / "scene.tif", 150, 131)
    (outputs_dir / "taken.tif").write_bytes(b"keep")
    with pytest.raises(OutputPathError, match="already exists"):  # refused before any tile is read
        StreamedRequest.open(pipeline, payload(path, out_path="taken.tif"), "r1")
    with pytest.raises(OutputPathError, match="outside"):
        StreamedRequest.open(pipeline, payload(path, out_path=str(tmp_path)), "r2")
    assert (outputs_dir / "taken.tif").read_bytes() == b"keep"

    # The folder checked at open is swapped for a link before the output is published: the write
    # stays in the folder that was checked (it is held open), never where the link points.
    (outputs_dir / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stream = StreamedRequest.open(pipeline, payload(path, out_path="sub/pred.tif"), "r3")
    prompts = [p for start, stop in stream.chunks for p in stream.prompts(start, stop)]
    os.rename(outputs_dir / "sub", outputs_dir / "sub-moved")
    os.symlink(elsewhere, outputs_dir / "sub")
    answer = run(stream, outputs_for(prompts))
    assert not list(elsewhere.iterdir())
    assert (outputs_dir / "sub-moved" / "pred.tif").exists()
    assert answer.data == str(outputs_dir / "sub" / "pred.tif")  # the name it was given, as for any output


def test_a_failed_or_abandoned_stream_leaves_nothing(tmp_path):
    pipeline, media, outputs_dir = make(tmp_path)
    path = write_sample_geotiff(media / "scene.tif", 150, 131)
    stream = StreamedRequest.open(pipeline, payload(path), "r1")
    (start, stop), *_ = stream.chunks
    bad = outputs_for(stream.prompts(start, stop))
    bad[0][0, 0, 0] = float("nan")
    with pytest.raises(RequestError, match="no valid output"):
        stream.add(bad)
    stream.abort()
    stream.abort()  # idempotent
    with pytest.raises(RequestError, match="already finished or aborted"):
        stream.prompts(start, stop)

    stream = StreamedRequest.open(pipeline, payload(path), "r2")
    stream.add(outputs_for(stream.prompts(start, stop)))
    with pytest.raises(RequestError, match="tile outputs arrived"):  # finished early: not published
        stream.finish()
    assert list(outputs_dir.iterdir()) == []
