"""`vllm-terratorch predict`: batch inference over many GeoTIFFs with one vLLM engine.

    vllm-terratorch predict MODEL --input IN --output OUTDIR [options] [vLLM engine options]
    python -m vllm_terratorch.predict MODEL --input IN --output OUTDIR ...

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
- `--ray`: the same on Ray Data (see predict_ray.py).
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
import contextlib
import glob
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from vllm_terratorch.predict_tasks import PARTIAL_SUFFIX, ProcessorSpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "vllm-terratorch predict"
TIFF_SUFFIXES = (".tif", ".tiff")
GLOB_CHARS = "*?["

# pretrained_cfg.model.class_path (last component) -> IO processor.
PLUGIN_BY_TASK = {
    "SemanticSegmentationTask": "terratorch_segmentation",
    "PixelwiseRegressionTask": "terratorch_regression",
    "ClassificationTask": "terratorch_classification",
    "MultiLabelClassificationTask": "terratorch_classification",
}
PLUGINS = ("terratorch_segmentation", "terratorch_regression", "terratorch_classification")
# Engine options predict sets itself (the passthrough may override them).
ENGINE_DEFAULTS = {"model_impl": "terratorch", "skip_tokenizer_init": True, "enforce_eager": True}

EXAMPLES = """examples:
  vllm-terratorch predict ./my-model --input scenes/ --output predictions/
  vllm-terratorch predict ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11 \\
      --input 'scenes/**/*.tif' --output out/ --dtype bfloat16 --max-num-seqs 64 --workers 8
  vllm-terratorch predict ./my-model --input list.txt --output out/ --ray --replicas 2

Other vLLM engine options are passed to LLM(...), e.g. --max-model-len=1024 --seed=0.
exit codes: 0 all done, 1 some input failed, 2 usage error, 130 interrupted"""


class UsageError(Exception):
    """A command-line problem (exit code 2)."""


# Command line ----------------------------------------------------------------------------------


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
                        help="tiles sent to the engine per call, from as many scenes as needed (default: 2 x max-num-seqs)")
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


def check_engine_options(options: dict[str, Any]) -> None:
    """Every passthrough name must be a field of vLLM's EngineArgs (typos fail before any work)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {item.name for item in dataclasses.fields(EngineArgs)}
    unknown = sorted(name for name in options if name not in known)
    if unknown:
        raise UsageError(
            "unknown option(s) " + ", ".join("--" + name.replace("_", "-") for name in unknown)
            + " (neither a predict option nor a vLLM engine argument)"
        )
    for name in ("model", "io_processor_plugin"):
        if name in options:
            raise UsageError(f"--{name.replace('_', '-')} cannot be passed to the engine here")


# Inputs and outputs ----------------------------------------------------------------------------


