"""Property tests: malformed and adversarial TOML and values end in a clear ConfigError (or a valid run).

Never another exception: no KeyError, no TypeError, no torch RuntimeError, no traceback for a user.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import typing
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moola_engine.config import ExperimentConfig, load_config
from moola_engine.core.plan import compute_plan, validate_plan
from moola_engine.core.plugins import build_plugin_manager, load_strategies
from moola_engine.errors import ConfigError, MoolaError
from moola_engine.runs.train import train

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_, REGISTRY = build_plugin_manager()

# --------------------------------------------------------------------------- a tiny TOML writer (inline tables only)

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_str(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_key(k: str) -> str:
    return k if _BARE.match(k) else toml_str(k)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(doc: dict[str, Any]) -> str:
    return "\n".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n"


# --------------------------------------------------------------------------- adversarial values

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, 5e-324, math.inf, -math.inf, math.nan]),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", " ", "auto", "cpu", "cuda", "min", "max", "npz", "adamw", "exact", "../..", "\u202e"]),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 1, 1)),
    st.dates(),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def fields(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls) if f.metadata.get("toml", True)]


def section(cls: type, junk: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """A table for ``cls``: some of its real keys with plausible or adversarial values, maybe a junk key."""
    names = fields(cls)
    plausible = st.integers(0, 12) | st.floats(0.01, 2.0) | st.sampled_from(["val_loss", "min", "cpu", "npz"])
    if not junk:
        return st.dictionaries(st.sampled_from(names), plausible, max_size=3) if names else st.just({})
    keys = (st.sampled_from(names) | st.text(min_size=1, max_size=8)) if names else st.text(min_size=1, max_size=8)
    return st.dictionaries(keys, plausible | values, max_size=4)


def nested_types(cls: type) -> dict[str, type]:
    """The attrs-class sections of ``cls`` (each real section is fuzzed, new ones included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in attrs.fields(cls) if attrs.has(hints[f.name])}


@st.composite
def experiment_docs(draw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name, cls in nested_types(ExperimentConfig).items():
        choice = draw(st.integers(0, 4))
        if choice == 0:
            continue
        doc[name] = draw(section(cls, junk=choice < 3)) if choice < 4 else draw(values)
    if draw(st.booleans()):
        doc[draw(st.text(min_size=1, max_size=6))] = draw(values)
    return doc


def mutate(text: str) -> st.SearchStrategy[str]:
    """Valid TOML with bytes cut, doubled or replaced."""
    return st.tuples(st.integers(0, len(text)), st.integers(0, 8), st.text(max_size=4)).map(
        lambda t: text[: t[0]] + t[2] + text[t[0] + t[1]:])


# --------------------------------------------------------------------------- experiment config


def _expect_config_error_or_config(path: Path) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        assert exc.problems and all(p.strip() for p in exc.problems)
        return
    assert isinstance(cfg, ExperimentConfig)


@SETTINGS
@given(doc=experiment_docs())
def test_adversarial_experiment_values_end_in_config_error(tmp_path: Path, doc: dict[str, Any]) -> None:
    assert set(nested_types(ExperimentConfig)) >= {"run", "train", "model", "data", "checks", "checkpoint"}
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    _expect_config_error_or_config(path)


VALID_EXPERIMENT = """[run]
strategy = "two_phase"
[train]
epochs = 3
lr = 0.001
early_stopping = { metric = "val_loss", patience = 2 }
[model]
name = "simple_lstm"
[[model.groups]]
name = "head"
modules = ["head"]
[data]
path = "x.npz"
[checkpoint]
keep = 2
"""


@SETTINGS
@given(text=st.one_of(mutate(VALID_EXPERIMENT), st.text(max_size=60), st.binary(max_size=40).map(repr)))
def test_malformed_experiment_toml_ends_in_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _expect_config_error_or_config(path)


def test_undecodable_and_missing_files_end_in_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_bytes(b"[train]\nepochs = \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bad.toml: cannot read: 'utf-8' codec"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match=r"nope.toml: no such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"tmp.*: cannot read"):
        load_config(tmp_path)  # a folder


# --------------------------------------------------------------------------- strategies.toml


@st.composite
def strategy_docs(draw: Any) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 3))):
        plugin = draw(st.sampled_from(REGISTRY.names()) | st.sampled_from(REGISTRY.names()) | scalars)
        params_cls = REGISTRY[plugin].params if isinstance(plugin, str) and plugin in REGISTRY else None
        table: dict[str, Any] = {} if draw(st.integers(0, 5)) == 0 else {"plugin": plugin}
        if params_cls is not None:
            table.update(draw(section(params_cls, junk=draw(st.booleans()))))
        if draw(st.integers(0, 4)) == 0:
            table["description"] = draw(values)
        tables[draw(st.text(min_size=1, max_size=8))] = table if draw(st.integers(0, 8)) else draw(values)
    doc: dict[str, Any] = {"strategy": tables if draw(st.integers(0, 8)) else draw(values)}
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.text(min_size=1, max_size=6))] = draw(values)
    return doc


def _expect_strategies(path: Path, epochs: int) -> None:
    try:
        named = load_strategies(path, REGISTRY)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and exc.problems
        return
    groups = ["encoder.layer0", "encoder.layer1", "head"]
    for n in named.values():  # a valid table must also plan cleanly, or refuse with a MoolaError
        strat = n.build()
        try:
            plan = compute_plan(strat, groups, ["head"], epochs, 1e-3, name=n.name)
            validate_plan(plan, strat, n.name)
        except MoolaError:
            pass


