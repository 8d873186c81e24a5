"""HBLL over time: training a recurrent cell without backpropagation through time.

The tree goes over the T time steps of a sequence instead of over N blocks:

- a leaf ``[t, t + 1)`` is one step of the cell, ``h_{t+1} = cell(x_t, h_t)``, and all
  leaves share the cell's weights, so their local gradients add up in the one cell.
  With ``leaf_steps=k`` a leaf is k steps that it trains with backprop through time;
- an internal node over ``[a, b)`` has a shortcut that maps ``(h_a, x_{a:b})`` to
  ``h_b``: a fresh copy of the cell applied once to a parallel summary of the span's
  inputs (``SpanPooling``). Spans of one length scale share one shortcut, so the model
  is the same at every position in time;
- the messages give every step an estimate of its incoming state after
  ``L = ceil(log2 T)`` rounds, and every node trains on its own output loss and the
  consistency term, from detached inputs.

One training step then has a critical path of O(log T) module evaluations against
backpropagation through time's 2T. Every round of the step runs as one batched call per
module: all leaves share the cell, and all spans of one scale share a shortcut.

A state is a tensor ``(B, H)`` or a tuple of such tensors, as ``nn.LSTMCell`` returns
``(h, c)``. ``RecurrentHBLL`` takes ``torch.nn.GRUCell``, ``LSTMCell`` and ``RNNCell``
and any cell with the interface ``cell(x_t, state) -> state``.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from hbll.critical_path import Task, TaskGraph
from hbll.engine import StepResult, check_sweep_options
from hbll.model import call_detached, fresh_copy
from hbll.objectives import ObjectiveConfig, consistency_terms
from hbll.tree import CutLike, Node, Tree

__all__ = [
    "State",
    "RecurrentHBLL",
    "SpanPooling",
    "SpanShortcut",
    "RecurrentEngine",
    "BPTTEngine",
    "build_recurrent_engine",
    "parse_method",
    "tree_messages",
]

State = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Span = tuple[int, int]

_TRUNCATED = re.compile(r"tbptt(\d+)")


def parse_method(method: str) -> tuple[str, Optional[int]]:
    """Split a method name into its kind and truncation length.

    ``"hbll"`` and ``"backprop"`` have no truncation; ``"tbptt16"`` is truncated
    backpropagation through time over windows of 16 steps, ``("backprop", 16)``.
    """
    if method in ("hbll", "backprop"):
        return method, None
    match = _TRUNCATED.fullmatch(method) if isinstance(method, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"method must be 'hbll', 'backprop' or 'tbptt<k>' with k >= 1 (truncated backprop through "
            f"time over k steps, recurrent networks only), got {method!r}"
        )
    return "backprop", int(match.group(1))


# States: a tensor or a tuple of tensors ------------------------------------------------


def state_parts(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _rebuild(like: State, parts: Sequence[torch.Tensor]) -> State:
    return tuple(parts) if isinstance(like, tuple) else parts[0]


def detach_state(state: State) -> State:
    return _rebuild(state, [part.detach() for part in state_parts(state)])


def cat_states(states: Sequence[State]) -> State:
    """Concatenate states along the batch dimension."""
    columns = zip(*(state_parts(state) for state in states))
    return _rebuild(states[0], [torch.cat(column) for column in columns])


def split_state(state: State, chunks: int) -> list[State]:
    """Split a state along the batch dimension into ``chunks`` equal states."""
    columns = [part.chunk(chunks) for part in state_parts(state)]
    return [_rebuild(state, [column[i] for column in columns]) for i in range(chunks)]


def flat_state(state: State) -> torch.Tensor:
    """Return the state's parts as one tensor ``(B, D)``."""
    return torch.cat([part.flatten(1) for part in state_parts(state)], dim=1)


def _describe(state: State) -> str:
    shapes = [tuple(part.shape) for part in state_parts(state)] if isinstance(state, (tuple, torch.Tensor)) else None
    if shapes is None:
        return type(state).__name__
    return str(shapes[0]) if isinstance(state, torch.Tensor) else f"tuple of {shapes}"


def check_state(where: str, before: State, after: State) -> None:
    """Raise if a cell or shortcut returned a state of another structure or shape."""
    same = isinstance(after, (tuple, torch.Tensor)) and type(after) is type(before)
    if same:
        old, new = state_parts(before), state_parts(after)
        same = len(old) == len(new) and all(
            isinstance(b, torch.Tensor) and a.shape == b.shape for a, b in zip(old, new)
        )
    if not same:
        raise ValueError(
            f"{where} changed the state from {_describe(before)} to {_describe(after)}; a recurrent cell must "
            "return a state with the structure and shapes it receives, as cell(x_t, state) -> state"
        )


