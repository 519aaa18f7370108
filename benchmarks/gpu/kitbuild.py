"""The Python steps of `benchmarks/gpu/kit.sh build` (run there; each step is one subcommand).

    stand-ins REPORT DIR        metadata-only wheels of the image's torch/torchvision/torchaudio
    constraints IMAGE_LIST ...  the image's known versions as pip constraints
    lock REPORT ...             the resolved set -> kit.lock.json + the wheels to download
    streams SITE ...            the installed kit cut into streams of at most --max-raw bytes
    pack STREAMS ...            streams (compressed) bin-packed into archives of at most --limit bytes
    manifest ...                kit-manifest.md: what is carried, where, and why
    ours PYPROJECT SITE         vllm_terratorch's *.dist-info (entry points), not its code
    image-emulation ...         the image's packages, as far as a local venv has them (kit.sh check)
    traced DIR SITE ...         what a traced run imported (kit.sh trace)

Only the standard library and `packaging` (through kitcheck).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

from packaging.requirements import Requirement

from kitcheck import active_requirements, normalise, read_image_list, record_files

MIB = 1 << 20


def stand_ins(args: argparse.Namespace) -> None:
    """Wheels with nothing but the real METADATA (Requires-Dist included) of the packages in REPORT.

    The resolver then sees the image's torch exactly as pip would see the real one: its pins
    (triton==3.6.0, the nvidia-* libraries, sympy, ...) keep everything else on the image's versions.
    Prints one `name @ file://...` requirement a line.
    """
    report = json.loads(Path(args.report).read_text())
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in report["install"]:
        meta = item["metadata"]
        name, version = meta["name"], meta["version"]
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        if meta.get("requires_python"):
            lines.append(f"Requires-Python: {meta['requires_python']}")
        lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra") or []]
        lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist") or []]
        dist_info = f"{name}-{version}.dist-info"
        wheel = out / f"{name}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{dist_info}/METADATA", "\n".join(lines) + "\n")
            archive.writestr(f"{dist_info}/WHEEL",
                             "Wheel-Version: 1.0\nGenerator: kitbuild\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            archive.writestr(f"{dist_info}/RECORD", "")
        print(f"{name} @ {wheel.resolve().as_uri()}")


def constraints(args: argparse.Namespace) -> None:
    """`name==version` for every image package of known version, minus the released names."""
    released = {normalise(n) for n in args.release}
    skip = {normalise(n) for n in args.skip}
    for name, dist in sorted(read_image_list(Path(args.image)).items()):
        if dist.version is not None and name not in released | skip:
            print(f"{name}=={dist.version}")


def _reached(meta: dict[str, dict], roots: list[str], dropped: set[str]) -> dict[str, set[str]]:
    """Resolved package -> who requires it, walking active requirements from the roots (extras
    included) without entering dropped packages."""
    reached: dict[str, set[str]] = {}
    extras: dict[str, set[str]] = {}
    pending = [("(requested)", Requirement(r)) for r in roots]
    while pending:
        requirer, req = pending.pop()
        name = normalise(req.name)
        if name not in meta:
            continue
        first = name not in reached
        reached.setdefault(name, set()).add(requirer)
        new = {normalise(e) for e in req.extras} - extras.setdefault(name, set())
        extras[name] |= new
        if name not in dropped and (first or new):
            pending += [(name, sub) for sub in active_requirements(meta[name].get("requires_dist") or [], extras[name])]
    return reached


def lock(args: argparse.Namespace) -> None:
    """Classify the resolved set: carried by the kit, expected from the image, or dropped; write it.

    A resolved package the image has (by name) is not carried, unless --shadow names it; its lock
    entry keeps the image's version when known. --drop NAME=REASON leaves a package out, and with
    it whatever only dropped packages need. Writes the wheels to download as a pip requirements
    file with hashes (--download; wheels built here from an sdist are not in it), and every carried
    wheel's file name (--wheels).
    """
    report = json.loads(Path(args.report).read_text())
    image = read_image_list(Path(args.image))
    shadow = {normalise(k): v for k, v in (s.split("=", 1) for s in args.shadow)}
    drop = {normalise(k): v for k, v in (s.split("=", 1) for s in args.drop)}
    meta = {normalise(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    unknown = (set(shadow) | set(drop)) - set(meta)
    if unknown:
        sys.exit(f"kitbuild lock: --shadow/--drop name packages that were not resolved: {sorted(unknown)}")
    reached = _reached(meta, args.requested, set(drop))
    packages, downloads, wheels = [], [], []
    for item in sorted(report["install"], key=lambda i: normalise(i["metadata"]["name"])):
        meta_i, info = item["metadata"], item["download_info"]
        name = normalise(meta_i["name"])
        url = info["url"]
        entry = {"name": name, "version": meta_i["version"]}
        if name in image and name not in shadow:
            entry |= {"source": "image", "image_version": image[name].version}
        elif name in drop:
            entry |= {"source": "dropped", "dropped": drop[name]}
        elif name not in reached:
            needers = sorted(n for n in meta if n not in reached or n in drop
                             if name in {normalise(Requirement(r).name) for r in meta[n].get("requires_dist") or []})
            entry |= {"source": "dropped", "dropped": f"only what is dropped needs it ({', '.join(needers) or '?'})"}
        else:
            entry["source"] = "kit"
            if name in image:
                entry |= {"image_version": image[name].version, "shadows": shadow[name]}
            wheel = url.rsplit("/", 1)[-1]
            entry["wheel"] = wheel
            wheels.append(wheel)
            if url.startswith("file:"):
                entry["built_here_from_sdist"] = True
            else:
                sha256 = info.get("archive_info", {}).get("hashes", {}).get("sha256")
                entry |= {"url": url, "sha256": sha256}
                downloads.append(f"{meta_i['name']}=={meta_i['version']} --hash=sha256:{sha256}")
        entry |= {"requires_python": meta_i.get("requires_python"), "requires_dist": meta_i.get("requires_dist") or []}
        packages.append(entry)
    out = {
        "comment": "Written by benchmarks/gpu/kit.sh build (kitbuild.py lock) from pip's resolution; "
                   "read by kitcheck.py. source 'kit': carried in the archives; 'image': the GPU image's "
                   "own (image_version: the version known there, null if not known); 'dropped': left out "
                   "of the kit on purpose (why: 'dropped').",
        "target": "CPython 3.12.3, manylinux x86_64 (the nvidia-h200 image)",
        "pip": report.get("pip_version"),
        "requested": args.requested,
        "constraints": Path(args.constraints).read_text().split() if args.constraints else [],
        "packages": packages,
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    Path(args.download).write_text("".join(f"{d}\n" for d in downloads))
    Path(args.wheels).write_text("".join(f"{wheel}\n" for wheel in wheels))
    count = {s: sum(p["source"] == s for p in packages) for s in ("kit", "image", "dropped")}
    print(f"kitbuild lock: {len(packages)} resolved: {count['kit']} carried, {count['image']} from the image, "
          f"{count['dropped']} dropped")


def _owners(site: Path) -> dict[str, str]:
    """File (relative to SITE) -> the distribution whose RECORD lists it; `(unowned)` otherwise."""
    owner = record_files(site)
    for root, _, files in os.walk(site):
        for file in files:
            owner.setdefault(os.path.relpath(os.path.join(root, file), site), "(unowned)")
    return owner


def _split(files: list[tuple[str, int]], max_raw: int, depth: int = 0) -> list[list[tuple[str, int]]]:
    """Cut one distribution's files into groups of at most max_raw bytes, along its folders."""
    if sum(s for _, s in files) <= max_raw:
        return [files]
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path, size in files:
        parts = path.split(os.sep)
        groups[os.sep.join(parts[: depth + 1]) if len(parts) > depth + 1 else path].append((path, size))
    pieces: list[list[tuple[str, int]]] = []
    for key in sorted(groups):
        group = groups[key]
        if len(group) == 1 or sum(s for _, s in group) <= max_raw:
            pieces.append(group)
        else:
            pieces += _split(group, max_raw, depth + 1)
    return pieces


