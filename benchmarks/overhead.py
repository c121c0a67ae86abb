"""Engine overhead against a hand-written PyTorch loop doing the same work.

    python benchmarks/overhead.py                 # both scenarios, 7 rounds, CPU, 1 thread
    python benchmarks/overhead.py --quick         # CI smoke: small sizes, 3 rounds
    python benchmarks/overhead.py --device cuda --rounds 5 --json out.json
    python benchmarks/overhead.py --scenario finetune --rounds 15 --repeat 3   # 3 fresh processes, rounds pooled

Variants, all with the same model (SimpleLSTM: biLSTM 4->128, head 256->32->2),
the same synthetic windows, AdamW with one param group per model group, the
same seed, and a two-phase schedule (encoder frozen, then unfrozen at 0.3x lr):

* ``plain``: a hand-written loop (randperm + index batches, freeze by
  ``requires_grad``, per-epoch validation loss and accuracy);
* ``engine``: :class:`moola_engine.core.engine.Engine` with the ``two-phase``
  strategy, an event log on disk, no checks;
* ``engine+checks``: the same with every observer that
  ``observers.build_observers`` returns for a config with every check on;
* ``lightning``: Lightning's ``BackboneFinetuning`` callback (only when
  ``lightning`` or ``pytorch_lightning`` is importable).

Each round runs every variant once, in an order rotated from round to round;
the ratio of a round is variant time / plain time in that round, and the
table reports the median ratio over rounds.  A run is timed from model
construction to the end of training (engine construction and ``fit()``
included); building the plugin manager (entry-point discovery, once per
process) is not.  Timing depends on shapes, not values, so the windows are
random walks with a fixed seed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without pip install
    sys.path.insert(0, str(ROOT))

from moola_engine.config import CheckpointConfig, ChecksConfig, ExperimentConfig, TrainConfig, structure  # noqa: E402
from moola_engine.core.data import TensorData  # noqa: E402
from moola_engine.core.engine import Engine  # noqa: E402
from moola_engine.core.plugins import build_plugin_manager, register_checked  # noqa: E402
from moola_engine.logs import RunLog, clear_contextvars  # noqa: E402
from moola_engine.runs.observers import build_observers  # noqa: E402
from moola_ohlc.models import SimpleLSTM  # noqa: E402

TARGETS = {"engine": 1.02, "engine+checks": 1.05}  # CPU, 1 thread, median per-round ratio


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    n_train: int
    n_val: int
    batch_size: int
    epochs: int
    unfreeze_after: int
    seq_len: int = 64
    channels: int = 4
    lr: float = 1e-3
    lr_scale: float = 0.3
    seed: int = 0


SCENARIOS = {
    "finetune": Scenario(name="finetune", n_train=89, n_val=18, batch_size=16, epochs=30, unfreeze_after=10),
    "pretrain": Scenario(name="pretrain", n_train=12_000, n_val=1_200, batch_size=256, epochs=2, unfreeze_after=1),
}
QUICK = {
    "finetune": attrs.evolve(SCENARIOS["finetune"], epochs=6, unfreeze_after=2),
    "pretrain": attrs.evolve(SCENARIOS["pretrain"], n_train=768, n_val=128),
}


def make_data(sc: Scenario, device: torch.device) -> tuple[TensorData, TensorData]:
    g = torch.Generator().manual_seed(sc.seed)
    n = sc.n_train + sc.n_val
    x = torch.randn(n, sc.seq_len, sc.channels, generator=g).cumsum(dim=1) * 0.1
    y = (x[:, -1, 3] > x[:, 0, 3]).long()
    return (TensorData(x=x[:sc.n_train], y=y[:sc.n_train]).to(device),
            TensorData(x=x[sc.n_train:], y=y[sc.n_train:]).to(device))


def checks_config(on: bool) -> ChecksConfig:
    """Every boolean check switch on (or off); ``strict`` stays True (it is not a check)."""
    values = {f.name: on for f in attrs.fields(ChecksConfig)
              if f.name != "strict" and f.type in (bool, "bool")}
    return ChecksConfig(**values)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- (a) the plain loop


def run_plain(sc: Scenario, train: TensorData, val: TensorData, device: torch.device, **_: Any) -> float:
    """What a careful user writes by hand for the same two-phase run."""
    torch.manual_seed(sc.seed)
    model = SimpleLSTM().to(device)
    encoder, head = list(model.lstm.parameters()), list(model.head.parameters())
    opt = torch.optim.AdamW([{"params": encoder, "lr": sc.lr}, {"params": head, "lr": sc.lr}], lr=sc.lr)
    for p in encoder:
        p.requires_grad_(False)
    gen = torch.Generator(device=device)
    gen.manual_seed(sc.seed)
    n = len(train)
    for epoch in range(sc.epochs):
        if epoch == sc.unfreeze_after:
            for p in encoder:
                p.requires_grad_(True)
            opt.param_groups[0]["lr"] = sc.lr * sc.lr_scale
        model.train()
        total = torch.zeros((), device=device)
        for idx in torch.randperm(n, generator=gen, device=device).split(sc.batch_size):
            xb, yb = train.x[idx], train.y[idx]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.shape[0]
        train_loss = total.item() / n
        model.eval()
        with torch.no_grad():
            out = torch.cat([model(val.x[i:i + 1024]) for i in range(0, len(val), 1024)])
            val_loss = nn.functional.cross_entropy(out, val.y).item()
            val_acc = (out.argmax(1) == val.y).float().mean().item()
        if not (train_loss == train_loss and val_loss == val_loss and val_acc >= 0):  # NaN guard, as users write
            raise RuntimeError("non-finite loss")
    sync(device)
    return train_loss


# --------------------------------------------------------------------------- (b, c) the engine


class EngineRunner:
    def __init__(self, checks: bool, device: torch.device, checkpoints: bool = False) -> None:
        self.checks = checks
        self.checkpoints = checkpoints
        self.device = device
        self.pm_factory = build_plugin_manager  # entry points, or MOOLA_BUILTIN_PLUGINS=1 in a bare checkout
        _, registry = build_plugin_manager()
        if "two-phase" not in registry:
            raise SystemExit("strategy plugin two-phase not found: pip install -e . or set MOOLA_BUILTIN_PLUGINS=1")
        self.info = registry["two-phase"]
        self.tmp = Path(tempfile.mkdtemp(prefix="moola-bench-"))
        self.count = 0

    def prepare(self, sc: Scenario) -> Any:
        """Plugin manager with strategy and observers (not timed: once per process in real use)."""
        pm, _ = self.pm_factory()
        strat = self.info.factory(structure({"unfreeze_after": sc.unfreeze_after, "lr_scale": sc.lr_scale},
                                            self.info.params, source="benchmark"))
        strat.name = "two-phase"
        self.count += 1
        run_dir = self.tmp / f"run{self.count}"
        run_dir.mkdir()
        train_cfg = TrainConfig(epochs=sc.epochs, batch_size=sc.batch_size, lr=sc.lr, seed=sc.seed,
                                device=str(self.device))
        checks = checks_config(self.checks)
        if self.checks or self.checkpoints:
            cfg = ExperimentConfig(train=train_cfg, checks=checks, checkpoint=CheckpointConfig(enabled=self.checkpoints))
            for name, obs in build_observers(cfg, run_dir):
                register_checked(pm, obs, name=name)
        register_checked(pm, strat, name="strategy:two-phase")
        return pm, strat, run_dir, train_cfg, checks

    def __call__(self, sc: Scenario, train: TensorData, val: TensorData, device: torch.device,
                 prepared: Any = None) -> float:
        pm, strat, run_dir, train_cfg, checks = prepared
        runlog = RunLog(run_dir / "events.jsonl", console="none")
        try:
            torch.manual_seed(sc.seed)
            engine = Engine(SimpleLSTM(), train=train_cfg, pm=pm, strategy=strat, train_data=train, val_data=val,
                            checks=checks, logger=runlog.logger, run_dir=run_dir, strategy_name="two-phase")
            result = engine.fit()
            sync(device)
        finally:
            runlog.close()
            clear_contextvars()
        return result.history[-1]["train_loss"]


# --------------------------------------------------------------------------- (d) Lightning, when installed


def lightning_runner() -> Callable[..., float] | None:
    try:
        import lightning.pytorch as pl  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pytorch_lightning as pl  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return None
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self, sc: Scenario) -> None:
            super().__init__()
            self.sc = sc
            self.net = SimpleLSTM()
            self.backbone = self.net.lstm  # BackboneFinetuning looks for .backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            out = self(x)
            self.log("val_loss", nn.functional.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.sc.lr)

    def run(sc: Scenario, train: TensorData, val: TensorData, device: torch.device, **_: Any) -> float:
        torch.manual_seed(sc.seed)
        module = Module(sc)
        cb = pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=sc.unfreeze_after,
                                             backbone_initial_ratio_lr=sc.lr_scale, should_align=False,
                                             lambda_func=lambda epoch: 1.0, verbose=False)
        trainer = pl.Trainer(max_epochs=sc.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0)
        tl = DataLoader(TensorDataset(train.x.cpu(), train.y.cpu()), batch_size=sc.batch_size, shuffle=True)
        vl = DataLoader(TensorDataset(val.x.cpu(), val.y.cpu()), batch_size=1024)
        trainer.fit(module, tl, vl)
        sync(device)
        return float(trainer.callback_metrics.get("val_loss", float("nan")))

    return run


# --------------------------------------------------------------------------- the rounds


def bench(sc: Scenario, rounds: int, device: torch.device, variants: dict[str, Callable[..., float]],
          runners: dict[str, EngineRunner]) -> dict[str, Any]:
    train, val = make_data(sc, device)
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:  # warm-up: lazy inits, allocator, first-call costs
        variants[k](sc, train, val, device, prepared=runners[k].prepare(sc) if k in runners else None)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            prepared = runners[k].prepare(sc) if k in runners else None
            gc.collect()
            t0 = time.perf_counter()
            variants[k](sc, train, val, device, prepared=prepared)
            times[k].append(time.perf_counter() - t0)
    ratios = {k: [t / p for t, p in zip(times[k], times["plain"])] for k in names}
    return {
        "scenario": attrs.asdict(sc),
        "rounds": rounds,
        "seconds": times,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_range": {k: [min(v), max(v)] for k, v in ratios.items()},
    }


def table(results: list[dict[str, Any]], device: torch.device) -> str:
    lines = ["| scenario | variant | median s / run | median ratio vs plain | ratio min..max | target |",
             "|---|---|---|---|---|---|"]
    for res in results:
        sc = res["scenario"]
        label = f"{sc['name']} ({sc['n_train']} x {sc['seq_len']}x{sc['channels']}, batch {sc['batch_size']}, " \
                f"{sc['epochs']} epochs)"
        for k, ratio in res["median_ratio"].items():
            lo, hi = res["ratio_range"][k]
            target = TARGETS.get(k)
            verdict = "" if target is None or device.type != "cpu" else (
                f"<= {target} {'ok' if ratio <= target else 'MISSED'}")
            lines.append(f"| {label} | {k} | {res['median_seconds'][k]:.3f} | {ratio:.3f} | {lo:.3f}..{hi:.3f} "
                         f"| {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (CI smoke)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 7, --quick 3)")
    ap.add_argument("--scenario", choices=["finetune", "pretrain", "all"], default="all")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole benchmark this many times, each in a fresh process, and pool the rounds "
                         "(a median moves by about +-0.03 between processes on a noisy VM)")
    args = ap.parse_args(argv)
    if args.repeat > 1:
        on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        return repeat(args, argv if argv is not None else sys.argv[1:], on_cpu)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    rounds = args.rounds or (3 if args.quick else 7)
    scenarios = QUICK if args.quick else SCENARIOS
    chosen = list(scenarios) if args.scenario == "all" else [args.scenario]

    runners = {"engine": EngineRunner(checks=False, device=device),
               "engine+checks": EngineRunner(checks=True, device=device),
               "engine+checks+checkpoints": EngineRunner(checks=True, device=device, checkpoints=True)}
    variants: dict[str, Callable[..., float]] = {"plain": run_plain, **runners}
    lit = lightning_runner()
    if lit is not None:
        variants["lightning"] = lit
    results = [bench(scenarios[name], rounds, device, variants, runners) for name in chosen]

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "lightning": "installed" if lit is not None else "not installed (skipped)",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"device {env['device']}, torch {env['torch']}, {env['threads']} thread(s), lightning {env['lightning']}")
    print(table(results, device))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    return 0


def repeat(args: argparse.Namespace, argv: list[str], on_cpu: bool) -> int:
    """Run this benchmark ``args.repeat`` times in fresh processes; report each run's medians and the pooled one."""
    import subprocess

    keep: list[str] = []
    skip = False
    for a in argv:  # the same arguments, less --repeat N and --json PATH
        if skip:
            skip = False
        elif a in ("--repeat", "--json"):
            skip = True
        elif not a.startswith(("--repeat=", "--json=")):
            keep.append(a)
    runs = []
    with tempfile.TemporaryDirectory(prefix="moola-bench-repeat-") as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}.json"
            subprocess.run([sys.executable, __file__, *keep, "--json", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
    lines = ["| scenario | variant | median ratio per run | pooled median ratio | pooled rounds | target |",
             "|---|---|---|---|---|---|"]
    pooled_out = []
    for s_idx, first in enumerate(runs[0]["results"]):
        sc = first["scenario"]
        pooled: dict[str, list[float]] = {}
        for run in runs:
            res = run["results"][s_idx]
            for k, secs in res["seconds"].items():
                pooled.setdefault(k, []).extend(t / p for t, p in zip(secs, res["seconds"]["plain"]))
        medians = {k: statistics.median(v) for k, v in pooled.items()}
        pooled_out.append({"scenario": sc, "pooled_median_ratio": medians, "pooled_rounds": len(pooled["plain"])})
        for k, med in medians.items():
            per_run = ", ".join(f"{run['results'][s_idx]['median_ratio'][k]:.3f}" for run in runs)
            target = TARGETS.get(k)
            verdict = "" if target is None or not on_cpu else (
                f"<= {target} {'ok' if med <= target else 'MISSED'}")
            lines.append(f"| {sc['name']} | {k} | {per_run} | {med:.3f} | {len(pooled[k])} | {verdict} |")
    print(f"{args.repeat} runs, each in a fresh process; a run's ratio is the median of its rounds")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "pooled": pooled_out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
