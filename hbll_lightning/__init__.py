"""PyTorch Lightning integration of HBLL.

Importing this package registers ``HBLLStrategy`` under the name ``"hbll"``, so
``Trainer(strategy="hbll")`` works.
"""

from hbll_lightning.module import HBLLModule, ModulesSpec
from hbll_lightning.strategy import HBLLStrategy, ProcessLayoutError

__all__ = ["HBLLModule", "HBLLStrategy", "ModulesSpec", "ProcessLayoutError"]
