"""Networks for the shipped configs: a convolutional residual network, a causal transformer and a character RNN.

Each network is described by a spec class whose ``build()`` returns ``(stem, blocks,
head)``, so the same spec builds the HBLL model and the backprop baseline.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hbll.model import ExitHeadPolicy, HBLLModel
from hbll.recurrent import RecurrentHBLL

__all__ = [
    "NetworkSpec",
    "ConvResNet",
    "CausalTransformer",
    "CharRNN",
    "ResidualConvBlock",
    "DecoderBlock",
    "Task",
]

Task = Literal["classification", "language_modeling"]


class NetworkSpec:
    """Base class of network specs: ``build()`` returns ``(stem, blocks, head)``."""

    task: Task = "classification"
    default_exit_heads: ExitHeadPolicy = "local"
    # A recurrent spec builds a ``RecurrentHBLL`` whose tree goes over time steps.
    recurrent = False
    # The metric that reports compare; None picks accuracy or perplexity by task.
    metric: Optional[str] = None

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks must be at least 1, got {num_blocks}; set network.init_args.num_blocks "
                "to the number of trunk blocks"
            )
        self.num_blocks = num_blocks

    # Constructor arguments that may be left as None and read from the datamodule, as
    # ``{argument: datamodule attribute}``.
    data_arguments: dict[str, str] = {}

    def missing_arguments(self) -> list[str]:
        """Return the data-dependent arguments that are still None."""
        return [name for name in self.data_arguments if getattr(self, name) is None]

    def fill_from_data(self, datamodule: object) -> None:
        """Set every data-dependent argument left as None from ``datamodule``."""
        for name in self.missing_arguments():
            source = self.data_arguments[name]
            value = getattr(datamodule, source, None)
            if value is None:
                raise ValueError(
                    f"{type(self).__name__}.{name} is None and {type(datamodule).__name__} has no "
                    f"'{source}' attribute to take it from; set network.init_args.{name} in the config"
                )
            setattr(self, name, value)

    def build(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        raise NotImplementedError

    def model_options(self) -> dict:
        """Return extra ``HBLLModel`` arguments of this network, such as its shortcut or exit-head factory."""
        return {}

    def build_model(self, exit_heads: ExitHeadPolicy | None = None, **kwargs) -> HBLLModel:
        """Build the ``HBLLModel`` of this network; ``kwargs`` go to ``HBLLModel``."""
        missing = self.missing_arguments()
        if missing:
            raise ValueError(
                f"{type(self).__name__} arguments {missing} are None; set them, or call "
                "fill_from_data(datamodule) first"
            )
        stem, blocks, head = self.build()
        options = {**self.model_options(), **kwargs}
        return HBLLModel(stem, blocks, head, exit_heads=exit_heads or self.default_exit_heads, **options)

    def config(self) -> dict:
        """Return the constructor arguments, for checkpoints and reports."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": dict(vars(self))}


def _group_norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, width), width)


class ResidualConvBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(norm(conv(relu(norm(x))))))``.

    GroupNorm keeps no batch statistics, so a block gives the same output whether it runs
    on a message, inside a sweep or at inference. ``inner_width`` sets the channels
    between the two convolutions (default ``width``); a narrower one makes a cheaper
    shortcut.
    """

    def __init__(self, width: int, inner_width: Optional[int] = None) -> None:
        super().__init__()
        inner_width = inner_width or width
        self.norm1 = _group_norm(width)
        self.conv1 = nn.Conv2d(width, inner_width, 3, padding=1, bias=False)
        self.norm2 = _group_norm(inner_width)
        self.conv2 = nn.Conv2d(inner_width, width, 3, padding=1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(hidden_states)))
        out = self.conv2(F.relu(self.norm2(out)))
        return hidden_states + out


class ConvExitHead(nn.Module):
    """Exit head with one residual conv block before the pooled classifier."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.block = ResidualConvBlock(width)
        self.classifier = _pooled_classifier(width, num_classes)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(hidden_states))


