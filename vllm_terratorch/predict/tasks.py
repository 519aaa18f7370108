"""The CPU-side halves of `vllm-terratorch predict`, run in worker processes (local pool or Ray tasks).

- `decode_scene`: read a scene (a GeoTIFF, or a folder of frames or modalities), and turn it into
  the engine's per-tile inputs with the IO
  processor's own `prepare` (the exact code path the server runs for a `/pooling` request).
- `write_prediction`: the engine's tile outputs -> the processor's `render` (stitch, mask or values,
  GeoTIFF or JSON) -> an atomic write (temp file in the same folder + rename).

Tensors cross process boundaries as numpy arrays ("wire" form: bfloat16 travels as its int16 bit
pattern, so nothing is converted), which pickle without torch's shared-memory machinery.
Everything here returns a plain dict and never raises for a bad input: the error is reported.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_terratorch.core.inputs import MODALITY, tensor_prompt
from vllm_terratorch.files import write_atomically



@dataclass(frozen=True)
class ProcessorSpec:
    """What a worker needs to build the same IO processor as the engine's (picklable, small)."""

    model_dir: str
    plugin: str
    dtype: str  # torch dtype name, e.g. "float32"
    indices: tuple[int, ...] | None = None
    stream_pixels: int | None = None  # scenes larger than this are read window by window (None: never)


_PIPELINES: dict[ProcessorSpec, Any] = {}


def get_pipeline(spec: ProcessorSpec) -> Any:
    """The GeoTIFF pipeline of `spec` (the one the server's IO processor wraps), built once per process."""
    pipeline = _PIPELINES.get(spec)
    if pipeline is None:
        from vllm_terratorch.core.dtypes import parse_dtype
        from vllm_terratorch.registration import pipeline_class

        pipeline = pipeline_class(spec.plugin).for_model_folder(spec.model_dir, parse_dtype(spec.dtype))
        _PIPELINES[spec] = pipeline
    return pipeline


def worker_init(parent: int | None = None) -> None:
    """Pool initializer: Ctrl-C is the parent's business (a worker always finishes its write), a
    worker dies with its parent (`parent`: its pid; a killed `predict` leaves no worker behind), one
    compute thread per worker (the engine owns the cores), and the heavy imports done up front."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        die_with_parent(parent)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import vllm_terratorch.io.tasks  # noqa: F401  (rasterio, pydantic, the config parsing)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux's PR_SET_PDEATHSIG); if the
    parent is already gone, exit now. Elsewhere nothing is done (a killed parent may leave it behind)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def warm_up(spec: ProcessorSpec | None = None) -> int:
    """A task that only makes a worker import (and build the processor) before real work arrives."""
    if spec is not None:
        get_pipeline(spec)
    return os.getpid()


# Wire form of tensors --------------------------------------------------------------------------


def to_wire(tensor: Any) -> tuple[str, Any]:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return "bfloat16", tensor.view(torch.int16).numpy()
    return "", tensor.numpy()


def from_wire(wire: tuple[str, Any]) -> Any:
    import torch

    kind, array = wire
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if kind == "bfloat16" else tensor


def build_prompts(decoded: dict[str, Any], dtype: Any = None) -> list[dict[str, Any]]:
    """The engine prompts of one decoded scene (one per tile), exactly as `prepare` made them.

    `dtype`: cast to the engine's dtype (scenes decoded at float64 before the engine's dtype was
    known: the one rounding then happens here, so the values equal `prepare`'s at that dtype).
    """
    tiles = {name: from_wire(wire) for name, wire in decoded["tiles"].items()}
    extras = {name: from_wire(wire) for name, wire in decoded["extras"].items()}
    if dtype is not None:
        tiles = {name: value.to(dtype) for name, value in tiles.items()}
        extras = {name: value.to(dtype) for name, value in extras.items()}
    return [tensor_prompt({name: value[index] for name, value in tiles.items()} | extras) for index in range(decoded["count"])]


def outputs_to_wire(outputs: list[Any]) -> tuple[str, Any]:
    import torch

    return to_wire(torch.stack([output.detach().cpu() for output in outputs]))


# Worker tasks ----------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    from vllm_terratorch.errors import TerratorchError

    if isinstance(error, TerratorchError):
        return str(error)
    if isinstance(error, OSError):
        return f"cannot read the file: {error.strerror or error}" if error.filename is None else f"cannot read {error.filename}: {error.strerror or error}"
    return f"{type(error).__name__}: {error}"


def scene_request(pipeline: Any, path: str, indices: list[int] | None) -> tuple[Any, list[Path]]:
    """The `/pooling` request a scene amounts to, and its files in the order `prepare` takes them."""
    from vllm_terratorch.io.schema import GeoTiffRequest
    from vllm_terratorch.io.sources import modality_files
    from vllm_terratorch.predict.inputs import frame_files

    scene = Path(path)
    data: str | list[str] | dict[str, str]
    if not scene.is_dir():
        files, data = [scene], path  # the name carries the acquisition date, as for path requests
    elif pipeline.modalities is not None:
        files = modality_files(scene, pipeline.modalities)
        data = {name: str(file) for name, file in zip(pipeline.modalities, files, strict=True)}
    else:
        files = frame_files(scene)
        data = [str(file) for file in files]
    request = GeoTiffRequest(data=data, data_format="path", out_data_format="path", indices=indices)
    return request, files


def _wire_tiles(tiles: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    import torch

    wired = {}
    for name, stacked in tiles.items():
        if stacked.dtype == torch.float64 and torch.equal(stacked.to(torch.float32).to(torch.float64), stacked):
            stacked = stacked.to(torch.float32)  # the datamodule's float32 values: half the bytes, nothing lost
        wired[name] = to_wire(stacked)
    return wired


def _pixels(path: Path) -> int:
    """A GeoTIFF's pixel count from its header (0 if unreadable: `prepare` then says why)."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as source:
            return source.width * source.height
    except (RasterioError, OSError):
        return 0


