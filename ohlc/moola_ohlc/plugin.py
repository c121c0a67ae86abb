"""The OHLC package's plugin: registered through the ``moola_engine`` entry-point group exactly like a third party.

* model ``simple_lstm`` (the seed's downstream classifier);
* data kind ``ohlc`` (daily bars -> windows, the range-expansion label, leakage-free splits);
* pretraining objective ``ohlc-multitask`` (the four-head multi-task BiLSTM on unlabeled windows);
* baseline ``logistic-range`` (logistic regression on three hand-made range features);
* preset ``seed`` (the seed's ablation; ``moola-engine demo`` runs it).

The core imports nothing of this package: it reaches these only through the registries.  This module is
the entry point, so it stays light: the series, the models and the pretraining are imported only when a run
asks for them (a run on other data loads no other module of this package; tests/test_components.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moola_engine import hookimpl
from moola_engine.config import ExperimentConfig
from moola_engine.core.data import DataRequest, Splits
from moola_engine.errors import ConfigError
from moola_ohlc.options import OhlcOptions, PretrainConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
"""The repository's examples/ (the seed preset's config; a source checkout or editable install)."""


def simple_lstm(**params: Any) -> Any:
    """The seed's classifier: bidirectional LSTM -> head (SimpleLSTM); groups encoder.layerN and head."""
    from moola_ohlc.models import SimpleLSTM

    return SimpleLSTM(**params)


def load_ohlc(req: DataRequest) -> Splits:
    """Daily OHLC windows and the range-expansion label; ``data.path`` optional (default: a bundled series)."""
    import numpy as np
    import torch

    from moola_engine.core.data import TensorData
    from moola_ohlc.series import build_dataset, target_series

    opts: OhlcOptions = req.options
    path = req.path(required=False)
    series = target_series(opts, path, None if path is not None else req.base_dir)
    ds = build_dataset(series, opts, val_fraction=req.cfg.val_fraction, folds=req.cfg.folds, fold=req.cfg.fold,
                       seed=req.seed, source=req.source)

    def part(k: str) -> TensorData:
        x = torch.as_tensor(np.ascontiguousarray(ds.x[k]), dtype=torch.float32)
        return TensorData(x=x, y=req.task.targets(ds.y[k], where=f"{series.source} ({k} windows)"))

    return Splits(train=part("train"), val=part("val"), test=part("test"), meta=ds.meta())


def logistic_range(splits: Splits, req: DataRequest) -> dict[str, dict[str, float]] | None:
    """Logistic regression on three range features of the windows (range5, bar_range, vol20)."""
    from moola_ohlc.baselines import logistic_baseline

    if "standardisation" not in splits.meta:
        return None  # not OHLC windows: nothing to read the features from
    return logistic_baseline(splits)


