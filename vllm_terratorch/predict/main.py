"""`vllm-terratorch predict`: batch inference over many GeoTIFFs with one vLLM engine.

    vllm-terratorch predict MODEL --input IN --output OUTDIR [options] [vLLM engine options]
    python -m vllm_terratorch.predict.main MODEL --input IN --output OUTDIR ...

- IN: a folder (every *.tif / *.tiff below it), a glob (`'scenes/**/*.tif'`), one GeoTIFF, or a
  text file listing paths (one per line; `#` comments; relative paths are relative to the list).
- Each input `REL/X.tif` gives `OUTDIR/REL/X_pred.tif` (`X_pred.json` for classification),
  georeferenced like the input, written atomically; `OUTDIR/summary.json` lists every input.
- The IO processor is the server's (`prepare` / `render` of vllm_terratorch.io.processor), so a
  file's output equals the server's answer to a `/pooling` request for that file.
- Pipeline (local mode): a process pool decodes and tiles scenes ahead of the engine, the engine
  encodes tiles of many scenes per call (`--chunk-tiles`), and the pool stitches and writes behind
  it. `engine_busy_fraction` in the summary = time inside the engine / pipeline wall time.
- Resumable (outputs that exist and open are skipped; `--overwrite` redoes them), Ctrl-C keeps
  only complete outputs and still writes the summary, bad inputs are reported and the run goes on.
- `--ray`: the same on Ray Data (see on_ray.py).
- On CPU the engine runs inside the predict process (vLLM's `distributed_executor_backend="uni"`,
  VLLM_ENABLE_V1_MULTIPROCESSING=0): faster here than vLLM's engine-core process; see create_engine.
- Any other `--name value` / `--name=value` / `--flag` option goes to vLLM's `LLM(...)` as
  `name=value` (dashes -> underscores; ints, floats, true/false, none and JSON are parsed), e.g.
  `--max-model-len 1024 --seed 0`; names are checked against vLLM's EngineArgs. Put MODEL before
  them, or write them as `--name=value`.

Exit codes: 0 every input done (or skipped), 1 an input failed (or a bad model / no inputs),
2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_terratorch.core.hub import resolve_model_dir
from vllm_terratorch.errors import TerratorchError, UsageError
from vllm_terratorch.predict.args import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    parse_args,
    parse_engine_options,
)
from vllm_terratorch.predict.engine import check_engine_options, plugin_for_model
from vllm_terratorch.predict.inputs import mark_done, prepare_items, scene_layout
from vllm_terratorch.predict.local import run_local
from vllm_terratorch.predict.report import PipelineStats, print_totals, remove_partials, write_summary
from vllm_terratorch.predict.tasks import describe_error


def run_predict(args: argparse.Namespace, llm: Any = None) -> int:
    """Run `predict` for parsed `args`; returns the exit code. `llm`: an existing engine to use (tests)."""
    began = time.monotonic()
    try:
        if args.ray and args.cog:
            raise UsageError("--cog is written by the local pipeline only (scenes on Ray are held whole); drop --ray or --cog")
        options = parse_engine_options(getattr(args, "engine_options", None) or [])
        if options:
            check_engine_options(options)
        model_dir = resolve_model_dir(args.model, revision=args.revision)
        plugin = args.io_processor_plugin or plugin_for_model(model_dir)
        outdir = Path(args.output).expanduser()
        if outdir.exists() and not outdir.is_dir():
            raise UsageError(f"--output {outdir} is a file; expected a folder")
        layout, modalities = scene_layout(model_dir, getattr(args, "scene_layout", "auto"))
        items = prepare_items(args.input, outdir, plugin, layout, modalities)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (TerratorchError, OSError, json.JSONDecodeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not items:
        what = "GeoTIFFs (*.tif, *.tiff)" if layout == "file" else f"scene folders ({layout} layout)"
        print(f"{PROG}: error: no {what} found in {args.input}", file=sys.stderr)
        return EXIT_FAILED
    outdir.mkdir(parents=True, exist_ok=True)
    mark_done(items, args.overwrite, args.workers)
    todo = [item for item in items if item.record["status"] == "pending"]
    skipped = sum(item.record["status"] == "skipped" for item in items)
    meta: dict[str, Any] = {
        "model": str(args.model),
        "io_processor_plugin": plugin,
        "mode": "ray" if args.ray else "local",
        "output": str(outdir),
    }
    if skipped:
        print(f"{PROG}: {skipped} of {len(items)} inputs already have a complete output (skipped; --overwrite redoes them)",
              file=sys.stderr)
    for item in items:
        if item.record["status"] == "failed":  # found before anything ran (two inputs, one output)
            print(f"{PROG}: failed: {item.source}: {item.record['error']}", file=sys.stderr)
    stats: PipelineStats | None = None
    try:
        if todo and args.ray:
            from vllm_terratorch.predict.on_ray import run_ray

            stats = run_ray(args, todo, model_dir=model_dir, plugin=plugin, engine_options=options, meta=meta)
        elif todo:
            stats = run_local(args, todo, model_dir=model_dir, plugin=plugin, engine_options=options, meta=meta, llm=llm)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # outside the pipeline's own handling (e.g. while Ray starts)
        stats = stats or PipelineStats()
        stats.interrupted = True
    except Exception as error:  # noqa: BLE001 - the engine could not start, Ray failed, ...: say so, keep the summary
        message = describe_error(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        for item in todo:
            if item.record["status"] == "pending":
                item.record.update(status="failed", error=f"not run: {message}")
        write_summary(outdir, items, meta, stats)
        return EXIT_FAILED
    finally:
        if args.ray or (stats is not None and stats.interrupted):
            remove_partials(outdir)  # temp files of writes that were cut short (never outputs)
    for item in items:
        if item.record["status"] == "pending":
            item.record["status"] = "interrupted" if stats and stats.interrupted else "failed"
            item.record["error"] = item.record["error"] or ("interrupted" if stats and stats.interrupted else "not run")
    meta["total_seconds"] = round(time.monotonic() - began, 3)  # engine start-up included
    summary = write_summary(outdir, items, meta, stats)
    print_totals(summary, outdir)
    if stats and stats.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary["totals"]["failed"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run_predict(args)


if __name__ == "__main__":
    sys.exit(main())
