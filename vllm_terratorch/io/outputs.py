"""Where outputs go: only new files inside the configured output folder, written atomically."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from vllm_terratorch.errors import RequestError

# Request ids can come from a client header (X-Request-Id): only plain names become file names.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def output_file(output_dir: Path, out_path: str | None, request_id: str | None) -> Path:
    """The file a `path` output is written to; `out_path` may only name a new file inside `output_dir`."""
    if out_path is None:
        name = request_id if request_id and _SAFE_NAME.fullmatch(request_id) else uuid.uuid4().hex
        target = output_dir / f"{name}.tiff"
        return target if not target.exists() else output_dir / f"{name}-{uuid.uuid4().hex[:8]}.tiff"
    relative = PurePosixPath(out_path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\\" in out_path or "\0" in out_path:
        raise RequestError(
            f"out_path {out_path!r} must be a relative file name inside the server's output folder "
            "(no absolute paths, no '..')"
        )
    target = output_dir.joinpath(*relative.parts)
    if target.exists():
        raise RequestError(f"out_path {out_path!r} already exists in the output folder; outputs are never overwritten")
    return target


def write_new_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename) and never over an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # link() fails if the target exists: an existing output is never replaced.
        os.link(temp, path)
    except FileExistsError:
        raise RequestError(f"output {path.name} already exists; choose another out_path") from None
    finally:
        os.unlink(temp)
