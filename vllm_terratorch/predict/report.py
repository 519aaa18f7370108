"""What a `predict` run tells its user: the progress bar, each input's record, and `summary.json`."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_terratorch.predict.args import PROG
from vllm_terratorch.predict.inputs import Item
from vllm_terratorch.files import PARTIAL_SUFFIX, write_atomically


class Progress:
    """tqdm bar on stderr in tiles (tiles/s, ETA over the tiles known so far) with scenes done / total,
    and error lines that do not break it.

    A scene's tiles join the total when it is read (so a whole-scene run's ETA is known from its
    first scene on). The bar appears at `start()` (once the engine is up), so that start-up time
    does not count in the rate and ETA; inputs finished before that (bad inputs) count as done.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.count = 0
        self.failed = 0
        self.planned = 0
        self.inferred = 0
        self.bar: Any = None

    def start(self) -> None:
        if self.bar is None and self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.planned, initial=self.inferred, unit="tile", desc="predict", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            scenes = f"{self.count}/{self.total}" + (f", {self.failed} failed" if self.failed else "")
            self.bar.set_postfix_str(f"scenes {scenes}", refresh=False)

    def tiles_planned(self, tiles: int) -> None:
        self.planned += tiles
        if self.bar is not None:
            self.bar.total = self.planned
            self.bar.refresh()

    def tiles_done(self, tiles: int) -> None:
        self.inferred += tiles
        if self.bar is not None:
            self.bar.update(tiles)

    def done(self, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.failed += 1
        self._postfix()
        if self.bar is not None:
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_rss_bytes(pids: list[int]) -> int | None:
    """The sum of each process's peak resident memory (Linux's VmHWM; an upper bound of the tree's
    peak), or this process's own peak where /proc is missing."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    if total:
        return total
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


@dataclass
class PipelineStats:
    wall_s: float = 0.0
    engine_busy_s: float = 0.0
    engine_calls: int = 0
    tiles: int = 0
    interrupted: bool = False
    peak_rss_bytes: int | None = None  # this process and its workers (summed peaks)
    busy_fraction: float | None = None  # set where busy / wall is not the right ratio (Ray: per replica)


def finish(item: Item, progress: Progress, ok: bool, error: str | None = None, started: float | None = None,
           finished: float | None = None, tiles: int | None = None) -> None:
    """Record an input's outcome (local and Ray mode alike) and show it."""
    item.record.update(
        status="ok" if ok else "failed",
        error=error or None,
        seconds=round((finished or time.time()) - started, 4) if started else None,
    )
    if tiles is not None:
        item.record["tiles"] = tiles
    if not ok:
        progress.message(f"{PROG}: failed: {item.source}: {error}")
    progress.done(ok)


def write_summary(outdir: Path, items: list[Item], meta: dict[str, Any], stats: PipelineStats | None) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.record["status"]] = counts.get(item.record["status"], 0) + 1
    processed = counts.get("ok", 0)
    totals: dict[str, Any] = {
        "inputs": len(items),
        "ok": processed,
        "skipped": counts.get("skipped", 0),
        "failed": counts.get("failed", 0),
        "interrupted": counts.get("interrupted", 0),
    }
    if stats is not None:
        totals |= {
            "tiles": stats.tiles,
            "wall_seconds": round(stats.wall_s, 3),
            "engine_busy_seconds": round(stats.engine_busy_s, 3),
            "engine_busy_fraction": round(stats.busy_fraction, 4) if stats.busy_fraction is not None
            else round(stats.engine_busy_s / stats.wall_s, 4) if stats.wall_s > 0 else None,
            "engine_calls": stats.engine_calls,
            "scenes_per_second": round(processed / stats.wall_s, 3) if stats.wall_s > 0 else None,
            "peak_rss_bytes": stats.peak_rss_bytes,
        }
    summary = {
        **meta,
        "interrupted": bool(stats and stats.interrupted),
        "totals": totals,
        "inputs": [item.record for item in items],
    }
    write_atomically(outdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def remove_partials(outdir: Path) -> None:
    """Temp files of writes that a hard stop cut short (never complete outputs)."""
    for path in outdir.rglob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()


def print_totals(summary: dict[str, Any], outdir: Path) -> None:
    totals = summary["totals"]
    line = (f"{PROG}: {totals['ok']} done, {totals['skipped']} skipped, {totals['failed']} failed"
            + (f", {totals['interrupted']} interrupted" if totals["interrupted"] else ""))
    if totals.get("wall_seconds"):
        line += f" in {totals['wall_seconds']:.1f} s ({totals['scenes_per_second']} scenes/s"
        if totals.get("engine_busy_fraction") is not None:
            line += f", engine busy {100 * totals['engine_busy_fraction']:.1f}% of the time"
        line += ")"
    print(line + f"; summary: {outdir / 'summary.json'}", flush=True)
