"""The distillation loss: alpha x CE + (1 - alpha) x T^2 x divergence(teacher, student).

The divergence compares the two next-token distributions softened by the temperature T
(Hinton et al. 2015; the T^2 keeps its gradients on the scale of the CE term's as T grows):

- ``forward``: KL(teacher || student), mean-seeking: the student covers every token the
  teacher gives weight to (the classic choice, and the default);
- ``reverse``: KL(student || teacher), mode-seeking: the student puts its mass where the
  teacher's is largest (MiniLLM's argument for generative students);
- ``jsd``: the Jensen-Shannon divergence, symmetric and bounded by log 2.

Returned as sums over the counted positions, in float32, so the caller can divide by the
number of targets in the whole global batch (the same normaliser on every rank and every
gradient-accumulation step, which is what makes data-parallel training equal one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "LossParts", "check_loss_settings", "distill_loss"]

DIVERGENCES = ("forward", "reverse", "jsd")


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kd, summed over targets
    ce: torch.Tensor  # cross-entropy with the data's next tokens, summed
    kd: torch.Tensor  # the divergence at temperature T (without T^2), summed


def check_loss_settings(alpha: float, temperature: float, divergence: str) -> None:
    """ValueError naming what is allowed (called before any model is loaded)."""
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"--alpha {alpha} is invalid: allowed is 0 to 1 (the weight of the "
                         "cross-entropy term; 1 - alpha weighs the distillation term)")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"--temperature {temperature} is invalid: allowed is a number > 0 "
                         "(1 keeps the distributions as they are, 2 softens them)")
    if divergence not in DIVERGENCES:
        raise ValueError(f"--kl {divergence!r} is invalid: allowed is one of "
                         f"{', '.join(DIVERGENCES)}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 ids: torch.Tensor, mask: torch.Tensor, alpha: float, temperature: float,
                 divergence: str = "forward") -> LossParts:
    """Loss sums over the positions ``mask`` counts.

    ``*_logits`` are [b, t, vocab] outputs for ``ids`` [b, t]; the prediction at position i
    is scored against token i + 1 where ``mask[:, i + 1]`` is set.
    """
    counted = mask[:, 1:].bool()
    student = student_logits[:, :-1][counted].float()  # [n, vocab]
    targets = ids[:, 1:][counted]
    ce = F.cross_entropy(student, targets, reduction="sum")
    if alpha == 1.0:  # no distillation term: the teacher's logits are not needed
        return LossParts(ce, ce.detach(), torch.zeros((), device=ce.device))
    teacher = teacher_logits[:, :-1][counted].float()
    kd = divergence_sum(student / temperature, teacher / temperature, divergence)
    total = alpha * ce + (1.0 - alpha) * temperature ** 2 * kd
    return LossParts(total, ce.detach(), kd.detach())


def divergence_sum(student: torch.Tensor, teacher: torch.Tensor, divergence: str) -> torch.Tensor:
    """Sum over rows of the chosen divergence between softmax(teacher) and softmax(student)."""
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    if divergence == "forward":
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    if divergence == "reverse":
        return F.kl_div(log_t, log_s, log_target=True, reduction="sum")
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack((log_s, log_t)), dim=0) - math.log(2.0)
        return 0.5 * (F.kl_div(log_m, log_t, log_target=True, reduction="sum")
                      + F.kl_div(log_m, log_s, log_target=True, reduction="sum"))
    raise ValueError(f"divergence {divergence!r} is invalid: allowed is one of "
                     f"{', '.join(DIVERGENCES)}")
