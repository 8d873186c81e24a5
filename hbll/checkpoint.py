"""Save and load an ``HBLLModel`` as ``model.safetensors`` plus ``hbll_config.json``.

The config records the tree (N, L, the spans of every level and level cut), the exit-head
policy and the network spec, so ``load_checkpoint`` rebuilds the model without the code
that trained it. ``safetensors`` is imported on first use, so ``import hbll`` needs torch
only.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from hbll.model import HBLLModel
from hbll.networks import NetworkSpec

__all__ = ["save_checkpoint", "load_checkpoint", "apply_umask", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "hbll_config.json"


def save_checkpoint(
    model: HBLLModel, directory: str | Path, network: Optional[NetworkSpec] = None, extra: Optional[dict[str, Any]] = None
) -> Path:
    """Write the weights and the tree config of ``model`` into ``directory`` and return it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors stores contiguous, unshared tensors only.
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": "pt", "hbll_num_blocks": str(model.num_blocks)})
    # safetensors creates the file for its owner only.
    apply_umask(weights)

    config = {
        "tree": model.tree_config(),
        "init_sigma": model.init_sigma,
        "learn_sigma": model.learn_sigma,
        "network": network.config() if network is not None else None,
        **(extra or {}),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def apply_umask(path: Path) -> None:
    """Set ``path`` to the mode that the umask gives a new file or directory."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def load_checkpoint(directory: str | Path, map_location: str = "cpu") -> HBLLModel:
    """Rebuild the ``HBLLModel`` saved in ``directory`` by ``save_checkpoint``, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the directory that save_checkpoint wrote")
    config = json.loads(config_path.read_text())
    network = config.get("network")
    if not network or not network.get("class_path"):
        raise ValueError(
            f"{config_path} records no network spec, so the architecture cannot be rebuilt; build the "
            "HBLLModel yourself and load model.safetensors with safetensors.torch.load_file"
        )
    module_name, _, class_name = network["class_path"].rpartition(".")
    spec_class = getattr(importlib.import_module(module_name), class_name)
    spec: NetworkSpec = spec_class(**network["init_args"])
    model = spec.build_model(
        config["tree"]["exit_heads"], init_sigma=config["init_sigma"], learn_sigma=config["learn_sigma"]
    )
    model.load_state_dict(load_file(str(weights_path), device=map_location))
    return model.eval()