# The shortcut of a span ----------------------------------------------------------------


class SpanPooling(nn.Module):
    """Summarise the inputs ``x_{a:b}`` of spans in parallel, as one vector per span.

    Attention pooling with a recency bias per channel: channel c weights position t of
    the span by ``softmax_t(score_c(x_t) - (b - 1 - t) / τ_c)`` and sums ``value_c(x_t)``.
    The timescales τ start log-spaced from one step to ``max_steps``, so some channels
    follow the last input and others average the whole span.
    """

    def __init__(self, input_size: int, max_steps: int) -> None:
        super().__init__()
        self.score = nn.Linear(input_size, input_size)
        self.value = nn.Linear(input_size, input_size)
        self.log_timescale = nn.Parameter(torch.linspace(0.0, math.log(max(max_steps, 2)), input_size))

    def forward(self, inputs: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        """Pool ``inputs`` ``(B, T, E)`` over each span; returns ``(len(spans) * B, E)``, span-major."""
        device = inputs.device
        width = max(end - start for start, end in spans)
        starts = torch.tensor([start for start, _ in spans], device=device)
        ends = torch.tensor([end for _, end in spans], device=device)
        offsets = torch.arange(-width, 0, device=device)
        # Each span's last `width` positions, right-aligned so column j has age width-1-j.
        index = ends[:, None] + offsets[None, :]
        valid = index >= starts[:, None]
        index = index.clamp(min=0)
        age = (-1 - offsets).to(inputs.dtype)
        scores = self.score(inputs)[:, index] - age[:, None] / self.log_timescale.exp()
        scores = scores.masked_fill(~valid[None, :, :, None], float("-inf"))
        pooled = (scores.softmax(dim=2) * self.value(inputs)[:, index]).sum(dim=2)
        return pooled.transpose(0, 1).reshape(-1, inputs.shape[-1])


class SpanShortcut(nn.Module):
    """The default shortcut: ``(h_a, x_{a:b}) -> h_b`` as one cell step on the pooled span.

    The cell is a fresh instance of the trained cell's class and configuration, so a cut
    of the tree is a recurrent net of the same family that takes coarser steps.
    """

    def __init__(self, cell: nn.Module, input_size: int, max_steps: int) -> None:
        super().__init__()
        self.pool = SpanPooling(input_size, max_steps)
        self.cell = fresh_copy(cell)

    def forward(self, state: State, inputs: torch.Tensor, spans: Sequence[Span]) -> State:
        return self.cell(self.pool(inputs, spans), state)


# The model ------------------------------------------------------------------------------


def _default_initial_state(cell: nn.Module) -> Optional[Callable[[int, torch.Tensor], State]]:
    # torch's cells accept hx=None and start from zeros; their sizes give the same zeros.
    if isinstance(cell, nn.LSTMCell):
        return lambda batch, like: (like.new_zeros(batch, cell.hidden_size), like.new_zeros(batch, cell.hidden_size))
    if isinstance(cell, (nn.GRUCell, nn.RNNCell)):
        return lambda batch, like: like.new_zeros(batch, cell.hidden_size)
    method = getattr(cell, "initial_state", None)
    if callable(method):
        return lambda batch, like: method(batch, like)
    return None


def _default_readout(state: State) -> torch.Tensor:
    return state_parts(state)[0]


class RecurrentHBLL(nn.Module):
    """A recurrent cell over time steps, with the shortcuts of the HBLL tree over time.

    Args:
        stem: maps the batch ``x`` (for example token ids ``(B, T)``) to the cell inputs
            ``(B, T, E)``, position by position.
        cell: the recurrent cell, ``cell(x_t, state) -> state`` with ``x_t`` of shape
            ``(B, E)``.
        head: maps the readout of a state (``(B, H)`` or ``(B, T, H)``) to the output, such
            as next-token logits.
        max_steps: the maximum sequence length the model trains on. It sets the number
            of shortcut scales, ``ceil(log2 max_steps)``.
        input_size: E; read from ``cell.input_size`` when not given.
        initial_state: ``initial_state(batch_size, like) -> state``, the state before the
            first step (``like`` is the cell input tensor, for device and dtype). torch's
            cells start from zeros; another cell needs this argument or an
            ``initial_state`` method.
        readout: picks the tensor of a state that the head reads; by default the state
            itself or, for a tuple such as an LSTM's ``(h, c)``, its first element.
        shortcut_factory: builds the shortcut of scale k, which serves the spans of
            length ``2**(k-1) + 1`` to ``2**k``, as ``factory(k)``. It is called as
            ``shortcut(state, inputs, spans)``. By default a ``SpanShortcut``.
        leaf_steps: k, the time steps of one leaf. With k > 1 a leaf runs the cell over k
            steps from its message and backpropagates through them, so each leaf trains
            like truncated BPTT over k steps while the tree, now over ``ceil(T / k)``
            leaves, supplies the starting states. The critical path grows by about 2k.
        lookahead: h, the number of lookahead heads. Head j (1 … h) reads the state after
            step t and predicts the target of step t + j, before the cell has seen the
            inputs in between. It trains the cell to keep in its state what later
            steps need, which a per-step loss alone does not ask for (see
            ``RecurrentEngine``). Each head is a fresh copy of ``head``.
        init_sigma, learn_sigma: σ of the consistency term, one per scale.

    ``model(x)`` runs the cell as an ordinary sequential RNN and returns the head's output
    at every step; ``cut_state`` and ``approximate_states`` read states through the tree.
    """

    def __init__(
        self,
        stem: nn.Module,
        cell: nn.Module,
        head: nn.Module,
        *,
        max_steps: int,
        input_size: Optional[int] = None,
        initial_state: Optional[Callable[[int, torch.Tensor], State]] = None,
        readout: Optional[Callable[[State], torch.Tensor]] = None,
        shortcut_factory: Optional[Callable[[int], nn.Module]] = None,
        leaf_steps: int = 1,
        lookahead: int = 0,
        init_sigma: float = 1.0,
        learn_sigma: bool = True,
    ) -> None:
        super().__init__()
        if leaf_steps < 1:
            raise ValueError(f"leaf_steps must be >= 1, got {leaf_steps}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, the length of the longest training sequence; got {max_steps}")
        self.leaf_steps = leaf_steps
        self.tree = Tree(math.ceil(max_steps / leaf_steps))
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if init_sigma <= 0:
            raise ValueError(f"init_sigma must be > 0, got {init_sigma}")
        input_size = input_size if input_size is not None else getattr(cell, "input_size", None)
        if input_size is None:
            raise ValueError(
                f"cannot read the input size of {type(cell).__name__}: it has no input_size attribute; "
                "pass input_size=E, the width of the cell's input x_t"
            )
        self._initial_state = initial_state or _default_initial_state(cell)
        if self._initial_state is None:
            raise ValueError(
                f"{type(cell).__name__} is not a torch cell and has no initial_state method; pass "
                "initial_state=lambda batch_size, like: ... returning the state before the first step"
            )
        self.readout = readout or _default_readout
        self.init_sigma = init_sigma
        self.learn_sigma = learn_sigma
        self.stem = stem
        self.cell = cell
        self.head = head
        self.lookahead_heads = nn.ModuleList(fresh_copy(head) for _ in range(lookahead))
        self.max_steps = max_steps
        factory = shortcut_factory or (lambda scale: SpanShortcut(cell, input_size, max_steps))
        # Scale s serves spans of 2**(s-1) + 1 to 2**s steps; internal nodes span two leaves or more.
        scales = range(math.ceil(math.log2(leaf_steps + 1)), math.ceil(math.log2(max_steps)) + 1) if self.tree.depth else range(0)
        self.shortcuts = nn.ModuleDict({str(scale): factory(scale) for scale in scales})
        self.log_sigma = nn.ParameterDict(
            {
                str(scale): nn.Parameter(torch.tensor(math.log(init_sigma)), requires_grad=learn_sigma)
                for scale in scales
            }
        )
        self._trees: dict[int, Tree] = {max_steps: self.tree}
        if self.tree.num_blocks > 1 and not self.shortcuts:
            raise ValueError(f"max_steps={max_steps} and leaf_steps={leaf_steps} leave no shortcut scale")

    def tree_config(self) -> dict:
        """Describe the tree over time for a checkpoint: T, L and the shortcut scales."""
        return {
            "num_blocks": self.max_steps,
            "depth": self.depth,
            "exit_heads": "shared",
            "over_time": True,
            "leaf_steps": self.leaf_steps,
            "lookahead": len(self.lookahead_heads),
            "shortcut_scales": sorted(int(scale) for scale in self.shortcuts),
        }

    @property
    def num_blocks(self) -> int:
        """The number of time steps of the training tree, ``max_steps``."""
        return self.max_steps

    @property
    def depth(self) -> int:
        return self.tree.depth

    def tree_for(self, num_steps: int) -> Tree:
        """Return the tree over the ``ceil(num_steps / leaf_steps)`` leaves of a sequence of ``num_steps`` steps."""
        if num_steps not in self._trees:
            self._trees[num_steps] = Tree(math.ceil(num_steps / self.leaf_steps))
        return self._trees[num_steps]

    def step_span(self, node: Node, num_steps: int) -> Span:
        """Return the time steps ``[a, b)`` of a node in a sequence of ``num_steps`` steps."""
        return node.start * self.leaf_steps, min(node.end * self.leaf_steps, num_steps)

    def scale(self, node: Node, num_steps: int) -> int:
        """Return the shortcut scale of an internal node: ``ceil(log2(steps of its span))``."""
        start, end = self.step_span(node, num_steps)
        return math.ceil(math.log2(end - start))

    def sequential_evaluations(self, nodes: Sequence[Node], num_steps: int) -> int:
        """Count the module evaluations of running ``nodes`` one after another: k per leaf, 1 per shortcut."""
        count = 0
        for node in nodes:
            start, end = self.step_span(node, num_steps)
            count += end - start if node.is_leaf else 1
        return count

    def encode(self, x: torch.Tensor, tree_length: bool = True) -> torch.Tensor:
        """Run the stem and check that its output is a non-empty sequence ``(B, T, E)``.

        With ``tree_length`` the sequence must also fit the tree, ``T <= max_steps``.
        """
        inputs = self.stem(x)
        if inputs.dim() < 3 or inputs.shape[1] == 0:
            raise ValueError(
                f"the stem turned the batch into {tuple(inputs.shape)}, expected (batch, time, features) with "
                "at least one time step; a sequence of length 0 has no step to train or run"
            )
        if tree_length and inputs.shape[1] > self.max_steps:
            raise ValueError(
                f"the sequence has {inputs.shape[1]} steps, more than max_steps={self.max_steps}, the longest "
                "the shortcuts were built for; build the model with a larger max_steps or split the sequence"
            )
        return inputs

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        return self._initial_state(batch_size, like)


    def frozen_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the head through detached parameters: gradient reaches ``hidden_states`` only."""
        return call_detached(self.head, hidden_states)

    def run_leaves(self, leaves: Sequence[Node], states: Sequence[State], inputs: torch.Tensor) -> list[list[State]]:
        """Run the cell over every leaf's steps from its state; return each leaf's states after each step.

        Leaves of one length run together: one batched cell call per step of a leaf.
        """
        num_steps = inputs.shape[1]
        groups: dict[int, list[int]] = {}
        for k, leaf in enumerate(leaves):
            start, end = self.step_span(leaf, num_steps)
            groups.setdefault(end - start, []).append(k)
        results: list[list[State]] = [[] for _ in leaves]
        where = f"the cell ({type(self.cell).__name__})"
        for length, members in groups.items():
            state = cat_states([states[k] for k in members])
            starts = torch.tensor([leaves[k].start * self.leaf_steps for k in members], device=inputs.device)
            for offset in range(length):
                step_inputs = inputs[:, starts + offset].transpose(0, 1).reshape(-1, inputs.shape[-1])
                output = self.cell(step_inputs, state)
                check_state(where, state, output)
                state = output
                for k, part in zip(members, split_state(state, len(members))):
                    results[k].append(part)
        return results

    def run_nodes(self, nodes: Sequence[Node], states: Sequence[State], inputs: torch.Tensor) -> list[State]:
        """Return ``M_v(state_v, x_{span v})`` for every node, one batched call per module.

        ``states[k]`` is the state at the start of ``nodes[k]``. The leaves run together
        (see ``run_leaves``) and all internal nodes of one scale as one shortcut call.
        """
        num_steps = inputs.shape[1]
        groups: dict[int, list[int]] = {}
        for k, node in enumerate(nodes):
            groups.setdefault(0 if node.is_leaf else self.scale(node, num_steps), []).append(k)
        results: list[Optional[State]] = [None] * len(nodes)
        for scale, members in groups.items():
            if scale == 0:
                leaf_states = self.run_leaves([nodes[k] for k in members], [states[k] for k in members], inputs)
                for k, steps in zip(members, leaf_states):
                    results[k] = steps[-1]
                continue
            state = cat_states([states[k] for k in members])
            spans = [self.step_span(nodes[k], num_steps) for k in members]
            output = self.shortcuts[str(scale)](state, inputs, spans)
            check_state(f"the shortcut of scale {scale} (built from a copy of the cell {type(self.cell).__name__})", state, output)
            for k, part in zip(members, split_state(output, len(members))):
                results[k] = part
        return results

    def sequence_states(self, x: torch.Tensor, state: Optional[State] = None) -> list[State]:
        """Run the cell step by step and return the exact states at boundaries 1 … T; any T."""
        inputs = self.encode(x, tree_length=False)
        state = self.initial_state(inputs.shape[0], inputs) if state is None else state
        states = []
        for t in range(inputs.shape[1]):
            output = self.cell(inputs[:, t], state)
            check_state(f"the cell ({type(self.cell).__name__})", state, output)
            states.append(state := output)
        return states

    def forward(self, x: torch.Tensor, state: Optional[State] = None) -> torch.Tensor:
        """Run the sequential RNN and return the head's output at every step, ``(B, T, ...)``."""
        readouts = [self.readout(s) for s in self.sequence_states(x, state)]
        return self.head(torch.stack(readouts, dim=1))

    def cut_state(
        self, x: torch.Tensor, depth: Optional[int] = None, cut: Optional[CutLike] = None, state: Optional[State] = None
    ) -> State:
        """Return the state after the whole sequence, through the node modules of a cut in span order.

        Level cut ``depth`` takes one evaluation per shortcut and ``leaf_steps`` per leaf
        instead of T: one for ``depth=0`` (the root shortcut), T for the leaves, which is
        exact. A sequence
        longer than ``max_steps`` runs in windows of ``max_steps`` steps, each through
        its own tree's level cut ``min(depth, L)``, so ``depth=0`` takes one evaluation
        per window. An explicit ``cut`` needs ``T <= max_steps``.
        """
        if depth is not None and cut is not None:
            raise ValueError("pass either depth or cut, not both")
        inputs = self.encode(x, tree_length=cut is not None)
        state = self.initial_state(inputs.shape[0], inputs) if state is None else state
        for start in range(0, inputs.shape[1], self.max_steps):
            window = inputs[:, start : start + self.max_steps]
            tree = self.tree_for(window.shape[1])
            if cut is not None:
                nodes = tree.resolve_cut(cut)
            else:
                nodes = tree.level_cut(tree.depth if depth is None else min(depth, tree.depth))
            for node in nodes:
                (state,) = self.run_nodes([node], [state], window)
        return state

    def approximate_states(self, x: torch.Tensor, sweeps: int = 0, state: Optional[State] = None) -> list[State]:
        """Estimates of the states at boundaries 1 … T from the tree messages.

        The messages take ``L`` rounds and each of ``sweeps`` Jacobi sweeps one more (of
        ``leaf_steps`` steps); a final round runs every leaf from its message. With
        ``sweeps`` at least the number of leaves minus one, the result equals
        ``sequence_states``.
        """
        inputs = self.encode(x)
        tree = self.tree_for(inputs.shape[1])
        state = self.initial_state(inputs.shape[0], inputs) if state is None else state
        messages, _ = tree_messages(self, tree, inputs, state, sweeps)
        leaf_states = self.run_leaves(tree.leaves, [messages[leaf] for leaf in tree.leaves], inputs)
        return [step for steps in leaf_states for step in steps]


def tree_messages(
    model: RecurrentHBLL,
    tree: Tree,
    inputs: torch.Tensor,
    initial: State,
    sweeps: int = 0,
    graph: Optional[TaskGraph] = None,
    stem_task: Optional[Task] = None,
) -> tuple[dict[Node, State], dict[Node, Task]]:
    """Return the detached message of every node, top-down, and record the rounds in ``graph``.

    The root's message is ``initial``; a right child's message is its left sibling's
    module applied to the parent's message. ``sweeps`` Jacobi sweeps
    ``u_{t+1} <- cell(x_t, u_t)`` then refine the leaf messages, all steps at once.
    """
    graph = graph if graph is not None else TaskGraph()
    tasks: dict[Node, Task] = {tree.root: stem_task if stem_task is not None else graph.add("stem")}
    with torch.no_grad():
        inputs = inputs.detach()
        messages = dict.fromkeys(tree.left_spine(tree.root), detach_state(initial))
        for level in tree.levels[:-1]:
            parents = [node for node in level if not node.is_leaf]
            pairs = [tree.children(node) for node in parents]
            for node, (left, right) in zip(parents, pairs):
                tasks[left] = tasks[node]
                tasks[right] = graph.add(f"message {right}", [tasks[node]])
            results = model.run_nodes([left for left, _ in pairs], [messages[node] for node in parents], inputs)
            for (_, right), message in zip(pairs, results):
                messages.update(dict.fromkeys(tree.left_spine(right), message))
        leaves = tree.leaves
        for sweep in range(min(sweeps, len(leaves) - 1)):
            # A sweep is one synchronous round of leaf_steps sequential cell steps.
            round_task = graph.add(f"sweep {sweep}", [tasks[leaf] for leaf in leaves])
            for step in range(1, model.leaf_steps):
                round_task = graph.add(f"sweep {sweep} step {step}", [round_task])
            refined = model.run_nodes(leaves[:-1], [messages[leaf] for leaf in leaves[:-1]], inputs)
            for leaf, message in zip(leaves[1:], refined):
                messages[leaf] = message
                tasks[leaf] = round_task
    return messages, tasks


# Engines --------------------------------------------------------------------------------


class RecurrentEngine:
    """The HBLL-over-time training step: local losses of every node of the tree over time.

    Each node ``[a, b)`` computes ``o_v = M_v(sg(m_v), x_{a:b})`` and learns from

    - its exit term, the task loss of the head on ``o_v`` against the target of step
      ``b - 1``. Leaves read the head itself, so the per-step losses train it as in any
      RNN; internal nodes read it through detached parameters. A leaf of k steps
      (``leaf_steps``) has a per-step loss at each of its steps and backpropagates
      through them;
    - its consistency term with its right child, both estimates of ``h_b``;
    - for leaves of a model with lookahead heads, ``lookahead_weight`` times the loss of
      head j on the leaf's state against the target j steps later.

    The per-step loss trains the state after step t for the target of step t only, and
    no gradient reaches step t from later steps. A state then keeps what the next target
    needs and no more: with one-step leaves, a net trained this way does not learn to
    copy the input from one step back. The lookahead heads ask each state for the next
    h targets as well, so the cell learns to carry information h steps forward, still
    from one cell step's gradient. Leaves of k steps give credit up to k - 1 steps back.

    Leaves read the stem's output with its graph, so the stem learns from the per-step
    losses; shortcuts read it detached. No gradient crosses a node, and none crosses a
    leaf's boundaries in time.

    Args:
        objective: the weights of the exit and consistency terms, with their schedules.
        consistency_sweeps: K Jacobi sweeps that refine the leaf messages. K at least the
            number of leaves minus one gives every leaf its exact state, at the cost of K
            rounds (of ``leaf_steps`` steps each) of critical path.
        sweeps_from: the fraction of training from which the sweeps run.
        lookahead_weight: the weight of the lookahead heads' losses.
    """

    name = "recurrent"

    def __init__(
        self,
        objective: Optional[ObjectiveConfig] = None,
        consistency_sweeps: int = 0,
        sweeps_from: float = 0.0,
        lookahead_weight: float = 1.0,
    ) -> None:
        if lookahead_weight < 0:
            raise ValueError(f"lookahead_weight must be >= 0, got {lookahead_weight}")
        self.lookahead_weight = lookahead_weight
        check_sweep_options(consistency_sweeps, sweeps_from)
        self.objective = objective or ObjectiveConfig()
        self.consistency_sweeps = consistency_sweeps
        self.sweeps_from = sweeps_from

    def compute_losses(self, model: RecurrentHBLL, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one step on sequences ``x`` with per-step targets ``y`` ``(B, T)``."""
        objective = self.objective.at(progress)
        sweeps = self.consistency_sweeps if progress >= self.sweeps_from else 0
        graph = TaskGraph()
        inputs = model.encode(x)
        stem_task = graph.add("stem")
        batch, num_steps = inputs.shape[:2]
        _check_targets(y, batch, num_steps)
        tree = model.tree_for(num_steps)
        initial = model.initial_state(batch, inputs)
        messages, message_tasks = tree_messages(model, tree, inputs, initial, sweeps, graph, stem_task)

        nodes = tree.nodes
        leaves = [node for node in nodes if node.is_leaf]
        internal = [node for node in nodes if not node.is_leaf]
        # Leaves read the inputs with their graph, shortcuts read them detached. A leaf
        # of k steps keeps the state after each step for its per-step losses.
        leaf_states = model.run_leaves(leaves, [messages[n] for n in leaves], inputs)
        step_states = [state for _, states in sorted(zip(leaves, leaf_states)) for state in states]
        step_readouts = torch.stack([model.readout(state) for state in step_states], dim=1)
        outputs = {leaf: states[-1] for leaf, states in zip(leaves, leaf_states)}
        outputs.update(zip(internal, model.run_nodes(internal, [messages[n] for n in internal], inputs.detach())))
        output_tasks = {}
        for node in nodes:
            task = graph.add(f"forward {node}", [message_tasks[node]])
            for step in range(1, model.sequential_evaluations([node], num_steps)):
                task = graph.add(f"forward {node} step {step}", [task])
            output_tasks[node] = task

        parts: dict[str, dict[str, torch.Tensor]] = {}
        total = inputs.new_zeros(())
        exits = self._exit_terms(model, objective, outputs, step_readouts, internal, y)
        for group, (count, value) in exits.items():
            parts.setdefault(group, {})["exit"] = value.detach()
            total = total + objective.exit_weight * count * value
        uses_lookahead = self.lookahead_weight > 0 and len(model.lookahead_heads) > 0
        if uses_lookahead and num_steps > 1:
            lookahead = self._lookahead_term(model, objective, step_readouts, y)
            parts.setdefault("leaves", {})["lookahead"] = lookahead.detach() / num_steps
            total = total + self.lookahead_weight * lookahead
        if objective.consistency_weight > 0 and internal:
            for group, value in self._consistency_terms(model, objective, outputs, tree, internal, num_steps).items():
                parts.setdefault(group, {})["consistency"] = value.detach() / _level_size(tree, group)
                total = total + objective.consistency_weight * value
        self._record_backward(model, tree, num_steps, graph, output_tasks, objective, uses_lookahead)
        return StepResult(total, parts, graph.critical_path, messages, task_graph=graph)

    def _exit_terms(
        self,
        model: RecurrentHBLL,
        objective: ObjectiveConfig,
        outputs: dict[Node, State],
        step_readouts: torch.Tensor,
        internal: list[Node],
        y: torch.Tensor,
    ) -> dict[str, tuple[int, torch.Tensor]]:
        # Per group, the number of terms and their mean: one per step for the leaves, which
        # read the head, and one per internal node for each level, read through the
        # detached head.
        if objective.exit_weight == 0:
            return {}
        result = {"leaves": (step_readouts.shape[1], objective.task_loss(model.head(step_readouts), y))}
        if not internal:
            return result
        num_steps = y.shape[1]
        logits = model.frozen_head(torch.stack([model.readout(outputs[node]) for node in internal]))
        ends = [model.step_span(node, num_steps)[1] - 1 for node in internal]
        targets = y.transpose(0, 1)[torch.tensor(ends, device=y.device)]
        by_level: dict[int, list[int]] = {}
        for k, node in enumerate(internal):
            by_level.setdefault(node.level, []).append(k)
        for level, members in by_level.items():
            index = torch.tensor(members, device=logits.device)
            result[_level_key(level, leaves=False)] = (len(members), objective.task_loss(logits[index], targets[index]))
        return result

    @staticmethod
    def _lookahead_term(model: RecurrentHBLL, objective: ObjectiveConfig, readouts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Head j reads the state after step t and predicts the target of step t + j, summed over steps.
        total = readouts.new_zeros(())
        num_steps = readouts.shape[1]
        for j, head in enumerate(model.lookahead_heads, start=1):
            if j < num_steps:
                total = total + (num_steps - j) * objective.task_loss(head(readouts[:, :-j]), y[:, j:])
        return total

    def _consistency_terms(
        self,
        model: RecurrentHBLL,
        objective: ObjectiveConfig,
        outputs: dict[Node, State],
        tree: Tree,
        internal: list[Node],
        num_steps: int,
    ) -> dict[str, torch.Tensor]:
        # All internal nodes at once: node v's coarse half and its right child's fine half.
        rights = [tree.children(node)[1] for node in internal]
        coarse = torch.stack([flat_state(outputs[node]) for node in internal])
        fine = torch.stack([flat_state(outputs[node]) for node in rights])
        log_sigma = torch.stack([model.log_sigma[str(model.scale(node, num_steps))] for node in internal])
        coarse_terms, fine_terms = consistency_terms(coarse, fine, log_sigma, objective.consistency_lambda, per_row=True)
        sums: dict[str, torch.Tensor] = {}
        for k, (node, right) in enumerate(zip(internal, rights)):
            for owner, term in ((node, coarse_terms[k]), (right, fine_terms[k])):
                key = _level_key(owner.level, owner.is_leaf)
                sums[key] = sums[key] + term if key in sums else term
        return sums

    @staticmethod
    def _record_backward(
        model: RecurrentHBLL,
        tree: Tree,
        num_steps: int,
        graph: TaskGraph,
        output_tasks: dict[Node, Task],
        objective: ObjectiveConfig,
        lookahead: bool,
    ) -> None:
        loss_deps: dict[Node, list[Task]] = {node: [output_tasks[node]] for node in tree.nodes}
        for node in tree.nodes:
            if objective.exit_weight > 0:
                loss_deps[node] = [graph.add(f"exit {node}", [output_tasks[node]])]
            if lookahead and node.is_leaf:
                loss_deps[node].append(graph.add(f"lookahead {node}", [output_tasks[node]]))
            if node.is_leaf or objective.consistency_weight == 0:
                continue
            _, right = tree.children(node)
            loss_deps[node].append(output_tasks[right])
            loss_deps[right].append(output_tasks[node])
        # Each node's gradient runs through its exit and its own module; the stem's
        # backward waits for the leaves, which read it with its graph.
        leaf_backward = []
        for node in tree.nodes:
            task = graph.add(f"backward exit {node}", loss_deps[node])
            # A leaf of k steps backpropagates through its k cell steps.
            for _ in range(model.sequential_evaluations([node], num_steps)):
                task = graph.add(f"backward {node}", [task])
            if node.is_leaf:
                leaf_backward.append(task)
        graph.add("backward stem", leaf_backward)


def _level_key(level: int, leaves: bool) -> str:
    return "leaves" if leaves else f"level{level}"


def _level_size(tree: Tree, key: str) -> int:
    if key == "leaves":
        return tree.num_blocks
    level = int(key.removeprefix("level"))
    return sum(not node.is_leaf for node in tree.levels[level])


def _check_targets(y: torch.Tensor, batch: int, num_steps: int) -> None:
    if y.shape[:2] != (batch, num_steps):
        raise ValueError(
            f"targets of shape {tuple(y.shape)} do not match the sequence's (batch, time) = {(batch, num_steps)}; "
            "a recurrent model takes one target per step"
        )


class BPTTEngine:
    """Backpropagation through time, full or truncated, on the model's sequential RNN.

    Args:
        objective: the task loss (the HBLL weights are unused).
        truncation: k, the window of truncated BPTT: the state is detached every k steps,
            so no gradient runs further back than k steps. None backpropagates through the
            whole sequence.

    The loss is the mean task loss over all steps. The forward pass is a chain of T cell
    steps either way; the backward pass of the last window then takes k (or T) more.
    """

    def __init__(self, objective: Optional[ObjectiveConfig] = None, truncation: Optional[int] = None) -> None:
        if truncation is not None and truncation < 1:
            raise ValueError(f"truncation must be >= 1 or None, got {truncation}")
        self.objective = objective or ObjectiveConfig()
        self.truncation = truncation
        self.name = "bptt" if truncation is None else f"tbptt{truncation}"

    def compute_losses(self, model: RecurrentHBLL, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one step; ``progress`` is accepted for a common interface and unused."""
        graph = TaskGraph()
        inputs = model.encode(x)
        batch, num_steps = inputs.shape[:2]
        _check_targets(y, batch, num_steps)
        window = self.truncation or num_steps
        state = model.initial_state(batch, inputs)
        forward = [graph.add("stem")]
        readouts = []
        for t in range(num_steps):
            if t % window == 0:
                state = detach_state(state)
            output = model.cell(inputs[:, t], state)
            check_state(f"the cell ({type(model.cell).__name__})", state, output)
            state = output
            readouts.append(model.readout(state))
            forward.append(graph.add(f"forward {t}", [forward[-1]]))
        loss = self.objective.task_loss(model.head(torch.stack(readouts, dim=1)), y)

        # The head runs once over all steps; each window's backward chain starts from it
        # and runs back to the window's first step.
        head_backward = graph.add("backward head", [graph.add("head", [forward[-1]])])
        window_starts = []
        for start in range(0, num_steps, window):
            task = head_backward
            for _ in range(min(window, num_steps - start)):
                task = graph.add("backward", [task])
            window_starts.append(task)
        graph.add("backward stem", window_starts)
        return StepResult(loss, {"full": {"task": loss.detach()}}, graph.critical_path, task_graph=graph)


def build_recurrent_engine(
    method: str,
    objective: Optional[ObjectiveConfig] = None,
    consistency_sweeps: int = 0,
    sweeps_from: float = 0.0,
    lookahead_weight: float = 1.0,
) -> RecurrentEngine | BPTTEngine:
    """Return the engine of ``method`` for a ``RecurrentHBLL``: ``"hbll"``, ``"backprop"`` or ``"tbptt<k>"``.

    Backprop through time trains the sequential net only; the shortcuts and the lookahead
    heads get no gradient.
    """
    kind, truncation = parse_method(method)
    if kind == "hbll":
        return RecurrentEngine(objective, consistency_sweeps, sweeps_from, lookahead_weight)
    return BPTTEngine(objective, truncation)
