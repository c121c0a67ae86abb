"""``moola-engine pretrain [--config FILE]``: the multi-task BiLSTM encoder on the bundled (or configured) series.

The ``[data]`` table of the experiment config (kind ``ohlc``) decides the target, the window, the splits and
the folds, hence the calendar date every pretraining instrument is cut at; without ``--config`` the built-in
defaults are used (the same ones ``examples/seed.toml`` relies on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import attrs

from ..config import DataConfig, load_config, unstructure
from ..errors import ConfigError
from ..logs import Event, RunLog
from ..ohlc import parse_options, pretrain_cut_date, read_ohlc, resolve_series, target_series
from ..pretrain import PretrainConfig, build_pretrain_data, pretrain, save_encoder, sidecar
from .argtypes import non_negative_int, positive_float, positive_int, seed_int, writable_output


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pretrain", help="pretrain the multi-task BiLSTM encoder (writes .safetensors + .json)")
    p.add_argument("--config", help="experiment TOML whose [data] (kind = \"ohlc\") fixes target, splits and cut date")
    p.add_argument("--out", default="artifacts/encoder.safetensors",
                   help="output file; the sidecar .json and the .events.jsonl log go beside it (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing encoder file (refused otherwise: runs may have been trained from it)")
    d = PretrainConfig()
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="pretraining epochs (default: %(default)s)")
    p.add_argument("--samples-per-epoch", type=non_negative_int, default=d.samples_per_epoch,
                   help="windows drawn per epoch, 0 = all (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="windows per step (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--stride", type=positive_int, default=d.stride,
                   help="stride between window ends (default: %(default)s)")
    p.add_argument("--hidden-size", type=positive_int, default=d.hidden_size,
                   help="BiLSTM hidden size per direction; the fine-tuning model must match (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="seed of weights and window draws (default: %(default)s)")
    p.add_argument("--device", default=d.device, help='"auto", "cpu", "cuda", "cuda:N" or "mps" (default: %(default)s)')
    p.add_argument("--threads", type=positive_int, default=d.threads, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--console", choices=["pretty", "json", "none"], default="pretty",
                   help="what the terminal shows: pretty lines, JSON events, or nothing (default: %(default)s)")
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
        out = Path(args.out).with_suffix(".safetensors")
    except ValueError as exc:  # "", "/", a name without a stem
        raise ConfigError("--out", f"expected a file name like artifacts/encoder.safetensors, got {args.out!r} "
                                   f"({exc})") from None
    writable_output(out.with_suffix(".events.jsonl"), flag="--out", is_dir=False)  # before any data is read
    if out.exists() and not args.force:
        raise ConfigError("--out", f"{out} exists: runs may have been trained from it. Pass --force to overwrite it, "
                                   "or choose another --out")
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

    runlog = RunLog(out.with_suffix(".events.jsonl"), console=args.console)
    log = runlog.logger
    try:
        log.info(Event.PRETRAIN_STARTED, cut_date=cut, target=target.name,
                 instruments=[i["name"] for i in data.instruments if "skipped" not in i],
                 skipped={i["name"]: i["skipped"] for i in data.instruments if "skipped" in i},
                 windows=int((~data.holdout).sum()), holdout_windows=int(data.holdout.sum()),
                 epochs=pcfg.epochs, samples_per_epoch=pcfg.samples_per_epoch)
        bar = _Progress(sys.stderr) if args.console == "pretty" else None
        result = pretrain(data, pcfg, log=log, progress=bar)
        meta = sidecar(result, data, pcfg, opts.spec, cut_date=cut, target=target.name,
                       data_options={**unstructure(opts), "val_fraction": data_cfg.val_fraction,
                                     "folds": data_cfg.folds, "config": source})
        path, meta_path = save_encoder(result, out, meta)
        last = result.history[-1]
        log.info(Event.PRETRAIN_SAVED, path=str(path), sidecar=str(meta_path), seconds=round(result.seconds, 1),
                 **{k: round(v, 4) for k, v in last.items() if k.startswith("holdout_")})
    finally:
        runlog.close()
    print(f"encoder: {path}  sidecar: {meta_path}  (data up to {cut})")
    return 0


@attrs.define
class _Progress:
    """A one-line progress bar on a terminal, erased before each epoch's event line; nothing when not a tty."""

    stream: Any
    width: int = 30

    def __call__(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        if not getattr(self.stream, "isatty", lambda: False)():
            return
        filled = self.width * step // max(steps, 1)
        line = f"epoch {epoch}/{epochs} [{'#' * filled}{'-' * (self.width - filled)}] {step}/{steps}"
        self.stream.write("\r\033[K" if step == steps else f"\r{line}")
        self.stream.flush()
