"""The client side of `online.py`: request bodies serialised once, and a load of them sent at a
fixed concurrency on kept-alive connections, each answer with its latency and the server's timings."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Payload:
    """One request body, serialised once: encoding JSON per request would cost this client CPU
    that, on a machine with few cores, the server needs."""

    body: bytes
    label: dict[str, Any]  # what the mix reports per request (shape, format)

    @classmethod
    def of(cls, model: str, data: dict[str, Any], **label: Any) -> Payload:
        return cls(json.dumps({"data": data, "model": model, "softmax": False}).encode(), label)


def b64_request(path: Path) -> dict[str, Any]:
    return {"data": base64.b64encode(path.read_bytes()).decode(), "data_format": "b64_json",
            "out_data_format": "b64_json", "image_format": "geoTiff"}


@dataclass
class Answer:
    latency_s: float
    ok: bool
    timings: dict[str, float]
    label: dict[str, Any]


def send_all(url: str, payloads: Sequence[Payload], concurrency: int, count: int, time_limit_s: float) -> tuple[list[Answer], float]:
    """`count` requests (round-robin over `payloads`), `concurrency` in flight, none started after
    `time_limit_s`; each thread keeps its connection alive. The answers, and the wall seconds."""
    import requests

    local = threading.local()
    deadline = time.monotonic() + time_limit_s
    answers: list[Answer] = []

    def one(index: int) -> None:
        if time.monotonic() > deadline:
            return
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        payload = payloads[index % len(payloads)]
        started = time.perf_counter()
        try:
            response = session.post(f"{url}/pooling", data=payload.body, headers={"Content-Type": "application/json"}, timeout=300)
            ok = response.status_code == 200
            timings = (response.json()["data"].get("timings") or {}) if ok else {}
        except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
            ok, timings = False, {}
        answers.append(Answer(time.perf_counter() - started, ok, timings, payload.label))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return answers, time.perf_counter() - started
