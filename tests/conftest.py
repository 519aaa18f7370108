"""Shared test set-up: CPU engine settings and a real-engine helper for integration tests."""

from __future__ import annotations

import os

# vLLM on CPU: small KV cache, spawned workers (set before vLLM is imported anywhere).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
