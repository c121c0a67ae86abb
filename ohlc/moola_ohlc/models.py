"""The seed's downstream classifier (SimpleLSTM), registered as model ``simple_lstm``."""

from __future__ import annotations

import torch
from torch import nn

from moola_engine.config import GroupSpec


def lstm_layer_patterns(prefix: str, layer: int) -> list[str]:
    """Module-name patterns of one layer of an ``nn.LSTM`` (both directions: all 8 tensors)."""
    return [f"{prefix}.*_l{layer}", f"{prefix}.*_l{layer}_reverse"]


class SimpleLSTM(nn.Module):
    """The seed's downstream classifier: bidirectional LSTM -> 2H -> head_hidden -> classes.

    Defaults reproduce the seed: 1 layer, hidden 128, input 4, head 256 -> 32 -> 2.
    """

    def __init__(self, input_size: int = 4, hidden_size: int = 128, num_layers: int = 1,
                 head_hidden: int = 32, num_classes: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(
            nn.Linear(2 * hidden_size, head_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(head_hidden, num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return torch.cat([h[-2], h[-1]], dim=1)  # last layer, forward and backward final states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def default_groups(self) -> list[GroupSpec]:
        groups = [GroupSpec(name=f"encoder.layer{i}", modules=lstm_layer_patterns("lstm", i))
                  for i in range(self.num_layers)]
        return [*groups, GroupSpec(name="head", modules=["head"], head=True)]
