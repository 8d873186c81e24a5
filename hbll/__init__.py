"""Hierarchical Block-Local Learning: the tree, the local objectives, the engines and the cuts.

The core depends on torch only.
"""

from hbll.critical_path import TaskGraph
from hbll.engine import BackpropEngine, ReferenceEngine, StepResult, build_engine, train_step
from hbll.fused import FusedEngine
from hbll.model import HBLLModel, fresh_block_shortcut, fresh_copy
from hbll.networks import CausalTransformer, ConvResNet, NetworkSpec
from hbll.optim import level_param_groups
from hbll.objectives import ObjectiveConfig, consistency_terms, cross_entropy_loss
from hbll.tree import Node, Tree

__all__ = [
    "BackpropEngine",
    "CausalTransformer",
    "ConvResNet",
    "FusedEngine",
    "HBLLModel",
    "NetworkSpec",
    "Node",
    "ObjectiveConfig",
    "ReferenceEngine",
    "StepResult",
    "TaskGraph",
    "Tree",
    "build_engine",
    "consistency_terms",
    "cross_entropy_loss",
    "fresh_block_shortcut",
    "fresh_copy",
    "level_param_groups",
    "train_step",
]

__version__ = "0.1.0"
