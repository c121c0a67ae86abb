"""A training run that kills itself: the subprocess of the kill -9 tests (not a test module).

    python tests/killrun.py --config exp.toml [--strategy NAME --strategies FILE]
    python tests/killrun.py --resume runs/<id>

``MOOLA_KILL_AT_STEP=N``: SIGKILL this process right before global step N
(``before_step``), so the kill point is exact and repeatable.
``MOOLA_SIGINT_AT_STEP=N``: send this process SIGINT (Ctrl-C) right before global step N instead: Python
raises KeyboardInterrupt there, the run logs ``run.failed`` and exits.
``MOOLA_KILL_IN_SAVE=E``: SIGKILL it in the middle of writing the checkpoint of
epoch E (after its files are written, before the rename that publishes it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import attrs
import torch

from moola_engine import hookimpl
from moola_engine.config import load_config
from moola_engine.runs.resume import run_config
from moola_engine.runs.train import train


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    """Test plugin: SIGKILL before global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def before_step(self, engine: Any, step: int) -> None:
        if step == self.step:
            die()


class InterruptAt(KillAt):
    """Test plugin: SIGINT (Ctrl-C) before global step ``step``."""

    @hookimpl
    def before_step(self, engine: Any, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def kill_in_save(epoch: int) -> None:
    """Patch os.replace so publishing checkpoint ``epoch`` dies half way."""
    real = os.replace

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if str(dst).endswith(f"epoch-{epoch:04d}") and ".tmp-" in str(src):
            die()
        real(src, dst, *a, **kw)

    os.replace = replace  # type: ignore[assignment]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--strategy")
    p.add_argument("--strategies")
    p.add_argument("--runs-dir")
    p.add_argument("--resume")
    args = p.parse_args()
    torch.set_num_threads(1)
    plugins: tuple[Any, ...] = ()
    if os.environ.get("MOOLA_KILL_AT_STEP"):
        plugins = (KillAt(int(os.environ["MOOLA_KILL_AT_STEP"])),)
    if os.environ.get("MOOLA_SIGINT_AT_STEP"):
        # Ctrl-C raises KeyboardInterrupt here even when the process was started with SIGINT ignored (a shell
        # ignores it for background jobs, and children inherit that)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        plugins = (InterruptAt(int(os.environ["MOOLA_SIGINT_AT_STEP"])),)
    if os.environ.get("MOOLA_KILL_IN_SAVE"):
        kill_in_save(int(os.environ["MOOLA_KILL_IN_SAVE"]))
    if args.resume:
        out = train(run_config(args.resume), resume=args.resume, extra_plugins=plugins)
    else:
        cfg = load_config(args.config)
        if args.runs_dir:
            cfg = attrs.evolve(cfg, run=attrs.evolve(cfg.run, runs_dir=args.runs_dir))
        out = train(cfg, strategy=args.strategy, strategies_file=args.strategies, extra_plugins=plugins)
    print(out.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
