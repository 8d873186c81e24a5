"""Shared fixtures: tiny CPU models of the block family used across the test suite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbll import HBLLModel


class TinyBlock(nn.Module):
    """Residual MLP block on (B, D) hidden_states."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.linear(self.norm(hidden_states)))


def make_tiny_model(num_blocks: int, width: int = 6, num_classes: int = 3, **kwargs) -> HBLLModel:
    stem = nn.Linear(5, width)
    blocks = [TinyBlock(width) for _ in range(num_blocks)]
    head = nn.Linear(width, num_classes)
    return HBLLModel(stem, blocks, head, **kwargs)


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=generator), torch.randint(0, 3, (4,), generator=generator)
