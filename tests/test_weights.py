"""Pretrained loading: key mapping, refusals with clear messages, the exact-equality proof, fresh-init detection."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moola_engine import hookimpl
from moola_engine.checks.loading import (
    changed_since_load,
    equals_loaded,
    load_into,
    load_pretrained,
    map_keys,
    read_tensors,
)
from moola_engine.config import PretrainedConfig, RenameRule
from moola_engine.core.freezing import resolve_groups
from moola_engine.errors import CheckFailed, WeightsError
from moola_engine.logs import RunLog
from moola_ohlc.models import SimpleLSTM

H = 8  # small hidden size: the same code path as the seed's 128, in milliseconds


def trained_encoder(layers: int = 2, seed: int = 0) -> nn.LSTM:
    """A 2-layer biLSTM (input 4) after a few real optimizer steps: its weights no longer look freshly initialised."""
    torch.manual_seed(seed)
    lstm = nn.LSTM(4, H, num_layers=layers, batch_first=True, bidirectional=True)
    opt = torch.optim.Adam(lstm.parameters(), lr=0.05)
    x = torch.randn(32, 6, 4)
    for _ in range(30):
        out, _ = lstm(x)
        loss = (out[:, :, :4] - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lstm


def encoder_file(tmp_path: Path, lstm: nn.LSTM, prefix: str = "lstm.", name: str = "enc.safetensors") -> Path:
    """The layout ``moola-engine pretrain`` writes: ``lstm.weight_ih_l0`` ... ``lstm.bias_hh_l1_reverse``."""
    path = tmp_path / name
    save_file({prefix + k: v.detach().contiguous() for k, v in lstm.state_dict().items()}, str(path))
    return path


def model_and_groups() -> tuple[SimpleLSTM, list]:
    torch.manual_seed(1)
    model = SimpleLSTM(hidden_size=H)
    return model, resolve_groups(model, model.default_groups())


def test_layer0_of_two_layer_bilstm_loads_all_8_tensors_exactly(tmp_path: Path) -> None:
    src = trained_encoder()
    path = encoder_file(tmp_path, src)
    model, groups = model_and_groups()
    report, loaded = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0]), groups=groups)

    expected = sorted(f"lstm.{w}_{k}_l0{r}" for w in ("weight", "bias") for k in ("ih", "hh") for r in ("", "_reverse"))
    assert sorted(report.loaded) == expected
    assert len(report.dropped) == 8 and all("_l1" in k for k in report.dropped)
    assert report.exact and report.required == 8 and report.required_groups == ["encoder.layer0"]
    assert not report.all_fresh
    for key in expected:  # the proof, independently: every tensor equals the file's layer 0
        assert torch.equal(model.state_dict()[key], src.state_dict()[key.removeprefix("lstm.")])
        assert torch.equal(loaded[key], src.state_dict()[key.removeprefix("lstm.")])
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("head."))


def test_weights_loaded_event_through_the_real_log(tmp_path: Path) -> None:
    path = encoder_file(tmp_path, trained_encoder())
    model, groups = model_and_groups()
    log = RunLog(None, console="none", capture=True)
    loaded = load_pretrained(model, PretrainedConfig(path=path.name, lstm_layers=[0]), groups=groups,
                             base_dir=tmp_path, log=log.logger)
    assert loaded is not None and len(loaded) == 8
    [event] = log.events
    assert event["event"] == "weights.loaded" and event["level"] == "info"
    assert event["loaded"] == 8 and event["file_tensors"] == 16 and event["exact"] is True
    assert event["mismatched"] == [] and event["unexpected"] == [] and len(event["sha256"]) == 64
    assert all(t["exact"] and t["looks_fresh"] is False for t in event["tensors"])


def test_control_run_loads_nothing_and_says_so(tmp_path: Path) -> None:
    model, groups = model_and_groups()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = RunLog(None, console="none", capture=True)
    out = load_pretrained(model, PretrainedConfig(path="missing.safetensors", enabled=False), groups=groups,
                          base_dir=tmp_path, log=log.logger)
    assert out is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    [event] = log.events
    assert event["event"] == "weights.control" and "random-encoder control" in event["message"]


def test_prefix_mismatch_that_loads_nothing_is_an_error_with_a_hint(tmp_path: Path) -> None:
    # silent failure 5: load_state_dict(strict=False) with "encoder.lstm.*" keys loads nothing and says nothing
    path = encoder_file(tmp_path, trained_encoder(), prefix="encoder.lstm.")
    model, groups = model_and_groups()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0]), groups=groups)
    msg = str(err.value)
    assert str(path) in msg and "loaded nothing" in msg and 'set strip_prefix = "encoder."' in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the hint works
    report, _ = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0], strip_prefix="encoder."),
                          groups=groups)
    assert len(report.loaded) == 8


def test_rename_rules_and_add_prefix(tmp_path: Path) -> None:
    src = trained_encoder()
    path = tmp_path / "enc.safetensors"
    save_file({f"rnn.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, groups = model_and_groups()
    cfg = PretrainedConfig(path=str(path), rename=[RenameRule(pattern=r"^rnn\.", replace="")], add_prefix="lstm.",
                           lstm_layers=[0])
    report, _ = load_into(model, path, cfg, groups=groups)
    assert len(report.loaded) == 8 and report.exact


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    # silent failure 6: a checkpoint whose shapes do not fit
    torch.manual_seed(0)
    wide = nn.LSTM(4, 2 * H, num_layers=1, batch_first=True, bidirectional=True)
    path = encoder_file(tmp_path, wide)
    model, groups = model_and_groups()
    with pytest.raises(WeightsError) as err:
        load_into(model, path, PretrainedConfig(path=str(path)), groups=groups)
    msg = str(err.value)
    assert f"lstm.weight_ih_l0: file ({8 * H}, 4) vs model ({4 * H}, 4)" in msg
    assert f"lstm.weight_hh_l0_reverse: file ({8 * H}, {2 * H}) vs model ({4 * H}, {H})" in msg


def test_layer_1_into_layer_0_does_not_fit(tmp_path: Path) -> None:
    path = encoder_file(tmp_path, trained_encoder())
    model, groups = model_and_groups()
    with pytest.raises(WeightsError, match=rf"lstm.weight_ih_l0: file \({4 * H}, {2 * H}\) vs model \({4 * H}, 4\)"):
        load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[1]), groups=groups)


def test_missing_tensors_of_a_pretrained_group_are_an_error(tmp_path: Path) -> None:
    sd = trained_encoder().state_dict()
    path = tmp_path / "half.safetensors"
    save_file({f"lstm.{k}": v.contiguous() for k, v in sd.items() if "reverse" not in k}, str(path))
    model, groups = model_and_groups()
    with pytest.raises(WeightsError) as err:
        load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0]), groups=groups)
    assert "4 tensor(s) of pretrained group(s) encoder.layer0 are not in the file" in str(err.value)
    assert "lstm.weight_ih_l0_reverse" in str(err.value)
    # an explicit, lower min_loaded accepts the forward direction alone
    report, _ = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0], min_loaded=4), groups=groups)
    assert len(report.loaded) == 4
    with pytest.raises(WeightsError, match=r"fewer than model.pretrained.min_loaded = 5"):
        load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0], min_loaded=5), groups=groups)


def test_a_file_of_freshly_initialised_tensors_is_flagged(tmp_path: Path) -> None:
    torch.manual_seed(7)
    untrained = nn.LSTM(4, H, num_layers=2, batch_first=True, bidirectional=True)
    path = encoder_file(tmp_path, untrained)
    model, groups = model_and_groups()
    with pytest.raises(WeightsError) as err:
        load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0]), groups=groups)
    assert "every loaded tensor looks freshly initialised" in str(err.value) and "allow_fresh_init" in str(err.value)
    report, _ = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0], allow_fresh_init=True),
                          groups=groups)
    assert report.all_fresh and all(t.looks_fresh for t in report.tensors)
    assert all(abs(t.std_ratio - 1) < 0.5 for t in report.tensors)  # type: ignore[operator]


def test_torch_checkpoint_with_nested_state_dict(tmp_path: Path) -> None:
    src = trained_encoder()
    path = tmp_path / "enc.pt"
    torch.save({"model_state_dict": {f"lstm.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    tensors, fmt = read_tensors(path)
    assert fmt == "torch[model_state_dict]" and len(tensors) == 16
    model, groups = model_and_groups()
    report, _ = load_into(model, path, PretrainedConfig(path=str(path), lstm_layers=[0]), groups=groups)
    assert report.exact and len(report.loaded) == 8


class _Payload:
    """A checkpoint object that needs code to unpickle."""

    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_pickle_needing_code_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state": _Payload()}, path)
    with pytest.raises(WeightsError) as err:
        read_tensors(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused") and "weights_only=True" in msg and ".safetensors" in msg
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)


def test_unreadable_and_absent_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such pretrained weights file"):
        read_tensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"bad.safetensors: not a readable .safetensors file"):
        read_tensors(bad)


def test_map_keys_renumbers_kept_layers_and_rejects_collisions() -> None:
    keys = ["weight_ih_l0", "weight_ih_l1_reverse", "bias_hh_l2", "proj.weight"]
    mapping, dropped = map_keys(keys, PretrainedConfig(path="x", lstm_layers=[1, 2], add_prefix="lstm."))
    assert mapping == {"lstm.weight_ih_l0_reverse": "weight_ih_l1_reverse", "lstm.bias_hh_l1": "bias_hh_l2",
                       "lstm.proj.weight": "proj.weight"}
    assert dropped == ["weight_ih_l0"]
    with pytest.raises(WeightsError, match="both map to"):
        map_keys(["a.w", "b.w"], PretrainedConfig(path="x", rename=[RenameRule(pattern=r"^[ab]\.", replace="")]))
    with pytest.raises(WeightsError, match=r"rename\[0\].pattern"):
        map_keys(["a"], PretrainedConfig(path="x", rename=[RenameRule(pattern="(", replace="")]))


# --------------------------------------------------------------------------- the proof re-taken before the first step


class Reinit:
    """A setup step that calls reset_parameters() after loading: the run would train a head on a random encoder."""

    def __init__(self, hook: str = "on_fit_start") -> None:
        self.hook = hook

    def _reset(self, engine: Any) -> None:
        torch.manual_seed(1234)  # the engine seeds 0, which would redraw the very tensors it loaded here
        engine.model.enc0.reset_parameters()

    @hookimpl
    def on_fit_start(self, engine: Any) -> None:
        if self.hook == "on_fit_start":
            self._reset(engine)

    @hookimpl
    def before_step(self, engine: Any, step: int) -> None:
        if self.hook == "before_step" and step == 0:
            self._reset(engine)


def _engine_with_pretrained(*extra: Any) -> tuple[Any, RunLog]:
    from conftest import TINY_GROUPS, TinyNet, tiny_data

    from moola_engine.config import TrainConfig
    from moola_engine.core.engine import Engine
    from moola_engine.core.plugins import build_plugin_manager, register_checked

    torch.manual_seed(0)
    model = TinyNet()
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("enc0.")}
    pm, _ = build_plugin_manager()
    for i, plugin in enumerate(extra):
        register_checked(pm, plugin, name=f"setup-{i}")
    strategy = _immediate()
    register_checked(pm, strategy, name="strategy")
    runlog = RunLog(None, console="none", capture=True)
    engine = Engine(model, train=TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=0, device="cpu"),
                    groups=TINY_GROUPS, pm=pm, strategy=strategy, train_data=tiny_data(),
                    val_data=tiny_data(n=32, seed=100), logger=runlog.logger, pretrained=loaded)
    return engine, runlog


def _immediate() -> Any:
    from conftest import named

    return named("immediate")


def test_the_load_proof_is_retaken_before_the_first_step_and_passes_a_clean_run() -> None:
    engine, runlog = _engine_with_pretrained()
    engine.fit()
    [proof] = [e for e in runlog.events if e["event"] == "weights.reverified"]
    assert proof["ok"] is True and proof["tensors"] == 2 and proof["changed"] == []


@pytest.mark.parametrize("hook", ["on_fit_start", "before_step"])
def test_a_plugin_reinitialising_the_encoder_after_loading_is_caught(hook: str) -> None:
    engine, runlog = _engine_with_pretrained(Reinit(hook))
    with pytest.raises(CheckFailed, match=rf"2 pretrained tensor\(s\) no longer equal the file before the first "
                                          rf"training step: enc0.weight, enc0.bias; changed in .*{hook}.* by "
                                          r"plugin\(s\) setup-0"):
        engine.fit()
    [proof] = [e for e in runlog.events if e["event"] == "weights.reverified"]
    assert proof["ok"] is False and proof["changed"] == ["enc0.weight", "enc0.bias"] and "setup-0" in proof["suspects"]
    assert engine.step == 0  # stopped before any step trained on the random encoder


def test_the_proof_reports_a_tensor_that_differs_from_the_file() -> None:
    """Guards the proof itself: one that always said "exact" would pass every other test of a clean load."""
    model = nn.Linear(3, 2)
    same = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert changed_since_load(model, same) == []
    other = {**same, "weight": same["weight"] + 1e-6}
    assert changed_since_load(model, other) == ["weight"]
    assert not equals_loaded(model.weight, other["weight"])
    assert equals_loaded(model.weight, same["weight"].double())  # a file in float64: compared in the model's dtype