def streams(args: argparse.Namespace) -> None:
    """Write STREAMS/NNN.list (NUL-separated paths) and STREAMS/streams.json.

    A distribution larger than --max-raw is cut along its folders; a stream holds at most --max-raw
    raw bytes, so it never compresses to more than an archive may hold.
    """
    site, out = Path(args.site).resolve(), Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    by_dist: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for rel, name in _owners(site).items():
        by_dist[name].append((rel, os.path.getsize(site / rel)))
    # Largest distribution first, each one's pieces largest first, a new stream when the next piece
    # would not fit: a distribution stays in as few streams (and so archives) as it can.
    bins: list[dict] = []
    for name in sorted(by_dist, key=lambda n: (-sum(s for _, s in by_dist[n]), n)):
        pieces = _split(sorted(by_dist[name]), args.max_raw)
        for piece in sorted(pieces, key=lambda piece: -sum(s for _, s in piece)):
            size = sum(s for _, s in piece)
            if not bins or bins[-1]["raw"] + size > args.max_raw:
                bins.append({"raw": 0, "files": [], "dists": defaultdict(int)})
            stream = bins[-1]
            stream["raw"] += size
            stream["files"] += [p for p, _ in piece]
            stream["dists"][name] += size
    marker = Path(".kit")
    (site / marker / "streams").mkdir(parents=True, exist_ok=True)
    names = [f"{i:03d}" for i in range(len(bins))]
    (site / marker / "streams.txt").write_text("".join(f"{n}\n" for n in names))
    described = []
    for name, stream in zip(names, bins):
        (site / marker / "streams" / name).write_text("")
        # Each stream carries the list of them all, so an unpack can say how many are still missing.
        extra = [str(marker / "streams" / name), str(marker / "streams.txt")]
        files = sorted(stream["files"]) + extra
        (out / f"{name}.list").write_bytes(b"".join(f.encode() + b"\0" for f in files))
        described.append({"stream": name, "raw": stream["raw"], "dists": dict(stream["dists"])})
    (out / "streams.json").write_text(json.dumps(described, indent=1) + "\n")
    total = sum(s["raw"] for s in described)
    print(f"kitbuild streams: {len(described)} streams, {total / MIB:.1f} MiB installed")


