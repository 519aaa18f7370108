"""Hostile input against one real server: every bad request gets a 4xx naming the problem, the
next good request still succeeds, nothing is read or written outside what was allowed, and
concurrent requests each get their own result."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rasterio
import requests

from vllm_terratorch.envs import RESERVED_CPUS
from vllm_terratorch.testing.launcher import DOCUMENTED, Server
from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder, write_sample_geotiff

pytestmark = pytest.mark.integration
MAX_PIXELS = 300 * 300
MAX_BYTES = 3_000_000
MAX_RASTER_BYTES = MAX_PIXELS * 6 * 4  # six float32 bands of the largest allowed image


class Media(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/huge":
            self.send_response(200)
            self.end_headers()
            for _ in range(MAX_BYTES // 65536 + 2):
                self.wfile.write(b"\0" * 65536)
        elif self.path == "/trickle":  # 2 bytes/s for a minute, as long as the client listens
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(120):
                    self.wfile.write(b"II")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
        elif self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "http://localhost:%d/tile.tif" % self.server.server_address[1])
            self.end_headers()
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    media, outputs, private = root / "media", root / "outputs", root / "private"
    for folder in (media, outputs, private):
        folder.mkdir()
    write_model_folder(root / "model", sample_pretrained_cfg("segmentation"))
    write_sample_geotiff(media / "tile.tif", 64, 64, seed=1)
    write_sample_geotiff(media / "scene.tif", 90, 110, seed=2)
    write_sample_geotiff(media / "pixel.tif", 1, 1, seed=3)
    write_sample_geotiff(media / "four.tif", 64, 64, bands=4, seed=4)
    write_sample_geotiff(media / "large.tif", 301, 300, seed=5)
    write_sample_geotiff(private / "secret.tif", 64, 64, seed=6)
    os.symlink(private / "secret.tif", media / "link.tif")
    (media / "folder").mkdir()
    data = write_sample_geotiff(root / "float.tif", 64, 64, seed=7)
    with rasterio.open(data) as source:
        profile, pixels = source.profile, source.read().astype(np.float32)
    profile.update(dtype="float32", nodata=None)
    for name, value in (("nan.tif", np.nan), ("inf.tif", np.inf)):
        bad = pixels.copy()
        bad[:, 10:20, 10:20] = value
        with rasterio.open(media / name, "w", **profile) as target:
            target.write(bad)
    profile.update(dtype="complex64")
    with rasterio.open(media / "complex.tif", "w", **profile) as target:
        target.write(pixels.astype(np.complex64))
    plain = {k: v for k, v in profile.items() if k not in ("crs", "transform")}
    plain.update(dtype="float32")
    with rasterio.open(media / "nocrs.tif", "w", **plain) as target:
        target.write(pixels)
    tiff = (media / "tile.tif").read_bytes()
    (media / "truncated.tif").write_bytes(tiff[: len(tiff) // 3])
    (media / "taken.tif").write_bytes(b"")
    (outputs / "taken.tif").write_bytes(b"do not overwrite")
    # Header bombs: tiny files that declare far more pixels than they hold.
    bomb = {"driver": "GTiff", "width": 64, "height": 64, "crs": "EPSG:32629", "compress": "deflate",
            "transform": rasterio.transform.from_origin(725000.0, 4375000.0, 30.0, 30.0)}
    with rasterio.open(media / "bands5000.tif", "w", count=5000, dtype="uint8", **bomb) as target:
        target.write(np.zeros((5000, 64, 64), dtype=np.uint8))
    with rasterio.open(media / "float64.tif", "w", count=6, dtype="float64", **{**bomb, "width": 300, "height": 300}) as target:
        target.write(np.zeros((6, 300, 300)))
    # Links inside the output folder that lead outside it, at every level.
    (outputs / "a").mkdir()
    os.symlink(private, outputs / "escape")
    os.symlink(private, outputs / "a" / "escape")
    os.symlink(private / "planted.tif", outputs / "a" / "dangling.tif")
    return root


@pytest.fixture(scope="module")
def web(site):
    handler = functools.partial(Media, directory=str(site / "media"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "port": httpd.server_address[1], "silent": silent.getsockname()[1]}
    httpd.shutdown()
    silent.close()


@pytest.fixture(scope="module")
def server(site):
    settings = {
        "output_path": str(site / "outputs"), "max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES, "url_timeout_s": 2,
        "max_raster_bytes": MAX_RASTER_BYTES,
    }
    args = [*DOCUMENTED, "--allowed-local-media-path", str(site / "media"), "--allowed-media-domains", "127.0.0.1"]
    # One forward thread (the user's explicit setting wins over our every-core default): the isolation
    # checks below compare masks of differently batched requests bit for bit, which only a one-thread
    # forward guarantees; the default itself is served by test_serving, test_whole_scenes and the rest.
    env = {"VLLM_TERRATORCH_IO_CONFIG": json.dumps(settings), RESERVED_CPUS: "1"}
    server = Server(site / "model", args, site / "server.log", env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(data, fmt="path", out="b64_json", **extra):
    return {"data": data, "data_format": fmt, "out_data_format": out, **extra}


# (case id, request data (callable of (site, web) or a dict), expected words in the message)
CASES = [
    ("data-not-object", lambda s, w: "tile.tif", "must be an object"),
    ("data-missing", lambda s, w: {"data_format": "path", "out_data_format": "path"}, "data.data"),
    ("data-empty", lambda s, w: request(""), "data.data"),
    ("data-number", lambda s, w: request(12), "data.data"),
    ("format-missing", lambda s, w: {"data": "tile.tif", "out_data_format": "path"}, "data.data_format"),
    ("format-unknown", lambda s, w: request("tile.tif", fmt="s3"), "data.data_format"),
    ("out-format-unknown", lambda s, w: request("tile.tif", out="png"), "data.out_data_format"),
    ("image-format-unknown", lambda s, w: request("tile.tif", image_format="jpeg"), "data.image_format"),
    ("indices-negative", lambda s, w: request("tile.tif", indices=[-1, 0, 1, 2, 3, 4]), "indices"),
    ("indices-empty", lambda s, w: request("tile.tif", indices=[]), "indices"),
    ("indices-out-of-range", lambda s, w: request("tile.tif", indices=[0, 1, 2, 3, 4, 9]), "has 6 bands"),
    ("indices-too-few", lambda s, w: request("tile.tif", indices=[0, 1, 2]), "bands"),
    ("b64-invalid", lambda s, w: request("%%% not base64 %%%", fmt="b64_json"), "not valid base64"),
    ("b64-not-tiff", lambda s, w: request(b64(b"hello, world"), fmt="b64_json"), "not a readable GeoTIFF"),
    ("b64-truncated", lambda s, w: request(b64((s / "media" / "truncated.tif").read_bytes()), fmt="b64_json"), "not a readable GeoTIFF"),
    ("b64-too-large", lambda s, w: request("A" * (MAX_BYTES * 2), fmt="b64_json"), "limit"),
    ("empty-file", lambda s, w: request("taken.tif"), "empty"),
    ("wrong-band-count", lambda s, w: request("four.tif"), "4 bands"),
    ("complex-pixels", lambda s, w: request("complex.tif"), "complex"),
    ("too-many-pixels", lambda s, w: request("large.tif"), f"limit is {MAX_PIXELS} pixels"),
    ("infinite-pixels", lambda s, w: request("inf.tif"), "NaN or infinite"),
    ("no-crs-for-coords", lambda s, w: request("nocrs.tif"), "no usable CRS"),
    ("path-dotdot", lambda s, w: request("../private/secret.tif"), "outside the allowed media folder"),
    ("path-symlink-out", lambda s, w: request("link.tif"), "outside the allowed media folder"),
    ("path-absolute-elsewhere", lambda s, w: request(str(s / "private" / "secret.tif")), "outside the allowed media folder"),
    ("path-etc-passwd", lambda s, w: request("/etc/passwd"), "outside the allowed media folder"),
    ("path-dev-zero", lambda s, w: request("/dev/zero"), "outside the allowed media folder"),
    ("path-directory", lambda s, w: request("folder"), "not a regular file"),
    ("path-missing", lambda s, w: request("nothing-here.tif"), "does not exist"),
    ("url-file", lambda s, w: request("file:///etc/passwd", fmt="url"), "scheme 'file'"),
    ("url-ftp", lambda s, w: request("ftp://127.0.0.1/tile.tif", fmt="url"), "scheme 'ftp'"),
    ("url-not-a-url", lambda s, w: request("tile.tif", fmt="url"), "scheme"),
    ("url-host-not-allowed", lambda s, w: request(f"http://localhost:{w['port']}/tile.tif", fmt="url"), "allowed-media-domains"),
    ("url-redirect-not-allowed", lambda s, w: request(f"{w['base']}/redirect/x", fmt="url"), "allowed-media-domains"),
    ("url-never-answers", lambda s, w: request(f"http://127.0.0.1:{w['silent']}/tile.tif", fmt="url"), "timed out"),
    ("url-too-large", lambda s, w: request(f"{w['base']}/huge", fmt="url"), "limit"),
    ("url-404", lambda s, w: request(f"{w['base']}/missing.tif", fmt="url"), "HTTP 404"),
    ("url-refused", lambda s, w: request("http://127.0.0.1:1/tile.tif", fmt="url"), "cannot download"),
    ("out-path-absolute", lambda s, w: request("tile.tif", out="path", out_path="/tmp/evil.tif"), "outside the server's output folders"),
    ("out-path-absolute-missing", lambda s, w: request("tile.tif", out="path", out_path="/nonexistent/path/that/does/not/exist"), "outside"),
    ("out-path-private-dir", lambda s, w: request("tile.tif", out="path", out_path=str(s / "private")), "outside"),
    ("out-path-dotdot", lambda s, w: request("tile.tif", out="path", out_path="../evil.tif"), "without '..'"),
    ("out-path-link-first", lambda s, w: request("tile.tif", out="path", out_path="escape/evil.tif"), "outside"),
    ("out-path-link-middle", lambda s, w: request("tile.tif", out="path", out_path="a/escape/deeper/evil.tif"), "outside"),
    ("out-path-link-last", lambda s, w: request("tile.tif", out="path", out_path="a/escape"), "outside"),
    ("out-path-link-dangling", lambda s, w: request("tile.tif", out="path", out_path="a/dangling.tif"), "outside"),
    ("out-path-below-file", lambda s, w: request("tile.tif", out="path", out_path="taken.tif/x.tif"), "is a file"),
    ("out-path-too-long", lambda s, w: request("tile.tif", out="path", out_path="x" * 300 + ".tif"), "longer than"),
    ("out-path-nul", lambda s, w: request("tile.tif", out="path", out_path="x\0.tif"), "not a usable path"),
    ("header-bomb-bands", lambda s, w: request("bands5000.tif"), "5000 bands"),
    ("header-bomb-bands-indices", lambda s, w: request("bands5000.tif", indices=[0, 1, 2, 3, 4, 5]), "declares 5000 bands"),
    ("header-bomb-dtype", lambda s, w: request("float64.tif"), f"limit is {MAX_RASTER_BYTES} bytes"),
    ("url-trickle", lambda s, w: request(f"{w['base']}/trickle", fmt="url"), "took longer than 2 s"),
    ("out-path-existing", lambda s, w: request("tile.tif", out="path", out_path="taken.tif"), "already exists"),
    ("out-path-with-b64", lambda s, w: request("tile.tif", out="b64_json", out_path="x.tif"), "only used with"),
]


def good(server):
    response = server.pooling(request("tile.tif"))
    assert response.status_code == 200, response.text
    return response


def mask_of(response) -> np.ndarray:
    with rasterio.open(io.BytesIO(base64.b64decode(response.json()["data"]["data"]))) as source:
        return source.read()


@pytest.mark.parametrize(("case", "build", "words"), CASES, ids=[case[0] for case in CASES])
def test_bad_request_is_rejected_clearly(server, site, web, case, build, words):
    response = server.pooling(build(site, web))
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert words in response.json()["error"]["message"], response.text
    good(server)


def test_malformed_json_and_unknown_model(server):
    broken = requests.post(f"{server.url}/pooling", data=b'{"data": {', headers={"Content-Type": "application/json"}, timeout=30)
    assert 400 <= broken.status_code < 500
    unknown = requests.post(f"{server.url}/pooling", json={"data": request("tile.tif"), "model": "other-model"}, timeout=30)
    assert 400 <= unknown.status_code < 500 and "other-model" in unknown.text
    good(server)


@pytest.mark.parametrize("name", ["pixel.tif", "nan.tif"])
def test_edge_images_work(server, name):
    # A 1x1 image is padded to one tile; NaN pixels become the datamodule's no_data_replace.
    response = server.pooling(request(name))
    assert response.status_code == 200, response.text
    with rasterio.open(server_media(server) / name) as source:
        assert mask_of(response).shape == (1, source.height, source.width)


def server_media(server):
    return server.log_path.parent / "media"


def test_concurrent_mixed_requests_each_get_their_own_result(server, site, web):
    tiff = (site / "media" / "scene.tif").read_bytes()
    variants = [
        request("tile.tif"),
        request("scene.tif"),
        request(b64(tiff), fmt="b64_json"),
        request(f"{web['base']}/pixel.tif", fmt="url"),
        request("tile.tif", indices=[0, 1, 2, 3, 4, 5]),
        request("scene.tif", indices=[5, 4, 3, 2, 1, 0]),
    ]
    singles = [mask_of(server.pooling(v)) for v in variants]
    order = [i % len(variants) for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: server.pooling(variants[i], timeout=300), order))
    for index, response in zip(order, responses):
        assert response.status_code == 200, response.text
        assert np.array_equal(mask_of(response), singles[index])
    assert not np.array_equal(singles[4], singles[5][:, :64, :64])  # band order matters


def test_outputs_only_where_asked_and_nothing_overwritten(server, site):
    before = {p.name for p in (site / "outputs").iterdir()}
    response = server.pooling(request("tile.tif", out="path", out_path="mine/result.tif"))
    assert response.status_code == 200, response.text
    assert response.json()["data"]["data"] == str(site / "outputs" / "mine" / "result.tif")
    again = server.pooling(request("tile.tif", out="path", out_path="mine/result.tif"))
    assert again.status_code == 400 and "already exists" in again.text
    assert (site / "outputs" / "taken.tif").read_bytes() == b"do not overwrite"
    after = {p.name for p in (site / "outputs").iterdir()}
    assert after - before == {"mine"}
    assert not list((site / "outputs").rglob(".partial-*"))
    assert sorted(p.name for p in (site / "private").iterdir()) == ["secret.tif"]


def _process_stats(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kb = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    return fds, rss_kb


def test_resources_stay_flat_over_many_requests(server, site):
    pid = server.process.pid  # the API server process (IO processors run here)
    for _ in range(20):
        good(server)
    fds_before, rss_before = _process_stats(pid)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: server.pooling(request("tile.tif" if i % 2 else "scene.tif")).status_code, range(480)))
    assert statuses.count(200) == 480  # 500 requests with the warm-up
    fds_after, rss_after = _process_stats(pid)
    assert fds_after <= fds_before + 5, (fds_before, fds_after)
    assert rss_after <= rss_before + 150_000, (rss_before, rss_after)  # kB
    assert not [p for p in (site / "outputs").rglob("*") if p.name.startswith(".partial-")]
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


def test_failures_under_load_fail_only_their_own_requests(server):
    expected = mask_of(good(server))
    kinds = ["tile.tif", "inf.tif", "tile.tif", "four.tif", "tile.tif", "truncated.tif"] * 5
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda name: server.pooling(request(name)), kinds))
    for name, response in zip(kinds, responses):
        if name == "tile.tif":
            assert response.status_code == 200, response.text
            assert np.array_equal(mask_of(response), expected)
        else:
            assert response.status_code == 400, response.text
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200


def test_upstream_payload_fields_are_accepted(server):
    """TerraTorch's tests send image_format "", vLLM's examples "tiff" and a top-level priority;
    fields we do not read are ignored, as upstream's processors ignore them."""
    expected = mask_of(good(server))
    for extra in ({"image_format": ""}, {"image_format": "tiff"}, {"image_format": "GeoTIFF"}, {"colour": "red"}):
        response = server.pooling(request("tile.tif", **extra))
        assert response.status_code == 200, (extra, response.text)
        assert np.array_equal(mask_of(response), expected)
    for top in ({"priority": 0, "softmax": False}, {"use_activation": False}, {"softmax": True}):
        payload = {"data": request("tile.tif", image_format="tiff"), "model": server.model, **top}
        response = requests.post(f"{server.url}/pooling", json=payload, timeout=120)
        assert response.status_code == 200, (top, response.text)
        assert np.array_equal(mask_of(response), expected)


