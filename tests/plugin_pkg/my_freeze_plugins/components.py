"""A third party's model, data kind and task, registered exactly as the docs describe (docs/writing-plugins.md).

* model ``tiny-fcn``: a 1-D fully convolutional network (Wang et al. 2017's FCN, shrunk): block1 -> block2 -> head;
* data kind ``waves``: labeled synthetic series (sine vs. square waves in noise), generated from a seed,
  so the test ships its own data;
* task ``smoothed-classification``: cross-entropy with label smoothing, the built-in classification metrics;
* pretraining objective ``waves-denoise``: the FCN's conv blocks learn to reconstruct clean series from noisy ones
  (self-supervised: the labels are never read); writes the encoder and a sidecar stating the data it saw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from moola_engine import hookimpl
from moola_engine.config import GroupSpec
from moola_engine.core.data import DataRequest, Splits, TensorData, stratified_split
from moola_engine.core.tasks import Classification


class TinyFCN(nn.Module):
    """1-D CNN on (N, T, C) series: two conv blocks, global average pooling, a linear head."""

    def __init__(self, in_channels: int = 1, channels: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv1d(in_channels, channels, 5, padding=2), nn.BatchNorm1d(channels), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.BatchNorm1d(channels), nn.ReLU())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.block2(self.block1(x.transpose(1, 2)))
        return self.head(z.mean(dim=2))

    def default_groups(self) -> list[GroupSpec]:
        return [GroupSpec(name="encoder.block1", modules=["block1"]),
                GroupSpec(name="encoder.block2", modules=["block2"]),
                GroupSpec(name="head", modules=["head"], head=True)]


@attrs.frozen(kw_only=True)
class WaveOptions:
    n: int = 120
    length: int = 32
    noise: float = 0.6


def load_waves(req: DataRequest) -> Splits:
    """Sine (class 0) or square (class 1) waves of random phase and period, in Gaussian noise."""
    opts: WaveOptions = req.options
    rng = np.random.default_rng(1234)  # the dataset itself is fixed; the split follows the run's seed
    y = np.arange(opts.n) % 2
    t = np.arange(opts.length)
    phase = rng.uniform(0, 2 * np.pi, opts.n)[:, None]
    period = rng.uniform(6, 14, opts.n)[:, None]
    wave = np.sin(2 * np.pi * t / period + phase)
    x = np.where(y[:, None] == 1, np.sign(wave), wave) + opts.noise * rng.standard_normal((opts.n, opts.length))
    n_test = opts.n // 4
    test_idx, rest = np.arange(n_test), np.arange(n_test, opts.n)
    tr, va = stratified_split(y[rest], req.cfg.val_fraction, req.seed)
    xt = torch.as_tensor(x[:, :, None], dtype=torch.float32)

    def part(idx: np.ndarray) -> TensorData:
        return TensorData(x=xt[idx], y=req.task.targets(y[idx], where="waves"))

    return Splits(train=part(rest[tr]), val=part(rest[va]), test=part(test_idx), meta={"kind": "waves"})


@attrs.frozen(kw_only=True)
class SmoothingParams:
    smoothing: float = 0.1


class SmoothedClassification(Classification):
    """Classification with label smoothing in the training loss."""

    name = "smoothed-classification"

    def __init__(self, params: SmoothingParams) -> None:
        super().__init__(params)
        self.smoothing = params.smoothing

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=self.smoothing)


@hookimpl
def register_models(register: Any) -> None:
    register("tiny-fcn", TinyFCN)


@hookimpl
def register_datasets(register: Any) -> None:
    register("waves", load_waves, params=WaveOptions)


@hookimpl
def register_tasks(register: Any) -> None:
    register("smoothed-classification", SmoothedClassification, params=SmoothingParams)


@attrs.frozen(kw_only=True)
class DenoiseParams:
    epochs: int = 3
    lr: float = 1e-2
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    noise: float = 0.5


class WavesDenoise:
    """Denoising pretraining of the conv blocks on the training rows' inputs (labels never read)."""

    def __init__(self, params: DenoiseParams) -> None:
        self.params = params

    def pretrain(self, cfg: Any, *, out: Path, console: str = "pretty") -> dict[str, Any]:
        from moola_engine.core.data import build_splits
        from moola_engine.core.export import save_weights
        from moola_engine.core.models import build_model
        from moola_engine.runs.objectives import data_seen

        p = self.params
        torch.manual_seed(p.seed)
        if p.threads:
            torch.set_num_threads(p.threads)
        model = build_model(cfg.model, cfg.source, base_dir=cfg.base_dir)
        splits = build_splits(cfg.data, base_dir=cfg.base_dir, seed=p.seed, source=cfg.source)
        x = splits.train.x
        decoder = nn.Conv1d(model.head.in_features, x.shape[2], 1)
        params = [*model.block1.parameters(), *model.block2.parameters(), *decoder.parameters()]
        opt = torch.optim.Adam(params, lr=p.lr)
        gen = torch.Generator().manual_seed(p.seed)
        loss = torch.tensor(float("nan"))
        for _ in range(p.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(p.batch_size):
                clean = x[idx]
                noisy = clean + p.noise * torch.randn(clean.shape, generator=gen)
                rec = decoder(model.block2(model.block1(noisy.transpose(1, 2)))).transpose(1, 2)
                loss = nn.functional.mse_loss(rec, clean)
                opt.zero_grad()
                loss.backward()
                opt.step()
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        path = save_weights(tensors, out)
        sidecar = out.with_suffix(".json")
        sidecar.write_text(json.dumps({
            "objective": "waves-denoise", "keys": sorted(tensors), "reconstruction_mse": float(loss),
            "data_seen": data_seen(cfg, rows={"train": len(x)}, meta=splits.meta,
                                   trained_on="train rows' inputs only (labels never read)"),
        }, indent=1))
        return {"encoder": path, "sidecar": sidecar, "summary": f"reconstruction mse {float(loss):.4f}"}


@hookimpl
def register_objectives(register: Any) -> None:
    register("waves-denoise", WavesDenoise, params=DenoiseParams)