def pack(args: argparse.Namespace) -> None:
    """Bin-pack STREAMS/NNN.tar.xz (first-fit decreasing) into archives of at most --limit bytes.

    Writes STREAMS/archives.json (archive -> streams); kit.sh concatenates each archive's streams
    (xz reads concatenated streams, tar --ignore-zeros concatenated archives).
    """
    folder = Path(args.dir)
    sizes = {p.name.split(".")[0]: p.stat().st_size for p in folder.glob("*.tar.xz")}
    too_big = {n: s for n, s in sizes.items() if s > args.limit}
    if too_big:
        sys.exit(f"kitbuild pack: streams larger than one archive may be: {too_big}; lower --max-raw")
    archives: list[dict] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        for archive in archives:
            if archive["bytes"] + sizes[name] <= args.limit:
                break
        else:
            archive = {"bytes": 0, "streams": []}
            archives.append(archive)
        archive["bytes"] += sizes[name]
        archive["streams"].append(name)
    for i, archive in enumerate(archives, 1):
        archive["archive"] = f"kit-{i}.tar.xz"
        archive["streams"].sort()
    (folder / "archives.json").write_text(json.dumps(archives, indent=1) + "\n")
    for archive in archives:
        print(archive["archive"], " ".join(archive["streams"]))


def _record_hash(path: Path) -> str:
    """A RECORD line's hash: urlsafe base64 of the sha256, unpadded."""
    import base64

    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(args: argparse.Namespace) -> None:
    """kit-manifest.md: archives, then every resolved package (carried or from the image), then drops."""
    lock_data = json.loads(Path(args.lock).read_text())
    folder = Path(args.streams)
    described = {s["stream"]: s for s in json.loads((folder / "streams.json").read_text())}
    archives = json.loads((folder / "archives.json").read_text())
    where: dict[str, set[str]] = defaultdict(set)
    installed: dict[str, int] = defaultdict(int)
    for archive in archives:
        for stream in archive["streams"]:
            for dist, size in described[stream]["dists"].items():
                where[dist].add(archive["archive"])
                installed[dist] += size
    lines = [
        "# The GPU kit: what `benchmarks/gpu/kit.sh build` carries",
        "",
        "Written by `kit.sh build` (do not edit). The archives themselves are not committed (`.gpu/kit/`).",
        "On the GPU machine, one archive per command: `bash benchmarks/gpu/kit.sh unpack .gpu/kit/kit-N.tar.xz "
        "/tmp/kit`, then `PYTHONPATH=/tmp/kit:$PWD python3 ...`.",
        f"Target: {lock_data['target']}. Resolved by pip {lock_data.get('pip')}: "
        f"`{' '.join(lock_data['requested'])}`, with the image's known versions as constraints.",
        "",
        "## Archives",
        "",
        "| archive | bytes | MiB | sha256 | packages |",
        "|---|---:|---:|---|---|",
    ]
    total = 0
    for archive in archives:
        path = Path(args.kit) / archive["archive"]
        size = path.stat().st_size
        total += size
        dists = sorted({d for s in archive["streams"] for d in described[s]["dists"]})
        lines.append(f"| {archive['archive']} | {size} | {size / MIB:.2f} | `{_sha256(path)[:16]}…` | "
                     f"{', '.join(dists)} |")
    raw = sum(installed.values())
    lines += ["", f"{len(archives)} archives, {total} bytes ({total / MIB:.1f} MiB) for {raw / MIB:.1f} MiB installed.",
              ""]
    packages = lock_data["packages"]
    count = {s: sum(p["source"] == s for p in packages) for s in ("kit", "image", "dropped")}
    lines += [
        "## Packages",
        "",
        f"{len(packages)} resolved: {count['kit']} carried by the kit, {count['image']} from the image (not "
        f"carried), {count['dropped']} dropped (not carried: see the reasons). The version of an image "
        "package is the image's where known.",
        "",
        "| package | version | installed MiB | archive | source | note |",
        "|---|---|---:|---|---|---|",
    ]
    for p in packages:
        name = p["name"]
        if p["source"] == "kit":
            note = f"shadows the image's {p.get('image_version') or '(version not known)'}: {p['shadows']}" \
                if "shadows" in p else ""
            if p.get("built_here_from_sdist"):
                note = (note + "; " if note else "") + "no wheel on PyPI: built here from its sdist (pure Python)"
            lines.append(f"| {name} | {p['version']} | {installed.get(name, 0) / MIB:.2f} | "
                         f"{', '.join(sorted(where.get(name, ()))) or '—'} | kit | {note} |")
        elif p["source"] == "dropped":
            lines.append(f"| {name} | {p['version']} | — | — | dropped | {p['dropped']} |")
        else:
            known = p.get("image_version")
            if known is None:
                note, version = f"version not known there (resolved: {p['version']})", p["version"]
            elif known != p["version"]:
                note, version = f"the image's {known} kept, resolved {p['version']}: see kitcheck.WAIVERS", known
            else:
                note, version = "", known
            lines.append(f"| {name} | {version} | — | — | image | {note} |")
    in_lock = {p["name"] for p in packages}
    for name in sorted(set(installed) - in_lock - {"(unowned)"}):
        lines.append(f"| {name} | | {installed[name] / MIB:.2f} | {', '.join(sorted(where[name]))} | kit | "
                     "its *.dist-info only, written from pyproject.toml: the entry points through which vLLM "
                     "finds our model and IO processors; the code travels with the repo |")
    unowned = installed.get("(unowned)", 0)
    if unowned:
        lines.append(f"| (unowned files) | | {unowned / MIB:.2f} | {', '.join(sorted(where['(unowned)']))} | kit | "
                     "files no RECORD lists (the kit's `.kit/` markers) |")
    dropped = [row for row in csv.reader(Path(args.dropped).open(), delimiter="\t")] if args.dropped else []
    if dropped:
        lines += ["", "## Parts dropped from installed packages", "",
                  "What an attention-free pooling model never loads (kit.sh's drop_paths; whole packages dropped "
                  "are in the table above, from its drop_dists).", "",
                  "| path | installed MiB | why |", "|---|---:|---|"]
        for pattern, size, reason in dropped:
            lines.append(f"| `{pattern}` | {int(size) / MIB:.2f} | {reason} |")
        gone = sum(int(r[1]) for r in dropped)
        lines += ["", f"{gone / MIB:.1f} MiB dropped."]
    Path(args.output).write_text("\n".join(lines) + "\n")