def test_no_hostile_request_gets_a_server_error_even_all_at_once(server, site, web):
    """The sweep: every hostile request of this suite, concurrently; each a 4xx, never a 5xx."""
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda case: server.pooling(case[1](site, web), timeout=120), CASES))
    errors = {case[0]: r.status_code for case, r in zip(CASES, responses) if not 400 <= r.status_code < 500}
    assert errors == {}
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    good(server)


def test_no_link_or_bad_out_path_wrote_anything_outside(server, site):
    for case in ("escape/evil.tif", "a/escape/deeper/evil.tif", "a/escape", "a/dangling.tif"):
        assert server.pooling(request("tile.tif", out="path", out_path=case)).status_code == 400
    assert sorted(p.name for p in (site / "private").iterdir()) == ["secret.tif"]
    assert (site / "outputs" / "taken.tif").read_bytes() == b"do not overwrite"
    assert not list((site / "outputs").rglob(".partial-*"))


def test_header_bombs_are_refused_before_decoding(server):
    """5000 declared bands: refused from the header, so the server's memory does not move."""
    pid = server.process.pid
    good(server)
    _, rss_before = _process_stats(pid)
    for _ in range(5):
        response = server.pooling(request("bands5000.tif", indices=[0, 1, 2, 3, 4, 5]))
        assert response.status_code == 400 and "declares 5000 bands" in response.text
    _, rss_after = _process_stats(pid)
    assert rss_after - rss_before < 50_000, (rss_before, rss_after)  # kB; one decode would take 20 MB
    good(server)


def test_a_trickling_download_stalls_nobody(server, web):
    """While two clients' inputs trickle in at 2 bytes/s, /health and 20 other requests are answered;
    the trickling ones are refused at the server's url_timeout_s (2 s), not when the sender stops."""
    expected = mask_of(good(server))
    with ThreadPoolExecutor(24) as pool:
        started = time.monotonic()
        slow = [pool.submit(server.pooling, request(f"{web['base']}/trickle", fmt="url")) for _ in range(2)]
        time.sleep(0.3)
        assert requests.get(f"{server.url}/health", timeout=3).status_code == 200
        others = list(pool.map(lambda _: server.pooling(request("tile.tif"), timeout=60), range(20)))
        for response in others:
            assert response.status_code == 200, response.text
            assert np.array_equal(mask_of(response), expected)
        for future in slow:
            response = future.result()
            assert response.status_code == 400 and "took longer than 2 s" in response.text, response.text
        assert time.monotonic() - started < 30  # the sender would go on for 60 s
