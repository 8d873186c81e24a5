"""``HBLLConfig`` and the transformers models of a variable-depth HBLL checkpoint.

An HBLL checkpoint contains a stock architecture (its config under ``stock_config``) with
the shortcuts and exit heads of the tree. ``HBLLForCausalLM`` and
``HBLLForSequenceClassification`` load it whole for training, or one cut for inference:

    model = HBLLForCausalLM.from_pretrained(path)            # the whole tree
    model = HBLLForCausalLM.from_pretrained(path, depth=2)   # level cut C_2 only
    model.export_cut(depth=2, save_directory="cut2")         # a stock checkpoint

``from_pretrained(..., depth=ℓ)`` reads only the tensors that cut ℓ needs from
``model.safetensors``. ``export_cut`` writes, for example, a ``LlamaForCausalLM`` with
``num_hidden_layers = |cut|`` that loads with plain transformers and no custom code.
Importing ``hbll_hf`` registers both classes with the Auto classes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from hbll.objectives import cross_entropy_loss
from hbll.tree import CutLike, Node, Tree
from hbll_hf.adapters import (
    ArchitectureMap,
    LayerBlock,
    LayerContext,
    LayerStem,
    StockHead,
    Task,
    find_architecture,
    from_transformers,
    shortcut_source,
)

__all__ = [
    "HBLLConfig",
    "HBLLPreTrainedModel",
    "HBLLForCausalLM",
    "HBLLForSequenceClassification",
    "CutModel",
    "shift_labels",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STOCK_AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "base": AutoModel,
}


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Return the next-token targets of causal-LM ``labels``: position t holds ``labels[t + 1]``, the last -100."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


class HBLLConfig(PretrainedConfig):
    """Configuration of an HBLL checkpoint built on a stock transformers architecture.

    Args:
        stock_config: the stock model's config as a dict (``config.to_dict()``), with N =
            its ``num_hidden_layers`` blocks.
        architecture: where the stock model's parts live (``ArchitectureMap.to_dict()``).
        shortcut_init: how shortcuts start: a copy of the ``"first"``, ``"middle"`` or
            ``"last"`` layer of their span, or ``"fresh"``.
        exit_heads: ``"shared"`` or ``"local"`` (see ``hbll.HBLLModel``).
        init_sigma, learn_sigma: σ of the consistency terms.
        depth: None for the whole tree; a level ℓ for a model that contains cut ``C_ℓ`` only.
        training: the HBLL training settings and per-depth results, recorded for the
            model card.
    """

    model_type = "hbll"

    def __init__(
        self,
        stock_config: Optional[dict] = None,
        architecture: Optional[dict] = None,
        shortcut_init: str = "first",
        exit_heads: Optional[str] = None,
        init_sigma: float = 1.0,
        learn_sigma: bool = True,
        depth: Optional[int] = None,
        training: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        self.stock_config = stock_config or {}
        self.architecture = architecture or {}
        self.shortcut_init = shortcut_init
        self.exit_heads = exit_heads
        self.init_sigma = init_sigma
        self.learn_sigma = learn_sigma
        self.depth = depth
        self.training = training or {}
        stock = self.stock_config
        for key in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
            if key in stock and key not in kwargs:
                kwargs[key] = stock[key]
        if "id2label" in stock and "id2label" not in kwargs:
            kwargs["id2label"] = {int(k): v for k, v in stock["id2label"].items()}
        # The stock model ties its own embeddings; the wrapper must not tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_stock(cls, stock: PretrainedConfig, arch: ArchitectureMap, **options: Any) -> "HBLLConfig":
        return cls(stock_config=stock.to_dict(), architecture=arch.to_dict(), **options)

    def stock(self, num_hidden_layers: Optional[int] = None, layer_sources: Optional[Sequence[int]] = None) -> PretrainedConfig:
        """Return the stock config, optionally with ``num_hidden_layers`` layers taken from ``layer_sources``."""
        if not self.stock_config:
            raise ValueError("this HBLLConfig has no stock_config; build it with HBLLConfig.from_stock")
        values = copy.deepcopy(self.stock_config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        if num_hidden_layers is not None:
            layer_types = getattr(config, "layer_types", None)
            config.num_hidden_layers = num_hidden_layers
            if isinstance(layer_types, list) and layer_sources is not None:
                config.layer_types = [layer_types[i] for i in layer_sources]
        return config

    @property
    def arch(self) -> ArchitectureMap:
        return ArchitectureMap(**self.architecture)

    @property
    def num_blocks(self) -> int:
        return self.stock().num_hidden_layers


def _stock_class(config: HBLLConfig) -> type:
    for name in config.stock_config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return STOCK_AUTO_CLASSES[config.arch.task]


def _build_stock(config: HBLLConfig, num_hidden_layers: Optional[int] = None, layer_sources=None) -> PreTrainedModel:
    stock_config = config.stock(num_hidden_layers, layer_sources)
    cls = _stock_class(config)
    return cls.from_config(stock_config) if cls in STOCK_AUTO_CLASSES.values() else cls(stock_config)


class CutModel(nn.Module):
    """The modules of one cut: the stem, the cut's node modules and the head.

    Its parameter names equal those of the same modules in the whole ``HBLLModel``
    (``blocks.3...``, ``shortcuts.0_8...``), so a checkpoint of the whole tree loads
    into it by name.
    """

    def __init__(self, stem: LayerStem, nodes: Sequence[Node], layers: Sequence[nn.Module], head: StockHead, context: LayerContext) -> None:
        super().__init__()
        self.nodes = list(nodes)
        self.stem = stem
        self.blocks = nn.ModuleDict()
        self.shortcuts = nn.ModuleDict()
        for node, layer in zip(self.nodes, layers):
            if node.is_leaf:
                self.blocks[str(node.start)] = LayerBlock(layer, context)
            else:
                self.shortcuts[node.name] = LayerBlock(layer, context)
        self.head = head
        self.context = context

    def node_module(self, node: Node) -> nn.Module:
        return self.blocks[str(node.start)] if node.is_leaf else self.shortcuts[node.name]

    def forward(self, x: Any) -> torch.Tensor:
        hidden_states, inputs = self.stem.run(x)
        previous, self.context.state = self.context.state, inputs
        try:
            for node in self.nodes:
                hidden_states = self.node_module(node)(hidden_states)
            return self.head(hidden_states)
        finally:
            self.context.state = previous


def _cut_model(config: HBLLConfig, nodes: Sequence[Node]) -> tuple[CutModel, PreTrainedModel]:
    """Build a stock model with one layer per cut node and wrap it as a ``CutModel``."""
    arch = config.arch
    sources = [node.start if node.is_leaf else shortcut_source(node, config.shortcut_init) for node in nodes]
    stock = _build_stock(config, len(nodes), sources)
    hbll_model, _ = from_transformers(stock, arch=arch, exit_heads="local", shortcut_init="first")
    layers = [block.layer for block in hbll_model.blocks]
    cut = CutModel(hbll_model.stem, nodes, layers, hbll_model.head, hbll_model.context)
    return cut, stock


class HBLLPreTrainedModel(PreTrainedModel):
    """Base class of the HBLL transformers models: loading, saving and export of cuts."""

    config_class = HBLLConfig
    base_model_prefix = "hbll"
    task: Task = "causal_lm"
    main_input_name = "input_ids"

    def __init__(self, config: HBLLConfig, stock_model: Optional[PreTrainedModel] = None) -> None:
        super().__init__(config)
        if config.depth is None:
            stock_model = stock_model if stock_model is not None else _build_stock(config)
            self.hbll, _ = from_transformers(
                stock_model,
                arch=config.arch,
                shortcut_init=config.shortcut_init,
                exit_heads=config.exit_heads,
                init_sigma=config.init_sigma,
                learn_sigma=config.learn_sigma,
            )
        else:
            self.hbll, _ = _cut_model(config, Tree(config.num_blocks).level_cut(config.depth))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The stock model initialises its own modules; shortcuts start as layer copies.
        pass

    @classmethod
    def from_stock(cls, model: PreTrainedModel, **options: Any) -> "HBLLPreTrainedModel":
        """Wrap a stock transformers model; ``options`` go to ``HBLLConfig`` and ``find_architecture``.

        The result shares the stock model's modules. ``options`` may hold ``layers``,
        ``final_norm`` (paths for ``find_architecture``), ``shortcut_init``,
        ``exit_heads``, ``init_sigma`` and ``learn_sigma``.
        """
        search = {key: options.pop(key) for key in ("layers", "final_norm") if key in options}
        arch = find_architecture(model, task=cls.task, **search)
        config = HBLLConfig.from_stock(model.config, arch, **options)
        config.stock_config["architectures"] = [type(model).__name__]
        return cls(config, stock_model=model)

    @property
    def is_cut(self) -> bool:
        return self.config.depth is not None

    @property
    def tree(self) -> Tree:
        return Tree(self.config.num_blocks)

    def run(self, inputs: dict[str, Any], depth: Optional[int] = None, cut: Optional[CutLike] = None) -> torch.Tensor:
        """Return the head's output of level cut ``depth`` (or ``cut``; None: the full network)."""
        if self.is_cut:
            if (depth is not None and depth != self.config.depth) or cut is not None:
                raise ValueError(
                    f"this model contains level cut {self.config.depth} only; load the whole checkpoint "
                    f"(from_pretrained without depth) to run depth={depth}"
                )
            return self.hbll(inputs)
        return self.hbll(inputs, depth=depth, cut=cut)

    def _logits_and_loss(self, inputs: dict[str, Any], targets: Optional[torch.Tensor], depth: Optional[int]) -> dict[str, Any]:
        logits = self.run(inputs, depth=depth)
        loss = cross_entropy_loss(logits, targets) if targets is not None else None
        return {"loss": loss, "logits": logits}

    # Saving and loading.

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied tensors stored once).

        With ``push_to_hub=True`` the directory is then uploaded with ``push_to_hub``,
        which renders the model card; ``kwargs`` go there (``repo_id``, ``token``, ...).
        """
        from safetensors.torch import save_file

        directory = Path(save_directory)
        if is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            state = state_dict if state_dict is not None else self.state_dict()
            tensors, tied, seen = {}, {}, {}
            for name, tensor in state.items():
                key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else None
                if key is not None and key in seen:
                    tied[name] = seen[key]
                    continue
                if key is not None:
                    seen[key] = name
                tensors[name] = tensor.detach().cpu().contiguous()
            metadata = {"format": "pt", "hbll_tied": json.dumps(tied)}
            save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
            self.config.architectures = [type(self).__name__]
            self.config.save_pretrained(directory)
        if push_to_hub:
            self.push_to_hub(save_directory=directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload this checkpoint with its rendered model card; see ``hbll_hf.hub.push_to_hub`` for the options."""
        from hbll_hf.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        depth: Optional[int] = None,
        revision: Optional[str] = None,
        subfolder: str = "",
        cache_dir: Optional[str] = None,
        token: Optional[str] = None,
        dtype: Optional[torch.dtype | str] = None,
        **kwargs: Any,
    ) -> "HBLLPreTrainedModel":
        """Load an HBLL checkpoint from a directory or a Hub repository.

        ``depth=ℓ`` builds level cut ``C_ℓ`` only and reads only its tensors; None loads
        the whole tree. The model is returned in eval mode.
        """
        config = kwargs.pop("config", None)
        local_files_only = bool(kwargs.pop("local_files_only", False))
        force_download = bool(kwargs.pop("force_download", False))
        dtype = kwargs.pop("torch_dtype", None) or dtype
        # Arguments that the Auto classes pass along and that a local load does not need.
        for key in ("trust_remote_code", "device_map", "low_cpu_mem_usage", "_from_auto", "adapter_kwargs", "proxies", "_commit_hash"):
            kwargs.pop(key, None)
        if kwargs:
            logger.warning("%s.from_pretrained ignores the arguments %s", cls.__name__, sorted(kwargs))
        download = {
            "revision": revision,
            "subfolder": subfolder,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        if isinstance(config, HBLLConfig) and depth is None:
            # The Auto classes read config.json first, and a depth argument lands on that config.
            depth = config.depth
        config = HBLLConfig.from_json_file(str(_resolve(pretrained_model_name_or_path, CONFIG_NAME, **download)))
        weights_path = _resolve(pretrained_model_name_or_path, WEIGHTS_NAME, **download)
        if config.depth is not None:
            if depth is not None and depth != config.depth:
                raise ValueError(f"{pretrained_model_name_or_path} contains level cut {config.depth} only, not {depth}")
            depth = config.depth
        if depth is not None:
            tree = Tree(config.num_blocks)
            if not 0 <= depth <= tree.depth:
                raise ValueError(f"depth must be in 0..{tree.depth} for N = {tree.num_blocks} blocks, got {depth}")
        config.depth = depth
        model = cls(config)
        _load_tensors(model, weights_path)
        if dtype is not None and dtype != "auto":
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()

    # Export.

    def export_cut(
        self, depth: Optional[int] = None, save_directory: Optional[str | os.PathLike] = None, cut: Optional[CutLike] = None
    ) -> PreTrainedModel:
        """Return cut ``depth`` (or ``cut``) as a stock transformers model, and save it if asked.

        The stock model has ``num_hidden_layers = |cut|``: the stem, the cut's node
        modules in span order as its layers, and the head. It loads with
        ``AutoModelFor*.from_pretrained`` and no custom code, and gives the cut's logits.
        """
        if self.is_cut:
            if (depth is not None and depth != self.config.depth) or cut is not None:
                raise ValueError(f"this model contains level cut {self.config.depth} only, not depth {depth}")
            nodes, source = self.hbll.nodes, self.hbll
        else:
            nodes, source = self.hbll.cut_nodes(depth, cut), self.hbll
        cut_model, stock = _cut_model(self.config, nodes)
        cut_model.load_state_dict(_cut_state(source, nodes), strict=True)
        stock.eval()
        if save_directory is not None:
            stock.save_pretrained(save_directory)
        return stock


def _cut_state(source: nn.Module, nodes: Sequence[Node]) -> dict[str, torch.Tensor]:
    """Collect the state of the stem, the nodes of ``nodes`` and the head of ``source``, named as in ``CutModel``."""
    state = {}
    for prefix in ("stem", "head"):
        state.update({f"{prefix}.{k}": v for k, v in getattr(source, prefix).state_dict().items()})
    for node in nodes:
        name = f"blocks.{node.start}" if node.is_leaf else f"shortcuts.{node.name}"
        state.update({f"{name}.{k}": v for k, v in source.node_module(node).state_dict().items()})
    return state


def _resolve(
    location: str | os.PathLike,
    filename: str,
    revision: Optional[str],
    subfolder: str,
    cache_dir: Optional[str],
    token: Optional[str],
    local_files_only: bool,
    force_download: bool,
) -> Path:
    local = Path(location) / subfolder / filename
    if Path(location).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{local} not found; save the model with save_pretrained first")
        return local
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            str(location),
            filename,
            subfolder=subfolder or None,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
        )
    )


