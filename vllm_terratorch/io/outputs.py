"""Where `path` outputs go: only new files inside an allowed output root, never through a link.

Two steps, because a request must be refused before the model runs, and the file system may
change between the check and the write:

1. `OutputPolicy.target` (pre-processing) decides the file: every existing component of the path
   is resolved (symlinks included) and the result must lie inside one of the roots; a component
   below an existing file, a name too long for the file system, an unwritable folder or an existing
   file is a `RequestError` (HTTP 400). Nothing is created.
2. `OutputPolicy.write` (post-processing; `stage` for an output streamed over time) walks from the
   root's directory descriptor one component at a time with `O_NOFOLLOW`, creating missing folders,
   writes a temporary file created with `O_CREAT | O_EXCL | O_NOFOLLOW` and links it to the final
   name (`link` never replaces a file). A symlink swapped in after the check makes the write fail;
   it cannot redirect it.

`out_path` forms (upstream's processors pass an existing directory; ours also took a file name):
- absent: `<output_path>/<request_id>.tiff`;
- an absolute path: an existing directory inside a root; the file is `<request_id>.tiff` in it;
- a relative path: below `output_path`; an existing directory gets `<request_id>.tiff`, anything
  else names the new file itself (missing folders are created).
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vllm_terratorch.errors import OutputPathError

# Request ids can come from a client header (X-Request-Id): only plain names become file names.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
SUFFIX = ".tiff"  # upstream's output file suffix


@dataclass(frozen=True)
class OutputTarget:
    """A checked output file: `root` (resolved, an allowed root) / `folders` / `name`."""

    root: Path
    folders: tuple[str, ...]
    name: str
    generated: bool  # the name was made from the request id: pick another one on a clash

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.folders, self.name)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


class OutputPolicy:
    """The output roots of a server: `output_path` first (relative names go there), then any extra."""

    def __init__(self, roots: Sequence[Path]) -> None:
        if not roots:
            raise ValueError("at least one output root is needed")
        self.roots = [Path(os.path.realpath(root)) for root in roots]

    @property
    def default_root(self) -> Path:
        return self.roots[0]

    def _root_of(self, resolved: Path) -> Path | None:
        return next((root for root in self.roots if resolved.is_relative_to(root)), None)

    def _outside(self, out_path: str) -> OutputPathError:
        roots = ", ".join(str(root) for root in self.roots)
        return OutputPathError(
            f"out_path {out_path!r} is outside the server's output folders ({roots}); give a relative file "
            "name inside the output folder, or an existing directory inside one of those folders"
        )

    def target(self, out_path: str | None, request_id: str | None) -> OutputTarget:
        """Decide and check the file a `path` output goes to; creates nothing."""
        generated = request_id if request_id and _SAFE_NAME.fullmatch(request_id) else uuid.uuid4().hex
        if out_path is None:
            return self._unique(OutputTarget(self.default_root, (), generated + SUFFIX, True))
        if "\0" in out_path or "\\" in out_path or not out_path.strip():
            raise OutputPathError(f"out_path {out_path!r} is not a usable path (empty, NUL or backslash)")
        given = PurePosixPath(out_path)
        if not given.is_absolute() and ".." in given.parts:
            raise OutputPathError(f"out_path {out_path!r} must be a relative file name inside the output folder, without '..'")
        candidate = Path(given) if given.is_absolute() else self.default_root.joinpath(*given.parts)
        self._check_lengths(out_path, candidate)
        try:
            return self._unique(self._checked_target(out_path, given, candidate, generated))
        except OSError as error:  # e.g. ELOOP: a link cycle
            raise OutputPathError(f"out_path {out_path!r} cannot be used: {error.strerror}") from None

    def _check_lengths(self, out_path: str, candidate: Path) -> None:
        """Names the file system cannot hold (checked before any stat, which would fail on them)."""
        limit = _name_max(self.default_root)
        for part in candidate.parts:
            if len(os.fsencode(part)) > limit:
                raise OutputPathError(f"out_path {out_path!r} has a name longer than {limit} bytes ({part[:40]}...)")
        if len(os.fsencode(str(candidate))) + 64 >= os.pathconf(self.default_root, "PC_PATH_MAX"):
            raise OutputPathError(f"out_path {out_path!r} is longer than the file system allows")

    def _checked_target(self, out_path: str, given: PurePosixPath, candidate: Path, generated: str) -> OutputTarget:
        # realpath resolves every existing component (links included) and keeps the rest as given.
        resolved = Path(os.path.realpath(candidate))
        root = self._root_of(resolved)
        if root is None:
            raise self._outside(out_path)
        if resolved.is_dir():
            folder, name, is_generated = resolved, generated + SUFFIX, True
        elif given.is_absolute():
            raise OutputPathError(
                f"out_path {out_path!r} is not an existing directory; an absolute out_path must name a directory "
                f"inside the server's output folders, where the output is written as <request id>{SUFFIX}"
            )
        elif resolved.exists() or os.path.lexists(candidate):  # a file, or a link (even dangling) at the name
            raise OutputPathError(f"out_path {out_path!r} already exists in the output folder; outputs are never overwritten")
        else:
            folder, name, is_generated = resolved.parent, resolved.name, False
        self._check_creatable(out_path, folder)
        return OutputTarget(root, folder.relative_to(root).parts, name, is_generated)

    @staticmethod
    def _check_creatable(out_path: str, folder: Path) -> None:
        """Every missing folder can be created: the nearest existing ancestor is a writable folder."""
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise OutputPathError(f"out_path {out_path!r} goes below {existing.name!r}, which is a file, not a folder")
        # A folder with no write bit is read-only by intent, also for a server running as root
        # (for whom os.access always says yes).
        if not os.access(existing, os.W_OK | os.X_OK) or not existing.stat().st_mode & 0o222:
            raise OutputPathError(f"out_path {out_path!r}: the server cannot write into {existing} (read-only)")

    @staticmethod
    def _unique(target: OutputTarget) -> OutputTarget:
        if target.generated and os.path.lexists(target.path):
            stem = target.name.removesuffix(SUFFIX)
            return OutputTarget(target.root, target.folders, f"{stem}-{uuid.uuid4().hex[:8]}{SUFFIX}", True)
        return target

    def write(self, target: OutputTarget, data: bytes) -> Path:
        """Write `data` as a new file at `target`, without following any link below the root."""
        staged = self.stage(target)
        try:
            staged.write_bytes(data)
        except BaseException:
            staged.discard()
            raise
        return staged.publish()

    def stage(self, target: OutputTarget) -> StagedOutput:
        """A new temporary file in `target`'s folder (created now, without following any link below the
        root), to be written and then given `target`'s name by `StagedOutput.publish`."""
        folder = os.open(target.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in target.folders:
                try:
                    os.mkdir(part, 0o755, dir_fd=folder)
                except FileExistsError:
                    pass
                try:
                    inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
                except OSError as error:
                    raise OutputPathError(
                        f"output folder {part!r} under {target.root} changed into a link or a file before the "
                        f"output was written ({error.strerror}); nothing was written"
                    ) from None
                os.close(folder)
                folder = inner
            return StagedOutput(target, folder)
        except BaseException:
            os.close(folder)
            raise


def _unwritable(name: str, error: OSError) -> OSError:
    if error.errno in (errno.ENAMETOOLONG, errno.EACCES):
        return OutputPathError(f"output {name!r} cannot be written: {error.strerror}")
    return error


class StagedOutput:
    """A server output being written: `.partial-<random>.tiff` in the target's folder, held open by
    descriptor, linked to the target's name by `publish` (`link` never replaces a file).

    `temporary` is a path through that folder's descriptor (`/proc/self/fd/N/...`), for writers that
    take a path (GDAL, streaming a large output): a link swapped into the output path after the
    check cannot redirect them. The temporary file itself is created with `O_EXCL | O_NOFOLLOW`.
    """

    def __init__(self, target: OutputTarget, folder: int) -> None:
        self.target = target
        self._name = f".partial-{uuid.uuid4().hex}{SUFFIX}"
        try:
            os.close(os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder))
        except OSError as error:
            raise _unwritable(target.name, error) from None
        self._folder: int | None = folder
        through = Path(f"/proc/self/fd/{folder}")
        self.temporary = through / self._name if through.is_dir() else target.path.with_name(self._name)

    def write_bytes(self, data: bytes) -> None:
        fd = os.open(self._name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=self._folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)

    def publish(self) -> Path:
        """Give the written file its name (another free one for a generated name that is taken)."""
        target = self.target
        try:
            name = target.name
            for _ in range(3):
                try:
                    os.link(self._name, name, src_dir_fd=self._folder, dst_dir_fd=self._folder, follow_symlinks=False)
                    return target.root.joinpath(*target.folders, name)
                except FileExistsError:
                    if not target.generated:
                        raise OutputPathError(
                            f"output {target.name} already exists; outputs are never overwritten, choose another out_path"
                        ) from None
                    name = f"{target.name.removesuffix(SUFFIX)}-{uuid.uuid4().hex[:8]}{SUFFIX}"
                except OSError as error:
                    raise _unwritable(name, error) from None
            raise OutputPathError(f"could not find a free output name for {target.name}")
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the temporary file and let go of the folder (also after `publish`)."""
        if self._folder is None:
            return
        try:
            os.unlink(self._name, dir_fd=self._folder)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._folder)
            self._folder = None
