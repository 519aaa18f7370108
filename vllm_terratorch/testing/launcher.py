"""Start and stop a real `vllm serve` process (used by `make demo`, the tests and the benchmarks).

It runs the documented command line through the `vllm` script beside the running interpreter
(ours: see cli/serve.py; its module where there is no script), on a loopback port, in its own
process group so that stopping it also stops the engine-core and worker processes it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from vllm_terratorch import envs

_SCRIPT = Path(sys.executable).with_name("vllm")
# The `vllm` script beside the interpreter; where packages were installed with `pip --target` (the GPU
# machine's kit, benchmarks/gpu/) there is none, and the same entry point runs as a module.
VLLM = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "vllm_terratorch.cli.serve"]
# The flags of the mission document's `vllm serve` line.
DOCUMENTED = ["--io-processor-plugin", "terratorch_segmentation", "--model-impl", "terratorch", "--skip-tokenizer-init", "--enforce-eager"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`vllm serve MODEL ARGS` on a loopback port; stopped (whole process group) on close."""

    def __init__(self, model: Path | str, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = str(model)
        self.log_path = log
        command = [*VLLM, "serve", self.model, *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        environment = envs.engine_environment({**os.environ, **(env or {})})
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pooling(self, data: dict[str, object], timeout: float = 120) -> requests.Response:
        """POST the mission document's payload shape: the IO processor's `data`, model, softmax."""
        payload = {"data": data, "model": self.model, "softmax": False}
        return requests.post(f"{self.url}/pooling", json=payload, timeout=timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
