"""Does the GPU kit plus the GPU image's own packages satisfy every declared requirement?

The kit (`benchmarks/gpu/kit.sh`) carries vLLM, TerraTorch and what they need that the GPU image
lacks. This checks, with no GPU and no network, every `Requires-Dist` of every package in the set
(environment markers evaluated for CPython 3.12.3 on Linux x86_64; a requirement under an extra is
checked only when something in the set asks for that extra) against what will be importable there:
the kit's packages and the image's.

    python kitcheck.py                                  # the committed lock (kit.lock.json; CI)
    python kitcheck.py --kit /tmp/kit                   # an unpacked kit's *.dist-info instead
    python3 kitcheck.py --kit /tmp/kit --image live     # on the GPU machine: the image as it is

The lock (`--lock`, default kit.lock.json beside this file) gives the top-level requests, the
packages expected from the image (with their metadata, so torch's own pins are checked too) and
the packages dropped from the kit on purpose, each with its reason. `--kit` replaces the lock's kit
packages by those installed in a folder. `--image` is the image's package list (image-packages.txt:
NAME [VERSION] a line; a package listed without a version counts as present and is reported as
"version not known"), or `live`: the distributions this interpreter sees outside the kit folder.

Exit status 0 when every requirement is satisfied or waived (each waiver is printed with its
reason), 1 with a `FAIL package requires 'requirement', found ...` line for each one that is not,
2 on a usage error. Needs `packaging` only.
"""

from __future__ import annotations

import argparse
import csv
import email.parser
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

HERE = Path(__file__).resolve().parent
IMAGE_LIST = HERE / "image-packages.txt"
LOCK = HERE / "kit.lock.json"

# The GPU image's interpreter (KINDS.md: python3 is Python 3.12.3) on Linux x86-64. Every marker
# variable is given, so the result does not depend on the interpreter running this check.
TARGET_ENVIRONMENT = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": "3.12",
    "sys_platform": "linux",
}

# Requirements the kit leaves unsatisfied on purpose, besides those on dropped packages (whose
# reasons the lock carries): (package, required name) -> why. One that is satisfied is reported
# as stale.
WAIVERS: dict[tuple[str, str], str] = {
    ("vllm", "numba"): (
        "vLLM pins numba==0.65.0 (it jits the n-gram speculative decoder and a few batch helpers); the "
        "image's numba 0.68 is used instead: numba 0.65 refuses at import a numpy newer than 2.4, so "
        "carrying it means carrying numpy 2.3.5 as well, shadowing the image's numpy 2.5.2 under every "
        "compiled package there (torch, scipy, pandas, opencv, jax, ...)"
    ),
    ("mistral-common", "numpy"): (
        "mistral_common caps numpy<2.4 on Python <= 3.12 (metadata only; every release vLLM accepts, "
        ">=1.11.5, does); vLLM imports it for Mistral tokenizers, which an image model never uses; the "
        "image's numpy 2.5.2 stays, for the reason given for numba"
    ),
}


