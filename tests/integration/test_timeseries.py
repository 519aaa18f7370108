"""A multi-temporal Prithvi (`prithvi_eo_v2_tiny_tl`, 3 frames, time + location encodings) served
from files: `data` is a list of GeoTIFFs in time order (one per frame), through `vllm serve` and our
segmentation processor, `predict`, and (a pixel-wise regression fine-tune of the same backbone)
offline `LLM.encode`. Every answer equals a plain PyTorch forward of that request's own frames and
dates; bad series are 400s and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import numpy as np
import pytest
import rasterio
import torch

from reference import assert_same_classes, normalised_scene

from vllm_terratorch.testing.launcher import Server
from vllm_terratorch.testing.samples import MEANS, STDS, build_sample_task, sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
FRAMES = 3
CFG = sample_pretrained_cfg("segmentation", frames=FRAMES)
REGRESSION_CFG = sample_pretrained_cfg("regression", frames=FRAMES)
REQUESTS = 10
ARGS = ["--io-processor-plugin", "terratorch_segmentation", "--model-impl", "terratorch", "--skip-tokenizer-init", "--enforce-eager"]


def series_dates(k: int) -> list[date]:
    """Request k's frames: different dates for every request (and a year boundary in one)."""
    first = date(2023, 12, 1) + timedelta(days=17 * k)
    return [first + timedelta(days=40 * t) for t in range(FRAMES)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("timeseries")
    (root / "media").mkdir()
    write_model_folder(root / "model", CFG)
    write_model_folder(root / "regression", REGRESSION_CFG)
    for k in range(REQUESTS):
        for t, day in enumerate(series_dates(k)):
            write_sample_geotiff(root / "media" / f"r{k}_t{t}.tif", 64, 64, seed=100 * k + t, date=day.isoformat())
    write_sample_geotiff(root / "media" / "shifted.tif", 64, 64, seed=7, origin=(725030.0, 4375000.0), date="2024-05-01")
    for t in range(FRAMES):
        write_sample_geotiff(root / "media" / f"undated_{t}.tif", 64, 64, seed=50 + t)
    return root


@pytest.fixture(scope="module")
def server(workdir):
    server = Server(workdir / "model", [*ARGS, "--allowed-local-media-path", str(workdir / "media")], workdir / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def frames_of(workdir, k: int) -> list[str]:
    return [str(workdir / "media" / f"r{k}_t{t}.tif") for t in range(FRAMES)]


def reference(workdir, k: int, cfg: dict = CFG) -> np.ndarray:
    """Plain PyTorch: each frame normalised as the datamodule does, stacked on the time axis; the
    first frame's centre as location_coords; (year, day of year - 1) per frame. The segmentation
    model's logits (K, H, W), or the regression model's values (H, W)."""
    scenes = [normalised_scene(path, MEANS, STDS) for path in frames_of(workdir, k)]
    image = torch.stack([pixels[0] for pixels, _ in scenes], dim=1)[None]  # (1, C, T, H, W)
    temporal = torch.tensor([[[d.year, d.timetuple().tm_yday - 1] for d in series_dates(k)]], dtype=torch.float32)
    network = build_sample_task(cfg).model
    with torch.no_grad():
        return network(image, location_coords=scenes[0][1], temporal_coords=temporal).output[0].numpy()


def read_band(encoded: str) -> np.ndarray:
    with rasterio.open(io.BytesIO(base64.b64decode(encoded))) as source:
        return source.read(1)


def values(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return read_band(response.json()["data"]["data"])


def test_concurrent_series_each_get_their_own_frames_and_dates(server, workdir):
    def ask(k: int):
        if k == 0:  # inline frames: their dates come from the file tags as well; also given in `dates`
            items = [base64.b64encode(open(path, "rb").read()).decode() for path in frames_of(workdir, k)]
            data = {"data": items, "data_format": "b64_json", "dates": [d.isoformat() for d in series_dates(k)]}
        else:
            data = {"data": frames_of(workdir, k), "data_format": "path"}
        return server.pooling(data | {"out_data_format": "b64_json"})

    with ThreadPoolExecutor(REQUESTS) as pool:
        responses = list(pool.map(ask, range(REQUESTS)))
    answers = [values(response) for response in responses]
    for k, answer in enumerate(answers):
        logits = reference(workdir, k)
        assert answer.shape == logits.shape[1:] == (64, 64)
        assert_same_classes(answer, logits)
    assert any(not np.array_equal(answers[1], other) for other in answers[2:])  # different series, different answers


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda w: {"data": frames_of(w, 0)[:2], "data_format": "path"}, "takes 3 frames"),
        (lambda w: {"data": frames_of(w, 0)[0], "data_format": "path"}, "takes 3 frames"),
        (lambda w: {"data": [frames_of(w, 0)[0], str(w / "media" / "shifted.tif"), frames_of(w, 0)[2]],
                    "data_format": "path"}, "input 2 is not on input 1's grid"),
        (lambda w: {"data": [str(w / "media" / f"undated_{t}.tif") for t in range(FRAMES)], "data_format": "path"},
         "no TIFFTAG_DATETIME tag and no date in its name"),
        (lambda w: {"data": frames_of(w, 0), "data_format": "path", "dates": ["2024-01-01"]}, "'dates' has 1 dates"),
        (lambda w: {"data": frames_of(w, 0), "data_format": "path", "dates": ["not a date"] * 3}, "data.dates"),
    ],
    ids=["two-frames", "one-file", "other-grid", "no-dates", "dates-count", "dates-bad"],
)
def test_bad_series_are_rejected_and_the_server_keeps_serving(server, workdir, data, message):
    response = server.pooling(data(workdir) | {"out_data_format": "b64_json"})
    assert response.status_code == 400, response.text
    assert message in json.dumps(response.json())
    good = server.pooling({"data": frames_of(workdir, 3), "data_format": "path", "out_data_format": "b64_json"})
    assert_same_classes(values(good), reference(workdir, 3))


