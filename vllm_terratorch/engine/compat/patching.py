"""Patching vLLM once per process: the one helper every shim in this package uses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

GUARD_MARK = "_vllm_terratorch_guard"


def wrap_once(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Replace `owner.name` with `wrap(current)`, once per process; True if it was replaced now.

    Why one helper: every shim patches a vLLM attribute that a release may not have (then nothing
    is done) and must not wrap itself twice, because `register()` runs many times per process.
    """
    current = getattr(owner, name, None) if owner is not None else None
    if current is None or getattr(current, GUARD_MARK, False):
        return False
    wrapped = functools.wraps(current)(wrap(current))
    setattr(wrapped, GUARD_MARK, True)
    setattr(owner, name, wrapped)
    return True
