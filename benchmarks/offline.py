"""Offline throughput: our backend vs a plain batched PyTorch forward vs the in-tree vLLM model.

One process, the same inputs and weights for every path, warm-up excluded, several repetitions
(median and spread). `--rounds N` runs the paths N times, every other round in reverse order, and
pools the rounds: on a shared machine whose speed drifts, the drift then falls on every path alike
instead of on whichever ran last. Writes `<output>/offline-<model>-<dtype>.json` and `.png`.

    python benchmarks/offline.py --model tiny                       # CPU smoke (seconds)
    python benchmarks/offline.py --model prithvi300 --image-size 512 --dtype bfloat16 --batch-size 8
    python benchmarks/offline.py --model tiny --image-size 224 --batch-size 16 --paths raw,raw-bound,ours --rounds 4

Paths: `raw` (the network alone, at every core: the plain PyTorch loop a user would run instead),
`raw-bound` (CPU: the same forward in a child process started with the environment vLLM gives the
engine's worker for this model: its LD_PRELOAD, and with a separate worker process its OpenMP
thread count and core binding), `adapter` (our model path without vLLM: runs where vLLM is not
installed), `ours` (`LLM.encode` through our backend), `ours-mp` (the same with vLLM's separate
worker process, `distributed_executor_backend="mp"`),
`graphs` (`ours` without `enforce_eager`), `intree` (vLLM's own class), and the opt-in
compiled forward, `adapter-compiled` (no vLLM) and `compiled` (engine). A compiled path takes a
torch.compile mode after `=`, e.g. `--paths raw,adapter,adapter-compiled=reduce-overhead`
(CUDA graphs on a GPU); without one it uses `--compile-mode`.

    python benchmarks/offline.py --model tiny --paths raw,adapter,adapter-compiled=default,adapter-compiled=reduce-overhead --profile

The in-tree path uses the same folder with vLLM's own `Terratorch` class (our plugin disabled in
the engine processes). All images share one `location_coords`, so the in-tree model's batching bug
(request 0's coordinates for the whole batch) does not change its outputs here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from vllm_terratorch import envs
from vllm_terratorch.core.inputs import tensor_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summary, write_results  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"backbone": "prithvi_eo_v2_tiny_tl", "indices": [1, 3, 5, 11], "decoder_channels": 16, "image_size": 64},
    "prithvi300": {"backbone": "prithvi_eo_v2_300_tl", "indices": [5, 11, 17, 23], "decoder_channels": 256, "image_size": 512},
}
PATHS = ("raw", "raw-bound", "adapter", "ours", "ours-mp", "graphs", "intree", "compiled", "adapter-compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_folder(model: str, image_size: int, folder: Path) -> dict[str, Any]:
    from vllm_terratorch.testing.samples import sample_pretrained_cfg, write_model_folder

    spec = MODELS[model]
    cfg = sample_pretrained_cfg(
        "segmentation", image_size=image_size, backbone=spec["backbone"], indices=spec["indices"], decoder_channels=spec["decoder_channels"]
    )
    # The in-tree model would download backbone weights for `true`; ours ignores the switch.
    cfg["model"]["init_args"]["model_args"]["backbone_pretrained"] = False
    if not (folder / "config.json").is_file():
        write_model_folder(folder, cfg, weight_format="pt")  # {"state_dict": ...}: readable by both
    return cfg


def make_inputs(cfg: dict[str, Any], count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shape = cfg["input"]["data"]["pixel_values"]["shape"]
    coords = torch.tensor([[-0.38, 39.47]])
    return [{"pixel_values": torch.randn(shape, generator=generator), "location_coords": coords} for _ in range(count)]


Timing = tuple[list[float], list[torch.Tensor], float]


def timed(run: Callable[[], list[torch.Tensor]], repeats: int) -> Timing:
    """One warm-up call (its outputs and duration are returned: the comparison, and the compile
    time of the compiled paths), then `repeats` timed calls."""
    started = time.perf_counter()
    outputs = run()
    first_pass = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return seconds, outputs, first_pass


def batched(forward: Callable[[int, int], torch.Tensor], count: int, batch: int, device: str) -> Callable[[], list[torch.Tensor]]:
    """A pass over `count` images, `batch` at a time (`forward(start, stop)`), outputs on the CPU."""

    def run() -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, count, batch):
                outputs.extend(forward(start, start + batch).to("cpu", non_blocking=True))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return outputs

    return run


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the in-process paths with `count` torch threads (what vLLM's CPU worker gets)."""
    default = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(default)


