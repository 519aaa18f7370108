"""`online.py --mix`: a realistic mix of requests, and where each one's time goes.

Scenes of several sizes and aspect ratios (256²..2048² by default), DEFLATE-compressed as
satellite GeoTIFFs usually are, so decoding costs what it would. Each scene is sent both ways, in
turn: as a URL (downloaded by the server from a loopback HTTP server in this process, the only
host the server is allowed to fetch from here) and inline as base64. Each answer's time is split
into what the IO processor reports (`decode_s`: read, decode, normalise, tile; `engine_s`: from
tiles ready to outputs back, so queueing for the engine and the forwards; `encode_s`: stitch and
encode) and the rest (`outside_s`: HTTP, vLLM's request parsing and its hand-offs between threads,
the download's wait for an IO thread).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import summary
from online_load import Answer, Payload, b64_request
from server_meters import shares

PARTS = ("decode_s", "queue_engine_s", "encode_s", "outside_s")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"256x256,512x384" -> [(256, 256), (512, 384)] (height x width)."""
    shapes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            height, width = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--mix-sizes: {item!r} is not HxW (e.g. 512x384)") from None
        shapes.append((height, width))
    if not shapes:
        raise SystemExit("--mix-sizes: give at least one HxW")
    return shapes


def write_compressed_scene(path: Path, height: int, width: int, seed: int) -> Path:
    """A sample scene (testing/samples.py), rewritten with DEFLATE and a predictor, as COGs are."""
    import rasterio.shutil

    from vllm_terratorch.testing.samples import write_sample_geotiff

    plain = write_sample_geotiff(path.with_suffix(".plain.tif"), height, width, seed=seed)
    rasterio.shutil.copy(plain, path, driver="GTiff", compress="deflate", predictor=2)
    plain.unlink()
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def split(answer: Answer) -> dict[str, float]:
    """An answer's time in PARTS (outside_s: what the IO processor's timings do not cover)."""
    decode, engine, encode = (answer.timings.get(key, 0.0) for key in ("decode_s", "engine_s", "encode_s"))
    return {"decode_s": decode, "queue_engine_s": engine, "encode_s": encode,
            "outside_s": max(0.0, answer.latency_s - decode - engine - encode)}


def grouped(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median latency and median of each part, per value of `key` (a shape or a format)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    return {name: {"requests": len(group), **{f"{part}_p50": summary([r[part] for r in group])["p50"]
                                              for part in ("latency_s", *PARTS)}}
            for name, group in groups.items()}


@dataclass
class Mix:
    payloads: list[Payload]
    shapes: list[tuple[int, int]]
    httpd: http.server.ThreadingHTTPServer

    @classmethod
    def prepare(cls, folder: Path, sizes: str, model: str) -> Mix:
        """Write the scenes, bind the loopback HTTP server (served by `serving`), build the payloads:
        scene by scene, the URL request then the base64 one."""
        folder.mkdir(parents=True, exist_ok=True)
        shapes = parse_sizes(sizes)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        payloads = []
        for index, (height, width) in enumerate(shapes):
            path = write_compressed_scene(folder / f"mix{index}-{height}x{width}.tif", height, width, seed=100 + index)
            label = {"shape": f"{height}x{width}", "megapixels": round(height * width / 1e6, 3)}
            url = {"data": f"{base}/{path.name}", "data_format": "url", "out_data_format": "b64_json", "image_format": "geoTiff"}
            payloads.append(Payload.of(model, url, format="url", **label))
            payloads.append(Payload.of(model, b64_request(path), format="b64", **label))
        return cls(payloads, shapes, httpd)

    @staticmethod
    def serve_args() -> list[str]:
        """The server may download from the loopback host only."""
        return ["--allowed-media-domains", "127.0.0.1"]

    @contextmanager
    def serving(self) -> Iterator[None]:
        thread = threading.Thread(target=self.httpd.serve_forever, name="mix-http", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()

    @staticmethod
    def describe(answers: list[Answer]) -> dict[str, Any]:
        """A mix level's per-request split, its medians per shape and per format, and the share
        of all request time each part took."""
        rows = [{**answer.label, "latency_s": round(answer.latency_s, 4), **{k: round(v, 4) for k, v in split(answer).items()}}
                for answer in answers if answer.ok]
        totals = {part: sum(row[part] for row in rows) for part in PARTS}
        return {"time_shares": shares(totals), "by_shape": grouped(rows, "shape"), "by_format": grouped(rows, "format"),
                "per_request": rows}

    def describe_run(self, levels: list[dict[str, Any]]) -> dict[str, Any]:
        return {"shapes": [f"{h}x{w}" for h, w in self.shapes], "formats": ["url", "b64"], "compression": "deflate",
                "megapixels_per_scene_mean": round(sum(h * w for h, w in self.shapes) / len(self.shapes) / 1e6, 3),
                "levels": levels}
