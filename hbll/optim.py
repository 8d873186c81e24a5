"""Optimizer parameter groups with a learning rate per tree level."""

from __future__ import annotations

from torch import nn

from hbll.model import HBLLModel

__all__ = ["level_param_groups"]


def level_param_groups(model: HBLLModel, lr: float, level_lr_scale: float = 1.0) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimizer groups by tree level.

    The module and σ of a node at level ℓ train at ``lr * level_lr_scale ** ℓ``: the root
    at ``lr``, and with a scale below 1 the finer levels slower. The stem, the head and
    the exit heads train at ``lr``. A leaf at a shallower level (N not a power of two)
    takes the rate of its own level. Each group carries its ``"lr"``, so schedulers that
    multiply the rate keep the ratios.
    """
    if level_lr_scale <= 0:
        raise ValueError(f"level_lr_scale must be > 0, got {level_lr_scale}")
    groups: dict[int, list[nn.Parameter]] = {}
    assigned: set[int] = set()
    for node in model.tree.nodes:
        params = list(model.node_module(node).parameters())
        if not node.is_leaf:
            params.append(model.log_sigma[node.name])
        for param in params:
            if param.requires_grad and id(param) not in assigned:
                groups.setdefault(node.level, []).append(param)
                assigned.add(id(param))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in assigned]
    result = [{"params": rest, "lr": lr}] if rest else []
    result += [{"params": params, "lr": lr * level_lr_scale**level} for level, params in sorted(groups.items())]
    return result
