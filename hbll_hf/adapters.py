"""Wrap a transformers model as an ``HBLLModel``: its embeddings, its layers and its head.

The adapter finds the three parts generically:

- the **layers**: the ``nn.ModuleList`` of the base model (``layers``, ``h``,
  ``encoder.layer`` and similar names, else the one list of ``num_hidden_layers``
  modules of one class);
- the **stem**: the base model itself with its layer list replaced by a module that stops
  the forward pass at the first layer. Running it gives ``hidden_states`` and exactly the
  positional and keyword arguments that the stock model passes to every layer: the
  attention mask, rotary position embeddings, position ids. Nothing about masks or
  positions is reimplemented, so every family that calls its layers in a loop works;
- the **head**: the final norm (``norm``, ``ln_f`` and similar, absent in post-norm
  encoders such as BERT), then the LM head, the sequence classifier or nothing.

Every block is the stock layer inside ``LayerBlock``, which calls it with the arguments
of the active batch (see ``LayerContext``). Shortcuts are stock layers too, so every level
cut exports as a stock checkpoint with fewer layers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import nn

from hbll.model import HBLLModel
from hbll.tree import Node

__all__ = [
    "ArchitectureMap",
    "LayerContext",
    "LayerBlock",
    "LayerStem",
    "StockHead",
    "ShortcutInit",
    "Task",
    "find_architecture",
    "from_transformers",
    "shortcut_source",
]

logger = logging.getLogger(__name__)

Task = Literal["causal_lm", "sequence_classification", "base"]
ShortcutInit = Literal["first", "middle", "last", "fresh"]

LAYER_LIST_NAMES = ("layers", "h", "layer", "encoder.layer", "decoder.layers", "encoder.layers", "blocks", "block")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
STEM_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclass
class ArchitectureMap:
    """Where the parts of a stock transformers model live, as dotted attribute paths.

    Attributes:
        task: ``"causal_lm"``, ``"sequence_classification"`` or ``"base"`` (hidden states out).
        base_prefix: the base model inside the stock model (``"model"``, ``"transformer"``,
            ``"bert"``), or ``""`` when the stock model is the base model.
        layers: the layer list inside the base model.
        final_norm: the norm after the last layer inside the base model, or None.
        output: the output module of the stock model (``"lm_head"``, ``"score"``,
            ``"classifier"``), or None for a base model.
        pooler: the pooler inside the base model that a classifier reads, or None.
        dropout: the dropout between pooler and classifier in the stock model, or None.
    """

    task: Task
    base_prefix: str
    layers: str
    final_norm: Optional[str] = None
    output: Optional[str] = None
    pooler: Optional[str] = None
    dropout: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _get(module: nn.Module, path: str) -> Any:
    for name in path.split(".") if path else []:
        module = getattr(module, name)
    return module


def _has(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
    except AttributeError:
        return False
    return True


def _with_replaced(module: nn.Module, path: str, new: Optional[nn.Module]) -> nn.Module:
    """Return a shallow copy of ``module`` whose submodule at ``path`` is ``new``; ``module`` stays as it is."""
    head, _, rest = path.partition(".")
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._modules[head] = _with_replaced(module._modules[head], rest, new) if rest else new
    return clone


def _num_layers(config: Any) -> Optional[int]:
    return getattr(config, "num_hidden_layers", None)


def find_architecture(
    model: nn.Module,
    layers: Optional[str] = None,
    final_norm: Optional[str] = None,
    task: Optional[Task] = None,
) -> ArchitectureMap:
    """Find the base model, layer list, final norm and output module of a transformers model.

    ``layers`` and ``final_norm`` are dotted paths inside the base model that override
    the search, for architectures whose names the search does not know. ``task`` is
    read from the class name when None.
    """
    cls_name = type(model).__name__
    base_prefix = getattr(model, "base_model_prefix", "") or ""
    if not base_prefix or not _has(model, base_prefix) or _get(model, base_prefix) is model:
        base_prefix = ""
    base = _get(model, base_prefix)
    if task is None:
        if "SequenceClassification" in cls_name:
            task = "sequence_classification"
        elif base_prefix and model.get_output_embeddings() is not None:
            task = "causal_lm"
        elif not base_prefix:
            task = "base"
        else:
            raise ValueError(
                f"cannot tell the task of {cls_name}: it is neither a causal LM, a sequence "
                "classifier nor a base model; pass task='causal_lm', 'sequence_classification' or 'base'"
            )

    layers = layers or _find_layer_list(base, _num_layers(getattr(model, "config", None)), cls_name)
    if not isinstance(_get(base, layers), nn.ModuleList):
        raise TypeError(f"{type(base).__name__}.{layers} is a {type(_get(base, layers)).__name__}, not an nn.ModuleList")
    if final_norm is None:
        final_norm = next((name for name in FINAL_NORM_NAMES if isinstance(getattr(base, name, None), nn.Module)), None)

    arch = ArchitectureMap(task=task, base_prefix=base_prefix, layers=layers, final_norm=final_norm)
    if task == "causal_lm":
        output = model.get_output_embeddings()
        arch.output = next(name for name, module in model.named_children() if module is output)
    elif task == "sequence_classification":
        arch.output = next((name for name in ("classifier", "score") if hasattr(model, name)), None)
        if arch.output is None:
            raise ValueError(f"{cls_name} has neither a 'classifier' nor a 'score' module for the classifier head")
        if arch.output == "classifier" and getattr(base, "pooler", None) is not None:
            arch.pooler = "pooler"
        if isinstance(getattr(model, "dropout", None), nn.Dropout):
            arch.dropout = "dropout"
    return arch


def _find_layer_list(base: nn.Module, num_layers: Optional[int], cls_name: str) -> str:
    for name in LAYER_LIST_NAMES:
        if _has(base, name) and isinstance(_get(base, name), nn.ModuleList):
            return name
    # Any list of num_hidden_layers modules of one class.
    candidates = [
        name
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (num_layers is None or len(module) == num_layers)
        and len({type(layer) for layer in module}) == 1
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"cannot find the layer list of {cls_name}: its base model {type(base).__name__} has no attribute "
        f"{' / '.join(LAYER_LIST_NAMES)} holding an nn.ModuleList, and "
        f"{'several' if candidates else 'no'} nn.ModuleList of {num_layers} modules of one class "
        f"({candidates}). Pass the path inside the base model explicitly, for example "
        "from_transformers(model, layers='decoder.layers')"
    )


@dataclass
class LayerInputs:
    """The arguments that the stock model passes to each layer besides ``hidden_states``."""

    args: tuple
    kwargs: dict
    last_token: Optional[torch.Tensor] = None


class _StopAtFirstLayer(Exception):
    def __init__(self, hidden_states: torch.Tensor, inputs: LayerInputs) -> None:
        super().__init__("the stem stops the base model's forward pass at its first layer")
        self.hidden_states = hidden_states
        self.inputs = inputs


class _FirstLayerCapture(nn.Module):
    """Stands in for the layer list: the first layer call raises with its arguments."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise _StopAtFirstLayer(hidden_states, LayerInputs(args, kwargs))


