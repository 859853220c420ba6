"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surge.models.config import ModelConfig
from surge.models.linear import Linear

__all__ = ["CausalLM", "RMSNorm"]


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


class CausalLM(nn.Module):
    """What every decoder family shares: the LM head, tied to the token embedding when the
    config says so (then checkpoints need not store it). Subclasses build the body first."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Unquantized whatever the layers' linear method: the head is small next to them and
        # its precision decides every sampled token.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False)

    def input_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def optional_tensor(self, name: str) -> bool:
        return name == "lm_head.weight" and self.config.tie_word_embeddings

    def finish_loading(self, device: torch.device, max_positions: int | None) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embedding().weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