class TargetEmbeddingHead(nn.Module):
    """Exit head that scores a boundary against a learned embedding of every class.

    This is the block-local-learning reading of an exit: each class has an embedding
    ``t_c`` in the pooled feature space of the boundary, and the logits are
    ``-|f(h) - t_c|^2 · exp(s)`` with ``f`` the normalised, pooled ``hidden_states`` and
    ``s`` a learned log scale. Cross-entropy over these logits is the likelihood of the
    target under a Gaussian centred at each class embedding.
    """

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(_group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.targets = nn.Parameter(torch.randn(num_classes, width) * 0.1)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.features(hidden_states)
        return -torch.cdist(features, self.targets).pow(2) * self.log_scale.exp()


def _pooled_classifier(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(_group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


ConvExitHeadKind = Literal["linear", "conv", "target_embedding"]


class ConvResNet(NetworkSpec):
    """Image classifier: a strided conv stem, N residual blocks of fixed width, a pooled head.

    Args:
        num_blocks: N, the number of residual blocks in the trunk.
        in_channels: channels of the input image; None reads ``in_channels`` of the datamodule.
        num_classes: classes of the classifier head; None reads ``num_classes`` of the datamodule.
        width: channels of ``hidden_states``.
        downsample: total stride of the stem, a power of two; 28×28 inputs with
            ``downsample=4`` give 7×7 ``hidden_states``.
        exit_head: the local exit head of each boundary. ``"target_embedding"`` (the
            default) scores the pooled boundary against a learned embedding of each
            class; ``"linear"`` is a pooled linear classifier like the final head;
            ``"conv"`` puts one residual conv block before that classifier.
        shortcut_width: the inner width of every shortcut block; None gives shortcuts
            the blocks' architecture, so every cut is a plain network of this family.
    """

    data_arguments = {"in_channels": "in_channels", "num_classes": "num_classes"}

    def __init__(
        self,
        num_blocks: int = 8,
        in_channels: Optional[int] = None,
        num_classes: Optional[int] = None,
        width: int = 32,
        downsample: int = 4,
        exit_head: ConvExitHeadKind = "target_embedding",
        shortcut_width: Optional[int] = None,
    ) -> None:
        super().__init__(num_blocks)
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two (1, 2, 4, ...), got {downsample}")
        if exit_head not in ("linear", "conv", "target_embedding"):
            raise ValueError(f"exit_head must be 'linear', 'conv' or 'target_embedding', got {exit_head!r}")
        if shortcut_width is not None and shortcut_width < 1:
            raise ValueError(f"shortcut_width must be at least 1, got {shortcut_width}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.downsample = downsample
        self.exit_head = exit_head
        self.shortcut_width = shortcut_width

    def build(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(self.in_channels, self.width, 3, padding=1, bias=False)]
        for _ in range(int(math.log2(self.downsample))):
            layers += [_group_norm(self.width), nn.ReLU(), nn.Conv2d(self.width, self.width, 3, stride=2, padding=1, bias=False)]
        stem = nn.Sequential(*layers)
        blocks = [ResidualConvBlock(self.width) for _ in range(self.num_blocks)]
        return stem, blocks, _pooled_classifier(self.width, self.num_classes)

    def model_options(self) -> dict:
        options: dict = {}
        if self.shortcut_width is not None:
            options["shortcut_factory"] = lambda node, span_blocks: ResidualConvBlock(self.width, self.shortcut_width)
        if self.exit_head == "conv":
            options["exit_head_factory"] = lambda boundary: ConvExitHead(self.width, self.num_classes)
        elif self.exit_head == "target_embedding":
            options["exit_head_factory"] = lambda boundary: TargetEmbeddingHead(self.width, self.num_classes)
        return options


class DecoderBlock(nn.Module):
    """Pre-norm causal decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = hidden_states.shape
        qkv = self.qkv(self.attn_norm(hidden_states))
        # (B, T, 3·D) -> 3 × (B, heads, T, D / heads)
        q, k, v = qkv.view(batch, seq_len, 3, self.num_heads, d_model // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        hidden_states = hidden_states + self.attn_out(attn.transpose(1, 2).reshape(batch, seq_len, d_model))
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class TokenPositionEmbedding(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int, max_positions: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_positions, d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.positions.num_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_positions {self.positions.num_embeddings}; "
                "raise network.init_args.max_positions or shorten the data's block_size"
            )
        positions = torch.arange(seq_len, device=input_ids.device)
        return self.tokens(input_ids) + self.positions(positions)


class CausalTransformer(NetworkSpec):
    """Small causal LM: token plus position embedding, N pre-norm decoder layers, norm plus LM head.

    Exit heads default to ``"shared"``: every boundary is read by a stop-gradient copy of the
    vocabulary-sized LM head instead of one such head per boundary. ``vocab_size=None``
    reads ``vocab_size`` of the datamodule.
    """

    task: Task = "language_modeling"
    default_exit_heads: ExitHeadPolicy = "shared"
    data_arguments = {"vocab_size": "vocab_size"}

    def __init__(
        self,
        num_blocks: int = 4,
        vocab_size: Optional[int] = None,
        max_positions: int = 256,
        d_model: int = 128,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_blocks)
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.d_model = d_model
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout

    def build(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        stem = TokenPositionEmbedding(self.vocab_size, self.max_positions, self.d_model)
        blocks = [DecoderBlock(self.d_model, self.num_heads, self.mlp_ratio, self.dropout) for _ in range(self.num_blocks)]
        head = nn.Sequential(nn.LayerNorm(self.d_model), nn.Linear(self.d_model, self.vocab_size, bias=False))
        return stem, blocks, head


RecurrentCellKind = Literal["gru", "lstm"]


class CharRNN(NetworkSpec):
    """Character-level recurrent LM: an embedding, one GRU or LSTM cell over time, a linear head.

    The tree goes over time steps, not blocks: ``max_steps`` is the sequence length the
    model trains on (the datamodule's ``block_size``), and ``build_model`` returns a
    ``hbll.recurrent.RecurrentHBLL``. ``vocab_size=None`` reads ``vocab_size`` of the
    datamodule.

    Args:
        max_steps: T, the longest training sequence; sets the shortcut scales.
        vocab_size: characters in the vocabulary.
        cell: ``"gru"`` or ``"lstm"``.
        embedding_dim: width of the cell's input.
        hidden_size: width of the cell's state.
        leaf_steps: the time steps of one leaf, which trains on them with backprop
            through time from its message (see ``RecurrentHBLL``).
        lookahead: the number of lookahead heads, which train the state to carry
            information to later steps (see ``RecurrentHBLL``).
    """

    task: Task = "language_modeling"
    recurrent = True
    metric = "bits_per_char"
    data_arguments = {"vocab_size": "vocab_size"}

    def __init__(
        self,
        max_steps: int = 128,
        vocab_size: Optional[int] = None,
        cell: RecurrentCellKind = "gru",
        embedding_dim: int = 64,
        hidden_size: int = 256,
        lookahead: int = 0,
        leaf_steps: int = 1,
    ) -> None:
        super().__init__(max_steps)
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.max_steps = max_steps
        self.vocab_size = vocab_size
        self.cell = cell
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.lookahead = lookahead
        self.leaf_steps = leaf_steps

    def config(self) -> dict:
        config = super().config()
        # num_blocks mirrors max_steps and is no constructor argument.
        config["init_args"].pop("num_blocks")
        return config

    def build_model(self, exit_heads: ExitHeadPolicy | None = None, **kwargs) -> RecurrentHBLL:
        """Build the ``RecurrentHBLL``; ``kwargs`` (``init_sigma``, ``learn_sigma``) go to it."""
        missing = self.missing_arguments()
        if missing:
            raise ValueError(f"CharRNN arguments {missing} are None; set them, or call fill_from_data(datamodule) first")
        cell_class = nn.GRUCell if self.cell == "gru" else nn.LSTMCell
        return RecurrentHBLL(
            nn.Embedding(self.vocab_size, self.embedding_dim),
            cell_class(self.embedding_dim, self.hidden_size),
            nn.Linear(self.hidden_size, self.vocab_size),
            max_steps=self.max_steps,
            lookahead=self.lookahead,
            leaf_steps=self.leaf_steps,
            **kwargs,
        )
