"""Worker for tests/test_distributed.py, launched by ``torchrun --nproc-per-node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py OUT_DIR``

1. a two-phase run through the Engine under DDP: saves each rank's final parameters;
2. the same with the wrapper rebuild disabled (the bug DDP invites): the
   ``ddp.consistency`` check must fail on every rank; the message is saved;
0. (first, in a fresh process) ``train()`` from a config: rank 0 writes the run folder, rank 1
   ``runs/.rank1/``, and the ``ddp.consistency`` check passes from the initial freeze on.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_GROUPS, TinyNet, named, tiny_data

from moola_engine.config import TrainConfig
from moola_engine.core import distributed
from moola_engine.core.engine import Engine
from moola_engine.core.plugins import build_plugin_manager, register_checked
from moola_engine.errors import CheckFailed
from moola_engine.logs import RunLog

N_TRAIN = 61  # 16, 16, 16, 13: a ragged last global batch, split 7 / 6 over two ranks


def build_engine(runlog: RunLog | None = None, epochs: int = 3) -> Engine:
    """The run both the DDP ranks and the single-process reference do."""
    torch.manual_seed(0)
    strat = named("two-phase", unfreeze_after=1, lr_scale=0.5)
    pm, _ = build_plugin_manager()
    register_checked(pm, strat, name="strategy")
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, seed=0, device="cpu", grad_clip=1.0)
    return Engine(TinyNet(), train=cfg, groups=TINY_GROUPS, pm=pm, strategy=strat,
                  train_data=tiny_data(n=N_TRAIN, seed=0), val_data=tiny_data(n=32, seed=100),
                  logger=runlog.logger if runlog is not None else None)


def main(out: Path) -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a hung collective: say where, then exit
    torch.set_num_threads(1)
    ctx = distributed.setup(torch.device("cpu"))  # owns the process group for the whole script
    # 0. the CLI path first, in a fresh process (nothing seeded yet): ranks must still start equal
    from moola_engine.config import load_config
    from moola_engine.runs.train import train

    outcome = train(load_config(out / "experiment.toml"), strategies_file=str(out / "strategies.toml"))
    # 1. the real thing
    runlog = RunLog(None, console="none", capture=True)
    engine = build_engine(runlog)
    rank = engine.dist.rank
    fit = engine.fit()
    torch.save({k: v.detach().clone() for k, v in engine.model.state_dict().items()}, out / f"params{rank}.pt")
    checks = [e for e in runlog.events if e["event"] == "ddp.consistency"]
    summary: dict[str, Any] = {"world": engine.dist.world_size, "history": fit.history, "checks": checks}

    # 2. negative control: keep the wrapper built at the first step (encoder frozen then)
    engine = build_engine()
    engine._rewrap_once = engine._rewrap  # type: ignore[attr-defined]

    def stale() -> None:
        if engine._step_fn is engine._model_fn:
            engine._rewrap_once()  # type: ignore[attr-defined]
        engine._wrap_stale = False

    engine._rewrap = stale  # type: ignore[method-assign]
    try:
        engine.fit()
        summary["stale"] = None
    except CheckFailed as exc:
        summary["stale"] = str(exc)
    summary["run_dir"] = str(outcome.run_dir)
    (out / f"summary{rank}.json").write_text(json.dumps(summary, default=str))
    # Teardown in order: the engines' DDP wrappers (the negative control's stopped in the middle of a fit) go
    # before the process group, both ranks leave it together, and the process exits without running C++ static
    # destructors. Otherwise gloo sometimes aborts the process at exit ("terminate called without an active
    # exception", SIGABRT) after everything above was written: seen about 1 run in 5 on a loaded 2-core machine.
    engine = fit = None  # type: ignore[assignment]  # drop the last references
    gc.collect()
    torch.distributed.barrier()
    distributed.shutdown(ctx)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
