"""Every gallery example (docs/gallery.md, examples/gallery/) runs as documented, at reduced size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GALLERY = ROOT / "examples" / "gallery"


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "moola_engine.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out


def events(stdout: str) -> list[dict]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("run folder: "))
    run_dir = Path(line.removeprefix("run folder: ").split()[0])
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("gallery") / "gallery"
    shutil.copytree(GALLERY, ws, ignore=shutil.ignore_patterns("data", "artifacts", "runs", "__pycache__"))
    subprocess.run([sys.executable, "make_data.py", "--scale", "0.25"], cwd=ws, check=True, capture_output=True)
    return ws


@pytest.mark.slow
def test_fcn_pretrained_on_one_dataset_fine_tuned_on_another_with_a_budget_curve(gallery: Path) -> None:
    cli(["pretrain", "--config", "ucr_source.toml", "--out", "artifacts/fcn_source.safetensors", "--epochs", "2",
         "--console", "none"], gallery)
    side = json.loads((gallery / "artifacts" / "fcn_source.json").read_text())
    assert side["data_seen"]["files"][0]["path"].endswith("SynthSource_TRAIN.tsv.gz")
    cli(["ablate", "--config", "ucr_target.toml", "--strategies", "probe,ulmfit", "--labels", "10,20", "--seeds", "2",
         "--epochs", "4", "--jobs", "1", "--out", "grid"], gallery)
    res = json.loads((gallery / "grid" / "results.json").read_text())
    assert res["labels"] == [10, 20] and set(res["budget_curve"]["arms"]) == {"control", "probe", "ulmfit"}
    assert (gallery / "grid" / "report.html").read_text().count("alt='budget_curve'") == 1
    probe = next(a for a in res["arms"] if a["label"] == "probe")
    assert probe["definition"]["train"] == {"lr": 3e-3, "epochs": 20}


@pytest.mark.slow
def test_transformer_with_one_group_per_layer_gradual_unfreezing_and_discriminative_lr(gallery: Path) -> None:
    cli(["pretrain", "--config", "transformer_source.toml", "--out", "artifacts/transformer_source.safetensors",
         "--epochs", "1", "--console", "none"], gallery)
    out = cli(["train", "--config", "transformer_target.toml", "--strategy", "ulmfit", "--epochs", "5"], gallery)
    ev = events(out.stdout)
    groups = next(e for e in ev if e["event"] == "groups.resolved")["groups"]
    assert [g["name"] for g in groups] == ["encoder.embed", "encoder.layer0", "encoder.layer1", "encoder.layer2",
                                           "head"]
    thawed = {e["group"]: e for e in ev if e["event"] == "freeze.transition" and e["to_state"] == "trainable"
              and e["group"].startswith("encoder.")}
    assert [thawed[g]["epoch"] for g in ("encoder.layer2", "encoder.layer1", "encoder.layer0", "encoder.embed")] == \
        [1, 2, 3, 4]  # top first, one group per epoch
    assert thawed["encoder.layer1"]["lr"] == pytest.approx(thawed["encoder.layer2"]["lr"] * 0.38)
    assert next(e for e in ev if e["event"] == "weights.loaded")["keys"]


@pytest.mark.slow
def test_regression_example_reports_rmse(gallery: Path) -> None:
    out = cli(["train", "--config", "regression.toml", "--strategy", "immediate", "--epochs", "3"], gallery)
    done = next(e for e in events(out.stdout) if e["event"] == "run.finished")
    assert {"test_rmse", "test_mae", "test_r2"} <= set(done)
