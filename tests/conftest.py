"""Shared test set-up: CPU engine settings and a real-engine helper for integration tests."""

from __future__ import annotations

import os

# vLLM on CPU: small KV cache, spawned workers (set before vLLM is imported anywhere).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_reservation_is_per_test():
    """An engine built in the test process sets VLLM_CPU_NUM_OF_RESERVED_CPU=0 for itself (our CPU
    default, engine/compat.py); servers a later test starts must decide for themselves, as a fresh
    `vllm serve` does, so the variable is put back after every test."""
    from vllm_terratorch.envs import RESERVED_CPUS as name

    saved = os.environ.get(name)
    yield
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved
