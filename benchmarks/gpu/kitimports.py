"""Will importing the entry modules find every module they import at import time? Read from source.

A static walk of module-level imports: the statements that run when a module is imported (module
and class bodies, loops, `with`, `try`), not function bodies and not `if TYPE_CHECKING:`. Each
import is *plain*, *conditional* (under a module-level `if`: it may not run) or *guarded* (in a
`try:` whose `except` catches ImportError without raising again, or under
`contextlib.suppress(ImportError)`: the importer carries on without it).
`importlib.import_module("literal")` counts as an import.

    python kitimports.py SITE [--path FOLDER ...] --entry MODULE ... \\
        [--image-list image-packages.txt --image-site SITE_PACKAGES] [--dists]

Modules are found in SITE (the installed kit), the --path folders (the repo), the standard library
and the image (the top-level modules of every --image-list package, read from an --image-site that
has them installed, e.g. .venv312's site-packages). A plain import, from a module that a chain of
plain imports reaches, of a module found nowhere is an error (exit status 1): that import fails on
the GPU machine too. Unfound conditional imports, and plain ones from conditionally reached
modules, are listed as warnings. `--dists` prints, for every distribution in SITE, how the entries
reach it (needed / conditional / guarded / unreached) and the import chain.

Dynamic imports by computed names (vLLM's qualified-name strings, plugin entry points) are not
seen: name what they load as entries.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from kitcheck import read_image_list, record_files

# Top-level modules of image packages that the local venv (--image-site) does not have installed.
IMAGE_MODULES_NOT_IN_VENV = {"nvidia-ml-py": ["pynvml"]}
GUARD_EXCEPTIONS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
PLAIN, CONDITIONAL, GUARDED = "plain", "conditional", "guarded"
RANK = {PLAIN: 0, CONDITIONAL: 1, GUARDED: 2}


@dataclass(frozen=True)
class Import:
    module: str  # must be a module (`import a.b` -> a.b; `from a.b import c` -> a.b)
    names: tuple[str, ...]  # `from a.b import c`: c may be a submodule or an attribute
    kind: str
    line: int


class ModuleIndex:
    """Dotted module name -> file (a .py, an extension, or a folder for a namespace package)."""

    def __init__(self, folders: list[Path]) -> None:
        self.files: dict[str, Path] = {}
        for folder in folders:
            for root, dirs, files in os.walk(folder):
                rel = Path(root).relative_to(folder)
                if any(not part.isidentifier() for part in rel.parts):
                    dirs[:] = []
                    continue
                if rel.parts:
                    self.files.setdefault(".".join(rel.parts), Path(root))  # namespace unless __init__ below
                for file in files:
                    name = self._module_name(rel, file)
                    if name and (name not in self.files or self.files[name].is_dir()):
                        self.files[name] = Path(root) / file

    @staticmethod
    def _module_name(rel: Path, file: str) -> str | None:
        if file.endswith(".py"):
            stem = file[:-3]
        elif file.endswith(".so"):
            stem = file.split(".", 1)[0]
        else:
            return None
        if not stem.isidentifier():
            return None
        parts = list(rel.parts) + ([] if stem == "__init__" else [stem])
        return ".".join(parts) if parts else None

    def is_package(self, name: str) -> bool:
        path = self.files.get(name)
        return path is not None and (path.name == "__init__.py" or path.is_dir())


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _exception_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:
        return {"BaseException"}
    nodes = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {n.id if isinstance(n, ast.Name) else n.attr for n in nodes if isinstance(n, (ast.Name, ast.Attribute))}


def _is_guard(node: ast.Try) -> bool:
    """An except that catches ImportError and does not raise (again) lets the importer go on."""
    return any(_exception_names(h) & GUARD_EXCEPTIONS and not any(isinstance(s, ast.Raise) for s in h.body)
               for h in node.handlers)


def _suppresses_import_error(item: ast.withitem) -> bool:
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "suppress") or (
        isinstance(func, ast.Name) and func.id == "suppress")
    return named and any(isinstance(a, (ast.Name, ast.Attribute)) and
                         (a.id if isinstance(a, ast.Name) else a.attr) in GUARD_EXCEPTIONS for a in call.args)


def _weaker(kind: str, other: str) -> str:
    return kind if RANK[kind] >= RANK[other] else other


def module_level_imports(tree: ast.Module, module: str, is_package: bool) -> list[Import]:
    """Each import that runs when `module` is imported, with how sure it is to run."""
    found: list[Import] = []
    package = module if is_package else module.rpartition(".")[0]

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - node.level + 1] if node.level > 1 else base
        return ".".join(base + ([node.module] if node.module else []))

    def visit(statements: list[ast.stmt], kind: str) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend(Import(alias.name.removesuffix(".__init__"), (), kind, node.lineno)
                             for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.append(Import(absolute(node).removesuffix(".__init__"), tuple(a.name for a in node.names),
                                    kind, node.lineno))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.ClassDef):
                visit(node.body, kind)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body, _weaker(kind, CONDITIONAL))
                visit(node.orelse, _weaker(kind, CONDITIONAL))
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body, _weaker(kind, GUARDED) if _is_guard(node) else kind)
                for handler in node.handlers:
                    visit(handler.body, _weaker(kind, CONDITIONAL))
                visit(node.orelse, kind)
                visit(node.finalbody, kind)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                guarded = any(_suppresses_import_error(i) for i in node.items)
                visit(node.body, _weaker(kind, GUARDED) if guarded else kind)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                visit(node.body, kind)
                visit(node.orelse, kind)
            else:
                for call in ast.walk(node):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr == "import_module" and call.args
                            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
                            and not call.args[0].value.startswith(".")):
                        found.append(Import(call.args[0].value, (), kind, node.lineno))

    visit(tree.body, PLAIN)
    return found


class ImportGraph:
    """Module-level import edges between the modules of an index, parsed on demand."""

    def __init__(self, index: ModuleIndex) -> None:
        self.index = index
        self._imports: dict[str, list[Import]] = {}

    def imports(self, module: str) -> list[Import]:
        if module not in self._imports:
            path = self.index.files.get(module)
            found: list[Import] = []
            if path is not None and path.suffix == ".py":
                try:
                    tree = ast.parse(path.read_bytes(), filename=str(path))
                    found = module_level_imports(tree, module, self.index.is_package(module))
                except (SyntaxError, ValueError):
                    pass
            self._imports[module] = [i for i in found if i.module]
        return self._imports[module]

    def targets(self, module: str) -> list[tuple[str, str]]:
        """(module imported, kind): a submodule's package first, then each import's modules."""
        parent = module.rpartition(".")[0]
        out = [(parent, PLAIN)] if parent else []
        for imp in self.imports(module):
            parts = imp.module.split(".")
            out += [(".".join(parts[: i + 1]), imp.kind) for i in range(len(parts))]
            out += [(f"{imp.module}.{n}", imp.kind) for n in imp.names if f"{imp.module}.{n}" in self.index.files]
        return out

    def reach(self, entries: list[str], kinds: set[str]) -> dict[str, str | None]:
        """Module -> the module that first imported it (None for entries), following `kinds`."""
        seen: dict[str, str | None] = {e: None for e in entries}
        queue = deque(entries)
        while queue:
            module = queue.popleft()
            for target, kind in self.targets(module):
                if kind in kinds and target in self.index.files and target not in seen:
                    seen[target] = module
                    queue.append(target)
        return seen


def chain(seen: dict[str, str | None], module: str) -> list[str]:
    out = [module]
    while seen.get(out[-1]) is not None:
        out.append(seen[out[-1]])
    return out[::-1]


def image_modules(image_list: Path | None, image_site: Path | None) -> set[str]:
    """Top-level module names of the image's packages, read from a site-packages that has them."""
    if image_list is None or image_site is None:
        return set()
    wanted = set(read_image_list(image_list))
    names = {m for dist, modules in IMAGE_MODULES_NOT_IN_VENV.items() if dist in wanted for m in modules}
    for rel, dist in record_files(image_site).items():
        first = rel.split(os.sep, 1)[0]
        if dist in wanted and not first.endswith((".dist-info", ".data")) and first != "bin":
            names.add(first.split(".", 1)[0])
    return names


@dataclass
class Findings:
    errors: list[str]
    warnings: list[str]


def unresolved(graph: ImportGraph, entries: list[str], elsewhere: set[str]) -> Findings:
    """Imports of modules found neither in the index nor (by top-level name) in `elsewhere`."""
    strong = graph.reach(entries, {PLAIN})
    weak = graph.reach(entries, {PLAIN, CONDITIONAL})
    errors, warnings = [], []
    for module in weak:
        for imp in graph.imports(module):
            if imp.kind == GUARDED or imp.module.split(".")[0] in elsewhere or imp.module in graph.index.files:
                continue
            where = f"{module}:{imp.line} imports {imp.module} ({imp.kind})"
            if module in strong and imp.kind == PLAIN:
                errors.append(f"{where}, found nowhere; reached by {' > '.join(chain(strong, module))}")
            else:
                warnings.append(f"{where}, found nowhere; reached by {' > '.join(chain(weak, module))}")
    for entry in entries:
        if entry not in graph.index.files and entry.split(".")[0] not in elsewhere:
            errors.append(f"entry {entry} found nowhere")
    return Findings(sorted(errors), sorted(warnings))


def dists_reached(graph: ImportGraph, site: Path, entries: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Distribution in SITE -> (needed | conditional | guarded | unreached, the chain reaching it)."""
    owned = {os.path.normpath(site / rel): dist for rel, dist in record_files(site).items()}
    result = {d: ("unreached", []) for d in set(owned.values())}
    order = {"unreached": 0, "guarded": 1, "conditional": 2, "needed": 3}
    for kinds, label in (({PLAIN, CONDITIONAL, GUARDED}, "guarded"), ({PLAIN, CONDITIONAL}, "conditional"),
                         ({PLAIN}, "needed")):
        seen = graph.reach(entries, kinds)
        for module in seen:
            dist = owned.get(os.path.normpath(graph.index.files[module])) if module in graph.index.files else None
            if dist is not None and order[label] > order[result[dist][0]]:
                result[dist] = (label, chain(seen, module))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--path", type=Path, nargs="*", default=[], help="more folders to find modules in")
    parser.add_argument("--entry", nargs="+", required=True)
    parser.add_argument("--image-list", type=Path)
    parser.add_argument("--image-site", type=Path)
    parser.add_argument("--dists", action="store_true", help="how each distribution in SITE is reached")
    args = parser.parse_args()
    site = args.site.resolve()
    graph = ImportGraph(ModuleIndex([site, *(p.resolve() for p in args.path)]))
    if args.dists:
        result = dists_reached(graph, site, args.entry)
        for dist in sorted(result, key=lambda d: (result[d][0], d)):
            kind, how = result[dist]
            print(f"{kind:11} {dist:40} {' > '.join(how)}")
        return 0
    elsewhere = set(sys.stdlib_module_names) | {"__future__"} | image_modules(args.image_list, args.image_site)
    findings = unresolved(graph, args.entry, elsewhere)
    for line in findings.warnings:
        print(f"  warning: {line}")
    for line in findings.errors:
        print(f"ERROR {line}")
    print(f"kitimports: {len(graph._imports)} modules read from {len(args.entry)} entries: "
          f"{len(findings.errors)} errors, {len(findings.warnings)} warnings")
    return 1 if findings.errors else 0


if __name__ == "__main__":
    sys.exit(main())
