"""TerraTorch YAML + training checkpoint -> a servable folder (`config.json`, `model.safetensors`).

A Lightning checkpoint carries optimizer state, loss weights and pickled objects; serving needs
only the network's tensors. Exporting reads the checkpoint without executing anything in it, maps
it onto the network built from the YAML with the same strict matching the server uses (so a
checkpoint that does not fit fails here, not at start-up), optionally casts it, runs one dummy
forward, and writes safetensors, which load fast and cannot carry code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_terratorch.errors import ModelSourceError, OutputExistsError
from vllm_terratorch.core.factory import build_network
from vllm_terratorch.cli.generate import (
    CONFIG_NAME,
    generate_config,
    write_config,
)
from vllm_terratorch.cli.validate import Summary, backbone_name, summarize
from vllm_terratorch.core.dtypes import dtype_name, parse_dtype
from vllm_terratorch.core.weights import match_state_dict, read_state_dict
from vllm_terratorch.registration import PLUGINS, kind_for_task
from vllm_terratorch.files import write_atomically

WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"


@dataclass
class ExportResult:
    """The written folder and what went into it."""

    folder: Path
    tensors: int
    dtype: str
    notes: list[str]
    summary: Summary | None


def _check_outdir(outdir: Path, force: bool) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"OUTDIR {outdir} is a file; pass a folder (new or empty)")
    if not outdir.is_dir() or not any(outdir.iterdir()):
        return
    if not force:
        raise OutputExistsError(f"OUTDIR {outdir} is not empty; pass --force to write into it, or choose a new folder")
    # Other safetensors files would be loaded with (or instead of) ours; never delete them for the user.
    strays = sorted(p.name for p in outdir.glob("*.safetensors*") if p.name != WEIGHTS_NAME)
    if strays:
        raise OutputExistsError(
            f"OUTDIR {outdir} holds {', '.join(strays)}, which the server would load alongside {WEIGHTS_NAME}; "
            "remove them or choose a new folder"
        )


def _safetensors_ready(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous tensors, floating ones cast, none sharing memory (safetensors refuses that)."""
    ready: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        ready[name] = tensor
    return ready


def readme_text(folder: Path, class_path: str, backbone: str | None, ttconfig: Path, checkpoint: Path, tensors: int, dtype: str) -> str:
    """A short README stub: what the folder is and the mission's `vllm serve` line for it."""
    kind = kind_for_task(class_path)
    processor = kind.plugin if kind is not None else "<one of: " + ", ".join(PLUGINS) + ">"
    return f"""# {folder.name}

A TerraTorch model (`{class_path}`, backbone `{backbone or 'see config.json'}`) exported for serving
with vLLM by `vllm-terratorch export`, from `{ttconfig.name}` and `{checkpoint.name}`.

- `{CONFIG_NAME}`: the vLLM config (`architectures: ["Terratorch"]`, `pretrained_cfg` with the input
  spec and the YAML's `model` and `data` sections).
- `{WEIGHTS_NAME}`: the network's weights only ({tensors} tensors, {dtype}); no optimizer state.

Serve it (or upload the folder to the Hugging Face Hub and serve the repo id):

```bash
vllm serve {folder.resolve()} \\
  --io-processor-plugin {processor} \\
  --model-impl terratorch \\
  --skip-tokenizer-init \\
  --enforce-eager
```

Check it offline first: `vllm-terratorch validate {folder.resolve()}`.
"""


def export_model(
    ttconfig: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    input_arg: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    check: bool = True,
) -> ExportResult:
    """Write `config.json`, `model.safetensors` and `README.md` into `outdir`."""
    ttconfig, checkpoint, outdir = Path(ttconfig), Path(checkpoint), Path(outdir)
    cast = parse_dtype(dtype) if dtype else None
    generated = generate_config(ttconfig, input_arg)
    _check_outdir(outdir, force)
    if not checkpoint.is_file():
        raise ModelSourceError(f"--checkpoint {checkpoint} does not exist; pass the .ckpt/.pt/.safetensors file of the trained model")
    pretrained = generated.parsed.pretrained_cfg
    network = build_network(pretrained.model)
    matched = match_state_dict(read_state_dict(checkpoint), network.state_dict(), strict=True, source=str(checkpoint))
    tensors = _safetensors_ready(matched, cast)
    stored = dtype_name(cast or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32))
    summary = None
    if check:
        network.load_state_dict(tensors, strict=True)
        summary = summarize(str(outdir), pretrained, network, cast or torch.float32)
        summary.weight_files, summary.tensors_loaded = [WEIGHTS_NAME], len(tensors)
    config = dict(generated.config)
    if cast is not None:
        config["torch_dtype"] = stored
    readme = readme_text(outdir, pretrained.model.class_path, backbone_name(pretrained), ttconfig, checkpoint, len(tensors), stored)
    _write(outdir, config, tensors, readme)
    return ExportResult(outdir, len(tensors), stored, generated.notes, summary)


def _write(outdir: Path, config: dict, tensors: dict[str, torch.Tensor], readme: str) -> None:
    """Weights first, config last: a folder with a config.json is complete."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", "exported_by": "vllm-terratorch"}
    write_atomically(outdir / WEIGHTS_NAME, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    write_atomically(outdir / README_NAME, readme)
    write_config(config, outdir / CONFIG_NAME, force=True)