def _load_tensors(model: HBLLPreTrainedModel, weights_path: Path) -> None:
    """Read the tensors ``model`` has from the file, and only those."""
    from safetensors import safe_open

    wanted = model.state_dict()
    with safe_open(str(weights_path), framework="pt") as file:
        tied = json.loads((file.metadata() or {}).get("hbll_tied", "{}"))
        stored = set(file.keys())
        missing = [name for name in wanted if name not in stored and tied.get(name) not in stored]
        if missing:
            raise ValueError(
                f"{weights_path} lacks {len(missing)} tensors of {type(model).__name__}, such as {missing[:3]}; "
                "it was written for another architecture or tree"
            )
        state = {name: file.get_tensor(name if name in stored else tied[name]) for name in wanted}
    model.load_state_dict(state, strict=True)


class HBLLForCausalLM(HBLLPreTrainedModel):
    """A causal LM trained with HBLL: ``model(input_ids, depth=ℓ)`` runs level cut ℓ.

    ``forward`` takes ``input_ids``, ``attention_mask``, ``labels`` (the HF convention:
    the model shifts them) and ``depth``, and returns ``CausalLMOutputWithPast`` with
    ``loss`` and ``logits``. Generation runs on an exported cut (``export_cut``), which
    is a stock model with a KV cache.
    """

    task: Task = "causal_lm"

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        depth: Optional[int] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        targets = shift_labels(labels) if labels is not None else None
        return CausalLMOutputWithPast(**self._logits_and_loss(inputs, targets, depth))


class HBLLForSequenceClassification(HBLLPreTrainedModel):
    """A sequence classifier trained with HBLL: ``model(input_ids, depth=ℓ)`` runs level cut ℓ."""

    task: Task = "sequence_classification"

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        depth: Optional[int] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return SequenceClassifierOutput(**self._logits_and_loss(inputs, labels, depth))


AutoConfig.register("hbll", HBLLConfig, exist_ok=True)
AutoModelForCausalLM.register(HBLLConfig, HBLLForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HBLLConfig, HBLLForSequenceClassification, exist_ok=True)
