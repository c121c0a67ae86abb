"""``moola-engine pretrain [--config FILE]``: the multi-task BiLSTM encoder on the bundled (or configured) series.

The ``[data]`` table of the experiment config (kind ``ohlc``) decides the target, the window, the splits and
the folds, hence the calendar date every pretraining instrument is cut at; without ``--config`` the built-in
defaults are used (the same ones ``examples/seed.toml`` relies on).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DataConfig, load_config, unstructure
from ..errors import ConfigError
from ..logs import Event, RunLog
from ..ohlc import parse_options, pretrain_cut_date, read_ohlc, resolve_series, target_series
from ..pretrain import PretrainConfig, build_pretrain_data, pretrain, save_encoder, sidecar
from ..progress import Bar


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help="pretrain the multi-task BiLSTM encoder (writes .safetensors + .json)")
    p.add_argument("--config", help="experiment TOML whose [data] (kind = \"ohlc\") fixes target, splits and cut date")
    p.add_argument("--out", default="artifacts/encoder.safetensors", help="output file (default: %(default)s)")
    d = PretrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    p.add_argument("--samples-per-epoch", type=int, default=d.samples_per_epoch,
                   help="windows drawn per epoch, 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="default: %(default)s")
    p.add_argument("--stride", type=int, default=d.stride, help="stride between window ends (default: %(default)s)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--console", choices=["pretty", "json", "none"], default="pretty")
    return p


def run(args: argparse.Namespace) -> int:
    if args.config:
        cfg = load_config(args.config)
        data_cfg, source, base_dir = cfg.data, cfg.source, Path(cfg.source).parent
    else:
        data_cfg, source, base_dir = DataConfig(kind="ohlc"), "<defaults>", Path.cwd()
    if data_cfg.kind != "ohlc":
        raise ConfigError(source, f"pretraining needs data.kind = \"ohlc\", got {data_cfg.kind!r} @ $.data.kind")
    opts = parse_options(data_cfg.options, source)
    try:
        pcfg = PretrainConfig(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch or None,
                              batch_size=args.batch_size, lr=args.lr, stride=args.stride, hidden_size=args.hidden_size,
                              seed=args.seed, device=args.device, threads=args.threads)
    except ValueError as exc:
        raise ConfigError("pretrain", f"invalid option: {exc}") from exc
    target_path = None
    if data_cfg.path is not None:
        target_path = Path(data_cfg.path) if Path(data_cfg.path).is_absolute() else base_dir / data_cfg.path
    target = target_series(opts, target_path, base_dir)
    cut = pretrain_cut_date(target, opts, val_fraction=data_cfg.val_fraction, folds=data_cfg.folds)
    others = [read_ohlc(resolve_series(n, base_dir), name=n) for n in opts.pretrain if n != target.name]
    data = build_pretrain_data([target, *others], opts.spec, cut, stride=pcfg.stride,
                               holdout_fraction=pcfg.holdout_fraction)

    out = Path(args.out).with_suffix(".safetensors")
    # the bar first: on a terminal, the log's console lines (sys.stderr) then print above it
    bar = _Progress(pcfg.epochs) if args.console == "pretty" else None
    runlog = RunLog(out.with_suffix(".events.jsonl"), console=args.console)
    log = runlog.logger
    try:
        log.info(Event.PRETRAIN_STARTED, cut_date=cut, target=target.name,
                 instruments=[i["name"] for i in data.instruments if "skipped" not in i],
                 skipped={i["name"]: i["skipped"] for i in data.instruments if "skipped" in i},
                 windows=int((~data.holdout).sum()), holdout_windows=int(data.holdout.sum()),
                 epochs=pcfg.epochs, samples_per_epoch=pcfg.samples_per_epoch)
        result = pretrain(data, pcfg, log=log, progress=bar, on_epoch=bar.epoch_done if bar else None)
        meta = sidecar(result, data, pcfg, opts.spec, cut_date=cut, target=target.name,
                       data_options={**unstructure(opts), "val_fraction": data_cfg.val_fraction,
                                     "folds": data_cfg.folds, "config": source})
        path, meta_path = save_encoder(result, out, meta)
        last = result.history[-1]
        log.info(Event.PRETRAIN_SAVED, path=str(path), sidecar=str(meta_path), seconds=round(result.seconds, 1),
                 **{k: round(v, 4) for k, v in last.items() if k.startswith("holdout_")})
    finally:
        runlog.close()
        if bar is not None:
            bar.bar.close()
    print(f"encoder: {path}  sidecar: {meta_path}  (data up to {cut})")
    return 0


class _Progress:
    """Pretraining progress (:class:`moola_engine.progress.Bar`): a rich bar moving per batch on a terminal,
    one plain line per epoch (with its losses and ETA) otherwise."""

    def __init__(self, epochs: int) -> None:
        self.bar = Bar(epochs, unit="epochs", label="pretrain")
        self.bar.phase = "self-supervised, every layer"

    def __call__(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if self.bar.tty:  # per batch: only a terminal redraws
            self.bar.update(done=epoch - 1 + step / max(steps, 1), emit=False)

    def epoch_done(self, epoch: int, epochs: int, row: dict[str, Any]) -> None:
        loss = "  ".join(f"{k[len('batch_'):-len('_loss')]} {v:.4f}" for k, v in row.items()
                         if k.startswith("batch_") and k.endswith("_loss") and isinstance(v, float))
        self.bar.update(done=epoch, loss=loss or None)
