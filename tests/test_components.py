"""Any model, any data, any task: components by plugin or import path, driven through the CLI alone."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moola_engine.cli import main
from moola_engine.config import DataConfig, TaskConfig, load_config
from moola_engine.core.data import build_splits, label_budget
from moola_engine.core.tasks import build_task
from moola_engine.errors import ConfigError, DataError
from moola_engine.runs.train import train
from tests.conftest import ROOT
from tests.test_plugins import PKG, install_on_path

STRATEGIES = """
[strategy.frozen]
plugin = "frozen"

[strategy.immediate]
plugin = "immediate"

[strategy.two_phase]
plugin = "two-phase"
unfreeze_after = 2
lr_scale = 0.5

[strategy.gradual]
plugin = "gradual"
every = 1
"""

EXPERIMENT = """
[run]
strategies_file = "strategies.toml"
console = "none"

[train]
epochs = 4
batch_size = 16
lr = 1e-2
threads = 1

[model]
name = "{model}"
params = {{ channels = 6 }}

[task]
name = "{task}"
params = {{ smoothing = 0.1 }}

[data]
kind = "{kind}"
val_fraction = 0.25
options = {{ n = 96, length = 24 }}
"""


def write_experiment(ws: Path, *, model: str = "tiny-fcn", task: str = "smoothed-classification",
                     kind: str = "waves") -> Path:
    (ws / "strategies.toml").write_text(STRATEGIES)
    cfg = ws / "exp.toml"
    cfg.write_text(EXPERIMENT.format(model=model, task=task, kind=kind))
    return cfg


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moola_engine.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def run_folder(stdout: str) -> Path:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("run folder: "))
    return Path(line.removeprefix("run folder: ").split()[0].rstrip("/"))


def drive_cli(ws: Path, env: dict[str, str]) -> None:
    """plan, train, verify and ablate --jobs 2, as a user types them."""
    plan = cli(["plan", "--config", "exp.toml", "--strategy", "two_phase"], ws, env)
    assert plan.returncode == 0, plan.stderr
    assert "encoder.block1" in plan.stdout and "encoder.block2" in plan.stdout

    tr = cli(["train", "--config", "exp.toml", "--strategy", "two_phase"], ws, env)
    assert tr.returncode == 0, tr.stderr
    run_dir = run_folder(tr.stdout)
    assert run_dir.parent == ws / "runs"  # runs_dir resolves against the experiment file
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    unfrozen = [e for e in events if e["event"] == "freeze.transition" and e["to_state"] == "trainable"
                and e["group"].startswith("encoder.")]
    assert {e["group"] for e in unfrozen} == {"encoder.block1", "encoder.block2"}
    assert all(e["epoch"] == 2 for e in unfrozen)
    done = next(e for e in events if e["event"] == "run.finished")
    assert "test_accuracy" in done

    (ws / "expect.toml").write_text('[[expect]]\ngroup = "encoder.block1"\ntrainable_from_epoch = 2\n'
                                    'frozen_before = 2\nmoves_after = 2\n')
    ver = cli(["verify", str(run_dir / "events.jsonl"), "--expect", "expect.toml"], ws, env)
    assert ver.returncode == 0, ver.stdout + ver.stderr

    abl = cli(["ablate", "--config", "exp.toml", "--strategies", "frozen,two_phase", "--seeds", "2", "--jobs", "2",
               "--no-figures", "--out", "grid"], ws, env)
    assert abl.returncode == 0, abl.stderr
    results = json.loads((ws / "grid" / "results.json").read_text())
    assert results["runs_finished"] == 6
    assert {a["label"] for a in results["arms"]} == {"control", "frozen", "two_phase"}


@pytest.mark.slow
def test_third_party_package_pip_installed_runs_plan_train_verify_ablate(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(PKG)], check=True, capture_output=True)
    ws = tmp_path / "ws"
    ws.mkdir()
    write_experiment(ws)
    env = {**os.environ, "PYTHONPATH": str(target)}
    drive_cli(ws, env)


@pytest.mark.slow
def test_import_paths_without_any_package(tmp_path: Path) -> None:
    """The same components named by import path, from a module beside the experiment file: no plugin at all."""
    ws = tmp_path / "ws"
    ws.mkdir()
    src = (PKG / "my_freeze_plugins" / "components.py").read_text()
    (ws / "mylab.py").write_text(src)  # a plain module, never installed
    write_experiment(ws, model="mylab:TinyFCN", task="mylab:SmoothedClassification", kind="mylab:load_waves")
    cfg = (ws / "exp.toml").read_text().replace("options = { n = 96, length = 24 }", "")
    (ws / "exp.toml").write_text(cfg.replace("params = { smoothing = 0.1 }", ""))
    # an import-path task gets its params as given; this one needs its params object
    (ws / "mylab.py").write_text(src + "\n\ndef smoothed(params):\n    return SmoothedClassification("
                                 "SmoothingParams(smoothing=0.1))\n\n\ndef waves(req):\n"
                                 "    import attrs\n    return load_waves(attrs.evolve(req, options=WaveOptions("
                                 "n=96, length=24)))\n")
    text = (ws / "exp.toml").read_text().replace("mylab:SmoothedClassification", "mylab:smoothed")
    (ws / "exp.toml").write_text(text.replace("mylab:load_waves", "mylab:waves"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    drive_cli(ws, env)


def test_third_party_components_are_listed_and_selected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_on_path(PKG, site)
    monkeypatch.syspath_prepend(str(site))
    from moola_engine.core.components import registries
    from moola_engine.core.plugins import build_plugin_manager

    pm, _ = build_plugin_manager()
    regs = registries(pm)
    assert regs["model"]["tiny-fcn"].source == "my-freeze-plugins 0.1.0"
    assert "waves" in regs["dataset"] and "smoothed-classification" in regs["task"]


def test_training_other_data_loads_no_module_of_the_ohlc_package(tmp_path: Path) -> None:
    """Only the OHLC package's entry point (and its light option classes) are imported: no series, model or
    pretraining code."""
    write_npz(tmp_path / "d.npz")
    (tmp_path / "exp.toml").write_text(
        f'[run]\nstrategies_file = "{ROOT / "strategies.toml"}"\nconsole = "none"\n[train]\nepochs = 2\nthreads = 1\n'
        '[model]\nname = "tests.conftest:TinyNet"\n[[model.groups]]\nname = "encoder"\nmodules = ["enc0", "enc1"]\n'
        '[[model.groups]]\nname = "head"\nmodules = ["head"]\nhead = true\n[data]\nkind = "npz"\npath = "d.npz"\n')
    code = ("import sys\nfrom moola_engine.cli import main\n"
            f"rc = main(['train', '--config', {str(tmp_path / 'exp.toml')!r}, '--strategy', 'immediate'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'moola_ohlc'))\nsys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert loaded == ["moola_ohlc", "moola_ohlc.options", "moola_ohlc.plugin"]


def write_npz(path: Path, n: int = 64, *, y: np.ndarray | None = None, **extra: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 5, 3)).astype(np.float32)
    np.savez(path, x=x, y=(x[:, :, 0].mean(axis=1) > 0).astype(np.int64) if y is None else y, **extra)


def test_unknown_model_lists_installed_and_says_how_to_add_one(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "exp.toml").write_text('[model]\nname = "fcn"\n')
    assert main(["plan", "--config", str(tmp_path / "exp.toml"), "--strategy", "immediate",
                 "--strategies", str(ROOT / "strategies.toml")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'fcn' @ $.model.name; installed: simple_lstm" in err
    assert '"package.module:callable"' in err and "register_models(register)" in err


def test_bad_import_path_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_mod' .* @ \$\.task\.name"):
        build_task(TaskConfig(name="no_such_mod:Task"), source="exp.toml", base_dir=tmp_path)


def run_task(tmp_path: Path, task: str, y: np.ndarray, model_params: str) -> dict[str, float]:
    write_npz(tmp_path / "d.npz", n=len(y), y=y)
    (tmp_path / "exp.toml").write_text(
        f'[run]\nconsole = "none"\n[train]\nepochs = 3\nthreads = 1\nlr = 1e-2\n[task]\nname = "{task}"\n'
        f'[model]\nname = "tests.conftest:TinyNet"\nparams = {model_params}\n'
        '[[model.groups]]\nname = "encoder"\nmodules = ["enc0", "enc1"]\n'
        '[[model.groups]]\nname = "head"\nmodules = ["head"]\nhead = true\n[data]\nkind = "npz"\npath = "d.npz"\n')
    out = train(load_config(tmp_path / "exp.toml"), strategy="immediate", strategies_file=str(ROOT / "strategies.toml"))
    return out.fit.history[-1]


def test_regression_task_trains_on_float_targets(tmp_path: Path) -> None:
    y = np.linspace(-1, 1, 64).astype(np.float32)
    last = run_task(tmp_path, "regression", y, "{ classes = 1 }")
    assert {"val_loss", "val_rmse", "val_mae", "val_r2"} <= set(last)
    assert abs(last["val_rmse"] - last["val_loss"] ** 0.5) < 1e-6


def test_multi_label_task_trains_on_0_1_columns(tmp_path: Path) -> None:
    y = (np.random.default_rng(1).random((64, 3)) > 0.5).astype(np.int64)
    last = run_task(tmp_path, "multi-label", y, "{ classes = 3 }")
    assert {"val_loss", "val_micro_f1", "val_subset_accuracy", "val_label_accuracy"} <= set(last)


def test_classification_refuses_real_valued_labels(tmp_path: Path) -> None:
    write_npz(tmp_path / "d.npz", y=np.linspace(0, 1, 64))
    with pytest.raises(DataError, match="expects integer class labels, got non-integer values"):
        build_splits(DataConfig(kind="npz", path="d.npz"), base_dir=tmp_path, seed=0)


def write_ucr(path: Path, labels: list[int], length: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = ["\t".join([str(lab), *(f"{v:.4f}" for v in rng.standard_normal(length) + lab)]) for lab in labels]
    data = ("\n".join(rows) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_table_reads_gzip_ucr_with_a_test_file(tmp_path: Path) -> None:
    write_ucr(tmp_path / "ECG_TRAIN.tsv.gz", [-1, 1] * 20)
    write_ucr(tmp_path / "ECG_TEST.tsv.gz", [1, -1] * 8, seed=1)
    sp = build_splits(DataConfig(kind="table", path="ECG_TRAIN.tsv.gz", test_path="ECG_TEST.tsv.gz"),
                      base_dir=tmp_path, seed=0)
    assert sp.test is not None and len(sp.test) == 16
    assert len(sp.train) + len(sp.val) == 40
    assert sp.meta["classes"] == ["-1", "1"]  # -1 -> class 0, 1 -> class 1, in both files
    assert sp.test.y.tolist()[:2] == [1, 0]
    assert sp.train.x.shape[1:] == (10, 1)


def test_table_test_label_unseen_in_training_is_refused(tmp_path: Path) -> None:
    write_ucr(tmp_path / "tr.csv", [0, 1] * 10)
    write_ucr(tmp_path / "te.csv", [2, 1])
    with pytest.raises(DataError, match=r"te.csv: label '2' does not occur in the training file"):
        build_splits(DataConfig(kind="table", path="tr.csv", test_path="te.csv"), base_dir=tmp_path, seed=0)


def test_table_options_are_checked(tmp_path: Path) -> None:
    write_ucr(tmp_path / "tr.csv", [0, 1] * 10)
    with pytest.raises(ConfigError, match=r"extra fields found \(sep\) @ \$\.data\.options"):
        build_splits(DataConfig(kind="table", path="tr.csv", options={"sep": ","}), base_dir=tmp_path, seed=0)


def test_label_budget_is_stratified_and_drawn_per_seed(tmp_path: Path) -> None:
    y = np.array([0] * 30 + [1] * 10)
    a, b = label_budget(y, 8, seed=0), label_budget(y, 8, seed=1)
    assert len(a) == 8 and np.bincount(y[a]).tolist() == [6, 2]
    assert not np.array_equal(a, b)
    write_npz(tmp_path / "d.npz", n=80)
    sp = build_splits(DataConfig(kind="npz", path="d.npz", labels=10), base_dir=tmp_path, seed=3)
    assert len(sp.train) == 10 and sp.meta["label_budget"] == 10
    assert len(sp.val) == 16  # validation stays whole


def test_label_budget_below_the_class_count_is_refused() -> None:
    with pytest.raises(DataError, match="data.labels = 1 is fewer than the 2 classes"):
        label_budget(np.array([0, 1, 0, 1]), 1, seed=0)


def test_model_that_is_not_a_module_is_refused(tmp_path: Path) -> None:
    (tmp_path / "exp.toml").write_text('[model]\nname = "builtins:dict"\n')
    with pytest.raises(ConfigError, match="built a dict, not a torch nn.Module @ \\$.model.name"):
        from moola_engine.core.models import build_model

        build_model(load_config(tmp_path / "exp.toml").model, "exp.toml")


def test_tasks_metrics_read_the_device_once() -> None:
    from moola_engine.core.tasks import MultiLabel, Regression

    out = torch.tensor([[2.0, -1.0], [-3.0, 0.5]])
    m = MultiLabel().metrics(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert m["subset_accuracy"] == 0.5 and m["label_accuracy"] == 0.75
    assert m["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    r = Regression().metrics(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0]))
    assert r["loss"] == 2.0 and r["mae"] == 1.0 and np.isnan(r["r2"])


@pytest.mark.slow
def test_third_party_objective_pretrain_export_and_budget_ablation_through_the_cli(tmp_path: Path) -> None:
    """The package's own pretraining objective, then export, then ablate --jobs 2 --labels: the CLI alone."""
    from safetensors.torch import load_file

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(PKG)], check=True, capture_output=True)
    ws = tmp_path / "ws"
    ws.mkdir()
    cfg = write_experiment(ws)
    cfg.write_text(cfg.read_text() + '\n[model.pretrained]\npath = "artifacts/encoder.safetensors"\n\n'
                                     '[pretrain]\nobjective = "waves-denoise"\nparams = { epochs = 2 }\n')
    env = {**os.environ, "PYTHONPATH": str(target)}
    pre = cli(["pretrain", "--config", "exp.toml", "--console", "none"], ws, env)
    assert pre.returncode == 0, pre.stderr
    enc = ws / "artifacts" / "encoder.safetensors"
    assert not any(k.startswith("head.") for k in load_file(enc))
    seen = json.loads(enc.with_suffix(".json").read_text())["data_seen"]
    assert seen["kind"] == "waves" and seen["rows"]["train"] == 54

    tr = cli(["train", "--config", "exp.toml", "--strategy", "gradual"], ws, env)
    assert tr.returncode == 0, tr.stderr
    events = [json.loads(x) for x in (run_folder(tr.stdout) / "events.jsonl").read_text().splitlines()]
    loaded = next(e for e in events if e["event"] == "weights.loaded")
    assert loaded["keys"] and all(k.startswith(("block1.", "block2.")) for k in loaded["keys"])
    ex = cli(["export", "latest", "--module", "encoder", "--out", "exported/encoder.safetensors"], ws, env)
    assert ex.returncode == 0, ex.stderr
    keys = sorted(load_file(ws / "exported" / "encoder.safetensors"))
    assert keys and all(k.startswith(("block1.", "block2.")) for k in keys)

    abl = cli(["ablate", "--config", "exp.toml", "--strategies", "frozen,gradual", "--seeds", "2", "--jobs", "2",
               "--labels", "12,24", "--no-figures", "--out", "grid"], ws, env)
    assert abl.returncode == 0, abl.stderr
    results = json.loads((ws / "grid" / "results.json").read_text())
    assert results["runs_finished"] == 12 and results["labels"] == [12, 24]
    assert set(results["budget_curve"]["arms"]) == {"control", "frozen", "gradual"}
    assert all(p["vs_control"]["n"] == 2 for p in results["budget_curve"]["arms"]["gradual"])