def test_offline_encode_of_a_regression_series_equals_a_plain_forward(workdir):
    """A pixel-wise regression fine-tune of the same backbone through offline `LLM.encode` and our
    regression processor (frames inline, dates in their tags; one also given in `dates`)."""
    from helpers import engine

    inline = {k: [base64.b64encode(open(path, "rb").read()).decode() for path in frames_of(workdir, k)] for k in (4, 5)}
    prompts = [{"data": {"data": inline[4], "data_format": "b64_json", "out_data_format": "b64_json"}},
               {"data": {"data": inline[5], "data_format": "b64_json", "out_data_format": "b64_json",
                         "dates": [d.isoformat() for d in series_dates(5)]}}]
    with engine(workdir / "regression", io_processor_plugin="terratorch_regression") as llm:
        outputs = [llm.encode(prompt, pooling_task="plugin", use_tqdm=False)[0].outputs for prompt in prompts]
    for k, output in zip((4, 5), outputs):
        answer, expected = read_band(output.data), reference(workdir, k, REGRESSION_CFG)
        assert answer.shape == expected.shape == (64, 64)
        # 1e-4, plus float32 rounding of values up to ~12 (batched vs single forwards sum in another order)
        assert np.abs(answer - expected).max() <= 1e-4 + 1e-5 * np.abs(expected).max(), k


def test_predict_reads_folders_of_frames_and_equals_the_server(server, workdir, tmp_path):
    """`vllm-terratorch predict` on folders of frames (the layout detected from the model): one mask
    per series, as the plain forward and the server give it."""
    served = {k: values(server.pooling({"data": frames_of(workdir, k), "data_format": "path", "out_data_format": "b64_json"}))
              for k in (5, 6)}

    scenes = tmp_path / "scenes"
    for k in (5, 6):  # one folder per series; name order is time order
        (scenes / f"series{k}").mkdir(parents=True)
        for t, path in enumerate(frames_of(workdir, k)):
            (scenes / f"series{k}" / f"t{t}_{series_dates(k)[t].isoformat()}.tif").write_bytes(open(path, "rb").read())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vllm_terratorch.predict.main", str(workdir / "model"), "--input", str(scenes),
               "--output", str(out), "--dtype", "float32", "--workers", "1", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for k in (5, 6):
        with rasterio.open(out / f"series{k}_pred.tif") as predicted:
            mask = predicted.read(1)  # batched with the other series
        assert_same_classes(mask, reference(workdir, k))
        assert (mask == served[k]).mean() >= 0.999, k
