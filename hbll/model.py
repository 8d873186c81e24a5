"""``HBLLModel``: a stem, N blocks and a head, with the shortcuts and exit heads of the tree."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.func import functional_call

from hbll.tree import CutLike, Node, Tree

__all__ = [
    "HBLLModel",
    "ExitHeadPolicy",
    "ShortcutFactory",
    "fresh_copy",
    "fresh_block_shortcut",
    "check_hidden_shape",
    "BatchContext",
    "call_detached",
]

ExitHeadPolicy = Literal["local", "shared"]
ShortcutFactory = Callable[[Node, Sequence[nn.Module]], nn.Module]


class BatchContext(Protocol):
    """Per-batch inputs that blocks read besides ``hidden_states``.

    Transformer layers need attention masks and position embeddings of the batch. A
    model whose blocks read such inputs passes a ``BatchContext`` to ``HBLLModel``, and
    its blocks read the active state from it. ``prepare`` computes the state from the
    batch input ``x`` alone, so a process that does not run the stem can prepare it too.
    """

    def prepare(self, x: Any) -> Any:
        """Return the state that the blocks read for the batch input ``x``."""
        ...

    @property
    def state(self) -> Any:
        """The active state."""
        ...

    @state.setter
    def state(self, value: Any) -> None: ...


def fresh_copy(module: nn.Module) -> nn.Module:
    """Return a new instance of ``module``'s class and configuration with fresh weights.

    The module is deep-copied and every submodule that defines ``reset_parameters``
    (all of torch's built-in layers do) draws new weights. Parameters of custom modules
    without ``reset_parameters`` keep the copied values.
    """
    clone = copy.deepcopy(module)
    for submodule in clone.modules():
        reset = getattr(submodule, "reset_parameters", None)
        if callable(reset):
            reset()
    return clone


def call_detached(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` through detached parameters, so gradient reaches ``inputs`` only."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, {**params, **dict(module.named_buffers())}, inputs)


def fresh_block_shortcut(node: Node, span_blocks: Sequence[nn.Module]) -> nn.Module:
    """Build the default shortcut: a fresh instance of the first block of the span."""
    return fresh_copy(span_blocks[0])


def check_hidden_shape(node: Node, before: torch.Tensor, after: torch.Tensor) -> None:
    """Raise if the module of ``node`` changed the shape of ``hidden_states``."""
    if not isinstance(after, torch.Tensor):
        raise TypeError(
            f"the module of node {node} returned {type(after).__name__}, expected a tensor of "
            f"shape {tuple(before.shape)}; wrap blocks that return tuples so they return "
            "hidden_states only"
        )
    if after.shape != before.shape:
        module_name = f"block {node.start}" if node.is_leaf else f"the shortcut of node {node}"
        raise ValueError(
            f"{module_name} changed the shape of hidden_states from {tuple(before.shape)} to "
            f"{tuple(after.shape)}; every block must map hidden_states to the same shape, "
            "so move resolution or width changes into the stem or the head"
        )


class HBLLModel(nn.Module):
    """A trunk of N blocks arranged under the HBLL tree.

    Args:
        stem: maps the input to ``hidden_states`` (boundary 0).
        blocks: the N trunk blocks ``B_0 … B_{N-1}``, each mapping ``hidden_states`` to the
            same shape.
        head: maps ``hidden_states`` at boundary N to the output.
        shortcut_factory: builds the shortcut of each internal node from the node and the
            blocks of its span. By default a fresh instance of the span's first block, so
            every cut is a plain network of the block family.
        exit_heads: ``"local"`` gives each boundary 1 … N-1 its own trainable exit head.
            ``"shared"`` reads every boundary through a stop-gradient copy of ``head``,
            which suits vocabulary-sized heads.
        exit_head_factory: builds the local exit head of a boundary. By default a fresh
            instance of ``head``.
        init_sigma: starting value of each internal node's σ.
        learn_sigma: whether σ is trained; if not, it stays at ``init_sigma``.
        context: the per-batch inputs that blocks read besides ``hidden_states`` (see
            ``BatchContext``); None for blocks that read ``hidden_states`` only.

    ``model(x)`` runs the full network, ``model(x, depth=ℓ)`` runs level cut ``C_ℓ`` and
    ``model(x, cut=[(0, 4), (4, 6), (6, 8)])`` runs any cut given as spans or nodes.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Iterable[nn.Module],
        head: nn.Module,
        *,
        shortcut_factory: Optional[ShortcutFactory] = None,
        exit_heads: ExitHeadPolicy = "local",
        exit_head_factory: Optional[Callable[[int], nn.Module]] = None,
        init_sigma: float = 1.0,
        learn_sigma: bool = True,
        context: Optional[BatchContext] = None,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if exit_heads not in ("local", "shared"):
            raise ValueError(f"exit_heads must be 'local' or 'shared', got {exit_heads!r}")
        if init_sigma <= 0:
            raise ValueError(f"init_sigma must be > 0, got {init_sigma}")
        self.tree = Tree(len(blocks))
        self.exit_head_policy: ExitHeadPolicy = exit_heads
        self.init_sigma = init_sigma
        self.learn_sigma = learn_sigma
        self.context = context

        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

        factory = shortcut_factory or fresh_block_shortcut
        self.shortcuts = nn.ModuleDict(
            {node.name: factory(node, blocks[node.start : node.end]) for node in self.tree.internal_nodes}
        )

        head_factory = exit_head_factory or (lambda boundary: fresh_copy(head))
        boundaries = range(1, self.num_blocks) if exit_heads == "local" else range(0)
        self.exit_heads = nn.ModuleDict({str(b): head_factory(b) for b in boundaries})

        # One scalar per internal node, so a node's loss touches its own σ parameter only.
        self.log_sigma = nn.ParameterDict(
            {
                node.name: nn.Parameter(torch.tensor(math.log(init_sigma)), requires_grad=learn_sigma)
                for node in self.tree.internal_nodes
            }
        )

    @property
    def num_blocks(self) -> int:
        return self.tree.num_blocks

    @property
    def depth(self) -> int:
        """Tree depth ``L = ceil(log2 N)``; valid level cuts are 0 … L."""
        return self.tree.depth

    @contextlib.contextmanager
    def batch(self, x: Any) -> Iterator[Any]:
        """Make ``x``'s per-batch context active inside the block and yield its state.

        Without a ``context`` this does nothing and yields None.
        """
        if self.context is None:
            yield None
            return
        with self.batch_state(self.context.prepare(x)) as state:
            yield state

    @contextlib.contextmanager
    def batch_state(self, state: Any) -> Iterator[Any]:
        """Make a state from ``batch`` active inside the block, and restore the previous one after."""
        if self.context is None:
            yield state
            return
        previous, self.context.state = self.context.state, state
        try:
            yield state
        finally:
            self.context.state = previous

    def node_module(self, node: Node) -> nn.Module:
        """Return ``M_v``: the block of a leaf or the shortcut of an internal node."""
        return self.blocks[node.start] if node.is_leaf else self.shortcuts[node.name]

    def exit_head(self, boundary: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return ``A_b``, the head that reads boundary ``boundary``; boundary N uses ``head``."""
        if not 1 <= boundary <= self.num_blocks:
            raise ValueError(f"boundary must be in 1..{self.num_blocks}, got {boundary}")
        if boundary == self.num_blocks:
            return self.head
        if self.exit_head_policy == "local":
            return self.exit_heads[str(boundary)]
        return self.frozen_head

    def frozen_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the final head through detached parameters: gradient reaches ``hidden_states`` only."""
        # The shared policy reads every boundary this way.
        return call_detached(self.head, hidden_states)

    def cut_nodes(self, depth: Optional[int] = None, cut: Optional[CutLike] = None) -> list[Node]:
        """Return the nodes of level cut ``depth``, of an explicit ``cut``, or all leaves."""
        if depth is not None and cut is not None:
            raise ValueError("pass either depth or cut, not both")
        if cut is not None:
            return self.tree.resolve_cut(cut)
        if depth is None:
            return self.tree.leaves
        return self.tree.level_cut(depth)

    def run_nodes(self, hidden_states: torch.Tensor, nodes: Sequence[Node]) -> torch.Tensor:
        """Run the node modules of a cut in span order on ``hidden_states``."""
        for node in nodes:
            output = self.node_module(node)(hidden_states)
            check_hidden_shape(node, hidden_states, output)
            hidden_states = output
        return hidden_states

    def cut_network(self, depth: Optional[int] = None, cut: Optional[CutLike] = None, compile: bool = False) -> nn.Module:
        """Return the network of a cut as ``nn.Sequential(stem, *node modules, head)``.

        It shares this model's modules (no copies) and runs them with no per-node Python
        beyond the module calls, so it suits deployment and ``torch.compile``; with
        ``compile=True`` it comes back compiled. Models with a per-batch context (the
        transformers adapters) need ``model(x, depth=...)`` instead.
        """
        if self.context is not None:
            raise ValueError("a model with a per-batch context runs its cuts through model(x, depth=...)")
        network = nn.Sequential(self.stem, *(self.node_module(node) for node in self.cut_nodes(depth, cut)), self.head)
        return torch.compile(network) if compile else network

    def forward(
        self, x: torch.Tensor, depth: Optional[int] = None, cut: Optional[CutLike] = None
    ) -> torch.Tensor:
        nodes = self.cut_nodes(depth, cut)
        with self.batch(x):
            return self.head(self.run_nodes(self.stem(x), nodes))

    @torch.no_grad()
    def predict_anytime(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Run level cuts from shallow to deep and stop per sample once it is confident.

        A sample stops at the first level whose top softmax probability reaches
        ``threshold``; samples that never do take the full network's output. Returns the
        logits ``(B, C)`` and the level each sample stopped at ``(B,)``.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if self.context is not None:
            raise NotImplementedError(
                "predict_anytime runs a shrinking subset of the batch, which a model with a per-batch "
                "context does not support; run model(x, depth=level) for each level instead"
            )
        hidden_states = self.stem(x)
        logits = None
        stopped_at = torch.full((x.shape[0],), -1, dtype=torch.long, device=hidden_states.device)
        for level in range(self.depth + 1):
            active = stopped_at < 0
            if not active.any():
                break
            level_logits = self.head(self.run_nodes(hidden_states[active], self.tree.level_cut(level)))
            if logits is None:
                logits = level_logits.new_zeros((x.shape[0], *level_logits.shape[1:]))
            logits[active] = level_logits
            confident = level_logits.softmax(-1).amax(-1) >= threshold
            if level == self.depth:
                confident = torch.ones_like(confident)
            stopped_at[active.nonzero().squeeze(1)[confident]] = level
        return logits, stopped_at

    def tree_config(self) -> dict:
        """Describe the tree for a checkpoint: N, L, the policy and the spans of every level."""
        return {
            "num_blocks": self.num_blocks,
            "depth": self.depth,
            "exit_heads": self.exit_head_policy,
            "levels": [[[n.start, n.end] for n in level] for level in self.tree.levels],
            "level_cuts": [[[n.start, n.end] for n in self.tree.level_cut(d)] for d in range(self.depth + 1)],
        }