@dataclass
class Item:
    """One input scene and where its prediction goes."""

    index: int
    source: Path
    relative: PurePath
    output: Path
    record: dict[str, Any] = field(default_factory=dict)


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _glob_base(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if any(char in part for char in GLOB_CHARS):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def list_inputs(spec: str, outdir: Path) -> list[tuple[Path, PurePath]]:
    """(file, path relative to the input root) for every input named by `spec`, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        base = path
        files = [f for f in path.rglob("*") if f.suffix.lower() in TIFF_SUFFIXES and f.is_file() and not f.name.startswith(".")]
    elif path.is_file() and path.suffix.lower() in TIFF_SUFFIXES:
        base, files = path.parent, [path]
    elif path.is_file():
        listed = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = Path(line).expanduser()
                listed.append(entry if entry.is_absolute() else path.parent / entry)
        files = [Path(os.path.abspath(entry)) for entry in listed]
        if not files:
            return []
        base = Path(os.path.commonpath([str(entry.parent) for entry in files]))
    elif any(char in spec for char in GLOB_CHARS):
        base = _glob_base(spec)
        files = [Path(match) for match in glob.glob(os.path.expanduser(spec), recursive=True)]
        files = [f for f in files if f.is_file()]
    else:
        raise UsageError(f"--input {spec}: no such folder, file or glob")
    found = []
    for file in files:
        if outdir.exists() and _is_under(file, outdir) and not path.is_file():
            continue  # our own outputs, when OUTDIR lies inside the input folder
        try:
            relative = PurePath(os.path.relpath(file, base))
        except ValueError:
            relative = PurePath(file.name)
        if relative.parts and relative.parts[0] == "..":
            relative = PurePath(file.name)
        found.append((file, relative))
    return sorted(found, key=lambda pair: str(pair[1]))


def output_path(outdir: Path, relative: PurePath, plugin: str) -> Path:
    suffix = ".json" if plugin == "terratorch_classification" else ".tif"
    return outdir.joinpath(*relative.parent.parts, f"{relative.stem}_pred{suffix}")


def output_complete(path: Path) -> bool:
    """An earlier run's output that can be kept: JSON that parses, or a raster that opens and reads."""
    if not path.is_file():
        return False
    try:
        if path.suffix == ".json":
            return isinstance(json.loads(path.read_text()), dict)
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(path) as source:
            if source.count < 1 or source.width < 1 or source.height < 1:
                return False
            source.read(1, window=Window(source.width - 1, source.height - 1, 1, 1))
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is redone
        return False


# Model ------------------------------------------------------------------------------------------


def plugin_for_model(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    class_path = (((config.get("pretrained_cfg") or {}).get("model") or {}).get("class_path")) or ""
    task = class_path.rsplit(".", 1)[-1]
    if task not in PLUGIN_BY_TASK:
        from vllm_terratorch.errors import ConfigError

        raise ConfigError(
            f"{model_dir}: cannot tell the IO processor from pretrained_cfg.model.class_path {class_path!r}; "
            f"pass --io-processor-plugin ({', '.join(PLUGINS)})"
        )
    return PLUGIN_BY_TASK[task]


def engine_kwargs(args: argparse.Namespace, model_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": str(model_dir), **ENGINE_DEFAULTS, "dtype": args.dtype}
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return kwargs | options


def create_engine(kwargs: dict[str, Any]) -> Any:
    """`LLM(**kwargs)`. On CPU the engine runs inside this process by default (measured here: about
    1.5x the scenes/s of vLLM's engine-core + worker processes, and a faster start); pass
    `--distributed-executor-backend mp` or set VLLM_ENABLE_V1_MULTIPROCESSING=1 to opt out."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # an attention-free model needs no KV cache
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and kwargs.get("distributed_executor_backend", "uni") == "uni":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = {"distributed_executor_backend": "uni", **kwargs}
        # In-process, vLLM's CPU worker warns on every request batch that it ignores
        # torch.set_num_threads (called by vLLM's own multimodal input processing): drop that line.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_drop_set_num_threads_warning)
    return LLM(**kwargs)


def _drop_set_num_threads_warning(record: logging.LogRecord) -> bool:
    return "torch.set_num_threads" not in record.getMessage()


def shutdown_engine(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def dtype_name(torch_dtype: Any) -> str:
    return str(torch_dtype).removeprefix("torch.")


# Local pipeline ---------------------------------------------------------------------------------


class Progress:
    """tqdm bar (scenes/s, ETA) on stderr, and error lines that do not break it.

    The bar appears at `start()` (once the engine is up), so that start-up time does not count in
    the rate and ETA; inputs finished before that (bad inputs) are its initial count.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.count = 0
        self.failed = 0
        self.bar: Any = None

    def start(self) -> None:
        if self.bar is None and self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.count, unit="scene", desc="predict", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed)

    def done(self, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.failed += 1
        if self.bar is not None:
            if not ok:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_engine_dead(error: BaseException) -> bool:
    """vLLM's EngineDeadError (engine core gone): no later call can succeed."""
    return any(cls.__name__ == "EngineDeadError" for cls in type(error).__mro__)


@dataclass
class PipelineStats:
    wall_s: float = 0.0
    engine_busy_s: float = 0.0
    engine_calls: int = 0
    tiles: int = 0
    interrupted: bool = False
    busy_fraction: float | None = None  # set where busy / wall is not the right ratio (Ray: per replica)


class LocalPipeline:
    """Decode ahead in a process pool, encode chunks of tiles from many scenes, write behind.

    `encode(prompts) -> list[tensor]` is the engine call (one output per prompt, in order).
    """

    def __init__(
        self,
        spec: ProcessorSpec,
        pool: Any,
        encode: Callable[[list[dict[str, Any]]], list[Any]],
        *,
        dtype: Any = None,
        chunk_tiles: int,
        workers: int,
        progress: Progress,
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.encode_fn = encode
        self.dtype = dtype
        self.chunk_tiles = chunk_tiles
        self.workers = workers
        self.progress = progress
        self.stats = PipelineStats()
        self.fatal: str | None = None

    # records -------------------------------------------------------------------------------

    @staticmethod
    def report(item: Item, progress: Progress, ok: bool, error: str | None = None, started: float | None = None,
               finished: float | None = None, tiles: int | None = None) -> None:
        item.record.update(
            status="ok" if ok else "failed",
            error=error,
            seconds=round((finished or time.time()) - started, 4) if started is not None else None,
        )
        if tiles is not None:
            item.record["tiles"] = tiles
        if not ok:
            progress.message(f"{PROG}: failed: {item.source}: {error}")
        progress.done(ok)

    def _finish(self, item: Item, ok: bool, error: str | None = None, started: float | None = None,
                finished: float | None = None, tiles: int | None = None) -> None:
        self.report(item, self.progress, ok, error, started, finished, tiles)

    # engine --------------------------------------------------------------------------------

    def _timed_encode(self, prompts: list[dict[str, Any]]) -> list[Any]:
        start = time.monotonic()
        try:
            return self.encode_fn(prompts)
        finally:
            self.stats.engine_busy_s += time.monotonic() - start
            self.stats.engine_calls += 1

    def _run_engine(self, chunk: list[tuple[Item, dict[str, Any]]]) -> list[tuple[Item, dict[str, Any], list[Any]]]:
        from vllm_terratorch.predict_tasks import build_prompts, describe_error

        prompts_per_scene = [build_prompts(decoded, self.dtype) for _, decoded in chunk]
        prompts = [prompt for scene in prompts_per_scene for prompt in scene]
        try:
            outputs = self._timed_encode(prompts)
            if len(outputs) != len(prompts):
                raise RuntimeError(f"the engine returned {len(outputs)} outputs for {len(prompts)} tiles")
        except Exception as error:  # noqa: BLE001
            if _is_engine_dead(error) or len(chunk) == 1:
                if _is_engine_dead(error):
                    self.fatal = describe_error(error)
                for item, decoded in chunk:
                    self._finish(item, False, f"inference failed: {describe_error(error)}", decoded["started"])
                return []
            # One bad scene must not fail its chunk-mates: retry scene by scene.
            done = []
            for item, decoded in chunk:
                if self.fatal:
                    self._finish(item, False, f"inference failed: {self.fatal}", decoded["started"])
                    continue
                done.extend(self._run_engine([(item, decoded)]))
            return done
        self.stats.tiles += len(prompts)
        results, offset = [], 0
        for (item, decoded), scene in zip(chunk, prompts_per_scene):
            results.append((item, decoded, outputs[offset : offset + len(scene)]))
            offset += len(scene)
        return results

    # main loop -----------------------------------------------------------------------------

    def run(self, items: list[Item], preloaded: Sequence[tuple[Item, dict[str, Any]]] = ()) -> PipelineStats:
        from concurrent.futures import FIRST_COMPLETED, wait

        from vllm_terratorch.predict_tasks import decode_scene, outputs_to_wire, write_prediction

        todo = deque(items)
        decoding: dict[Any, Item] = {}
        writing: dict[Any, tuple[Item, int]] = {}
        ready: deque[tuple[Item, dict[str, Any]]] = deque(preloaded)
        ready_tiles = sum(len(decoded["tiles"][1]) for _, decoded in preloaded)
        decoded_scenes, decoded_tiles = len(preloaded), ready_tiles
        ahead_tiles = 2 * self.chunk_tiles
        start = time.monotonic()

        def submit_decodes() -> None:
            average = decoded_tiles / decoded_scenes if decoded_scenes else 1.0
            while todo and not self.fatal and ready_tiles + len(decoding) * average < ahead_tiles and len(decoding) < 4096:
                item = todo.popleft()
                decoding[self.pool.submit(decode_scene, self.spec, item.index, str(item.source))] = item

        def harvest_decodes(futures: Sequence[Any]) -> None:
            nonlocal ready_tiles, decoded_scenes, decoded_tiles
            for future in futures:
                item = decoding.pop(future)
                try:
                    decoded = future.result()
                except Exception as error:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    decoded = {"ok": False, "error": f"worker failed: {error!r}", "started": None}
                if decoded["ok"]:
                    tiles = len(decoded["tiles"][1])
                    item.record["tiles"] = tiles
                    ready.append((item, decoded))
                    ready_tiles += tiles
                    decoded_scenes += 1
                    decoded_tiles += tiles
                else:
                    self._finish(item, False, decoded["error"], decoded["started"])

        def harvest_writes(futures: Sequence[Any]) -> None:
            for future in futures:
                item, tiles = writing.pop(future)
                try:
                    result = future.result()
                except Exception as error:  # noqa: BLE001
                    result = {"ok": False, "error": f"worker failed: {error!r}", "started": None, "finished": None}
                self._finish(item, result["ok"], result.get("error"), result["started"], result["finished"], tiles)

        try:
            while True:
                submit_decodes()
                harvest_decodes([f for f in list(decoding) if f.done()])
                if not ready:
                    if decoding:
                        done, _ = wait(list(decoding), return_when=FIRST_COMPLETED)
                        harvest_decodes(list(done))
                        continue
                    if todo and not self.fatal:
                        continue
                    break
                chunk: list[tuple[Item, dict[str, Any]]] = []
                chunk_tiles = 0
                while ready and chunk_tiles < self.chunk_tiles:
                    item, decoded = ready.popleft()
                    chunk.append((item, decoded))
                    chunk_tiles += len(decoded["tiles"][1])
                ready_tiles -= chunk_tiles
                submit_decodes()  # keep the pool busy while the engine runs
                for item, decoded, outputs in self._run_engine(chunk):
                    future = self.pool.submit(
                        write_prediction, self.spec, item.index, outputs_to_wire(outputs), decoded["pending"],
                        str(item.output), decoded["started"],
                    )
                    writing[future] = (item, len(outputs))
                harvest_writes([f for f in list(writing) if f.done()])
                # Bounded memory: at most two chunks of outputs wait for the pool (the engine only
                # waits here when writing falls behind inference for good).
                while sum(tiles for _, tiles in writing.values()) > 2 * self.chunk_tiles:
                    done, _ = wait(list(writing), return_when=FIRST_COMPLETED)
                    harvest_writes(list(done))
                if self.fatal:
                    while ready:
                        item, decoded = ready.popleft()
                        self._finish(item, False, f"inference failed: {self.fatal}", decoded["started"])
            if writing:
                done, _ = wait(list(writing))
                harvest_writes(list(done))
        except KeyboardInterrupt:
            self.stats.interrupted = True
            for future in decoding:
                future.cancel()
            if writing:
                self.progress.message(
                    f"{PROG}: interrupted; finishing the {len(writing)} outputs already inferred (Ctrl-C again to stop now)"
                )
                try:
                    done, _ = wait(list(writing))
                    harvest_writes(list(done))
                except KeyboardInterrupt:
                    pass
        finally:
            self.stats.wall_s = time.monotonic() - start
        return self.stats


# Summary ----------------------------------------------------------------------------------------


def write_summary(outdir: Path, items: list[Item], meta: dict[str, Any], stats: PipelineStats | None) -> dict[str, Any]:
    from vllm_terratorch.predict_tasks import atomic_write

    counts: dict[str, int] = {}
    for item in items:
        counts[item.record["status"]] = counts.get(item.record["status"], 0) + 1
    processed = counts.get("ok", 0)
    totals: dict[str, Any] = {
        "inputs": len(items),
        "ok": processed,
        "skipped": counts.get("skipped", 0),
        "failed": counts.get("failed", 0),
        "interrupted": counts.get("interrupted", 0),
    }
    if stats is not None:
        totals |= {
            "tiles": stats.tiles,
            "wall_seconds": round(stats.wall_s, 3),
            "engine_busy_seconds": round(stats.engine_busy_s, 3),
            "engine_busy_fraction": round(stats.busy_fraction, 4) if stats.busy_fraction is not None
            else round(stats.engine_busy_s / stats.wall_s, 4) if stats.wall_s > 0 else None,
            "engine_calls": stats.engine_calls,
            "scenes_per_second": round(processed / stats.wall_s, 3) if stats.wall_s > 0 else None,
        }
    summary = {
        **meta,
        "interrupted": bool(stats and stats.interrupted),
        "totals": totals,
        "inputs": [item.record for item in items],
    }
    atomic_write(outdir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _remove_partials(outdir: Path) -> None:
    """Temp files of writes that a hard stop cut short (never complete outputs)."""
    for path in outdir.rglob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()


# Entry points -----------------------------------------------------------------------------------


def _prepare_items(args: argparse.Namespace, outdir: Path, plugin: str) -> list[Item]:
    items: list[Item] = []
    owners: dict[Path, Item] = {}
    for index, (source, relative) in enumerate(list_inputs(args.input, outdir)):
        item = Item(index, source, relative, output_path(outdir, relative, plugin))
        item.record = {"input": str(source), "output": str(item.output), "status": "pending", "seconds": None,
                       "tiles": None, "error": None}
        if item.output in owners:
            item.record.update(status="failed", error=f"its output {item.output} is also the output of {owners[item.output].source}")
        owners.setdefault(item.output, item)
        items.append(item)
    return items


def _mark_done(items: list[Item], overwrite: bool, workers: int) -> None:
    if overwrite:
        return
    from concurrent.futures import ThreadPoolExecutor

    candidates = [item for item in items if item.record["status"] == "pending"]
    with ThreadPoolExecutor(max(1, workers)) as threads:
        for item, complete in zip(candidates, threads.map(lambda it: output_complete(it.output), candidates)):
            if complete:
                item.record.update(status="skipped", seconds=0.0)


def run_predict(args: argparse.Namespace, llm: Any = None) -> int:
    """Run `predict` for parsed `args`; returns the exit code. `llm`: an existing engine to use (tests)."""
    from vllm_terratorch.errors import TerratorchError
    from vllm_terratorch.hub import resolve_model_dir

    began = time.monotonic()
    try:
        options = parse_engine_options(getattr(args, "engine_options", None) or [])
        if options:
            check_engine_options(options)
        model_dir = resolve_model_dir(args.model, revision=args.revision)
        plugin = args.io_processor_plugin or plugin_for_model(model_dir)
        outdir = Path(args.output).expanduser()
        if outdir.exists() and not outdir.is_dir():
            raise UsageError(f"--output {outdir} is a file; expected a folder")
        items = _prepare_items(args, outdir, plugin)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (TerratorchError, OSError, json.JSONDecodeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not items:
        print(f"{PROG}: error: no GeoTIFFs (*.tif, *.tiff) found in {args.input}", file=sys.stderr)
        return EXIT_FAILED
    outdir.mkdir(parents=True, exist_ok=True)
    _mark_done(items, args.overwrite, args.workers)
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
            from vllm_terratorch.predict_ray import run_ray

            stats = run_ray(args, todo, model_dir=model_dir, plugin=plugin, engine_options=options, meta=meta)
        elif todo:
            stats = _run_local(args, todo, model_dir=model_dir, plugin=plugin, engine_options=options, meta=meta, llm=llm)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # outside the pipeline's own handling (e.g. while Ray starts)
        stats = stats or PipelineStats()
        stats.interrupted = True
    except Exception as error:  # noqa: BLE001 - the engine could not start, Ray failed, ...: say so, keep the summary
        from vllm_terratorch.predict_tasks import describe_error

        message = describe_error(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        for item in todo:
            if item.record["status"] == "pending":
                item.record.update(status="failed", error=f"not run: {message}")
        write_summary(outdir, items, meta, stats)
        return EXIT_FAILED
    finally:
        if args.ray or (stats is not None and stats.interrupted):
            _remove_partials(outdir)  # temp files of writes that were cut short (never outputs)
    for item in items:
        if item.record["status"] == "pending":
            item.record["status"] = "interrupted" if stats and stats.interrupted else "failed"
            item.record["error"] = item.record["error"] or ("interrupted" if stats and stats.interrupted else "not run")
    meta["total_seconds"] = round(time.monotonic() - began, 3)  # engine start-up included
    summary = write_summary(outdir, items, meta, stats)
    _print_totals(summary, outdir)
    if stats and stats.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary["totals"]["failed"] else EXIT_OK


def _print_totals(summary: dict[str, Any], outdir: Path) -> None:
    totals = summary["totals"]
    line = (f"{PROG}: {totals['ok']} done, {totals['skipped']} skipped, {totals['failed']} failed"
            + (f", {totals['interrupted']} interrupted" if totals["interrupted"] else ""))
    if totals.get("wall_seconds"):
        line += f" in {totals['wall_seconds']:.1f} s ({totals['scenes_per_second']} scenes/s"
        if totals.get("engine_busy_fraction") is not None:
            line += f", engine busy {100 * totals['engine_busy_fraction']:.1f}% of the time"
        line += ")"
    print(line + f"; summary: {outdir / 'summary.json'}", flush=True)


def _run_local(args: argparse.Namespace, todo: list[Item], *, model_dir: Path, plugin: str,
               engine_options: dict[str, Any], meta: dict[str, Any], llm: Any = None) -> PipelineStats:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from vllm_terratorch.predict_tasks import decode_scene, processor_class, warm_up, worker_init

    # Scenes are prepared at float64 and cast to the engine's dtype just before inference (one
    # rounding, as `prepare` at that dtype does), so decoding needs no engine and starts at once.
    spec = ProcessorSpec(str(model_dir), plugin, "float64", args.indices)
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init)
    owned = llm is None
    stats = PipelineStats()
    progress = Progress(len(todo), not args.no_progress)
    try:
        # Workers start (and import) while the engine loads.
        warmups = [pool.submit(warm_up, spec) for _ in range(args.workers)]
        # The engine starts only once a scene is ready for it: a re-run whose remaining inputs are
        # all bad reports them without loading the model.
        remaining = deque(todo)
        preloaded: list[tuple[Item, dict[str, Any]]] = []
        while remaining and not preloaded:
            item = remaining.popleft()
            decoded = decode_scene(spec, item.index, str(item.source))
            if decoded["ok"]:
                item.record["tiles"] = len(decoded["tiles"][1])
                preloaded.append((item, decoded))
            else:
                LocalPipeline.report(item, progress, False, decoded["error"], decoded["started"])
        if not preloaded:
            return stats
        if owned:
            kwargs = engine_kwargs(args, model_dir, engine_options)
            progress.message(f"{PROG}: starting the engine: LLM({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
            llm = create_engine(kwargs)
        vllm_config = llm.llm_engine.vllm_config
        processor_class(plugin)(vllm_config)  # the engine's own config: fails here if the processor cannot serve it
        dtype = vllm_config.model_config.dtype
        max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        chunk_tiles = args.chunk_tiles or 2 * max_num_seqs
        meta |= {"dtype": dtype_name(dtype), "max_num_seqs": max_num_seqs, "chunk_tiles": chunk_tiles,
                 "workers": args.workers}
        if owned:
            meta["engine_options"] = {k: v for k, v in kwargs.items() if k != "model"}
        for future in warmups:
            future.result()

        def encode(prompts: list[dict[str, Any]]) -> list[Any]:
            return [output.outputs.data for output in llm.encode(prompts, pooling_task="plugin", use_tqdm=False)]

        progress.start()
        pipeline = LocalPipeline(spec, pool, encode, dtype=dtype, chunk_tiles=chunk_tiles, workers=args.workers,
                                 progress=progress)
        stats = pipeline.run(list(remaining), preloaded=preloaded)
        return stats
    except KeyboardInterrupt:
        stats.interrupted = True
        return stats
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
        if owned and llm is not None:
            shutdown_engine(llm)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return run_predict(args)


if __name__ == "__main__":
    sys.exit(main())
