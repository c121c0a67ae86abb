"""GPU checks in one short run: device, sync-free step loop, bf16 and torch.compile smoke runs.

    python benchmarks/gpu_check.py            # CUDA when present, else the CPU equivalents

Needs no pytest and no installed entry points (``MOOLA_BUILTIN_PLUGINS=1`` is
set when the package is not installed).  Exit status 1 when a check fails.
"""

from __future__ import annotations

import importlib.metadata as md
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not any(ep.name == "two-phase" for ep in md.entry_points(group="moola_engine")):
    os.environ.setdefault("MOOLA_BUILTIN_PLUGINS", "1")  # a checkout on PYTHONPATH, not pip-installed

import torch  # noqa: E402

from moola_engine import hookimpl  # noqa: E402
from moola_engine.config import ExperimentConfig, TrainConfig, structure  # noqa: E402
from moola_engine.core.data import TensorData  # noqa: E402
from moola_engine.core.engine import Engine  # noqa: E402
from moola_engine.core.plugins import build_plugin_manager, register_checked  # noqa: E402
from moola_engine.runs.observers import build_observers  # noqa: E402
from moola_ohlc.models import SimpleLSTM  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead import checks_config  # noqa: E402


class StepListener:
    """Both step hooks implemented, so the hooked path of the loop is the one checked."""

    steps = 0

    @hookimpl
    def before_step(self, step: int) -> None:
        self.steps += 1

    @hookimpl
    def after_step(self, loss: torch.Tensor) -> None:
        pass


def windows(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, 4, generator=g).cumsum(dim=1) * 0.1
    return TensorData(x=x, y=(x[:, -1, 3] > x[:, 0, 3]).long())


def engine(device: str, *, epochs: int = 2, checks: bool = True, **train: Any) -> tuple[Engine, StepListener]:
    pm, registry = build_plugin_manager()
    info = registry["two-phase"]
    strat = info.factory(structure({"unfreeze_after": 1, "lr_scale": 0.3}, info.params, source="gpu_check"))
    strat.name = "two-phase"
    if checks:
        for name, obs in build_observers(ExperimentConfig(checks=checks_config(True)), None):
            register_checked(pm, obs, name=name)
    listener = StepListener()
    register_checked(pm, listener, name="step-listener")
    register_checked(pm, strat, name="strategy:two-phase")
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, device=device, grad_clip=1.0, **train)
    return Engine(SimpleLSTM(), train=cfg, pm=pm, strategy=strat, train_data=windows(256, 0),
                  val_data=windows(64, 1)), listener


def run(label: str, fn: Any) -> bool:
    t0 = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:
        print(f"FAIL  {label}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=6)
        return False
    print(f"ok    {label} ({time.perf_counter() - t0:.1f} s){': ' + detail if detail else ''}")
    return True


def main() -> int:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}")
    if not cuda:
        print("CUDA not available: running the CPU equivalents (sync proxy instead of cuda sync debug mode)")

    def sync_test() -> str:
        eng, listener = engine(device)
        eng.sync_debug = "error"  # torch.cuda.set_sync_debug_mode("error") around the step loop (CPU: op proxy)
        eng.fit()
        mode = "cuda sync debug mode 'error'" if cuda else "CPU proxy"
        if cuda and torch.cuda.get_sync_debug_mode() != 0:
            raise RuntimeError("sync debug mode was not restored after the step loop")
        return (f"{listener.steps} steps under {mode}, no host sync; observers: "
                f"{len(build_observers(ExperimentConfig(checks=checks_config(True)), None))}; "
                f"train_loss {eng.history[-1]['train_loss']:.4f}")

    def timed(**train: Any) -> str:
        eng, _ = engine(device, epochs=3, checks=False, **train)
        res = eng.fit()
        loss = eng.history[-1]["train_loss"]
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite train_loss {loss}")
        return f"3 epochs in {res.seconds:.2f} s, train_loss {loss:.4f}, val_loss {eng.history[-1]['val_loss']:.4f}"

    results = [
        run("sync-free step loop (two-phase, every check observer, both step hooks)", sync_test),
        run("fp32 reference", timed),
        run("bf16 autocast", lambda: timed(precision="bf16")),
        run("torch.compile (time includes compilation)", lambda: timed(compile=True)),
    ]
    print(f"gpu_check: {sum(results)}/{len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