def ours(args: argparse.Namespace) -> None:
    """vllm_terratorch's *.dist-info from pyproject.toml (metadata and entry points; its code
    travels with the repo): vLLM finds our model and IO processors through the entry points."""
    import tomllib

    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    name, version = project["name"], project["version"]
    folder = Path(args.site) / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             f"Requires-Python: {project['requires-python']}"]
    lines += [f"Requires-Dist: {r}" for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    entry_points = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
                           for group, points in groups.items() if points)
    (folder / "METADATA").write_text("\n".join(lines) + "\n")
    (folder / "entry_points.txt").write_text(entry_points)
    (folder / "INSTALLER").write_text("kitbuild\n")
    files = sorted(p for p in folder.iterdir() if p.name != "RECORD")
    rows = [f"{folder.name}/{p.name},sha256={_record_hash(p)},{p.stat().st_size}" for p in files]
    (folder / "RECORD").write_text("\n".join(rows + [f"{folder.name}/RECORD,,"]) + "\n")
    print(f"kitbuild ours: {folder.name} (metadata and entry points only; the code is the repo's)")


def _link_tree(source_site: Path, owned: dict[str, str], keep: set[str], out: Path) -> None:
    """Symlink into OUT what distributions in KEEP installed in SOURCE_SITE, sharing folders with
    others (namespace packages such as nvidia/) file by file."""
    by_top: dict[str, set[str]] = defaultdict(set)
    for rel, dist in owned.items():
        by_top[rel.split(os.sep, 1)[0]].add(dist)
    for rel, dist in sorted(owned.items()):
        top = rel.split(os.sep, 1)[0]
        if dist not in keep:
            continue
        if by_top[top] <= keep:  # the whole top-level entry belongs to kept distributions
            target = out / top
            if not target.is_symlink() and not target.exists():
                target.symlink_to(source_site / top)
        else:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source_site / rel)


