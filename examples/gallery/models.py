"""The gallery's models, named in TOML by import path (``models:FCN``): this module sits beside the configs.

* ``FCN``: the fully convolutional network of Wang et al. (2017), "Time series classification from scratch with
  deep neural networks: a strong baseline", narrowed (``channels``): three conv blocks, global average pooling,
  a linear head.  Groups: ``encoder.block1..3``, ``head``.
* ``TinyTransformer``: a transformer encoder built from config (no download): a linear input embedding plus learned
  positions, ``layers`` encoder layers, mean pooling, a linear head.  One group per layer: ``encoder.embed``,
  ``encoder.layer0..N-1``, ``head`` (the unit of gradual unfreezing and discriminative lrs).
"""

from __future__ import annotations

import torch
from torch import nn

from moola_engine.config import GroupSpec


class FCN(nn.Module):
    """1-D FCN on (N, T, C) series; ``classes`` outputs (1 for regression)."""

    def __init__(self, in_channels: int = 1, channels: int = 32, classes: int = 2) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, k, padding=k // 2), nn.BatchNorm1d(cout), nn.ReLU())

        self.block1 = block(in_channels, channels, 7)
        self.block2 = block(channels, 2 * channels, 5)
        self.block3 = block(2 * channels, channels, 3)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.block3(self.block2(self.block1(x.transpose(1, 2))))
        return self.head(z.mean(dim=2))

    def default_groups(self) -> list[GroupSpec]:
        return [GroupSpec(name=f"encoder.block{i}", modules=[f"block{i}"]) for i in (1, 2, 3)] + [
            GroupSpec(name="head", modules=["head"], head=True)]


class TinyTransformer(nn.Module):
    """Transformer encoder classifier on (N, T, C) series, built from its parameters."""

    def __init__(self, in_channels: int = 1, length: int = 64, d_model: int = 32, heads: int = 4, layers: int = 3,
                 ff: int = 64, dropout: float = 0.1, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels, d_model)
        self.pos = nn.Parameter(torch.zeros(1, length, d_model))
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x) + self.pos[:, : x.shape[1]]
        for layer in self.layers:
            z = layer(z)
        return self.head(self.norm(z).mean(dim=1))

    def default_groups(self) -> list[GroupSpec]:
        return [GroupSpec(name="encoder.embed", modules=["embed", "pos"]),
                *[GroupSpec(name=f"encoder.layer{i}", modules=[f"layers.{i}"]) for i in range(len(self.layers))],
                GroupSpec(name="head", modules=["norm", "head"], head=True)]