def raw_forward(cfg: dict[str, Any], inputs: list[dict[str, torch.Tensor]], dtype: torch.dtype, device: str) -> Callable[[int, int], torch.Tensor]:
    """The network alone, called the way TerraTorch's own inference does: `forward(start, stop)`."""
    from vllm_terratorch.testing.samples import build_sample_task

    network = build_sample_task(cfg).model.to(device=device, dtype=dtype).eval()
    pixels = torch.stack([i["pixel_values"] for i in inputs]).to(device=device, dtype=dtype)
    coords = torch.cat([i["location_coords"] for i in inputs]).to(device=device, dtype=dtype)

    def forward(start: int, stop: int) -> torch.Tensor:
        return network(pixels[start:stop], location_coords=coords[start:stop]).output

    return forward


# What TerraTorch's import sets process-wide (its Clay v1.5 module): the in-tree model's engine imports
# TerraTorch after vLLM's worker has set its own precision, so the in-tree path computes at this one.
TERRATORCH_IMPORT_PRECISION = "medium"


def raw_outputs_at_precision(cfg: dict[str, Any], inputs: list[dict[str, torch.Tensor]], batch: int, dtype: torch.dtype,
                             device: str, precision: str) -> list[torch.Tensor]:
    """The raw forward's outputs at another float32 matmul precision (untimed; for the comparison only)."""
    run = batched(raw_forward(cfg, inputs, dtype, device), len(inputs), batch, device)  # builds at our precision
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        return run()
    finally:
        torch.set_float32_matmul_precision(before)


def time_raw(cfg: dict[str, Any], inputs: list[dict[str, torch.Tensor]], batch: int, dtype: torch.dtype, device: str, repeats: int) -> Timing:
    return timed(batched(raw_forward(cfg, inputs, dtype, device), len(inputs), batch, device), repeats)


