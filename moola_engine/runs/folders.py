"""Run folders: ``runs/<run-id>/`` with events.jsonl, metrics.csv, result.json, config.json.

The folder is created and proven writable (with some free space) before any
training starts, so a read-only or full disk fails in the first second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import secrets
import shutil
import unicodedata
from pathlib import Path
from typing import Any

from moola_engine import jsonsafe
from moola_engine.errors import MoolaError

MIN_FREE_BYTES = 32 * 1024 * 1024


MAX_NAME = 64
"""Characters of a strategy or run name kept in a folder or file name (the whole run id stays far below 255)."""


def safe_name(name: str, max_len: int = MAX_NAME) -> str:
    """``name`` as a file-name part: ASCII letters, digits, ``.``, ``_`` and ``-``, at most ``max_len`` characters.

    A name that is already safe is kept as it is.  Otherwise accents are dropped (``é`` -> ``e``), every other
    character becomes ``_``, leading dots and dashes go (no ``..``, no hidden file, no option-like name), and a
    hash of the original name is appended, so two different names never map to the same id.
    """
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name) and len(name) <= max_len and ".." not in name:
        return name
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_)
    text = re.sub(r"\.{2,}", "_", text).lstrip(".-_") or "name"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{text[: max_len - 9].rstrip('.-_') or 'name'}-{digest}"


def new_run_id(strategy: str, seed: int, name: str | None = None) -> str:
    """``<UTC time>-<name or strategy>-s<seed>``, the name made safe for a folder name by :func:`safe_name`."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%S")
    return f"{stamp}-{safe_name(name or strategy)}-s{seed}"


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
    if run_dir.name == "latest" or run_dir.is_symlink():  # never latest -> latest: callers pass the real folder
        run_dir = run_dir.resolve()
        if run_dir.parent != latest.parent:
            return
    # a name unique to this call: two runs linking at once never share the temporary link
    tmp = run_dir.parent / f".latest-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)  # atomic: a reader sees the old link or the new one, never none
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write strict JSON through a temporary file, fsync and rename: a reader never sees half a file.

    Non-finite floats are written tagged (:mod:`moola_engine.jsonsafe`); read such a file with ``jsonsafe.loads``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        jsonsafe.dump(obj, fh, indent=2, default=str)  # strict JSON: non-finite floats tagged
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
