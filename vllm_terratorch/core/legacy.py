"""Configs and checkpoints written for older TerraTorch releases, served by the installed one.

One place for every translation between TerraTorch versions, each logged at INFO:

- `decoder_scale_modules` (UperNetDecoder's `scale_modules`, deprecated in 1.2.x, removed in
  1.2.13). It applied four learned rescaling layers (`fpn1`..`fpn4`) to the decoder's inputs.
  TerraTorch's replacement is the `LearnedInterpolateToPyramidal` neck, which holds exactly the
  same layers and runs at the same point (after every other neck, right before the decoder), so
  appending that neck computes the same function. Checkpoints trained with the old argument keep
  those weights under `decoder.fpnN.*`; the new network has them under `neck.<i>.fpnN.*`, so
  `rename_checkpoint_keys` moves them (and back, for a folder written on 1.2.13 and served on 1.2.10).

Where the installed TerraTorch still accepts the old argument (1.2.10), configs are built as
written: nothing is translated and the old keys are the network's own.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

SCALE_MODULES_ARG = "decoder_scale_modules"
PYRAMIDAL_NECK = "LearnedInterpolateToPyramidal"
# The scale layers' keys in the old layout (`<prefix>decoder.fpnN.<rest>`) and in the new one
# (`<prefix>neck.<i>.fpnN.<rest>`).
_OLD_SCALE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)decoder\.(?P<rest>fpn[1-4]\..+)$")
_NEW_SCALE_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)neck\.\d+\.(?P<rest>fpn[1-4]\..+)$")

T = TypeVar("T")


@functools.cache
def upernet_accepts_scale_modules() -> bool:
    """Whether the installed UperNetDecoder still takes `scale_modules` (TerraTorch < 1.2.13)."""
    try:
        from terratorch.models.decoders.upernet_decoder import UperNetDecoder
    except ImportError:  # pragma: no cover - every supported TerraTorch has it
        return False
    return "scale_modules" in inspect.signature(UperNetDecoder.__init__).parameters


def translate_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """A copy of a task's `init_args` that the installed TerraTorch accepts (the same object
    where nothing needs translating)."""
    model_args = init_args.get("model_args")
    if upernet_accepts_scale_modules() or not isinstance(model_args, dict) or SCALE_MODULES_ARG not in model_args:
        return init_args
    args = copy.deepcopy(init_args)
    model_args = args["model_args"]
    enabled = bool(model_args.pop(SCALE_MODULES_ARG))
    if not enabled:
        logger.info("model_args.%s=False dropped: the installed TerraTorch no longer has this argument", SCALE_MODULES_ARG)
        return args
    necks = list(model_args.get("necks") or [])
    necks.append({"name": PYRAMIDAL_NECK})
    model_args["necks"] = necks
    logger.info(
        "model_args.%s=True (removed in TerraTorch 1.2.13) translated to its replacement: neck %s appended "
        "(same layers, same place); checkpoint keys decoder.fpnN.* are mapped onto it",
        SCALE_MODULES_ARG,
        PYRAMIDAL_NECK,
    )
    return args


def rename_checkpoint_keys(
    state: Mapping[str, T], expected: Iterable[str], *, source: str = "checkpoint"
) -> dict[str, T]:
    """Move the scale layers' tensors to where the network built here keeps them.

    Old-layout `decoder.fpnN.*` tensors go to the last neck holding the same sub-key under the
    same prefix (the appended `LearnedInterpolateToPyramidal`), when the network was translated.
    The other way round, new-layout `neck.<i>.fpnN.*` tensors (a folder written on TerraTorch
    1.2.13, e.g. by `vllm-terratorch export`, whose config still says `decoder_scale_modules`) go
    back to `decoder.fpnN.*` when the installed TerraTorch builds the old argument. Only keys the
    network lacks are considered; keys with no such home are left alone, for the strict match to
    report.
    """
    expected = set(expected)
    renamed: dict[str, T] = {}
    moved = 0
    for key, value in state.items():
        target = None if key in expected else _home(key, expected)
        if target is not None and target not in state:
            renamed[target] = value
            moved += 1
        else:
            renamed[key] = value
    if moved:
        logger.info("%s: %d tensors of UperNet scale modules (decoder.fpnN.* / %s neck) mapped to the layout of the installed TerraTorch", source, moved, PYRAMIDAL_NECK)
    return renamed


def _home(key: str, expected: set[str]) -> str | None:
    if match := _OLD_SCALE_KEY.match(key):
        pattern = re.compile(rf"^{re.escape(match['prefix'])}neck\.(\d+)\.{re.escape(match['rest'])}$")
        homes = [(int(m.group(1)), candidate) for candidate in expected if (m := pattern.match(candidate))]
        return max(homes)[1] if homes else None
    if match := _NEW_SCALE_KEY.match(key):
        old = f"{match['prefix']}decoder.{match['rest']}"
        return old if old in expected else None
    return None
