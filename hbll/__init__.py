"""Hierarchical Block-Local Learning: the tree, the local objectives, the engines and the cuts.

``hbll.recurrent`` puts the tree over the time steps of a recurrent cell.

The core depends on torch only.
"""

from hbll.critical_path import TaskGraph
from hbll.engine import BackpropEngine, ReferenceEngine, StepResult, build_engine, train_step
from hbll.fused import FusedEngine
from hbll.model import HBLLModel, fresh_block_shortcut, fresh_copy
from hbll.networks import CausalTransformer, CharRNN, ConvResNet, NetworkSpec
from hbll.optim import level_param_groups
from hbll.objectives import ObjectiveConfig, consistency_terms, cross_entropy_loss
from hbll.recurrent import BPTTEngine, RecurrentEngine, RecurrentHBLL
from hbll.tree import Node, Tree

__all__ = [
    "BPTTEngine",
    "BackpropEngine",
    "CausalTransformer",
    "CharRNN",
    "ConvResNet",
    "FusedEngine",
    "HBLLModel",
    "NetworkSpec",
    "Node",
    "ObjectiveConfig",
    "RecurrentEngine",
    "RecurrentHBLL",
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
