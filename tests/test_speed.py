"""The fast path: no host sync in the step loop, no per-step engine work, bf16 and compile switches."""

from __future__ import annotations

import collections
import importlib.metadata as md
import statistics
import sys
from typing import Any

import pytest
import torch
from conftest import ROOT, TINY_GROUPS, TinyNet, make_engine, named, tiny_data
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moola_engine import hookimpl
from moola_engine.config import ExperimentConfig, TrainConfig
from moola_engine.core import plugins
from moola_engine.core.engine import Engine
from moola_engine.core.hostsync import HostSyncError
from moola_engine.core.plugins import build_plugin_manager, register_checked
from moola_engine.errors import MoolaError
from moola_engine.runs.observers import build_observers

sys.path.insert(0, str(ROOT / "benchmarks"))
import overhead


class StepListener:
    """Implements both step hooks (so the engine takes its slower, hooked path) without syncing."""

    def __init__(self) -> None:
        self.steps = 0

    @hookimpl
    def before_step(self, step: int) -> None:
        self.steps += 1

    @hookimpl
    def after_step(self, loss: torch.Tensor) -> None:
        assert loss.device.type in ("cpu", "cuda")


class ReadsLoss:
    @hookimpl
    def after_step(self, loss: torch.Tensor) -> None:
        float(loss)  # a host sync on every step


def all_check_observers() -> list[Any]:
    """Whatever observers a config with every check on registers (the checks' step hooks must not sync)."""
    cfg = ExperimentConfig(checks=overhead.checks_config(True))
    return [obs for _, obs in build_observers(cfg, None)]


def sync_free_engine(extra: tuple[Any, ...] = ()) -> Engine:
    strat = named("two-phase", unfreeze_after=1, lr_scale=0.5)
    engine = make_engine(strat, epochs=2, extra=(*all_check_observers(), *extra),
                         train_kwargs={"grad_clip": 1.0})
    engine.sync_debug = "error"
    return engine


def test_step_loop_has_no_host_sync_cpu_proxy() -> None:
    listener = StepListener()
    engine = sync_free_engine(extra=(listener,))
    engine.fit()
    assert listener.steps == 2 * 4
    assert engine.history[-1]["train_loss"] > 0


def test_a_plugin_reading_the_loss_every_step_is_caught() -> None:
    engine = sync_free_engine(extra=(ReadsLoss(),))
    with pytest.raises(HostSyncError, match="_local_scalar_dense inside the training step loop"):
        engine.fit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_epoch_on_cuda_under_sync_debug_error() -> None:
    """torch.cuda.set_sync_debug_mode("error") around the step loop; epoch-end reads happen outside it."""
    from moola_ohlc.models import SimpleLSTM

    strat = named("two-phase", unfreeze_after=1, lr_scale=0.5)
    pm, _ = build_plugin_manager()
    for i, obs in enumerate(all_check_observers()):
        register_checked(pm, obs, name=f"check-{i}")
    register_checked(pm, StepListener(), name="listener")
    register_checked(pm, strat, name="strategy")
    torch.manual_seed(0)
    engine = Engine(SimpleLSTM(hidden_size=32), train=TrainConfig(epochs=2, batch_size=16, device="cuda",
                                                                  grad_clip=1.0),
                    pm=pm, strategy=strat, train_data=tiny_data(n=64, t=16, c=4), val_data=tiny_data(n=16, t=16, c=4))
    engine.sync_debug = "error"
    engine.fit()
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
    assert engine.history[-1]["train_loss"] > 0


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _plain(n: int) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW([{"params": m.parameters()} for m in (model.enc0, model.enc1, model.head)], lr=1e-2,
                            weight_decay=0.0)
    data = tiny_data(n=n)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(())
    for idx in torch.randperm(n, generator=gen).split(16):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        loss.backward()
        opt.step()
        total += loss.detach() * idx.shape[0]  # the epoch loss, kept on the device as a careful loop does
    float(total)