def normalise(name: str) -> str:
    """PEP 503 name normalisation: lowercase, runs of `-`, `_`, `.` become one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_info_name(folder: Path) -> str:
    """`Foo_Bar-1.0.dist-info` -> `foo-bar`."""
    return normalise(folder.name.removesuffix(".dist-info").rsplit("-", 1)[0])


def record_files(site: Path) -> dict[str, str]:
    """Installed file (path relative to SITE) -> distribution, from every RECORD in SITE.

    `pip install --target` records scripts and data files relative to its scratch lib folder
    (`../../bin/vllm`); they end up at the top of SITE (`bin/vllm`).
    """
    owner: dict[str, str] = {}
    for record in sorted(site.glob("*.dist-info/RECORD")):
        dist = dist_info_name(record.parent)
        with record.open(newline="") as handle:
            for row in csv.reader(handle):
                if not row:
                    continue
                rel = os.path.normpath(row[0].removeprefix("../../"))
                if not rel.startswith("..") and (site / rel).is_file():
                    owner[rel] = dist
    return owner


@dataclass(frozen=True)
class Dist:
    """One distribution that will be importable: where it comes from and what it declares."""

    name: str
    version: str | None  # None: present, version not known
    source: str  # "kit" or "image"
    requires_dist: tuple[str, ...] | None = None  # None: not known, so not checked
    requires_python: str | None = None
    resolved: str | None = None  # an image package the lock resolved to another version than the image's


@dataclass
class Lock:
    kit: dict[str, Dist]
    image: dict[str, Dist]  # what the lock expects from the image: the resolved version's metadata
    dropped: dict[str, str]  # name -> why the kit leaves it out
    requested: list[str]

    def image_as_listed(self, listed: dict[str, Dist]) -> dict[str, Dist]:
        """The image's packages at the versions `listed` gives, with the lock's metadata where the
        version is the one resolved (or not known); another version keeps no requirements."""
        out = {}
        for name, dist in listed.items():
            meta = self.image.get(name)
            if meta is None:
                out[name] = dist
            elif dist.version is None or Version(dist.version) == Version(meta.version or "0"):
                out[name] = Dist(name, dist.version, "image", meta.requires_dist, meta.requires_python)
            else:
                out[name] = Dist(name, dist.version, "image", resolved=meta.version)
        return out


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    unknown_versions: dict[str, set[str]] = field(default_factory=dict)  # image package -> requirers
    waived: list[str] = field(default_factory=list)
    stale_waivers: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


def read_image_list(path: Path) -> dict[str, Dist]:
    """`image-packages.txt`: NAME [VERSION] a line, `#` comments."""
    dists = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ValueError(f"{path}: expected 'NAME [VERSION]', got {line!r}")
        name = normalise(words[0])
        dists[name] = Dist(name, words[1] if len(words) == 2 else None, "image")
    return dists


def read_live_image(skip: Iterable[Path]) -> dict[str, Dist]:
    """The distributions this interpreter sees outside the `skip` folders (the kit), with their
    versions: what the image really has."""
    skipped = [os.path.realpath(p) for p in skip]
    paths = [p for p in sys.path if not any(os.path.realpath(p or ".").startswith(s) for s in skipped)]
    dists: dict[str, Dist] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = normalise(dist.metadata["Name"] or "")
        if name and name not in dists:  # the first on the path wins, as at import
            dists[name] = Dist(name, dist.version, "image")
    return dists


def read_kit_folder(folder: Path) -> dict[str, Dist]:
    """The `*.dist-info/METADATA` of every package installed (`pip install --target`) in `folder`."""
    dists = {}
    for meta in sorted(folder.glob("*.dist-info/METADATA")):
        message = email.parser.Parser().parsestr(meta.read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name = normalise(message["Name"])
        dists[name] = Dist(name, message["Version"], "kit", tuple(message.get_all("Requires-Dist") or ()),
                           message["Requires-Python"])
    if not dists:
        raise ValueError(f"{folder}: no *.dist-info/METADATA (not an unpacked kit?)")
    return dists


def read_lock(path: Path) -> Lock:
    """The lock's packages by source (image entries at the version resolved: see image_as_listed)."""
    data = json.loads(path.read_text())
    lock = Lock({}, {}, {}, list(data.get("requested", [])))
    for entry in data["packages"]:
        name = normalise(entry["name"])
        if entry["source"] == "kit":
            lock.kit[name] = Dist(name, entry["version"], "kit", tuple(entry["requires_dist"]),
                                  entry["requires_python"])
        elif entry["source"] == "dropped":
            lock.dropped[name] = entry["dropped"]
        else:
            lock.image[name] = Dist(name, entry["version"], "image", tuple(entry["requires_dist"]),
                                    entry["requires_python"])
    return lock


