"""Red flags: results that are not errors but say the experiment may not measure what it claims.

The seed's fine-tuned model scored exactly what a random encoder scored.
These helpers compare a run's outputs with those of the random-encoder control
(``[model.pretrained] enabled = false``, everything else equal) and with
themselves.  A red flag is logged as ``red_flag.raised`` (warning level): it
does not stop anything, it is reported by ``moola-engine verify`` and by the
ablation report.

All inputs are plain arrays of model outputs, shape ``(N, classes)`` logits /
probabilities, or ``(N,)`` predicted labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from moola_engine.errors import MoolaError
from moola_engine.logs import Event


@attrs.frozen(kw_only=True)
class RedFlag:
    code: str
    """Stable identifier: ``outputs_identical``, ``predictions_identical``, ``constant_predictions``."""
    message: str


def labels(outputs: Any) -> np.ndarray:
    """Predicted labels: argmax over the last axis of (N, C) outputs; (N,) arrays are labels already."""
    a = np.asarray(outputs)
    return a.argmax(axis=-1) if a.ndim >= 2 else a


def outputs_identical(a: Any, b: Any) -> bool:
    """The raw outputs are equal element for element (same shape, same values)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def predictions_identical(a: Any, b: Any) -> bool:
    """Every sample gets the same predicted label from ``a`` and ``b`` (e.g. a run and its random-encoder control)."""
    la, lb = labels(a), labels(b)
    return la.shape == lb.shape and bool(np.array_equal(la, lb))


def constant_predictions(a: Any) -> bool:
    """The model predicts one label for every sample (more than one sample)."""
    la = labels(a)
    return la.size > 1 and bool(np.all(la == la.flat[0]))


def compare_to_control(outputs: Any, control: Any, *, split: str = "val") -> list[RedFlag]:
    """Red flags of a run's outputs against the random-encoder control's outputs on the same samples."""
    flags: list[RedFlag] = []
    n = len(labels(outputs))
    if outputs_identical(outputs, control):
        flags.append(RedFlag(code="outputs_identical", message=(
            f"{split} outputs are bit-for-bit identical to the random-encoder control's on all {n} samples: "
            "the pretrained weights had no effect (not loaded, or the encoder's output is ignored)")))
    elif predictions_identical(outputs, control):
        flags.append(RedFlag(code="predictions_identical", message=(
            f"{split} predictions are identical to the random-encoder control's on all {n} samples: "
            "no measurable benefit from pretraining on this split")))
    if constant_predictions(outputs):
        flags.append(RedFlag(code="constant_predictions", message=(
            f"the model predicts label {labels(outputs).flat[0]} for all {n} {split} samples")))
    return flags


def load_outputs(run_dir: str | Path, split: str = "val") -> np.ndarray:
    """``<split>_outputs`` from a run folder's predictions.npz (an error names the file and the array)."""
    path = Path(run_dir) / "predictions.npz"
    if not path.is_file():
        raise MoolaError(f"{path}: no such file (is {run_dir} a finished run folder?)")
    with np.load(path, allow_pickle=False) as arrays:
        key = f"{split}_outputs"
        if key not in arrays:
            raise MoolaError(f"{path}: no array {key!r} (found: {', '.join(arrays.files) or 'none'})")
        return np.asarray(arrays[key])


def saved_splits(run_dir: str | Path) -> list[str]:
    """The splits whose outputs a run folder's predictions.npz holds (``val``, ``test``), in that order."""
    path = Path(run_dir) / "predictions.npz"
    if not path.is_file():
        raise MoolaError(f"{path}: no such file (is {run_dir} a finished run folder?)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            files = set(arrays.files)
    except (OSError, ValueError) as exc:
        raise MoolaError(f"{path}: not a readable .npz file ({exc})") from None
    return [s for s in ("val", "test") if f"{s}_outputs" in files]


def compare_runs(run_dir: str | Path, control_dir: str | Path, split: str | None = None) -> list[RedFlag]:
    """:func:`compare_to_control` on two run folders' saved predictions.

    ``split`` None: the validation outputs when both runs saved them, else the test outputs (a run with a test
    split but no validation split); a split that only one of them has is an error naming what each run holds.
    """
    if split is None:
        mine, theirs = saved_splits(run_dir), saved_splits(control_dir)
        common = [s for s in mine if s in theirs]
        if not common:
            raise MoolaError(f"cannot compare {run_dir} with the control {control_dir}: no split has outputs in both "
                             f"(run: {', '.join(mine) or 'none'}; control: {', '.join(theirs) or 'none'})")
        split = common[0]
    return compare_to_control(load_outputs(run_dir, split), load_outputs(control_dir, split), split=split)


def raise_red_flags(flags: list[RedFlag], log: Any, **fields: Any) -> None:
    """Log each flag as ``red_flag.raised`` at warning level (never raises)."""
    for flag in flags:
        log.warning(Event.RED_FLAG, code=flag.code, message=flag.message, **fields)