def _engine(n: int) -> None:
    torch.manual_seed(0)
    pm, _ = build_plugin_manager()
    strat = named("two-phase", unfreeze_after=0, lr_scale=1.0)
    register_checked(pm, strat, name="strategy")
    Engine(TinyNet(), train=TrainConfig(epochs=1, batch_size=16, lr=1e-2, device="cpu"), groups=TINY_GROUPS, pm=pm,
           strategy=strat, train_data=tiny_data(n=n), val_data=tiny_data(n=8, seed=1)).fit()


def _ops_per_step(fn: Any) -> float:
    counts = []
    for n in (64, 128):  # 4 and 8 steps: the difference is what one step costs
        with _OpCount() as c:
            fn(n)
        counts.append(sum(c.ops.values()))
    return (counts[1] - counts[0]) / 4


def test_engine_step_runs_no_more_tensor_ops_than_a_plain_loop() -> None:
    """Deterministic overhead proxy: tensor ops per training step, engine vs a bare loop (no timing)."""
    plain, engine = _ops_per_step(_plain), _ops_per_step(_engine)
    assert engine <= plain, (engine, plain)


def test_bf16_autocast_switch_on_cpu() -> None:
    seen: list[torch.dtype | None] = []

    class Probe(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().forward(x)

    engine = make_engine(named("two-phase", unfreeze_after=0), epochs=1, model=Probe(),
                         train_kwargs={"precision": "bf16"})
    engine.fit()
    assert seen[:4] == [torch.bfloat16] * 4  # the training steps ran under bf16 autocast
    assert torch.isfinite(torch.tensor(engine.history[-1]["train_loss"]))


@pytest.mark.slow
def test_compile_switch_matches_eager_on_cpu() -> None:
    pytest.importorskip("torch._inductor")
    eager = make_engine(named("two-phase", unfreeze_after=1), epochs=2)
    eager.fit()
    compiled = make_engine(named("two-phase", unfreeze_after=1), epochs=2, train_kwargs={"compile": True})
    compiled.fit()
    assert compiled._model_fn is not compiled.model  # really compiled
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_source_tree_plugins_when_entry_points_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins.md, "entry_points", lambda group: [])
    monkeypatch.delenv("MOOLA_BUILTIN_PLUGINS", raising=False)
    assert "two-phase" not in build_plugin_manager()[1]
    monkeypatch.setenv("MOOLA_BUILTIN_PLUGINS", "1")
    pm, registry = build_plugin_manager()
    installed = {ep.name for ep in md.entry_points(group="moola_engine") if ep.dist.metadata["Name"] == "moola-engine"}
    assert installed <= set(registry.names())  # the same list the pyproject installs
    assert "moola-engine[two-phase]" in dict(pm.list_name_plugin())


@pytest.mark.slow
def test_overhead_benchmark_quick_smoke(tmp_path: Any) -> None:
    out = tmp_path / "bench.json"
    assert overhead.main(["--quick", "--scenario", "finetune", "--rounds", "1", "--json", str(out)]) == 0
    import json

    res = json.loads(out.read_text())["results"][0]
    assert set(res["median_ratio"]) >= {"plain", "engine", "engine+checks"}
    assert res["median_ratio"]["plain"] == 1.0
    assert all(t > 0 for ts in res["seconds"].values() for t in ts)


