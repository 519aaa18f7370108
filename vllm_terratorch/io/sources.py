"""Fetch the bytes a request points at, within what the server allows.

Local paths must lie under vLLM's `--allowed-local-media-path` (after resolving symlinks and `..`)
and be regular files; URLs must be http(s), and when vLLM's `--allowed-media-domains` is set, every
hop (redirects included) must be to one of those hosts; every source is capped in size and time.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from vllm_terratorch.errors import RequestError, SourceNotAllowedError
from vllm_terratorch.io.settings import IOSettings

_CHUNK = 1 << 20


class SourcePolicy:
    """What a request may read: vLLM's media settings plus our size and time limits."""

    def __init__(self, settings: IOSettings, allowed_local_path: str | None, allowed_domains: list[str] | None) -> None:
        self.settings = settings
        self.allowed_root = Path(os.path.realpath(allowed_local_path)) if allowed_local_path else None
        self.allowed_domains = {d.lower() for d in allowed_domains} if allowed_domains else None
        self._download_slots = threading.BoundedSemaphore(settings.max_concurrent_downloads)

    def read(self, data: str, data_format: str) -> bytes:
        if data_format == "b64_json":
            return self.decode_base64(data)
        if data_format == "path":
            return self.read_path(data)
        if data_format == "url":
            return self.download(data)
        raise RequestError(f"unknown data_format {data_format!r}; expected url, path or b64_json")

    def decode_base64(self, text: str) -> bytes:
        if len(text) > self.settings.max_bytes * 4 // 3 + 4:
            raise RequestError(f"the base64 payload is larger than the server's limit of {self.settings.max_bytes} bytes")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("data is not valid base64 (data_format b64_json expects a base64-encoded GeoTIFF)") from None

    def _local(self, text: str) -> Path:
        """`text` resolved (symlinks and `..`), refused unless it lies under the allowed media folder."""
        if self.allowed_root is None:
            raise SourceNotAllowedError(
                "this server reads no local files: start it with --allowed-local-media-path DIR to allow "
                "data_format 'path' for files under DIR, or send the image as b64_json"
            )
        candidate = Path(text)
        if not candidate.is_absolute():
            candidate = self.allowed_root / candidate
        resolved = Path(os.path.realpath(candidate))
        if not resolved.is_relative_to(self.allowed_root):
            raise SourceNotAllowedError(f"path {text!r} is outside the allowed media folder {self.allowed_root}")
        return resolved

    def read_modality_folder(self, text: str, modalities: list[str]) -> list[bytes]:
        """Upstream's multi-modal layout: a folder with one sub-folder per modality, one file in each."""
        return [self.read_path(str(path)) for path in modality_files(self._local(text), modalities, text)]

    def _unreadable(self, text: str, error: OSError) -> RequestError:
        if isinstance(error, FileNotFoundError):
            return RequestError(f"path {text!r} does not exist under {self.allowed_root}")
        return RequestError(f"path {text!r} cannot be read: {error.strerror}")

    def local_file(self, text: str) -> Path:
        """A `path` input checked as `read_path` checks it, but not read (nor size-limited): for a scene
        read window by window."""
        resolved = self._local(text)
        try:
            info = os.stat(resolved)
        except OSError as error:
            raise self._unreadable(text, error) from None
        if not stat.S_ISREG(info.st_mode):
            raise RequestError(f"path {text!r} is not a regular file")
        return resolved

    def read_path(self, text: str) -> bytes:
        resolved = self._local(text)
        try:
            fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as error:
            raise self._unreadable(text, error) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise RequestError(f"path {text!r} is not a regular file")
        with os.fdopen(fd, "rb") as handle:
            if info.st_size > self.settings.max_bytes:
                raise RequestError(f"file {text!r} has {info.st_size} bytes; the server's limit is {self.settings.max_bytes}")
            return handle.read(self.settings.max_bytes + 1)

    def _check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise SourceNotAllowedError(f"URL scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
        host = (parts.hostname or "").lower()
        if not host:
            raise RequestError(f"URL {url!r} has no host")
        if self.allowed_domains is not None and host not in self.allowed_domains:
            raise SourceNotAllowedError(
                f"host {host!r} is not in the server's --allowed-media-domains ({', '.join(sorted(self.allowed_domains))})"
            )

    def download(self, url: str) -> bytes:
        """GET `url` (redirects checked hop by hop) within the byte cap and one wall-clock deadline.

        The deadline covers the whole download and is enforced inside every read: the socket's
        timeout is set to the time left before each receive, and each read returns what has
        arrived (a sender trickling bytes cannot keep a read waiting for a full chunk). At most
        `max_concurrent_downloads` run at once; more wait for a free slot within the deadline.
        """
        settings = self.settings
        deadline = time.monotonic() + settings.url_timeout_s
        if not self._download_slots.acquire(timeout=settings.url_timeout_s):
            raise RequestError(
                f"the server is already downloading {settings.max_concurrent_downloads} inputs; retry later or "
                "send the image as b64_json"
            )
        try:
            return self._download(url, deadline)
        finally:
            self._download_slots.release()

    def _download(self, url: str, deadline: float) -> bytes:
        import requests

        settings = self.settings
        for _ in range(settings.url_max_redirects + 1):
            self._check_url(url)
            try:
                response = requests.get(url, stream=True, timeout=_left(deadline, url, settings), allow_redirects=False)
            except requests.Timeout:
                raise RequestError(f"downloading {url} timed out after {settings.url_timeout_s:g} s") from None
            except requests.RequestException as error:
                raise RequestError(f"cannot download {url}: {type(error).__name__}") from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise RequestError(f"downloading {url} failed with HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > settings.max_bytes:
                    raise RequestError(f"{url} is {declared} bytes; the server's limit is {settings.max_bytes}")
                return self._read_body(response, url, deadline)
        raise RequestError(f"{url}: more than {settings.url_max_redirects} redirects")

    def _read_body(self, response: Any, url: str, deadline: float) -> bytes:
        import requests
        from urllib3.exceptions import HTTPError as Urllib3Error

        settings = self.settings
        raw = response.raw
        sock = getattr(getattr(raw, "connection", None), "sock", None)
        body = bytearray()
        try:
            while True:
                left = _left(deadline, url, settings)
                if sock is not None:
                    sock.settimeout(left)
                chunk = raw.read1(_CHUNK, decode_content=True)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > settings.max_bytes:
                    raise RequestError(f"{url} is larger than the server's limit of {settings.max_bytes} bytes")
        except (TimeoutError, socket.timeout):
            raise _too_slow(url, settings) from None
        except (Urllib3Error, requests.RequestException, OSError) as error:
            if time.monotonic() >= deadline:
                raise _too_slow(url, settings) from None
            raise RequestError(f"downloading {url} failed: {type(error).__name__}") from None


def modality_files(folder: Path, modalities: list[str], name: str | None = None) -> list[Path]:
    """The one file in each modality's sub-folder of a scene folder, in the model's modality order
    (the layout of TerraTorch's TerraMind processor; `predict --scene-layout modalities` too)."""
    name = name if name is not None else str(folder)
    if not folder.is_dir():
        raise RequestError(
            f"path {name!r} is not a folder; this multi-modal model takes a folder with one sub-folder per "
            f"modality ({', '.join(modalities)}), or 'data' as an object with one input per modality"
        )
    out = []
    for modality in modalities:
        sub = folder / modality
        files = sorted(p for p in sub.iterdir() if not p.name.startswith(".")) if sub.is_dir() else []
        if len(files) != 1:
            found = "no such sub-folder" if not sub.is_dir() else f"{len(files)} files"
            raise RequestError(f"{name!r} must hold one sub-folder per modality with one GeoTIFF each; {modality}/: {found}")
        out.append(files[0])
    return out


def _too_slow(url: str, settings: IOSettings) -> RequestError:
    return RequestError(f"downloading {url} took longer than {settings.url_timeout_s:g} s (the server's url_timeout_s)")


def _left(deadline: float, url: str, settings: IOSettings) -> float:
    """Seconds left before `deadline`; a `RequestError` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(url, settings)
    return left
