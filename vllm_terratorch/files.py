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
from typing import Protocol

# Temp files are `.<name>.<random>.partial` beside their target (what `predict` cleans up after a hard stop).
PARTIAL_SUFFIX = ".partial"

# mkstemp creates 0600 files; a finished file gets the usual permissions. The umask is read once,
# here, because reading it means setting it (not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def file_mode() -> int:
    """Permissions of a plain new file: 0o666 less the process umask."""
    return 0o666 & ~_UMASK


class StagedFile(Protocol):
    """A file being written under a temporary name, given its real name only once complete.

    Two kinds: `PartialFile` (our commands: replaces an existing file) and the server's
    `io.outputs.StagedOutput` (never replaces a file, never follows a link)."""

    @property
    def temporary(self) -> Path: ...

    def publish(self) -> Path: ...

    def discard(self) -> None: ...


class PartialFile:
    """`path`, written as `.<name>.<random>.partial` in the same folder and renamed over it by `publish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
        os.close(handle)
        self.temporary = Path(temporary)

    def publish(self) -> Path:
        os.chmod(self.temporary, file_mode())
        os.replace(self.temporary, self.path)
        return self.path

    def discard(self) -> None:
        self.temporary.unlink(missing_ok=True)


def write_atomically(path: Path, content: bytes | str | Callable[[Path], None]) -> None:
    """Write `path` via a temp file in the same folder, renamed over it once complete.

    `content`: the bytes or text, or a function that writes the file at the path it is given
    (for writers that take a path, such as safetensors).
    """
    staged = PartialFile(path)
    try:
        if callable(content):
            content(staged.temporary)
        else:
            staged.temporary.write_bytes(content.encode() if isinstance(content, str) else content)
        staged.publish()
    except BaseException:
        staged.discard()
        raise