# --------------------------------------------------------------------------- the DataLoader path


class DictWaves(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A map-style Dataset whose items are ({"series": (T, C), "scale": ()}, label): a two-input model."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, 3, generator=g)
        self.scale = torch.rand(n, generator=g) + 0.5
        self.y = (self.x[:, :, 0].mean(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"series": self.x[i], "scale": self.scale[i]}, self.y[i]


class Streamed(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """The same rows as an IterableDataset (no __len__), inputs as a tuple."""

    def __init__(self, base: DictWaves) -> None:
        self.base = base

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(len(self.base)):
            inputs, y = self.base[i]
            yield (inputs["series"], inputs["scale"]), y


class TwoInputNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc0 = torch.nn.Linear(3, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, series: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.enc0(series.mean(dim=1) * scale[:, None])))


def dict_waves(req):  # type: ignore[no-untyped-def]
    from moola_engine.core.data import LoaderData, LoaderOptions, Splits

    opts = LoaderOptions(num_workers=int(req.options.get("workers", 0)), pin_memory=False)
    train_set = DictWaves(48, seed=req.seed)
    if req.options.get("iterable"):
        return Splits(train=LoaderData(dataset=Streamed(train_set), options=opts),
                      val=LoaderData(dataset=Streamed(DictWaves(16, seed=99)), options=opts))
    return Splits(train=LoaderData(dataset=train_set, options=opts),
                  val=LoaderData(dataset=DictWaves(16, seed=99), options=opts))


def loader_config(tmp_path: Path, **options: object) -> Path:
    opts = ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
    (tmp_path / "exp.toml").write_text(
        f'[run]\nconsole = "none"\n[train]\nepochs = 2\nthreads = 1\nbatch_size = 8\n'
        f'[model]\nname = "tests.test_components:TwoInputNet"\n'
        '[[model.groups]]\nname = "encoder"\nmodules = ["enc0"]\n[[model.groups]]\nname = "head"\nmodules = ["head"]\n'
        f'head = true\n[data]\nkind = "tests.test_components:dict_waves"\noptions = {{ {opts} }}\n')
    return tmp_path / "exp.toml"


@pytest.mark.parametrize("options", [{}, {"iterable": True}, {"workers": 2}], ids=["map-dict", "iterable-tuple",
                                                                                  "two-workers"])
def test_a_dataset_trains_through_a_dataloader_with_dict_or_tuple_inputs(tmp_path: Path, options: dict) -> None:
    from moola_engine.logs import read_events

    out = train(load_config(loader_config(tmp_path, **options)), strategy="two_phase",
                strategies_file=str(tmp_path / "s.toml") if (tmp_path / "s.toml").write_text(
                    '[strategy.two_phase]\nplugin = "two-phase"\nunfreeze_after = 1\n') else None)
    last = out.fit.history[-1]
    assert np.isfinite(last["train_loss"]) and 0.0 <= last["val_accuracy"] <= 1.0
    events = read_events(out.run_dir / "events.jsonl")
    assert [e["epoch"] for e in events if e["event"] == "freeze.transition" and e["to_state"] == "trainable"
            and e["group"] == "encoder"] == [1]
    checks = [e for e in events if e["event"] == "weight_delta.check" and e["group"] == "encoder"]
    assert checks and all(e["ok"] for e in checks)  # frozen in epoch 0, moved in epoch 1, through the loader path


def test_the_dataloader_path_equals_the_tensor_path_on_the_same_rows(tmp_path: Path) -> None:
    """Same rows, same order (no shuffle is compared: the two paths draw batches differently), same predictions."""
    from moola_engine.core.batches import eval_batches
    from moola_engine.core.data import LoaderData, TensorData

    base = DictWaves(20, seed=1)
    tensors = TensorData(x=base.x, y=base.y)
    loader = LoaderData(dataset=torch.utils.data.TensorDataset(base.x, base.y))
    a = [(x, y) for x, y in eval_batches(tensors, 8, torch.device("cpu"))]
    b = [(x, y) for x, y in eval_batches(loader, 8, torch.device("cpu"))]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_a_per_step_scheduler_needs_a_dataset_length(tmp_path: Path) -> None:
    cfg = loader_config(tmp_path, iterable=True)
    cfg.write_text(cfg.read_text().replace("batch_size = 8\n", 'batch_size = 8\nscheduler = "onecycle"\n'))
    with pytest.raises(ConfigError, match="needs the steps per epoch; this dataset has no length"):
        train(load_config(cfg), strategy="immediate", strategies_file=str(ROOT / "strategies.toml"))


def test_built_in_tasks_declare_their_attributes_and_a_subclass_keeps_or_overrides_them() -> None:
    from moola_engine.core.tasks import Classification, MultiLabel, Regression, Task

    got = [(t.name, t.primary, t.higher_is_better, t.classes) for t in (Classification, MultiLabel, Regression)]
    assert got == [("classification", "accuracy", True, True), ("multi-label", "micro_f1", True, False),
                   ("regression", "rmse", False, False)]

    class Smoothed(Classification):
        pass

    class Lenient(Regression, primary="mae"):
        pass

    assert (Smoothed.name, Smoothed.primary) == ("classification", "accuracy")
    assert (Lenient.name, Lenient.primary, Regression.primary) == ("regression", "mae", "rmse")
    assert isinstance(Lenient(), Task) and Lenient().params is None
