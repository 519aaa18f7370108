"""The one way our commands write a local file: whole or not at all.

A crash, Ctrl-C or a full disk must never leave half a file where a complete one is expected:
`predict` keeps existing outputs on a re-run, and an exported folder with a `config.json` counts
as complete. (Server outputs have their own, stricter writer: io/outputs.py, which never replaces
a file and never follows a link.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# Temp files are `.<name>.<random>.partial` beside their target (what `predict` cleans up after a hard stop).
PARTIAL_SUFFIX = ".partial"

# mkstemp creates 0600 files; a finished file gets the usual permissions. The umask is read once,
# here, because reading it means setting it (not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def file_mode() -> int:
    """Permissions of a plain new file: 0o666 less the process umask."""
    return 0o666 & ~_UMASK


def write_atomically(path: Path, content: bytes | str | Callable[[Path], None]) -> None:
    """Write `path` via a temp file in the same folder, renamed over it once complete.

    `content`: the bytes or text, or a function that writes the file at the path it is given
    (for writers that take a path, such as safetensors).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        if callable(content):
            os.close(handle)
            content(Path(temporary))
        else:
            with os.fdopen(handle, "wb") as stream:
                stream.write(content.encode() if isinstance(content, str) else content)
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
