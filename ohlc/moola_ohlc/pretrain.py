"""Multi-task BiLSTM pretraining on unlabeled OHLC windows (the seed's encoder, done without leakage).

Every instrument is cut at the target's training cut date (:func:`moola_ohlc.series.pretrain_cut_date`) before
a single window is built, so the encoder never sees a bar of the target's validation or test period, nor the
same dates on a correlated instrument.  Each instrument is standardised with its own pre-cut statistics (the
downstream run standardises its target with its training-period statistics, the same convention).

Self-supervised targets, all read from bars after the window (within the cut):

=============  =======  ==========================================================================
task           classes  target
=============  =======  ==========================================================================
expansion      2        the next-H-bar range exceeds the trailing median of H-bar ranges
swing          2        close H bars ahead is above the window's last close
candle         3        next bar is bearish / doji (|close-open| <= 0.1 (high-low)) / bullish
masked         (MSE)    a random 15% of the window's steps are zeroed; reconstruct them
=============  =======  ==========================================================================

The loop is a plain one (the Engine's classification assumptions do not fit four heads): data lives on the
device, batches are drawn by index, losses are summed on the device and read once per epoch.

Output: ``<out>.safetensors`` holding ``lstm.weight_ih_l0`` ... ``lstm.bias_hh_l1_reverse`` (16 tensors) and
``<out>.json`` (architecture, instruments and spans, cut date, standardisation, per-task metrics per epoch,
code version, seed).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from moola_engine import __version__
from moola_engine.errors import DataError
from moola_engine.logs import Event
from moola_ohlc.options import PretrainConfig
from moola_ohlc.series import (
    FeatureStats,
    OhlcSeries,
    WindowSpec,
    bar_features,
    make_windows,
    range_expansion_labels,
)

TASKS: dict[str, int] = {"expansion": 2, "swing": 2, "candle": 3}
"""Classification tasks and their class counts; ``masked`` (regression) comes on top."""


class MultiTaskBiLSTM(nn.Module):
    """``lstm`` (the encoder that is saved) + one small head per task + a per-step reconstruction head."""

    def __init__(self, input_size: int = 4, hidden_size: int = 128, num_layers: int = 2,
                 tasks: dict[str, int] | None = None) -> None:
        super().__init__()
        tasks = dict(TASKS if tasks is None else tasks)
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, bidirectional=True, batch_first=True)
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(2 * hidden_size, 64), nn.ReLU(), nn.Linear(64, k))
            for name, k in tasks.items()
        })
        self.recon = nn.Linear(2 * hidden_size, input_size)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out, (h, _) = self.lstm(x)
        pooled = torch.cat([h[-2], h[-1]], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}, self.recon(out)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return {f"lstm.{k}": v.detach().cpu().contiguous() for k, v in self.lstm.state_dict().items()}


# --------------------------------------------------------------------------- data


def candle_type(s: OhlcSeries, bars: np.ndarray) -> np.ndarray:
    """0 bearish, 1 doji (body <= 10% of the range), 2 bullish."""
    body = s.close[bars] - s.open[bars]
    rng = s.high[bars] - s.low[bars]
    out = np.where(body > 0, 2, 0)
    return np.where(np.abs(body) <= 0.1 * rng, 1, out).astype(np.int64)


@attrs.frozen(kw_only=True, eq=False)
class PretrainData:
    x: np.ndarray
    targets: dict[str, np.ndarray]
    holdout: np.ndarray  # bool per window
    instruments: list[dict[str, Any]]


def build_pretrain_data(series: Sequence[OhlcSeries], spec: WindowSpec, cut_date: str, *, stride: int = 1,
                        holdout_fraction: float = 0.1) -> PretrainData:
    """Windows from every instrument, each cut at ``cut_date`` (every bar a window or target reads is <= it)."""
    xs, tg, hold, infos = [], {k: [] for k in TASKS}, [], []
    for full in series:
        s = full.cut(cut_date)
        first, last = spec.valid_ends(len(s))
        info: dict[str, Any] = {"name": s.name, "source": s.source, "bars_before_cut": len(s)}
        if last - first + 1 < 2 * spec.min_embargo:
            info["skipped"] = f"only {len(s)} bars on or before {cut_date}"
            infos.append(info)
            continue
        ends = np.arange(first, last + 1, stride)
        n_hold = max(1, round(holdout_fraction * len(ends)))
        hold_ends = ends[-n_hold:]
        fit_ends = ends[ends <= hold_ends[0] - spec.min_embargo]
        feats = bar_features(s)
        stats = FeatureStats.fit(s, feats, 1, int(fit_ends[-1]))  # holdout bars stay out of the statistics too
        std = stats.apply(feats)
        all_ends = np.concatenate([fit_ends, hold_ends])
        xs.append(make_windows(std, all_ends, spec.window))
        tg["expansion"].append(range_expansion_labels(s, all_ends, spec))
        tg["swing"].append((s.close[all_ends + spec.horizon] > s.close[all_ends]).astype(np.int64))
        tg["candle"].append(candle_type(s, all_ends + 1))
        hold.append(np.r_[np.zeros(len(fit_ends), bool), np.ones(len(hold_ends), bool)])
        _, last_bar = spec.footprint(all_ends[-1])
        info.update(span=[s.date(0), s.date(len(s) - 1)], last_bar_read=s.date(int(last_bar)),
                    windows=len(fit_ends), holdout_windows=len(hold_ends), standardisation=stats.to_json())
        infos.append(info)
    if not xs:
        raise DataError(f"no instrument has enough bars on or before the cut date {cut_date} for pretraining "
                        f"(window {spec.window}, horizon {spec.horizon})")
    return PretrainData(x=np.concatenate(xs), targets={k: np.concatenate(v) for k, v in tg.items()},
                        holdout=np.concatenate(hold), instruments=infos)


# --------------------------------------------------------------------------- training


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _losses(model: MultiTaskBiLSTM, x: torch.Tensor, y: dict[str, torch.Tensor], mask_fraction: float,
            gen: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Per-task mean losses of one batch: classification on the masked input, reconstruction of masked steps."""
    mask = torch.rand(x.shape[:2], device=x.device, generator=gen) < mask_fraction
    logits, recon = model(x.masked_fill(mask[..., None], 0.0))
    out = {k: nn.functional.cross_entropy(v, y[k]) for k, v in logits.items()}
    m = mask[..., None].expand_as(x).to(x.dtype)
    out["masked"] = ((recon - x) ** 2 * m).sum() / m.sum().clamp_min(1.0)
    return out


