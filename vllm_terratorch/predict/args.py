"""The `predict` command line: its own options, and vLLM engine options passed through to `LLM(...)`."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from vllm_terratorch.errors import UsageError
from vllm_terratorch.predict.inputs import LAYOUTS
from vllm_terratorch.registration import PLUGINS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "vllm-terratorch predict"
# Above this a scene is streamed: held whole, a 4096^2 13-band scene already takes ~4 GB on its
# way through (decoded, float, tiles, outputs); below it, whole scenes pipeline best.
DEFAULT_STREAM_PIXELS = 4096 * 4096

EXAMPLES = """examples:
  vllm-terratorch predict ./my-model --input scenes/ --output predictions/
  vllm-terratorch predict ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11 \\
      --input 'scenes/**/*.tif' --output out/ --dtype bfloat16 --max-num-seqs 64 --workers 8
  vllm-terratorch predict ./my-model --input list.txt --output out/ --ray --replicas 2

Other vLLM engine options are passed to LLM(...), e.g. --max-model-len=1024 --seed=0.
exit codes: 0 all done, 1 some input failed, 2 usage error, 130 interrupted"""


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Add predict's options to `parser` (a subcommand parser or a standalone one).

    Unknown `--name value` options are vLLM engine options: parse with `parse_known_args` and put
    the leftovers in `args.engine_options` (see `parse_args`), or dispatch to `main(argv)`.
    """
    parser.add_argument("model", metavar="MODEL", help="model folder or Hugging Face repo id")
    parser.add_argument("--input", "-i", required=True, metavar="IN",
                        help="a folder (all *.tif/*.tiff, recursive), a glob, one GeoTIFF, or a text file listing paths")
    parser.add_argument("--output", "-o", required=True, metavar="OUTDIR", help="output folder (created)")
    parser.add_argument("--io-processor-plugin", choices=PLUGINS,
                        help="default: from the model's task (pretrained_cfg.model.class_path)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16 (default: auto)")
    parser.add_argument("--max-num-seqs", type=_positive_int, help="most tiles per engine batch (vLLM's default if not set)")
    parser.add_argument("--workers", type=_positive_int, default=_default_workers(),
                        help="processes decoding / encoding GeoTIFFs (default: %(default)s)")
    parser.add_argument("--chunk-tiles", type=_positive_int,
                        help="tiles sent to the engine per call, from as many scenes as needed (default: 2 x max-num-seqs, "
                             "fewer for large tiles: at most 32 MiB of tile inputs per call on a CPU, 1 GiB on a GPU)")
    parser.add_argument("--scene-layout", choices=LAYOUTS, default="auto",
                        help="a scene is a GeoTIFF (file), a folder of time steps (frames) or a folder of modality "
                             "folders (modalities); default: from the model's inputs")
    parser.add_argument("--stream-pixels", type=_non_negative_int, default=DEFAULT_STREAM_PIXELS, metavar="N",
                        help="scenes over N pixels are read, inferred and written window by window, never held whole "
                             "(memory then depends on the tile size and --chunk-tiles, not on the scene); 0: never "
                             "(default: %(default)s, 4096 x 4096)")
    parser.add_argument("--cog", action="store_true",
                        help="write Cloud-Optimized GeoTIFFs (with overviews); every raster scene is then streamed")
    parser.add_argument("--indices", type=_indices,
                        help="0-based band indices to read, in model order, e.g. 1,2,3,8,11,12 (default: from the config)")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose output already exists")
    parser.add_argument("--revision", help="Hub revision of MODEL")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray (--ray)")
    ray.add_argument("--ray", action="store_true", help="run the pipeline on Ray Data (one vLLM engine per actor)")
    ray.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--replicas", type=_positive_int,
                     help="engine actors (default: one per GPU of the cluster, 1 without GPUs)")
    parser.set_defaults(engine_options=[])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predict every GeoTIFF of a folder, glob or list with one vLLM engine (or a Ray pool of them).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_predict_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse predict's command line; unknown options are kept as `args.engine_options`."""
    parser = parser or build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.engine_options = list(getattr(args, "engine_options", [])) + unknown
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _indices(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band indices, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("band indices must be >= 0")
    return values


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip().startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_engine_options(tokens: Sequence[str]) -> dict[str, Any]:
    """`--max-model-len 1024 --enable-foo --x=1.5` -> {"max_model_len": 1024, "enable_foo": True, "x": 1.5}."""
    options: dict[str, Any] = {}
    position = 0
    while position < len(tokens):
        token = tokens[position]
        if not token.startswith("--") or token == "--":
            raise UsageError(
                f"unexpected argument {token!r}: engine options must look like --name value or --name=value "
                "(and come after MODEL)"
            )
        name, equals, value = token[2:].partition("=")
        if not equals:
            following = tokens[position + 1] if position + 1 < len(tokens) else None
            if following is not None and not following.startswith("--"):
                value, position = following, position + 1
            else:
                value = None
        key = name.replace("-", "_")
        if value is None:
            if key.startswith("no_"):
                options[key[3:]] = False
            else:
                options[key] = True
        else:
            options[key] = _parse_value(value)
        position += 1
    return options
