"""DDP through torchrun: 2 CPU ranks (gloo) equal one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TinyNet
from ddp_worker import N_TRAIN, build_engine

from moola_engine.core import distributed
from moola_engine.errors import MoolaError


def test_shard_slices_cover_the_global_batch_and_scale_to_its_mean() -> None:
    idx = torch.arange(13)
    parts = [distributed.DistContext(device=torch.device("cpu"), world_size=2, rank=r).shard(idx) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), idx)
    assert [p[1] for p in parts] == [7, 6]
    # DDP averages the ranks' gradients: (1/W) * sum(scale_r * mean_r) must be the global mean
    losses = torch.randn(13)
    ddp_mean = sum(s * losses[i].mean() for i, _, s in parts) / 2
    assert torch.allclose(ddp_mean, losses.mean())


def test_rank_with_empty_slice_still_joins_at_scale_zero() -> None:
    ctx = distributed.DistContext(device=torch.device("cpu"), world_size=4, rank=3)
    local, count, scale = ctx.shard(torch.arange(3))
    assert (local.numel(), count, scale) == (1, 0, 0.0)


def test_single_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup(torch.device("cpu"))
    assert not ctx.active and ctx.is_main


def test_world_size_without_torchrun_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MoolaError, match="launch with torchrun"):
        distributed.setup(torch.device("cpu"))


def test_fingerprint_sees_a_single_changed_weight() -> None:
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    b.load_state_dict(a.state_dict())
    assert torch.equal(distributed.fingerprint(a)[1], distributed.fingerprint(b)[1])
    with torch.no_grad():
        b.enc1.weight[3, 2] += 1e-6
    names, fa = distributed.fingerprint(a)
    diff = (distributed.fingerprint(b)[1] != fa).any(dim=1)
    assert [n for n, d in zip(names, diff) if d] == ["enc1.weight"]


def _write_cli_inputs(out: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8, 4)).astype(np.float32)
    np.savez(out / "data.npz", x=x, y=(x[:, :, 3].mean(axis=1) > 0).astype(np.int64))
    (out / "strategies.toml").write_text('[strategy.tp]\nplugin = "two-phase"\nunfreeze_after = 1\n')
    (out / "experiment.toml").write_text(f"""
[run]
strategy = "tp"
runs_dir = "{out / 'runs'}"
console = "none"
[train]
epochs = 2
batch_size = 16
device = "cpu"
[model.params]
hidden_size = 4
head_hidden = 4
dropout = 0.0
[data]
kind = "npz"
path = "{out / 'data.npz'}"
""")


@pytest.mark.slow
def test_two_gloo_ranks_match_single_process_and_check_consistency(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cli_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: a hung collective must not linger
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 180 s (a collective hung?):\n" + output[-4000:])
    assert proc.returncode == 0, output[-6000:]

    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in (0, 1))
    s0, s1 = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0["world"] == s1["world"] == 2
    # identical replicas, bit for bit
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    # the check ran at the initial freeze, the unfreeze and every epoch end, and passed on both ranks
    wheres = [e["where"] for e in s0["checks"]]
    assert wheres == ["freeze encoder.layer0", "freeze encoder.layer1", "epoch end",
                      "unfreeze encoder.layer0", "unfreeze encoder.layer1", "epoch end", "epoch end"]
    assert all(e["ok"] for e in s0["checks"] + s1["checks"])
    # equal to one process on the same global batch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = build_engine()
    assert not single.dist.active
    single.fit()
    ref = single.model.state_dict()
    for k in p0:
        assert torch.allclose(p0[k], ref[k], atol=1e-5, rtol=1e-4), (k, (p0[k] - ref[k]).abs().max())
    assert abs(s0["history"][-1]["train_loss"] - single.history[-1]["train_loss"]) < 1e-5
    assert s0["history"][-1]["val_loss"] == s1["history"][-1]["val_loss"]
    # a stale wrapper (no rebuild after unfreezing) desynchronises the ranks, and the check says so
    for s in (s0, s1):
        assert s["stale"] is not None and "ddp.consistency at epoch end (epoch 1" in s["stale"]
        assert "enc0.weight" in s["stale"]
    # only rank 0 wrote the run folder; rank 1 wrote under runs/.rank1/
    runs = tmp_path / "runs"
    assert Path(s0["run_dir"]).parent == runs
    assert Path(s1["run_dir"]).parent == runs / ".rank1"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir() and p.name != "latest") == \
        [".rank1", Path(s0["run_dir"]).name]
    events = [json.loads(line) for line in (Path(s0["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "ddp.consistency" and e["ok"] for e in events)
    assert N_TRAIN % 16 != 0  # the ragged last batch is part of what is compared


def test_train_builds_the_model_from_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks build their models independently: the initial weights must follow train.seed, not process state."""
    from moola_engine.config import load_config
    from moola_engine.runs.train import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _write_cli_inputs(tmp_path)
    outputs = []
    for junk in (1, 2):
        torch.rand(junk)  # different RNG state before each run
        outcome = train(load_config(tmp_path / "experiment.toml"), strategies_file=str(tmp_path / "strategies.toml"))
        outputs.append(np.load(outcome.run_dir / "predictions.npz")["val_outputs"])
    assert np.array_equal(outputs[0], outputs[1])