@pytest.mark.slow
def test_overhead_benchmark_repeat_pools_the_rounds_of_fresh_processes(tmp_path: Any) -> None:
    out = tmp_path / "bench.json"
    assert overhead.main(["--quick", "--scenario", "finetune", "--rounds", "1", "--repeat", "2",
                          "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2  # two processes, each its own results
    pooled = data["pooled"][0]
    assert pooled["pooled_rounds"] == 2
    ratios = [run["results"][0]["seconds"]["engine"][0] / run["results"][0]["seconds"]["plain"][0]
              for run in data["runs"]]
    assert pooled["pooled_median_ratio"]["engine"] == pytest.approx(sum(ratios) / 2)  # median of two


@pytest.mark.slow
def test_engine_parts_and_process_spread_scripts_run(tmp_path: Any) -> None:
    import subprocess

    bench = ROOT / "benchmarks"
    parts = subprocess.run([sys.executable, str(bench / "engine_parts.py"), "--quick", "--runs", "1", "--cold-probe"],
                           capture_output=True, text=True, timeout=300, check=True).stdout
    assert "engine + every check, fine-tuning scenario, 1 runs:" in parts
    timed = {line.split()[0] for line in parts.splitlines() if line.startswith("  ")}
    assert {"Engine.fit", "classification_metrics", "_DeltaObserver._measure", "GradFlowCheck.after_step"} <= timed
    assert "cold probe: a small numpy call takes" in parts
    spread = subprocess.run([sys.executable, str(bench / "process_spread.py"), "--quick", "--processes", "2",
                             "--runs", "2"], capture_output=True, text=True, timeout=300, check=True).stdout
    assert spread.count("process ") >= 2 and "between processes: medians" in spread


def test_non_finite_loss_is_found_at_epoch_end_with_its_step() -> None:
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 7 else loss  # step 6 (second epoch, third step)

    engine = make_engine(named("two-phase", unfreeze_after=0), epochs=3)
    engine.loss_fn = loss_fn
    with pytest.raises(MoolaError, match=r"non-finite training loss at step 6 \(epoch 1\)"):
        engine.fit()
    assert engine.history[0]["train_loss"] > 0 and len(engine.history) == 1


@pytest.mark.slow
def test_check_scaling_benchmark_pools_rounds_of_fresh_processes(tmp_path: Any) -> None:
    import json
    import subprocess

    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_scaling.py"), "--sizes", "tiny",
                           "--rounds", "2", "--repeat", "2", "--epochs", "2", "--unfreeze-after", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=300, check=True)
    assert "| tiny (" in proc.stdout and "targets (time <= 1.05 x off" in proc.stdout
    row = json.loads(out.read_text())["results"]["tiny"]
    pooled = [r for rounds in row["processes"] for r in rounds]
    assert len(row["processes"]) == 2 and len(pooled) == 4
    for v in ("off", "exact", "fingerprint"):
        assert all(r[v] > 0 for r in pooled)
        assert row[v]["median_ratio"] == pytest.approx(statistics.median(r[v] / r["off"] for r in pooled))
        assert row["rss_runs"][v]["peak_rss_mb"] > 50  # a process of its own with torch loaded
        assert row[v]["rss_ratio"] == pytest.approx(row[v]["peak_rss_mb"] / row["off"]["peak_rss_mb"])


@pytest.mark.slow
def test_check_scaling_hooks_mode_times_the_checks_inside_the_fit(tmp_path: Any) -> None:
    """--hooks: the time inside the check observers' hooks, per mode; part of the fit, and not nothing."""
    import json
    import subprocess

    out = tmp_path / "hooks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_scaling.py"), "--sizes", "tiny",
                           "--hooks", "2", "--epochs", "2", "--unfreeze-after", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=True)
    assert "| tiny | " in proc.stdout
    row = json.loads(out.read_text())["hooks"]["tiny"]
    for v in ("exact", "fingerprint"):
        assert 0 < row[v]["check_seconds"] < row[v]["fit_seconds"]
        assert 0 < row[v]["share"] < 1


def test_dataloader_benchmark_quick_smoke(tmp_path: Any) -> None:
    """The DataLoader-path benchmark runs both variants (a smoke test: it times nothing it asserts)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "dl.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dataloader.py"), "--quick", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert len(res["times"]["plain"]) == len(res["times"]["engine"]) == 2 and len(res["ratios"]) == 2