def decode_scene(spec: ProcessorSpec, index: int, path: str) -> dict[str, Any]:
    """Read and prepare one scene. On success: wire tiles, extras and the pipeline's `Pending`; for a
    scene over `spec.stream_pixels`, only `stream: True` and its tile count (its tiles are read
    later, chunk by chunk, by `decode_chunk`)."""
    started = time.time()
    try:
        pipeline = get_pipeline(spec)
        request, files = scene_request(pipeline, path, list(spec.indices) if spec.indices is not None else None)
        from vllm_terratorch.io.windows import WindowedScene

        if spec.stream_pixels is not None and WindowedScene.supports(pipeline, request) and _pixels(files[0]) > spec.stream_pixels:
            with WindowedScene(pipeline, request, files) as scene:  # checks every header, as prepare does
                return {"index": index, "ok": True, "stream": True, "count": len(scene.plan), "started": started}
        prompts, pending = pipeline.prepare([file.read_bytes() for file in files], request)  # `pending` travels too
        import torch

        images = [prompt["multi_modal_data"][MODALITY] for prompt in prompts]
        tiles = _wire_tiles({name: torch.stack([image[name] for image in images]) for name in pipeline.image_names})
        return {
            "index": index,
            "ok": True,
            "tiles": tiles,
            "count": len(prompts),
            "extras": {key: to_wire(value) for key, value in images[0].items() if key not in tiles},
            "pending": pending,
            "started": started,
            "decode_s": time.time() - started,
        }
    except Exception as error:  # noqa: BLE001 - every failure of one input is reported, the run goes on
        return {"index": index, "ok": False, "error": describe_error(error), "started": started}


def decode_chunk(spec: ProcessorSpec, index: int, path: str, start: int, stop: int) -> dict[str, Any]:
    """Tiles `start` .. `stop - 1` of a streamed scene, read by window, in `decode_scene`'s form."""
    started = time.time()
    try:
        from vllm_terratorch.io.windows import WindowedScene

        pipeline = get_pipeline(spec)
        request, files = scene_request(pipeline, path, list(spec.indices) if spec.indices is not None else None)
        with WindowedScene(pipeline, request, files) as scene:
            import torch

            # float32 as the datamodule makes them (the engine's dtype is applied in build_prompts)
            tiles = {name: to_wire(value) for name, value in scene.tiles(start, stop, torch.float32).items()}
            extras = {key: to_wire(value) for key, value in scene.extras.items()}
        return {"index": index, "ok": True, "tiles": tiles, "count": stop - start, "extras": extras, "started": started}
    except Exception as error:  # noqa: BLE001
        return {"index": index, "ok": False, "error": describe_error(error), "started": started}


def render_result(spec: ProcessorSpec, index: int, outputs: tuple[str, Any], pending: Any) -> bytes:
    """Tile outputs of one scene -> the bytes of its output file (GeoTIFF, or JSON for classification).

    Goes through the pipeline's own `complete` (its checks included: tile count, non-finite
    outputs of a failed forward), as a `/pooling` request does.
    """
    pipeline = get_pipeline(spec)
    return pipeline.file_bytes(pipeline.complete(list(from_wire(outputs)), pending))


def write_prediction(
    spec: ProcessorSpec, index: int, outputs: tuple[str, Any], pending: Any, target: str, started: float
) -> dict[str, Any]:
    """Render and write one scene's prediction; returns its record fields."""
    try:
        write_atomically(Path(target), render_result(spec, index, outputs, pending))
        return {"index": index, "ok": True, "started": started, "finished": time.time()}
    except Exception as error:  # noqa: BLE001
        return {"index": index, "ok": False, "error": describe_error(error), "started": started, "finished": time.time()}
