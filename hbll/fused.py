"""``FusedEngine``: the HBLL step with the independent module calls of each round batched.

The reference engine evaluates the nodes of one round (the left children of a level for
the messages, every node for the outputs, every exit head, every sweep) one after
another. The fused engine groups the modules of a round by structure and runs each group
as one call:

- **different modules of one structure** (the blocks and shortcuts of a level, the local
  exit heads): their parameters are stacked with ``torch.stack``, which keeps the
  autograd link to every module's own parameters, and ``torch.func.functional_call``
  runs under ``torch.vmap`` over the stacked parameters and inputs. Forward and
  backward are one batched computation per group;
- **one module applied several times** (the shared LM head that reads every boundary):
  the inputs are concatenated along the batch dimension and the module runs once.

A step then launches O(L) batched calls instead of O(N) module calls, and gives the
same losses and gradients as the reference engine up to float rounding. A group that
cannot be fused (a module with batch statistics in training, an operation ``vmap``
does not support) runs one module at a time, with one debug log line per structure.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from hbll.engine import ReferenceEngine

__all__ = ["FusedEngine", "fusion_key"]

logger = logging.getLogger(__name__)

ModuleCall = Callable[[torch.Tensor], torch.Tensor]


def _has_batch_statistics(module: nn.Module) -> bool:
    # Batch norm in training mode normalises over the batch, so concatenated or stacked
    # inputs would change its output.
    return any(isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training for sub in module.modules())


def fusion_key(module: ModuleCall, module_input: torch.Tensor) -> Optional[Hashable]:
    """Return the key of calls that can run as one batched call, or None for a call that runs alone.

    Calls of one module object (or one bound method, such as ``HBLLModel.frozen_head``)
    share ``("same", ...)``; calls of different modules with the same class, parameter
    and buffer names, shapes and dtypes, and input shape share ``("stacked", ...)``.
    """
    owner = getattr(module, "__self__", None)
    if owner is not None and isinstance(owner, nn.Module):
        if _has_batch_statistics(owner):
            return None
        return ("same", id(owner), getattr(module, "__func__", None), module_input.dtype, module_input.shape[1:])
    if not isinstance(module, nn.Module) or _has_batch_statistics(module):
        return None
    params = tuple((name, p.shape, p.dtype, p.device, p.requires_grad) for name, p in module.named_parameters())
    buffers = tuple((name, b.shape, b.dtype) for name, b in module.named_buffers())
    return ("stacked", type(module), params, buffers, module.training, module_input.shape, module_input.dtype)


class FusedEngine(ReferenceEngine):
    """The HBLL step of ``ReferenceEngine`` with the module calls of each round batched.

    It takes the reference engine's arguments plus:

    - ``randomness``: what ``torch.vmap`` does for random operations such as dropout
      inside a stacked group: ``"different"`` draws independent randomness per module,
      ``"same"`` shares it;
    - ``device_types``: the device types on which calls are batched, for example
      ``("cuda",)``; on other devices the engine runs the calls one at a time like the
      reference engine. None batches everywhere.
    """

    name = "fused"

    def __init__(self, *args, randomness: str = "different", device_types: Optional[Sequence[str]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if randomness not in ("different", "same"):
            raise ValueError(f"randomness must be 'different' or 'same', got {randomness!r}")
        self.randomness = randomness
        self.device_types = None if device_types is None else tuple(device_types)
        self.unfusable: set[Hashable] = set()

    def run_modules(self, modules: Sequence[ModuleCall], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.device_types is not None and inputs and inputs[0].device.type not in self.device_types:
            return super().run_modules(modules, inputs)
        groups: dict[Hashable, list[int]] = {}
        results: list[Optional[torch.Tensor]] = [None] * len(modules)
        for index, (module, module_input) in enumerate(zip(modules, inputs)):
            key = fusion_key(module, module_input)
            if key is None or key in self.unfusable:
                results[index] = module(module_input)
            else:
                groups.setdefault(key, []).append(index)
        for key, indices in groups.items():
            group_modules, group_inputs = [modules[i] for i in indices], [inputs[i] for i in indices]
            if len(indices) == 1:
                outputs = [group_modules[0](group_inputs[0])]
            else:
                outputs = self._run_group(key, group_modules, group_inputs)
            for index, output in zip(indices, outputs):
                results[index] = output
        return results  # type: ignore[return-value]

    def _run_group(self, key: Hashable, modules: Sequence[ModuleCall], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            if key[0] == "same":
                output = modules[0](torch.cat(list(inputs)))
                return list(output.split([x.shape[0] for x in inputs]))
            return list(self._stacked_call(modules, inputs).unbind(0))
        except torch.OutOfMemoryError:
            # Running the group module by module would hide that the device is full.
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
            self.unfusable.add(key)
            logger.debug(
                "FusedEngine: %d calls of %s run one at a time because the batched call failed: %s",
                len(modules),
                type(getattr(modules[0], "__self__", modules[0])).__name__,
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            return [module(module_input) for module, module_input in zip(modules, inputs)]

    def _stacked_call(self, modules: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        template = modules[0]
        named = [dict(module.named_parameters()) for module in modules]
        named_buffers = [dict(module.named_buffers()) for module in modules]
        params = {name: torch.stack([n[name] for n in named]) for name in named[0]}
        buffers = {name: torch.stack([n[name] for n in named_buffers]) for name in named_buffers[0]}

        def call(module_params: dict, module_buffers: dict, module_input: torch.Tensor) -> torch.Tensor:
            return functional_call(template, (module_params, module_buffers), (module_input,))

        return torch.vmap(call, randomness=self.randomness)(params, buffers, torch.stack(list(inputs)))