@torch.no_grad()
def evaluate(model: MultiTaskBiLSTM, x: torch.Tensor, y: dict[str, torch.Tensor], cfg: PretrainConfig,
             seed: int) -> dict[str, float]:
    """Per-task loss and accuracy, masked-step MSE; the same fixed mask every epoch; one host sync at the end.

    Inputs are masked as in training (one forward pass serves every task), with a mask drawn from ``seed``.
    """
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    n = x.shape[0]
    for i in range(0, n, 512):
        xb = x[i:i + 512]
        mask = torch.rand(xb.shape[:2], device=x.device, generator=gen) < cfg.mask_fraction
        logits, recon = model(xb.masked_fill(mask[..., None], 0.0))
        for k, v in logits.items():
            yb = y[k][i:i + 512]
            sums[f"{k}_loss"] = sums.get(f"{k}_loss", 0) + nn.functional.cross_entropy(v, yb, reduction="sum")
            sums[f"{k}_acc"] = sums.get(f"{k}_acc", 0) + (v.argmax(1) == yb).sum()
        m = mask[..., None].expand_as(xb).to(xb.dtype)
        per_window = ((recon - xb) ** 2 * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp_min(1.0)
        sums["masked_loss"] = sums.get("masked_loss", 0) + per_window.sum()
    model.train()
    host = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in sums.values()]).cpu()
    return {k: float(v) / n for k, v in zip(sums, host.tolist())}


def chance_metrics(y: dict[str, np.ndarray], x: np.ndarray) -> dict[str, float]:
    """What predicting the class prior (and the training mean, 0, for masked steps) scores: the bar to beat."""
    out = {}
    for k, v in y.items():
        p = np.bincount(v, minlength=TASKS[k]) / len(v)
        out[f"{k}_loss"] = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        out[f"{k}_acc"] = float(p.max())
    out["masked_loss"] = float(np.mean(x.astype(np.float64) ** 2))
    return out


@attrs.frozen(kw_only=True)
class PretrainResult:
    model: MultiTaskBiLSTM
    history: list[dict[str, Any]]
    seconds: float