def image_emulation(args: argparse.Namespace) -> None:
    """OUT/venv: the image's packages as found in a local venv (symlinks, only names the image has);
    OUT/versions: the image's known versions of the packages the kit needs from it, where the venv
    has another (installed from PyPI). On PYTHONPATH after the kit, with `python -S`, an import
    sees what it would on the GPU machine: the kit, the repo and the image's names, nothing else."""
    out = Path(args.output)
    image = read_image_list(Path(args.image))
    lock_data = json.loads(Path(args.lock).read_text())
    site = Path(args.venv_site).resolve()
    owned = record_files(site)
    venv_versions = {}
    for folder in site.glob("*.dist-info"):
        name, _, version = folder.name.removesuffix(".dist-info").rpartition("-")
        venv_versions[normalise(name)] = version
    needed = {p["name"] for p in lock_data["packages"] if p["source"] == "image"}
    wanted = sorted(f"{n}=={image[n].version}" for n in needed
                    if image[n].version is not None and venv_versions.get(n) != image[n].version)
    stamp = out / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        print(f"kitbuild image-emulation: {out} is up to date")
        return
    if out.exists():
        import shutil
        shutil.rmtree(out)
    (out / "venv").mkdir(parents=True)
    # What those versions need besides, as far as the image has it (numba 0.68 wants llvmlite 0.50).
    import subprocess
    report = out / "versions.json"
    pip = [sys.executable, "-m", "pip", "install", "-q", *args.pip]
    subprocess.run([*pip, "--dry-run", "--ignore-installed", "--target", str(out / "scratch"),
                    "--report", str(report), *wanted], check=True)
    resolved = {normalise(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    overlay = set(wanted)
    for name in {normalise(w.split("==")[0]) for w in wanted}:
        for req in active_requirements(resolved[name].get("requires_dist") or [], ()):
            dep = normalise(req.name)
            have = venv_versions.get(dep)
            fits = have is not None and req.specifier.contains(have, prereleases=True)
            if dep in image and dep in resolved and not fits:
                overlay.add(f"{dep}=={resolved[dep]['version']}")  # the venv's does not do (numba 0.68: llvmlite)
    overlay = sorted(overlay)
    subprocess.run([*pip, "--no-deps", "--no-compile", "--target", str(out / "versions"), *overlay], check=True)
    replaced = {normalise(o.split("==")[0]) for o in overlay}
    _link_tree(site, owned, set(image) - replaced, out / "venv")
    stamp.write_text(json.dumps(wanted))
    print(f"kitbuild image-emulation: {out}/venv (the image's names, from {site}) and {out}/versions: "
          f"{' '.join(overlay)}")


def _modules_by_dist(site: Path) -> dict[str, str]:
    """Module name -> the distribution in SITE that installed its file."""
    by_module = {}
    for rel, dist in record_files(site).items():
        if rel.endswith(".py"):
            parts = rel[:-3].split(os.sep)
        elif rel.endswith(".so"):
            parts = rel.split(".", 1)[0].split(os.sep)
        else:
            continue
        by_module[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = dist
    return by_module


def traced(args: argparse.Namespace) -> None:
    """Which kit distributions the traced processes imported, and none of what the kit drops.

    The traced run uses another environment (--venv-site, the CPU stack): a dropped distribution is
    looked up by the modules it installed there, where it is installed at all.
    """
    modules: set[str] = set()
    for file in Path(args.dir).glob("*.txt"):
        modules |= set(file.read_text().split("\n")[1:])
    in_kit = _modules_by_dist(Path(args.site).resolve())
    used = sorted({in_kit[m] for m in modules if m in in_kit})
    print(f"kitbuild traced: {len(modules)} modules imported, from {len(used)} kit distributions: {' '.join(used)}")
    lock_data = json.loads(Path(args.lock).read_text())
    dropped = {p["name"] for p in lock_data["packages"] if p["source"] == "dropped"}
    in_venv = _modules_by_dist(Path(args.venv_site).resolve())
    seen_there = sorted({d for d in in_venv.values() if d in dropped})
    bad = sorted({f"{in_venv[m]} ({m})" for m in modules if in_venv.get(m) in dropped})
    for row in Path(args.dropped).read_text().splitlines() if args.dropped else []:
        path = row.split("\t")[0]
        prefix = path.rsplit("/", 1)[0] + "/" + path.rsplit("/", 1)[-1].split(".", 1)[0] if "/" in path else path
        prefix = prefix.replace("/", ".")
        bad += sorted(f"{path} ({m})" for m in modules if m == prefix or m.startswith(prefix + "."))
    if bad:
        sys.exit(f"kitbuild traced: dropped but imported: {bad}")
    print(f"kitbuild traced: no dropped path was imported, nor any dropped distribution installed in the traced "
          f"environment ({', '.join(seen_there) or 'none of them is'}); the others are CUDA-only, absent there")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("stand-ins")
    p.add_argument("report")
    p.add_argument("dir")
    p.set_defaults(run=stand_ins)
    p = sub.add_parser("constraints")
    p.add_argument("image")
    p.add_argument("--release", nargs="*", default=[])
    p.add_argument("--skip", nargs="*", default=[])
    p.set_defaults(run=constraints)
    p = sub.add_parser("lock")
    p.add_argument("report")
    p.add_argument("--image", required=True)
    p.add_argument("--requested", nargs="+", required=True)
    p.add_argument("--constraints")
    p.add_argument("--shadow", nargs="*", default=[], help="NAME=REASON: carry it although the image has it")
    p.add_argument("--drop", nargs="*", default=[], help="NAME=REASON: leave it out of the kit")
    p.add_argument("--output", required=True)
    p.add_argument("--download", required=True)
    p.add_argument("--wheels", required=True)
    p.set_defaults(run=lock)
    p = sub.add_parser("streams")
    p.add_argument("site")
    p.add_argument("dir")
    p.add_argument("--max-raw", type=int, default=48 * MIB)
    p.set_defaults(run=streams)
    p = sub.add_parser("pack")
    p.add_argument("dir")
    p.add_argument("--limit", type=int, default=60 * MIB)
    p.set_defaults(run=pack)
    p = sub.add_parser("manifest")
    p.add_argument("--lock", required=True)
    p.add_argument("--streams", required=True)
    p.add_argument("--kit", required=True)
    p.add_argument("--dropped")
    p.add_argument("--output", required=True)
    p.set_defaults(run=manifest)
    p = sub.add_parser("ours")
    p.add_argument("pyproject")
    p.add_argument("site")
    p.set_defaults(run=ours)
    p = sub.add_parser("image-emulation")
    p.add_argument("--venv-site", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--lock", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--pip", action="append", default=[], help="an option for pip (repeat)")
    p.set_defaults(run=image_emulation)
    p = sub.add_parser("traced")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("--lock", required=True)
    p.add_argument("--dropped")
    p.add_argument("--venv-site", required=True)
    p.set_defaults(run=traced)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
