"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MergedLinear", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model dtype: the order Hugging Face uses, so
        # bf16 results match it bit for bit.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class MergedLinear(nn.Linear):
    """Several projections of one input in a single GEMM (q/k/v, or gate/up).

    Checkpoints store them separately; ``load_shard`` copies each into its rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def load_shard(self, name: str, shard: int, tensor: torch.Tensor) -> None:
        start = sum(self.output_sizes[:shard])
        target = getattr(self, name)
        target.data[start:start + self.output_sizes[shard]].copy_(tensor)