class LayerContext:
    """The active batch's layer arguments, read by every ``LayerBlock`` of one model.

    It implements ``hbll.model.BatchContext``: ``prepare`` runs the stem's base model up
    to its first layer, without gradient, and keeps the arguments that the layer would
    get. Copies of a module that contains a ``LayerContext`` share it.
    """

    def __init__(self) -> None:
        self.state: Optional[LayerInputs] = None
        self.stem: Optional["LayerStem"] = None

    def __deepcopy__(self, memo: dict) -> "LayerContext":
        return self

    def prepare(self, x: Any) -> LayerInputs:
        if self.stem is None:
            raise RuntimeError("this LayerContext has no stem yet; build it through from_transformers")
        with torch.no_grad():
            return self.stem.run(x)[1]

    def current(self) -> LayerInputs:
        if self.state is None:
            raise RuntimeError(
                "a transformers layer ran outside a batch: call the HBLLModel (model(x, depth=...)) or run "
                "the blocks inside `with model.batch(x):`, which prepares the masks and positions of x"
            )
        return self.state


class LayerStem(nn.Module):
    """The stem of a transformers model: its base model up to the first layer.

    ``base`` is a shallow copy of the stock base model whose layer list is a stand-in
    that stops the forward pass, and whose final norm and pooler are removed; it shares
    the embedding modules with the stock model. The stem takes a mapping with
    ``input_ids`` and optionally ``attention_mask``, ``token_type_ids`` and
    ``position_ids``.
    """

    def __init__(self, base: nn.Module, arch: ArchitectureMap, context: LayerContext, pad_token_id: Optional[int]) -> None:
        super().__init__()
        shell = _with_replaced(base, arch.layers, nn.ModuleList([_FirstLayerCapture()]))
        for path in (arch.final_norm, arch.pooler):
            if path:
                shell = _with_replaced(shell, path, None if path == arch.pooler else nn.Identity())
        self.base = shell
        self.context = context
        self.pad_token_id = pad_token_id
        self.needs_last_token = arch.task == "sequence_classification" and arch.pooler is None
        context.stem = self

    def run(self, x: Any) -> tuple[torch.Tensor, LayerInputs]:
        """Return ``hidden_states`` at boundary 0 and the layer arguments of the batch ``x``."""
        if isinstance(x, torch.Tensor):
            x = {"input_ids": x}
        if not isinstance(x, Mapping):
            raise TypeError(f"the stem of a transformers model takes a mapping with input_ids, got {type(x).__name__}")
        inputs = {key: value for key, value in x.items() if key in STEM_INPUTS and value is not None}
        try:
            self.base(**inputs, use_cache=False)
        except _StopAtFirstLayer as stop:
            hidden_states, layer_inputs = stop.hidden_states, stop.inputs
        else:
            raise RuntimeError(f"{type(self.base).__name__} never called its first layer")
        if self.needs_last_token:
            layer_inputs.last_token = self._last_token(inputs)
        return hidden_states, layer_inputs

    def _last_token(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # The stock decoder classifiers read the last token that is not padding.
        input_ids = inputs["input_ids"]
        if self.pad_token_id is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        non_pad = (input_ids != self.pad_token_id).int()
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return (positions * non_pad).argmax(-1)

    def forward(self, x: Any) -> torch.Tensor:
        return self.run(x)[0]


class LayerBlock(nn.Module):
    """One stock transformers layer as an HBLL block: ``hidden_states`` in, ``hidden_states`` out."""

    def __init__(self, layer: nn.Module, context: LayerContext) -> None:
        super().__init__()
        self.layer = layer
        self.context = context

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        inputs = self.context.current()
        output = self.layer(hidden_states, *inputs.args, **inputs.kwargs)
        # transformers 5 layers return a tensor; older layers and some families a tuple.
        return output[0] if isinstance(output, tuple) else output


class StockHead(nn.Module):
    """The stock model's final norm and output module, reading ``hidden_states``.

    - causal LM: ``lm_head(norm(h))``, logits of every position;
    - classifier with a pooler (BERT): ``classifier(dropout(pooler(h)))``;
    - classifier without a pooler (decoders): ``score(norm(h))`` at the last token that is
      not padding;
    - base model: ``norm(h)``, the last hidden state.
    """

    def __init__(
        self,
        task: Task,
        context: LayerContext,
        norm: Optional[nn.Module] = None,
        output: Optional[nn.Module] = None,
        pooler: Optional[nn.Module] = None,
        dropout: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.context = context
        self.norm = norm
        self.pooler = pooler
        self.dropout = dropout
        self.output = output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        if self.task == "base":
            return hidden_states
        if self.task == "causal_lm":
            return self.output(hidden_states)
        if self.pooler is not None:
            features = self.pooler(hidden_states)
        else:
            last_token = self.context.current().last_token
            features = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last_token]
        if self.dropout is not None:
            features = self.dropout(features)
        return self.output(features)


def shortcut_source(node: Node, init: ShortcutInit) -> int:
    """Return the block whose layer a shortcut of ``node`` copies (for ``"fresh"``, its architecture)."""
    if init in ("first", "fresh"):
        return node.start
    if init == "last":
        return node.end - 1
    if init == "middle":
        return (node.start + node.end - 1) // 2
    raise ValueError(f"shortcut_init must be 'first', 'middle', 'last' or 'fresh', got {init!r}")


def _reinitialised(layer: nn.Module, stock: nn.Module) -> nn.Module:
    clone = copy.deepcopy(layer)
    init = getattr(stock, "_init_weights", None)
    for module in clone.modules():
        if callable(init):
            init(module)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return clone


def from_transformers(
    model: nn.Module,
    *,
    layers: Optional[str] = None,
    final_norm: Optional[str] = None,
    task: Optional[Task] = None,
    shortcut_init: ShortcutInit = "first",
    exit_heads: Optional[str] = None,
    init_sigma: float = 1.0,
    learn_sigma: bool = True,
    arch: Optional[ArchitectureMap] = None,
) -> tuple[HBLLModel, ArchitectureMap]:
    """Wrap a transformers model as an ``HBLLModel`` whose blocks are its layers.

    The ``HBLLModel`` shares the stock model's embeddings, layers, norm and head (no
    copies), and adds one shortcut per internal tree node.

    Args:
        model: a transformers model: a causal LM (GPT-2, Llama/SmolLM, ...), a sequence
            classifier or a base model (BERT, ...).
        layers: the layer list's dotted path inside the base model, if the search fails.
        final_norm: the final norm's path inside the base model, if the search fails.
        task: ``"causal_lm"``, ``"sequence_classification"`` or ``"base"``; read from the
            class when None.
        shortcut_init: how a shortcut starts: a copy of the ``"first"``, ``"middle"`` or
            ``"last"`` layer of its span (which suits pretrained models), or a ``"fresh"``
            layer with the model's own initialisation.
        exit_heads: the exit-head policy; None gives ``"shared"`` for causal LMs (the LM
            head is vocabulary-sized) and ``"local"`` otherwise.
        init_sigma, learn_sigma: σ of the consistency terms, as in ``HBLLModel``.
        arch: a known ``ArchitectureMap``, which skips the search.

    Returns the ``HBLLModel`` and the ``ArchitectureMap`` that ``export_cut`` needs.
    """
    arch = arch or find_architecture(model, layers=layers, final_norm=final_norm, task=task)
    base = _get(model, arch.base_prefix)
    layer_list = _get(base, arch.layers)
    context = LayerContext()
    config = getattr(model, "config", None)
    stem = LayerStem(base, arch, context, getattr(config, "pad_token_id", None))
    head = StockHead(
        arch.task,
        context,
        norm=_get(base, arch.final_norm) if arch.final_norm else None,
        output=_get(model, arch.output) if arch.output else None,
        pooler=_get(base, arch.pooler) if arch.pooler else None,
        dropout=_get(model, arch.dropout) if arch.dropout else None,
    )
    blocks = [LayerBlock(layer, context) for layer in layer_list]

    def shortcut_factory(node: Node, span_blocks: Sequence[nn.Module]) -> nn.Module:
        source = layer_list[shortcut_source(node, shortcut_init)]
        layer = _reinitialised(source, model) if shortcut_init == "fresh" else copy.deepcopy(source)
        return LayerBlock(layer, context)

    hbll_model = HBLLModel(
        stem,
        blocks,
        head,
        shortcut_factory=shortcut_factory,
        exit_heads=exit_heads or ("shared" if arch.task == "causal_lm" else "local"),
        init_sigma=init_sigma,
        learn_sigma=learn_sigma,
        context=context,
    )
    return hbll_model, arch
