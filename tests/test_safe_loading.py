"""Safe loading: no file can make moola-engine run code by unpickling it."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

from moola_engine.config import DataConfig
from moola_engine.core.data import build_splits
from moola_engine.errors import DataError, WeightsError
from moola_engine.safeio import load_tensors, load_torch_file


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_a_file_that_would_run_code_is_refused_and_does_not_run(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pt"
    obj = {"encoder.weight": torch.zeros(2), "evil": Payload(marker)}
    if fmt == "torch-zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(WeightsError, match=r"weights.pt: refused: loading it would need arbitrary unpickling, "
                                           r"which can run code \(.*\)\. Only tensors are loaded"):
        load_tensors(path)
    with pytest.raises(WeightsError):
        load_torch_file(path)
    assert not marker.exists()
    # the payload is live: an unsafe loader would have run it (proves the assertion above can fail)
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()


def test_plain_tensors_load_from_both_formats(tmp_path: Path) -> None:
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "ckpt.pth", "w.safetensors"):
        got = load_tensors(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    (tmp_path / "w.pkl").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unknown weights format '.pkl'"):
        load_tensors(tmp_path / "w.pkl")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(WeightsError, match=r"bad.safetensors: not a readable .safetensors file"):
        load_tensors(tmp_path / "bad.safetensors")


def test_npz_with_pickled_object_arrays_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    np.savez(tmp_path / "d.npz", x=np.array([Payload(marker)] * 3, dtype=object), y=np.zeros(3))
    with pytest.raises(DataError, match=r"d.npz: not a readable .npz file \(an array holds Python objects, which "
                                         r"would need unpickling \(refused\)\)"):
        build_splits(DataConfig(kind="npz", path="d.npz"), base_dir=tmp_path, seed=0)
    assert not marker.exists()


UNPICKLERS = ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load", "cloudpickle.load")


def unsafe_calls(source: str, where: str) -> list[str]:
    """torch.load without weights_only=True, unpickler calls, allow_pickle not False."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        at = f"{where}:{node.lineno}"
        if name.endswith("torch.load"):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
        if name in UNPICKLERS:
            problems.append(f"{at}: {name}")
        ap = kw.get("allow_pickle")
        if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
            problems.append(f"{at}: allow_pickle is not False")
    return problems


def test_the_source_scan_finds_unsafe_loads() -> None:
    bad = "import torch, pickle, numpy as np\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n" \
          "np.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\n"
    assert unsafe_calls(bad, "x.py") == ["x.py:2: torch.load without weights_only=True",
                                         "x.py:3: torch.load without weights_only=True", "x.py:4: pickle.loads",
                                         "x.py:5: allow_pickle is not False"]


def test_no_unsafe_loader_anywhere_in_the_sources() -> None:
    """Every torch.load passes weights_only=True; nothing unpickles; nothing enables allow_pickle."""
    files = sorted((ROOT / "moola_engine").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert problems == []


def test_checkpoints_hold_no_pickles(tmp_path: Path) -> None:
    from conftest import named
    from test_checkpoint import build

    build(named("immediate"), tmp_path, epochs=2).fit()
    files = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*") if p.is_file())
    assert files == ["model.safetensors", "model.safetensors", "state.json", "state.json",
                     "state.safetensors", "state.safetensors"]
