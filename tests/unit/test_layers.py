"""The package's shape: layers import one way, vLLM only where the adapter is, no module too big.

Found by reading the source with `ast` (function-local imports included, since those are where an
import cycle hides), and checked for real by importing the vLLM-free layers with vLLM made
unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_terratorch"
# The modules that may import vLLM: the adapter layer and the seams where vLLM calls us.
VLLM_IMPORTERS = ("engine.", "io.processor", "registration", "predict.engine", "cli.serve")
# Layers that must work with vLLM absent: the core, the GeoTIFF pipeline, predict's decode/write
# workers and its own parts, the CLI's offline checks, the test models.
VLLM_FREE = (
    "core", "io", "log", "errors", "envs", "files", "registration", "predict.args", "predict.inputs", "predict.report",
    "predict.tasks", "cli.generate", "cli.export", "cli.validate", "testing.samples",
)
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_import_cycle():
    found = modules()
    edges = {
        name: {dep.removeprefix("vllm_terratorch.") for dep in imported(path) if dep.startswith("vllm_terratorch.")}
        & set(found) - {name}
        for name, path in found.items()
    }
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*trail[trail.index(dep):], dep])
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(found):
        if name not in state:
            visit(name, [name])


def test_vllm_is_imported_only_by_the_adapter_layer():
    offenders = {
        name: sorted(dep for dep in imported(path) if dep.split(".")[0] == "vllm")
        for name, path in modules().items()
        if not name.startswith(VLLM_IMPORTERS)
    }
    assert not {name: deps for name, deps in offenders.items() if deps}, "move these vLLM imports into engine/"


def test_the_vllm_free_layers_import_without_vllm():
    names = sorted(name for name in modules() if name.startswith(VLLM_FREE) and name not in ("io.processor",))
    assert {"core.factory", "io.pipeline", "predict.tasks"} <= set(names)
    script = "import sys\nsys.modules['vllm'] = None\n" + "".join(f"import vllm_terratorch.{name}\n" for name in names)
    script += "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules if sys.modules[m] is not None)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_module_is_too_long_to_read():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {name: n for name, n in lengths.items() if n > MAX_LINES}, f"split modules over {MAX_LINES} lines"