class OhlcMultiTask:
    """Multi-task BiLSTM pretraining on unlabeled OHLC windows (expansion, swing, candle type, masked bars)."""

    def __init__(self, params: Any) -> None:
        self.params = params

    def pretrain(self, cfg: ExperimentConfig, *, out: Path, console: str = "pretty") -> dict[str, Any]:
        from moola_engine.config import unstructure
        from moola_engine.logs import Event, RunLog
        from moola_ohlc.pretrain import build_pretrain_data, pretrain, save_encoder, sidecar
        from moola_ohlc.series import parse_options, pretrain_cut_date, read_ohlc, resolve_series, target_series

        data_cfg, source, base_dir = cfg.data, cfg.source, cfg.base_dir
        if data_cfg.kind != "ohlc":
            raise ConfigError(source, f"objective ohlc-multitask needs data.kind = \"ohlc\", got {data_cfg.kind!r} "
                                      "@ $.data.kind")
        opts = parse_options(data_cfg.options, source)
        pcfg = self.params
        target = target_series(opts, cfg.resolve(data_cfg.path) if data_cfg.path else None, base_dir)
        cut = pretrain_cut_date(target, opts, val_fraction=data_cfg.val_fraction, folds=data_cfg.folds)
        others = [read_ohlc(resolve_series(n, base_dir), name=n) for n in opts.pretrain if n != target.name]
        data = build_pretrain_data([target, *others], opts.spec, cut, stride=pcfg.stride,
                                   holdout_fraction=pcfg.holdout_fraction)
        # the bar first: on a terminal, the log's console lines (sys.stderr) then print above it
        bar = _Progress(pcfg.epochs) if console == "pretty" else None
        runlog = RunLog(out.with_suffix(".events.jsonl"), console=console)
        log = runlog.logger
        try:
            log.info(Event.PRETRAIN_STARTED, objective="ohlc-multitask", cut_date=cut, target=target.name,
                     instruments=[i["name"] for i in data.instruments if "skipped" not in i],
                     skipped={i["name"]: i["skipped"] for i in data.instruments if "skipped" in i},
                     windows=int((~data.holdout).sum()), holdout_windows=int(data.holdout.sum()),
                     epochs=pcfg.epochs, samples_per_epoch=pcfg.samples_per_epoch)
            result = pretrain(data, pcfg, log=log, progress=bar, on_epoch=bar.epoch_done if bar else None)
            meta = sidecar(result, data, pcfg, opts.spec, cut_date=cut, target=target.name,
                           data_options={**unstructure(opts), "val_fraction": data_cfg.val_fraction,
                                         "folds": data_cfg.folds, "config": source})
            meta["data_seen"] = {"kind": "ohlc", "instruments": [i["name"] for i in data.instruments
                                                                 if "skipped" not in i], "until": cut}
            path, meta_path = save_encoder(result, out, meta)
            last = result.history[-1]
            log.info(Event.PRETRAIN_SAVED, path=str(path), sidecar=str(meta_path), seconds=round(result.seconds, 1),
                     **{k: round(v, 4) for k, v in last.items() if k.startswith("holdout_")})
        finally:
            runlog.close()
            if bar is not None:
                bar.bar.close()
        return {"encoder": path, "sidecar": meta_path, "summary": f"data up to {cut}"}


class _Progress:
    """Pretraining progress (:class:`moola_engine.runs.progress.Bar`): a rich bar moving per batch on a terminal,
    one plain line per epoch (with its losses and ETA) otherwise."""

    def __init__(self, epochs: int) -> None:
        from moola_engine.runs.progress import Bar

        self.bar = Bar(epochs, unit="epochs", label="pretrain")
        self.bar.phase = "self-supervised, every layer"

    def __call__(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar.tty:  # per batch: only a terminal redraws
            self.bar.update(done=epoch - 1 + step / max(steps, 1), emit=False)

    def epoch_done(self, epoch: int, epochs: int, row: dict[str, Any]) -> None:
        loss = "  ".join(f"{k[len('batch_'):-len('_loss')]} {v:.4f}" for k, v in row.items()
                         if k.startswith("batch_") and k.endswith("_loss") and isinstance(v, float))
        self.bar.update(done=epoch, loss=loss or None)


@hookimpl
def register_models(register: Any) -> None:
    register("simple_lstm", simple_lstm)


@hookimpl
def register_datasets(register: Any) -> None:
    register("ohlc", load_ohlc, params=OhlcOptions)


@hookimpl
def register_objectives(register: Any) -> None:
    register("ohlc-multitask", OhlcMultiTask, params=PretrainConfig)


@hookimpl
def register_baselines(register: Any) -> None:
    register("logistic-range", logistic_range,
             description="logistic regression (3 range features)")


def seed_preset() -> Any:
    """The seed's ablation: random-encoder control, frozen, immediate, two-phase at 10 epochs, gradual."""
    from moola_engine.experiments.grid import Preset

    return Preset(
        name="seed", config=EXAMPLES / "seed.toml", strategies=["frozen", "immediate", "two_phase", "gradual"],
        control="immediate", seeds=10, demo_seeds=6,
        description="the seed's ablation: random-encoder control, frozen, immediate, two-phase at 10 epochs, gradual",
    )


@hookimpl
def register_presets(register: Any) -> None:
    register("seed", seed_preset)