def _matches(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({**TARGET_ENVIRONMENT, "extra": extra})


def active_requirements(reqs: Iterable[str], extras: Iterable[str]) -> list[Requirement]:
    """The requirements that apply on the target, with these extras of the package requested."""
    wanted = ("", *sorted(extras))
    return [req for req in map(Requirement, reqs) if any(_matches(req, e) for e in wanted)]


def requested_extras(dists: dict[str, Dist], roots: Iterable[str]) -> dict[str, set[str]]:
    """Package -> the extras something in the set (or a top-level request) asks for, to a fixpoint."""
    extras: dict[str, set[str]] = {name: set() for name in dists}
    pending = [Requirement(r) for r in roots]
    for dist in dists.values():
        pending += active_requirements(dist.requires_dist or (), ())
    while pending:
        req = pending.pop()
        name = normalise(req.name)
        new = {normalise(e) for e in req.extras} - extras.setdefault(name, set())
        if not new or name not in dists:
            continue
        extras[name] |= new
        pending += [sub for sub in active_requirements(dists[name].requires_dist or (), new)
                    if not _matches(sub, "")]
    return extras


def _contains(spec: SpecifierSet, version: str) -> bool:
    try:
        return spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def check(kit: dict[str, Dist], image: dict[str, Dist], roots: Iterable[str] = (),
          dropped: dict[str, str] | None = None) -> Report:
    """Every active requirement of every package with known metadata, against kit ∪ image."""
    dropped = dropped or {}
    available = {**image, **kit}  # the kit comes first on PYTHONPATH
    report = Report()
    roots = list(roots)
    extras = requested_extras(available, roots)
    requirers: list[tuple[str, Requirement]] = [("(requested)", Requirement(r)) for r in roots]
    for name in sorted(available):
        dist = available[name]
        if dist.resolved is not None:
            report.unchecked.append(f"{name} {dist.version} (resolved: {dist.resolved})")
        if dist.requires_dist is None:
            continue
        python = TARGET_ENVIRONMENT["python_full_version"]
        supported = SpecifierSet(dist.requires_python or "")
        if dist.requires_python and dist.version is not None and not _contains(supported, python):
            report.failures.append(f"{name} {dist.version} ({dist.source}) requires Python '{dist.requires_python}', "
                                   f"found {python}")
        requirers += [(name, req) for req in active_requirements(dist.requires_dist, extras.get(name, ()))]
    waived, satisfied = set(), set()
    for requirer, req in requirers:
        report.checked += 1
        wanted = normalise(req.name)
        found = available.get(wanted)
        problem = None
        if found is None:
            problem = "not found"
        elif found.version is None:
            report.unknown_versions.setdefault(wanted, set()).add(f"{requirer}: {req}")
        elif req.specifier and not _contains(req.specifier, found.version):
            problem = f"found {wanted} {found.version} ({found.source})"
        key = (requirer, wanted)
        if problem is None:
            satisfied.add(key)
        elif found is None and wanted in dropped:
            report.waived.append(f"{requirer} requires '{req}', {problem}: dropped from the kit: {dropped[wanted]}")
        elif key in WAIVERS:
            waived.add(key)
            report.waived.append(f"{requirer} requires '{req}', {problem}: {WAIVERS[key]}")
        else:
            report.failures.append(f"{requirer} requires '{req}', {problem}")
    report.stale_waivers = [f"{a} -> {b}: satisfied, the waiver is no longer needed"
                            for a, b in sorted((satisfied & WAIVERS.keys()) - waived)]
    return report


def shadows(kit: dict[str, Dist], image: dict[str, Dist]) -> list[str]:
    """Kit packages that the image also has (the kit's copy wins on PYTHONPATH)."""
    return [f"{name} {kit[name].version} (image: {image[name].version or 'version not known'})"
            for name in sorted(kit) if name in image]


def print_report(report: Report, kit: dict[str, Dist], image: dict[str, Dist], verbose: bool = False,
                 out: TextIO = sys.stdout) -> None:
    print(f"kitcheck: {len(kit)} kit packages, {len(image)} image packages, "
          f"{report.checked} requirements checked", file=out)
    for line in shadows(kit, image):
        print(f"  shadows the image: {line}", file=out)
    if report.unknown_versions:
        print(f"  image packages required whose version is not known ({len(report.unknown_versions)}), "
              f"counted as present: {', '.join(sorted(report.unknown_versions))}", file=out)
        if verbose:
            for name in sorted(report.unknown_versions):
                print(f"    {name}: wanted by {'; '.join(sorted(report.unknown_versions[name]))}", file=out)
    for line in report.unchecked:
        print(f"  image package kept at its own version, whose own requirements are not known: {line}", file=out)
    for line in report.waived:
        print(f"  WAIVED {line}", file=out)
    for line in report.stale_waivers:
        print(f"  STALE WAIVER {line}", file=out)
    for line in report.failures:
        print(f"FAIL {line}", file=out)
    print("kitcheck: OK" if report.ok else f"kitcheck: {len(report.failures)} unsatisfied", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file (default: %(default)s)")
    parser.add_argument("--kit", type=Path, help="an unpacked kit folder (its *.dist-info/METADATA)")
    parser.add_argument("--image", default=str(IMAGE_LIST),
                        help="the image's package list (default: %(default)s), or 'live'")
    parser.add_argument("-v", "--verbose", action="store_true", help="who wants each image package of unknown version")
    args = parser.parse_args(argv)
    try:
        lock = read_lock(args.lock)
        kit = read_kit_folder(args.kit) if args.kit is not None else lock.kit
        if args.image == "live":
            image = lock.image_as_listed(read_live_image([args.kit] if args.kit is not None else []))
        else:
            image = lock.image_as_listed(read_image_list(Path(args.image)))
    except (OSError, ValueError, KeyError, InvalidRequirement) as error:
        print(f"kitcheck: {error}", file=sys.stderr)
        return 2
    report = check(kit, image, lock.requested, lock.dropped)
    print_report(report, kit, image, args.verbose)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