def worker_environment(folder: Path, dtype: str) -> dict[str, str]:
    """What vLLM puts in the environment of the process that runs the engine's worker for `folder`,
    beyond this process's own: its `LD_PRELOAD` (tcmalloc, libgomp: set while the config is built,
    inherited by every engine process it starts) and, where the worker has its own process (`mp`),
    that process's OpenMP thread count and binding (`OMP_PLACES`/`OMP_PROC_BIND`, or KMP/GOMP
    affinity), computed by vLLM's own `OMPProcessManager`. With our CPU default (the worker inside
    the engine-core process, engine/compat.worker_in_engine_process) there is no binding."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    config = EngineArgs(model=str(folder), model_impl="terratorch", skip_tokenizer_init=True, dtype=dtype).create_engine_config()
    preload = {"LD_PRELOAD": os.environ["LD_PRELOAD"]} if os.environ.get("LD_PRELOAD") else {}
    if config.parallel_config.distributed_executor_backend != "mp":
        return preload
    configured = dict(os.environ)
    with OMPProcessManager(config).configure_omp_envs(0, 0):
        return preload | {name: value for name, value in os.environ.items() if configured.get(name) != value}


def time_raw_bound(argv: list[str], folder: Path, dtype: str) -> tuple[dict[str, Any], dict[str, str]]:
    """`raw` in a child process started with the environment of the engine's worker (it must be in
    place before the allocator and the OpenMP runtime start, so not in this process): its timing
    entry and that environment."""
    import tempfile

    environment = worker_environment(folder, dtype)
    threads = environment.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="raw-bound-") as scratch:
        command = [sys.executable, __file__, *argv, "--paths", "raw", "--raw-threads", threads, "--rounds", "1", "--output", scratch]
        result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the bound raw run failed: {result.stderr[-1500:]}")
        (child,) = Path(scratch).glob("offline-*.json")
        return json.loads(child.read_text())["paths"]["raw"], environment


def time_adapter(
    folder: Path, inputs: list[dict[str, torch.Tensor]], batch: int, dtype: torch.dtype, device: str, repeats: int, compile_mode: str | None = None,
) -> Timing:
    """Our model path without vLLM: config -> offline build -> checkpoint -> ForwardPlan batches,
    eager or (`compile_mode`) through the served model's `CompiledForward`.

    Runs where vLLM is not installed (the GPU machines' image) and shows what our adapter adds
    on top of the network itself. The compiled variant compiles lazily in the warm-up pass, for
    the one batch size timed here (the served model compiles every bucket at start-up).
    """
    from vllm_terratorch.core.compiled import CompiledForward
    from vllm_terratorch.core.config import load_config
    from vllm_terratorch.core.factory import build_network
    from vllm_terratorch.core.forward import ForwardPlan, task_output
    from vllm_terratorch.core.weights import load_folder_weights

    config = load_config(folder).pretrained_cfg
    network = build_network(config.model)
    load_folder_weights(network, folder)
    network = network.to(device=device, dtype=dtype)
    plan = ForwardPlan.for_network(config.input, network)
    stacked = {name: torch.stack([i[name] for i in inputs]) for name in plan.names}
    compiled = CompiledForward(network, compile_mode, batch) if compile_mode else None

    def forward(start: int, stop: int) -> torch.Tensor:
        args, kwargs = plan.batch({k: v[start:stop] for k, v in stacked.items()}, dtype, device)
        if compiled is not None:
            return compiled(args, kwargs, stop - start)
        return task_output(network(*args, **kwargs))

    return timed(batched(forward, len(inputs), batch, device), repeats)


def flops_per_image(cfg: dict[str, Any], inputs: list[dict[str, torch.Tensor]], device: str) -> float:
    """Measured forward FLOPs of one image (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vllm_terratorch.testing.samples import build_sample_task

    network = build_sample_task(cfg).model.to(device).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(inputs[0]["pixel_values"][None].to(device), location_coords=inputs[0]["location_coords"].to(device))
    return float(counter.get_total_flops())


def profile_forward(
    forward: Callable[[int, int], torch.Tensor], batch: int, device: str, top: int = 15,
) -> list[dict[str, Any]]:
    """The operators (CPU) or kernels (GPU) where one warm batch's time goes, largest first."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.inference_mode():
        forward(0, batch)  # warm (cuDNN / oneDNN algorithm choice)
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=activities) as profiler:
            forward(0, batch)
            if on_gpu:
                torch.cuda.synchronize()

    def own_time(event: Any) -> float:  # microseconds spent in the event itself
        if on_gpu:
            return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))
        return float(event.self_cpu_time_total)

    events = list(profiler.key_averages())
    if on_gpu:  # kernels only: an operator's device time is its kernels' time, counted once
        from torch.autograd import DeviceType

        events = [event for event in events if getattr(event, "device_type", None) == DeviceType.CUDA] or events
    events.sort(key=own_time, reverse=True)
    total = sum(own_time(event) for event in events) or 1.0
    return [
        {"name": event.key[:120], "calls": event.count, "ms": own_time(event) / 1e3, "share": own_time(event) / total}
        for event in events[:top]
    ]


def time_engine(
    folder: Path, inputs: list[dict[str, torch.Tensor]], batch: int, dtype: str, repeats: int, path: str, compile_mode: str | None = None,
) -> Timing:
    """`LLM.encode` through our backend (`ours`), the same with vLLM's own worker process (`ours-mp`:
    `distributed_executor_backend="mp"`, which our CPU default replaces), the same without `enforce_eager` (`graphs`: vLLM's
    CUDA-graph default, which our backend turns into an eager forward, engine/compat.eager_forward),
    our backend with the opt-in compiled forward (`compiled`), or vLLM's own class (`intree`)."""
    from vllm import LLM
    from vllm.model_executor.models.registry import ModelRegistry, _LazyRegisteredModel

    saved_entry = ModelRegistry.models["Terratorch"]
    saved_env = {name: os.environ.get(name) for name in ("VLLM_PLUGINS", "VLLM_TERRATORCH_COMPILE")}
    if path == "intree":
        ModelRegistry.models["Terratorch"] = _LazyRegisteredModel("vllm.model_executor.models.terratorch", "Terratorch")
        os.environ["VLLM_PLUGINS"] = "none"  # engine processes load neither our plugin nor terratorch_fix
    os.environ["VLLM_TERRATORCH_COMPILE"] = compile_mode or "0"
    # Only these entries are put back (not patch.dict): what vLLM itself sets in the environment
    # and registers while the engine starts stays, as it would in a user's process.
    try:
        llm = LLM(
            model=str(folder), model_impl="terratorch", skip_tokenizer_init=True, enforce_eager=path != "graphs",
            enable_mm_embeds=True, dtype=dtype, max_num_seqs=batch, gpu_memory_utilization=0.2 if not torch.cuda.is_available() else 0.8,
            **({"distributed_executor_backend": "mp"} if path == "ours-mp" else {}),
        )
    finally:
        ModelRegistry.models["Terratorch"] = saved_entry
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    prompts = [tensor_prompt(i) for i in inputs]
    try:
        return timed(lambda: [o.outputs.data for o in llm.encode(prompts, pooling_task="plugin", use_tqdm=False)], repeats)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def max_diff(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a.float().cpu() - b.float().cpu()).abs().max()) for a, b in zip(outputs, reference, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--image-size", type=int, help="input size (default: the model's)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="raw batch size = engine max_num_seqs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the paths this many times, every other round in reverse order (A B, B A, ...), each "
        "with --repeats timed calls: slow drift of a shared machine then falls on every path alike",
    )
    parser.add_argument(
        "--paths", default="raw,ours,intree",
        help="comma-separated subset of raw,raw-bound,adapter,ours,ours-mp,graphs,intree,compiled[=MODE],adapter-compiled[=MODE]",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of a compiled path named without one")
    parser.add_argument("--profile", action="store_true", help="profile one batch of the raw path: where its time goes")
    parser.add_argument("--flops", action="store_true", help="measure FLOPs per image and report achieved TFLOP/s")
    parser.add_argument(
        "--raw-threads", type=int, default=None,
        help="torch threads of the raw path (default on CPU: every core, what vLLM's CPU worker gets for a "
        "Terratorch model unless VLLM_CPU_NUM_OF_RESERVED_CPU is set; equal compute for both)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.models"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p.partition("=")[0] not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)} (compiled paths may add =MODE)")
    envs.engine_environment()
    from tqdm import tqdm

    image_size = args.image_size or MODELS[args.model]["image_size"]
    # One folder per TerraTorch version: a folder written by another version may use the other
    # checkpoint layout (decoder_scale_modules), which ours maps and the in-tree model does not.
    folder = args.work_dir / f"{args.model}-{image_size}-terratorch{version('terratorch')}"
    cfg = build_folder(args.model, image_size, folder)
    inputs = make_inputs(cfg, args.num_images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The engine's forward gets every core on CPU (VLLM_CPU_NUM_OF_RESERVED_CPU=0 by default for our
    # architecture, engine/compat.py): raw runs with the same, the whole machine a user would use.
    raw_threads = args.raw_threads or (os.cpu_count() or 1 if device == "cpu" else torch.get_num_threads())
    results: dict[str, Any] = {
        "title": f"{args.model} {image_size}px {args.dtype}, batch {args.batch_size}, {args.num_images} images",
        "model": args.model, "image_size": image_size, "dtype": args.dtype, "batch_size": args.batch_size,
        "num_images": args.num_images, "repeats": args.repeats, "device": device, "machine": machine(),
        "raw_threads": raw_threads,
        "plot_metric": "images_per_s", "paths": {},
    }
    outputs: dict[str, list[torch.Tensor]] = {}
    samples: dict[str, list[list[float]]] = {}  # by path: each round's timed seconds
    first_passes: dict[str, float] = {}
    extras: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, str]] = {}
    for round_index in range(args.rounds):
        order = paths if round_index % 2 == 0 else paths[::-1]
        for path in tqdm(order, desc=f"paths, round {round_index + 1}/{args.rounds}", unit="path"):
            if path in failed:
                continue  # failed in an earlier round
            name, _, mode = path.partition("=")
            compile_mode = (mode or args.compile_mode) if name.endswith("compiled") else None
            try:
                if name == "raw-bound":
                    if device != "cpu":
                        raise RuntimeError("raw-bound is a CPU path (the environment of vLLM's CPU worker)")
                    # The child takes this run's arguments with its own --paths/--raw-threads/--output after them.
                    entry, environment = time_raw_bound(given, folder, args.dtype)
                    seconds, first_pass = entry["seconds_samples"], entry["first_pass_s"]
                    extras[path] = {"worker_environment": environment}
                elif name == "raw":
                    with torch_threads(raw_threads):
                        seconds, outputs[path], first_pass = time_raw(cfg, inputs, args.batch_size, DTYPES[args.dtype], device, args.repeats)
                elif name in ("adapter", "adapter-compiled"):
                    with torch_threads(raw_threads):
                        seconds, outputs[path], first_pass = time_adapter(
                            folder, inputs, args.batch_size, DTYPES[args.dtype], device, args.repeats, compile_mode
                        )
                else:
                    seconds, outputs[path], first_pass = time_engine(
                        folder, inputs, args.batch_size, args.dtype, args.repeats, name, compile_mode
                    )
            except Exception as error:  # noqa: BLE001 - a path that cannot run is reported, not fatal
                failed[path] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                continue
            samples.setdefault(path, []).append(list(seconds))
            first_passes.setdefault(path, first_pass)
            if compile_mode:
                extras.setdefault(path, {})["compile_mode"] = compile_mode
    for path in paths:
        if path in failed:
            results["paths"][path] = failed[path]
            continue
        every = [value for round_seconds in samples[path] for value in round_seconds]
        results["paths"][path] = {
            "seconds": summary(every),
            "seconds_samples": every,
            "images_per_s": summary([args.num_images / s for s in every]),
            # The untimed warm-up pass (of the first round): for adapter-compiled this includes compiling its batch size.
            "first_pass_s": first_passes[path],
            **({"rounds_images_per_s_median": [summary([args.num_images / s for s in r])["median"] for r in samples[path]]}
               if args.rounds > 1 else {}),
            **extras.get(path, {}),
        }
    if args.profile:
        with torch_threads(raw_threads):
            results["profile_raw"] = profile_forward(raw_forward(cfg, inputs, DTYPES[args.dtype], device), args.batch_size, device)
        for row in results["profile_raw"]:
            print(f"{row['share']:6.1%} {row['ms']:9.3f} ms {row['calls']:5d}x  {row['name']}")
    if args.flops:
        flops = flops_per_image(cfg, inputs, device)
        results["flops_per_image"] = flops
        for entry in results["paths"].values():
            if "images_per_s" in entry:
                entry["achieved_tflops"] = flops * entry["images_per_s"]["median"] / 1e12
    if "raw" in outputs:
        for path in outputs:
            if path != "raw":
                results["paths"][path]["max_abs_diff_vs_raw"] = max_diff(outputs[path], outputs["raw"])
        if "intree" in outputs:
            # How far TerraTorch's precision alone moves a float32 forward on this machine (0 where
            # it changes nothing; bf16-sized on CPUs with AMX, TF32-sized on GPUs): the in-tree path's
            # distance from raw is that much, and its speed includes that precision's speed-up.
            with torch_threads(raw_threads):
                reduced = raw_outputs_at_precision(cfg, inputs, args.batch_size, DTYPES[args.dtype], device,
                                                   TERRATORCH_IMPORT_PRECISION)
            results["paths"]["intree"]["float32_matmul_precision"] = TERRATORCH_IMPORT_PRECISION
            results["raw_at_intree_precision_max_abs_diff_vs_raw"] = max_diff(reduced, outputs["raw"])
        raw_rate = results["paths"]["raw"]["images_per_s"]["median"]
        timed_paths = [path for path, entry in results["paths"].items() if path != "raw" and "images_per_s" in entry]
        results["ratios_vs_raw"] = {path: results["paths"][path]["images_per_s"]["median"] / raw_rate for path in timed_paths}
        if "images_per_s" in results["paths"].get("raw-bound", {}):  # equal compute: the engine worker's environment
            bound_rate = results["paths"]["raw-bound"]["images_per_s"]["median"]
            results["ratios_vs_raw_bound"] = {
                path: results["paths"][path]["images_per_s"]["median"] / bound_rate for path in timed_paths if path != "raw-bound"
            }
    stem = f"offline-{args.model}-{image_size}-{args.dtype}-b{args.batch_size}"
    json_path, png_path = write_results(results, args.output, stem)
    for path, entry in results["paths"].items():
        rate = entry.get("images_per_s", {}).get("median")
        print(f"{path:>7}: " + (f"{rate:8.1f} images/s (first pass {entry['first_pass_s']:.1f} s)" if rate else entry.get("error", "")[:200]))
    print(f"ratios vs raw: {results.get('ratios_vs_raw')}\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
