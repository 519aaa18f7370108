"""What a request may read: local paths under the allowed folder, http(s) URLs within limits."""

from __future__ import annotations

import base64
import http.server
import os
import threading
import time

import pytest

from vllm_terratorch.errors import RequestError, SourceNotAllowedError
from vllm_terratorch.io.settings import IOSettings, load_io_settings
from vllm_terratorch.io.sources import SourcePolicy


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok":
            self._send(b"GeoTIFF bytes")
        elif self.path == "/big":
            self._send(b"x" * 5000)
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path == "/slow":
            time.sleep(3)
            try:
                self._send(b"late")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first, as the test wants
        elif self.path.startswith("/redirect-to-"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect-to-").replace("_", "/"))
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def web():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "scene.tif").write_bytes(b"scene")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", root / "link.tif")
    (root / "sub").mkdir()
    return root


def policy(media=None, domains=None, **limits) -> SourcePolicy:
    settings = IOSettings(**{"max_bytes": 1000, "url_timeout_s": 1.0, **limits})
    return SourcePolicy(settings, str(media) if media else None, domains)


def test_paths_inside_the_allowed_folder(media):
    assert policy(media).read(str(media / "scene.tif"), "path") == b"scene"
    assert policy(media).read("scene.tif", "path") == b"scene"  # relative to the folder


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../secret.txt", "outside the allowed media folder"),
        ("link.tif", "outside the allowed media folder"),  # symlink pointing out
        ("/etc/passwd", "outside the allowed media folder"),
        ("/dev/zero", "outside the allowed media folder"),
        ("sub", "not a regular file"),
        ("missing.tif", "does not exist"),
    ],
)
def test_paths_outside_or_odd_are_refused(media, path, message):
    with pytest.raises(RequestError, match=message):
        policy(media).read(path, "path")


def test_no_allowed_folder_means_no_local_reads(media):
    with pytest.raises(SourceNotAllowedError, match="--allowed-local-media-path"):
        policy(None).read(str(media / "scene.tif"), "path")


def test_devices_are_refused_even_inside_the_allowed_folder(tmp_path):
    with pytest.raises(RequestError, match="not a regular file"):
        policy("/dev").read("/dev/zero", "path")


def test_file_size_cap(media):
    (media / "large.tif").write_bytes(b"x" * 2000)
    with pytest.raises(RequestError, match="limit is 1000"):
        policy(media).read("large.tif", "path")


def test_base64(media):
    assert policy().read(base64.b64encode(b"abc").decode(), "b64_json") == b"abc"
    with pytest.raises(RequestError, match="not valid base64"):
        policy().read("***", "b64_json")
    with pytest.raises(RequestError, match="larger than the server's limit"):
        policy().read(base64.b64encode(b"x" * 2000).decode(), "b64_json")


def test_urls(web):
    assert policy().read(f"{web}/ok", "url") == b"GeoTIFF bytes"
    assert policy(domains=["127.0.0.1"]).read(f"{web}/redirect-to-_ok", "url") == b"GeoTIFF bytes"


@pytest.mark.parametrize(
    ("path", "domains", "message"),
    [
        ("/big", None, "limit is 1000"),
        ("/big-undeclared", None, "larger than the server's limit"),
        ("/slow", None, "timed out"),
        ("/missing", None, "HTTP 404"),
        ("/loop", None, "redirects"),
        ("/ok", ["example.org"], "not in the server's --allowed-media-domains"),
        ("/redirect-to-http:__localhost:1_x", ["127.0.0.1"], "'localhost' is not in the server's --allowed-media-domains"),
    ],
)
def test_url_limits(web, path, domains, message):
    with pytest.raises(RequestError, match=message):
        policy(domains=domains).read(f"{web}{path}", "url")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.tif", "gopher://x", "/etc/passwd"])
def test_only_http_urls(url):
    with pytest.raises(SourceNotAllowedError, match="scheme"):
        policy().read(url, "url")


def test_unreachable_host():
    with pytest.raises(RequestError, match="cannot download"):
        policy().read("http://127.0.0.1:1/x.tif", "url")


def test_settings_json(tmp_path):
    settings = load_io_settings(f'{{"output_path": "{tmp_path / "out"}", "max_pixels": 10}}')
    assert settings.max_pixels == 10 and (tmp_path / "out").is_dir()
    with pytest.raises(ValueError, match="VLLM_TERRATORCH_IO_CONFIG"):
        load_io_settings('{"max_pixels": -1}')
    with pytest.raises(ValueError, match="VLLM_TERRATORCH_IO_CONFIG"):
        load_io_settings('{"unknown": 1}')
