"""Run folders: ``runs/<run-id>/`` with events.jsonl, metrics.csv, result.json, config.json.

The folder is created and proven writable (with some free space) before any
training starts, so a read-only or full disk fails in the first second.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from moola_engine.errors import MoolaError

MIN_FREE_BYTES = 32 * 1024 * 1024


def new_run_id(strategy: str, seed: int, name: str | None = None) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%S")
    return f"{stamp}-{name or strategy}-s{seed}"


def create_run_dir(runs_dir: str | Path, run_id: str) -> Path:
    """Create ``runs_dir/run_id`` (suffixing ``-2``, ``-3`` on a clash) and check it is writable."""
    root = Path(runs_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoolaError(f"run.runs_dir = {str(root)!r}: cannot create the runs folder ({exc.strerror})") from exc
    path = root / run_id
    n = 2
    while path.exists():
        path = root / f"{run_id}-{n}"
        n += 1
    try:
        path.mkdir()
    except OSError as exc:
        raise MoolaError(f"run folder {path}: cannot create it ({exc.strerror}); nothing was trained") from exc
    ensure_writable(path)
    return path


def ensure_writable(path: Path) -> None:
    """Prove ``path`` takes a file and has some free space (a new run and a resumed one both check)."""
    try:
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise MoolaError(f"run folder {path}: not writable ({exc.strerror}); nothing was trained") from exc
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise MoolaError(f"run folder {path}: only {free // 1024} KiB free, need at least "
                         f"{MIN_FREE_BYTES // (1024 * 1024)} MiB; nothing was trained")


def link_latest(run_dir: Path) -> None:
    """Point ``runs/latest`` at ``run_dir`` (atomically; best effort where symlinks are refused)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        pass


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file, fsync and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})
    lines = [",".join(keys)]
    for row in history:
        lines.append(",".join("" if row.get(k) is None else f"{row[k]:.6g}" if isinstance(row.get(k), float)
                              else str(row.get(k)) for k in keys))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
