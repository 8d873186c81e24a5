"""The local objectives of HBLL: the exit term and the consistency term of each node."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["ObjectiveConfig", "cross_entropy_loss", "consistency_terms"]

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension of ``logits``.

    Works for classification, ``(B, C)`` against ``(B,)``, and for language modelling,
    ``(B, T, V)`` against ``(B, T)``. Targets equal to -100 are ignored.
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


@dataclass
class ObjectiveConfig:
    """Weights of the local objective ``L_v = exit_weight * exit_v + consistency_weight * cons_v``.

    ``consistency_lambda`` is λ, the weight of the term that pulls the finer estimate of a
    boundary towards the coarser one. ``init_sigma`` is the starting value of each
    internal node's σ, and ``learn_sigma=False`` keeps σ fixed at that value, which turns
    the consistency term into a scaled mean squared error. ``stem_consistency=False``
    keeps the consistency term of nodes whose span starts at 0 out of the stem, so the
    stem learns from their exit terms only.

    ``consistency_weight_final`` and ``consistency_lambda_final`` schedule the two
    weights: when set, the weight moves linearly from its starting value to the final
    value over training (see ``at``). When None, the weight stays constant.
    """

    exit_weight: float = 1.0
    consistency_weight: float = 0.3
    consistency_lambda: float = 1.0
    init_sigma: float = 1.0
    learn_sigma: bool = True
    stem_consistency: bool = False
    consistency_weight_final: Optional[float] = None
    consistency_lambda_final: Optional[float] = None
    task_loss: TaskLoss = field(default=cross_entropy_loss, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "exit_weight",
            "consistency_weight",
            "consistency_lambda",
            "consistency_weight_final",
            "consistency_lambda_final",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.init_sigma <= 0:
            raise ValueError(f"init_sigma must be > 0, got {self.init_sigma}")

    def at(self, progress: float) -> "ObjectiveConfig":
        """Return the objective at ``progress``, the fraction of training done (0 to 1).

        Scheduled weights are interpolated linearly; the result has no schedule left.
        """
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")

        def interpolate(start: float, final: Optional[float]) -> float:
            return start if final is None else start + (final - start) * progress

        return replace(
            self,
            consistency_weight=interpolate(self.consistency_weight, self.consistency_weight_final),
            consistency_lambda=interpolate(self.consistency_lambda, self.consistency_lambda_final),
            consistency_weight_final=None,
            consistency_lambda_final=None,
        )


def consistency_terms(
    coarse: torch.Tensor,
    fine: torch.Tensor,
    log_sigma: torch.Tensor,
    consistency_lambda: float,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the coarse and the fine half of the consistency term of one internal node.

    ``coarse`` is the node's shortcut output and ``fine`` the right child's output, two
    estimates of the same boundary. The Gaussian negative log-likelihood is averaged over
    elements, so its scale does not grow with the width of ``hidden_states``.

    - The coarse half, ``|coarse - sg(fine)|^2 / (2 σ^2) + log σ``, trains the node's
      shortcut and its σ and belongs to the node's own loss.
    - The fine half, ``λ |fine - sg(coarse)|^2 / (2 sg(σ)^2)``, trains the right child and
      belongs to the right child's loss. σ is detached there, so σ stays the
      maximum-likelihood noise scale of the node's own transition and no gradient reaches
      another node's parameters.

    With ``per_row``, the first dimension indexes nodes and ``log_sigma`` contains one value
    per node: both halves come back with one term per node.
    """

    def mean(difference: torch.Tensor) -> torch.Tensor:
        squares = difference.pow(2)
        return squares.flatten(1).mean(dim=1) if per_row else squares.mean()

    sigma_sq = torch.exp(2 * log_sigma)
    coarse_term = mean(coarse - fine.detach()) / (2 * sigma_sq) + log_sigma
    fine_term = consistency_lambda * mean(fine - coarse.detach()) / (2 * sigma_sq.detach())
    return coarse_term, fine_term