def pretrain(data: PretrainData, cfg: PretrainConfig, *, log: Any = None,
             progress: Callable[[int, int, int, int], None] | None = None,
             on_epoch: Callable[[int, int, dict[str, Any]], None] | None = None) -> PretrainResult:
    """Train the multi-task model; ``history[0]`` is the state before training (epoch 0).

    ``progress(epoch, epochs, step, steps)`` after every batch; ``on_epoch(epoch, epochs, row)`` after each
    epoch's evaluation (``row``: that epoch's ``history`` entry)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    unknown = set(cfg.task_weights) - set(TASKS) - {"masked"}
    if unknown:
        raise DataError(f"pretrain: unknown task(s) {', '.join(sorted(unknown))} in task_weights "
                        f"(known: {', '.join([*TASKS, 'masked'])})")
    device = _device(cfg.device)
    model = MultiTaskBiLSTM(input_size=data.x.shape[2], hidden_size=cfg.hidden_size, num_layers=cfg.num_layers).to(device)
    x_all = torch.as_tensor(data.x, device=device)
    y_all = {k: torch.as_tensor(v, device=device) for k, v in data.targets.items()}
    fit_idx = torch.as_tensor(np.flatnonzero(~data.holdout), device=device)
    hold_idx = torch.as_tensor(np.flatnonzero(data.holdout), device=device)
    x_fit, y_fit = x_all[fit_idx], {k: v[fit_idx] for k, v in y_all.items()}
    hold_idx = hold_idx[torch.randperm(len(hold_idx), generator=torch.Generator().manual_seed(cfg.seed))
                        [:cfg.eval_windows].to(device)]
    x_hold, y_hold = x_all[hold_idx], {k: v[hold_idx] for k, v in y_all.items()}
    # a fixed sample of the training windows, to report training-set losses on the same footing every epoch
    gen_cpu = torch.Generator().manual_seed(cfg.seed)
    probe = torch.randperm(len(fit_idx), generator=gen_cpu)[:cfg.eval_windows].to(device)
    x_probe, y_probe = x_fit[probe], {k: v[probe] for k, v in y_fit.items()}
    weights = {k: float(cfg.task_weights.get(k, 0.0)) for k in [*TASKS, "masked"]}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = min(cfg.samples_per_epoch or len(fit_idx), len(fit_idx))
    steps = math.ceil(per_epoch / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps * cfg.epochs),
                                                pct_start=0.15)
    gen_dev = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    def record(epoch: int, train_losses: dict[str, float] | None, seconds: float) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "seconds": round(seconds, 2)}
        if train_losses is not None:
            row.update({f"batch_{k}": v for k, v in train_losses.items()})
        row.update({f"train_{k}": v for k, v in evaluate(model, x_probe, y_probe, cfg, cfg.seed).items()})
        row.update({f"holdout_{k}": v for k, v in evaluate(model, x_hold, y_hold, cfg, cfg.seed).items()})
        if log is not None:
            log.info(Event.PRETRAIN_EPOCH, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        return row

    start = time.perf_counter()
    history = [record(0, None, 0.0)]
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(fit_idx), generator=gen_cpu)[:per_epoch].to(device)
        sums = torch.zeros(len(weights), device=device)
        for b in range(steps):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            losses = _losses(model, x_fit[idx], {k: v[idx] for k, v in y_fit.items()}, cfg.mask_fraction, gen_dev)
            total = sum(weights[k] * losses[k] for k in weights)
            opt.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            sums += torch.stack([losses[k].detach() for k in weights])
            if progress is not None:
                progress(epoch, cfg.epochs, b + 1, steps)
        batch_means = dict(zip(weights, (sums / steps).cpu().tolist()))  # one host sync per epoch
        history.append(record(epoch, {f"{k}_loss": v for k, v in batch_means.items()}, time.perf_counter() - start))
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs, history[-1])
    return PretrainResult(model=model, history=history, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- files


def save_encoder(result: PretrainResult, out: Path, sidecar: dict[str, Any]) -> tuple[Path, Path]:
    """``out`` (.safetensors, the 16 ``lstm.*`` tensors) and ``out`` with ``.json`` (the sidecar), atomically."""
    from safetensors.torch import save_file

    out = out.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out.with_suffix(".json")
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(result.model.encoder_state(), str(tmp), metadata={"format": "pt", "producer": f"moola-engine {__version__}"})
    os.replace(tmp, out)
    tmp_json = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp_json.write_text(json.dumps(sidecar, indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_json, meta_path)
    return out, meta_path


def sidecar(result: PretrainResult, data: PretrainData, cfg: PretrainConfig, spec: WindowSpec, *, cut_date: str,
            target: str, data_options: dict[str, Any]) -> dict[str, Any]:
    model = result.model
    return {
        "format": "moola-engine pretrained encoder v1",
        "code_version": __version__,
        "seed": cfg.seed,
        "architecture": {"module": "torch.nn.LSTM", "prefix": "lstm.", "input_size": model.lstm.input_size,
                         "hidden_size": model.lstm.hidden_size, "num_layers": model.lstm.num_layers,
                         "bidirectional": True, "batch_first": True,
                         "tensors": sorted(model.encoder_state())},
        "cut_date": cut_date,
        "target": target,
        "window": spec.window, "horizon": spec.horizon, "median_lookback": spec.median_lookback,
        "data_options": data_options,
        "instruments": data.instruments,
        "windows": int((~data.holdout).sum()), "holdout_windows": int(data.holdout.sum()),
        "tasks": {**{k: {"classes": c} for k, c in TASKS.items()}, "masked": {"mask_fraction": cfg.mask_fraction}},
        "chance": {"train": chance_metrics({k: v[~data.holdout] for k, v in data.targets.items()}, data.x[~data.holdout]),
                   "holdout": chance_metrics({k: v[data.holdout] for k, v in data.targets.items()}, data.x[data.holdout])},
        "config": attrs.asdict(cfg),
        "history": result.history,
        "seconds": round(result.seconds, 1),
    }
