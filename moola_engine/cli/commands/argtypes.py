"""argparse ``type=`` helpers: a bad number is a usage error (exit 2) naming the flag, never a traceback later.

Bounds are what the engine can run: seeds are numpy seeds (below 2**32), epoch counts and the like stay below
:data:`MAX_COUNT` (a bigger value is a typo, and would spend minutes planning before the first step).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

MAX_COUNT = 1_000_000
MAX_SEED = 2**32 - 1


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None


def _bounded(lo: int, hi: int, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        value = _int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} ({lo}..{hi}), got {value if abs(value) < 10**12 else text[:40]}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _bounded(1, MAX_COUNT, "an integer >= 1")
non_negative_int = _bounded(0, MAX_COUNT, "an integer >= 0")
seed_int = _bounded(0, MAX_SEED, "a seed >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text[:40]}")
    return value


def writable_output(path: Path, *, flag: str, is_dir: bool) -> None:
    """Prove ``path`` (a file to write, or a folder to create) can be written, before any work starts.

    Creates the missing parent folders (the command would create them anyway) and writes and removes a probe file,
    so an unwritable location, a path under a file or a name too long fails here as a ConfigError naming ``flag``.
    """
    from moola_engine.errors import ConfigError

    folder = path if is_dir else path.parent
    try:
        if is_dir and path.exists() and not path.is_dir():
            raise ConfigError(flag, f"{path} is a file, not a folder")
        if not is_dir and path.is_dir():
            raise ConfigError(flag, f"{path} is a folder, expected a file name")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
        if not is_dir and not path.exists():  # the file name itself must be acceptable (length, characters)
            path.write_text("", encoding="utf-8")
            path.unlink()
    except OSError as exc:
        raise ConfigError(flag, f"cannot write to {_short(path)}: {exc.strerror or exc}") from None


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]} ({len(text)} characters)"
