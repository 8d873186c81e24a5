"""``HBLLStrategy``: the Lightning strategy that owns the HBLL training step.

``import hbll_lightning`` registers it under the name ``"hbll"``, so
``Trainer(strategy="hbll")`` selects it. The strategy, not the LightningModule, picks the
engine that executes a step, so that multi-process engines can replace the single-process
one without changes to the user's module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info

from hbll.engine import BackpropEngine, ReferenceEngine

__all__ = ["HBLLStrategy"]


class HBLLStrategy(SingleDeviceStrategy):
    """Run HBLL training steps with an HBLL engine on one device.

    The device is the first of the trainer's devices (``cuda:0`` for ``accelerator="gpu"``)
    unless ``device`` is given.
    """

    strategy_name = "hbll"

    def __init__(self, device: Optional[str | torch.device] = None, **kwargs: Any) -> None:
        super().__init__(device=device or "cpu", **kwargs)
        self._device_given = device is not None
        self.engine: Optional[ReferenceEngine | BackpropEngine] = None
        # The trainer's accelerator connector fills these two from the `devices` and
        # `num_nodes` flags, because the attributes exist.
        self.parallel_devices: Optional[list[torch.device]] = None
        self.num_nodes = 1

    @property
    def root_device(self) -> torch.device:
        if not self._device_given and self.parallel_devices:
            return self.parallel_devices[0]
        return self._root_device

    def setup(self, trainer: Trainer) -> None:
        num_devices = len(self.parallel_devices or [self.root_device])
        if num_devices > 1 or self.num_nodes > 1:
            raise ValueError(
                f"strategy='hbll' trains on one device, got devices={num_devices} and "
                f"num_nodes={self.num_nodes}; set devices=1 and num_nodes=1"
            )
        module = self.lightning_module
        build = getattr(module, "build_engine", None)
        if build is None or not hasattr(module, "run_engine_step"):
            raise TypeError(
                f"strategy='hbll' trains an hbll_lightning.HBLLModule, got {type(module).__name__}; "
                "wrap your network with HBLLModule(network=...) or HBLLModule.from_modules(stem, blocks, head)"
            )
        self.engine = build()
        rank_zero_info(
            f"HBLLStrategy: {self.engine.name} engine on {self.root_device}, "
            f"{module.model.num_blocks} blocks, tree depth {module.model.depth}"
        )
        super().setup(trainer)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs["batch"]
        with self.precision_plugin.train_step_context():
            return self.lightning_module.run_engine_step(self.engine, batch)


StrategyRegistry.register(
    HBLLStrategy.strategy_name,
    HBLLStrategy,
    description="Hierarchical Block-Local Learning: each tree node trains on its local objective",
)