@SETTINGS
@given(doc=strategy_docs(), epochs=st.integers(1, 6))
def test_adversarial_strategies_toml_ends_in_config_error_or_a_valid_plan(tmp_path: Path, doc: dict[str, Any],
                                                                         epochs: int) -> None:
    path = tmp_path / "strategies.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    _expect_strategies(path, epochs)


@SETTINGS
@given(text=mutate((ROOT / "strategies.toml").read_text(encoding="utf-8")), epochs=st.integers(1, 6))
def test_mutated_strategies_toml_ends_in_config_error_or_a_valid_plan(tmp_path: Path, text: str, epochs: int) -> None:
    path = tmp_path / "strategies.toml"
    path.write_text(text, encoding="utf-8")
    _expect_strategies(path, epochs)


# --------------------------------------------------------------------------- a valid config must also run (or refuse)

def pick(good: list[Any], bad: list[Any] = ()) -> st.SearchStrategy[Any]:  # type: ignore[assignment]
    """Mostly good values, sometimes a bad one: most examples get past the config and into the run."""
    return st.one_of(*[st.sampled_from(good)] * 4, *([st.sampled_from(list(bad))] if bad else []))


run_docs = st.fixed_dictionaries({}, optional={
    "run": st.fixed_dictionaries({"console": st.just("none")}, optional={
        "strategy": pick(["immediate", "frozen", "two_phase"], ["nope", ""]),
        "allow": st.lists(pick(["never-unfreeze"], ["bogus"]), max_size=2)}),
    "train": st.fixed_dictionaries({}, optional={
        "epochs": pick([1, 2], [0, -1]), "batch_size": pick([1, 7, 64, 10**6], [0]),
        "lr": pick([1e-3, 1.0, 1e10], [0.0, -1.0, math.nan, math.inf]),
        "optimizer": pick(["adamw", "adam", "sgd"], ["rmsprop"]), "weight_decay": pick([0.0, 0.1], [-1.0]),
        "momentum": pick([0.0, 0.9], [-0.5]), "grad_clip": pick([1.0, 1e-30], [0.0, -1.0, math.inf]),
        "seed": pick([0, 7, 2**32, 2**63 - 1], [-1, -(2**63)]),
        "device": pick(["cpu", "auto"], ["cuda", "cuda:7", "tpu", "", "meta", "cpu:0"]),
        "precision": pick(["fp32", "bf16"], ["fp8"]), "threads": pick([1], [0, -2]),
        "early_stopping": st.fixed_dictionaries({}, optional={
            "metric": pick(["val_loss", "val_accuracy", "train_loss"], ["bogus"]), "mode": pick(["min", "max"], ["up"]),
            "patience": pick([1, 3], [0, -1]), "min_delta": pick([0.0, 1e9], [-1.0, math.nan])}),
        "restore_best": st.booleans(), "train_bn": st.booleans(), "frozen_dropout": st.booleans()}),
    "model": st.fixed_dictionaries({}, optional={
        "name": pick(["simple_lstm"], ["nope"]),
        "params": st.fixed_dictionaries({"hidden_size": st.just(4), "head_hidden": st.just(4)}, optional={
            "num_layers": pick([1, 2], [0, -1]), "dropout": pick([0.0, 0.5], [2.0, -1.0]), "bogus": st.just(1)}),
        "groups": pick([[], [{"name": "h", "modules": ["head"]}, {"name": "e", "modules": ["lstm"]}]],
                       [[{"name": "all", "modules": ["lstm", "head"]}],
                        [{"name": "a", "modules": ["lstm"]}, {"name": "a", "modules": ["head"]}],
                        [{"name": "a", "modules": ["nomatch"]}, {"name": "h", "modules": ["head"], "head": True}],
                        [{"name": "h", "modules": ["head"]}]])}),
    "data": st.fixed_dictionaries({}, optional={
        "kind": pick(["npz"], ["table", "parquet"]), "path": pick(["tiny.npz"], ["missing.npz", "", ".", "tiny.csv"]),
        "val_fraction": pick([0.2, 0.5, 0.9], [0.0, 1.0, math.nan]), "folds": pick([1, 3], [0]),
        "fold": pick([0, 2], [5, -1])}),
    "checkpoint": st.fixed_dictionaries({}, optional={
        "keep": pick([1, 2], [0]), "every": pick([1, 10**9], [0, -1]), "enabled": st.booleans()}),
})


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=run_docs)
def test_a_structurally_valid_config_runs_or_refuses_clearly(tmp_path_factory: Any, doc: dict[str, Any]) -> None:
    ws = tmp_path_factory.mktemp("fuzzrun")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6, 4)).astype("float32")
    np.savez(ws / "tiny.npz", x=x, y=(x[:, :, 0].mean(1) > 0).astype("int64"))
    (ws / "tiny.csv").write_text("\n".join(f"{i % 2}," + ",".join(f"{v:.3f}" for v in row[:, 0])
                                           for i, row in enumerate(x)) + "\n")
    doc.setdefault("run", {"console": "none"})["runs_dir"] = str(ws / "runs")
    doc.setdefault("train", {}).setdefault("epochs", 1)
    doc["train"]["compile"] = False
    doc.setdefault("data", {}).setdefault("path", "tiny.npz")
    (ws / "exp.toml").write_text(to_toml(doc), encoding="utf-8")
    try:
        cfg = load_config(ws / "exp.toml")
        out = train(cfg, strategy=None if "strategy" in doc["run"] else "immediate",
                    strategies_file=str(ROOT / "strategies.toml"))
    except MoolaError as exc:
        assert str(exc).strip()
        return
    assert (out.run_dir / "result.json").is_file()
