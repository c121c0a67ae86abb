"""Safe files: atomic writes that survive a kill, loads that never run code.

* Writes go to a temporary name in the same directory, are flushed and
  fsync'ed, renamed over the final name, and the directory is fsync'ed, so a
  reader (or a resumed run) sees the old file or the new one, never half of one.
* Loads never unpickle arbitrary objects: ``.safetensors`` holds tensors only,
  and ``torch.load`` is always called with ``weights_only=True``.  A file that
  would need arbitrary unpickling (a pickled class, a ``__reduce__`` that calls
  ``os.system``) is refused with a :class:`~moola_engine.errors.WeightsError`
  before any of its code can run.  ``tests/test_reliability.py`` scans the
  sources so no unsafe ``torch.load`` / ``pickle.load`` / ``allow_pickle=True``
  creeps back in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moola_engine.errors import WeightsError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)``, fsync ``tmp``, rename it to ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU: tensors and plain containers only.

    A file that needs arbitrary unpickling is refused (:class:`WeightsError`);
    its code does not run.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused: loading it would need arbitrary unpickling, which can run code "
            f"({first}). Only tensors are loaded (torch.load(weights_only=True) runs no code); re-save the weights "
            f"as .safetensors or as a plain state_dict"
        ) from exc
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from exc


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable .safetensors file ({exc})") from exc


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A name -> tensor mapping from ``.safetensors`` or a torch file, loaded safely (see module docstring)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or "
                           f"{', '.join(TORCH_SUFFIXES)}")
    obj = load_torch_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of names to tensors, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}
