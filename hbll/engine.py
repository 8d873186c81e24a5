"""Training-step engines: the HBLL reference engine and the backprop baseline.

An engine computes the loss of one training step and records the task graph it executed.
The caller owns ``loss.backward()`` and the optimizer step, so the same engine serves a
plain PyTorch loop, the Lightning strategy and later distributed engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Protocol, Sequence

import torch

from hbll.critical_path import Task, TaskGraph
from hbll.model import HBLLModel, check_hidden_shape
from hbll.objectives import ObjectiveConfig, consistency_terms
from hbll.tree import Node

__all__ = [
    "StepResult",
    "Route",
    "NodeComm",
    "LocalComm",
    "ReferenceEngine",
    "BackpropEngine",
    "build_engine",
    "train_step",
]


@dataclass(frozen=True)
class Route:
    """A tensor that the owner of ``producer`` computes and the owners of ``consumers`` read.

    ``key`` names the tensor within one exchange. Every tensor has the shape of
    ``hidden_states`` unless ``scalar`` is set.
    """

    key: Hashable
    producer: Node
    consumers: tuple[Node, ...]
    scalar: bool = False


class NodeComm(Protocol):
    """Placement of the tree's nodes on processes, and the transport of tensors between their owners.

    The reference engine runs the same code in one process and in many: it computes the
    nodes that ``owns`` accepts, and calls ``exchange`` at every point where one node's
    owner needs a tensor that another node's owner computed. Every process must call
    ``exchange`` with the same routes in the same order.
    """

    def owns(self, node: Node) -> bool:
        """Return whether this process computes ``node``."""
        ...

    def begin_step(self, hidden_states: Optional[torch.Tensor]) -> None:
        """Start a step; ``hidden_states`` is ``z_0`` where this process ran the stem, else None."""
        ...

    def exchange(
        self, produced: Mapping[Hashable, torch.Tensor], routes: Sequence[Route]
    ) -> dict[Hashable, torch.Tensor]:
        """Return the tensors of ``routes`` that this process produced or consumes, by key."""
        ...


class LocalComm:
    """Every node lives in this process, so an exchange returns what was produced."""

    def owns(self, node: Node) -> bool:
        return True

    def begin_step(self, hidden_states: Optional[torch.Tensor]) -> None:
        pass

    def exchange(
        self, produced: Mapping[Hashable, torch.Tensor], routes: Sequence[Route]
    ) -> dict[Hashable, torch.Tensor]:
        return dict(produced)


@dataclass
class StepResult:
    """The outcome of one engine step.

    Attributes:
        loss: the sum of all local losses; ``loss.backward()`` gives every node its local
            gradient.
        node_losses: per node name, the detached ``"exit"`` and ``"consistency"`` parts of
            its loss (the backprop engine reports one entry, ``"full"``, with ``"task"``).
        critical_path: sequential module evaluations of the executed task graph, forward
            and backward.
        messages: the detached message of every node, by node (empty for backprop).
        local_losses: the loss ``L_v`` of every node with its autograd graph, by node
            (empty for backprop); their sum is ``loss``.
        task_graph: the recorded task graph.
    """

    loss: torch.Tensor
    node_losses: dict[str, dict[str, torch.Tensor]]
    critical_path: int
    messages: dict[Node, torch.Tensor] = field(default_factory=dict)
    local_losses: dict[Node, torch.Tensor] = field(default_factory=dict)
    task_graph: TaskGraph = field(default_factory=TaskGraph)


def check_sweep_options(consistency_sweeps: int, sweeps_from: float) -> None:
    """Raise if the number of Jacobi sweeps or the fraction of training they start at is invalid."""
    if consistency_sweeps < 0:
        raise ValueError(f"consistency_sweeps must be >= 0, got {consistency_sweeps}")
    if not 0.0 <= sweeps_from <= 1.0:
        raise ValueError(f"sweeps_from must be in [0, 1], got {sweeps_from}")


class ReferenceEngine:
    """The HBLL training step, one node at a time in one process.

    This engine defines the semantics that other engines must reproduce.

    Args:
        objective: weights of the local objectives, with their schedules.
        consistency_sweeps: K, the number of Jacobi sweeps that refine the leaf messages.
            After N - 1 sweeps the leaf messages are exact, so larger values are clamped to
            N - 1 and cost nothing extra. Each sweep adds one round to the critical path.
        sweeps_from: the fraction of training (0 to 1) from which the sweeps run; before
            it a step runs no sweeps. 0 runs them from the first step.
        chain_length: c, the leaves that train on chained inputs in each step. A step
            draws a random leaf s and replaces the messages of leaves s + 1 … s + c with
            ``B_{i-1}(u_{i-1})`` chained from leaf s's message, so those leaves see the
            activations the full network feeds them at inference. The chain adds c
            rounds to the critical path; ``chain_length=N`` trains a random suffix of
            the network on chained inputs, at O(N) critical path.
        chained_exit_weight: the weight of an extra exit term that trains every leaf
            i >= 2 on a pipelined chained input (0 turns the pipeline off). The engine
            keeps one buffered activation per leaf: in each step leaf i runs on the
            activation that leaf i - 1 produced in the previous step, adds
            ``chained_exit_weight * task(A_{i+1}(B_i(h)), y)`` with the labels that came
            with it, and passes its detached output on to leaf i + 1. The pipeline
            starts from leaf 1's output on the current batch, which is exact, so leaf i
            trains on the full network's activation of the batch from i - 1 steps
            before, computed by blocks up to i - 1 steps old. These evaluations read
            only the buffer, which exists when the step starts, so they add nothing to
            the critical path. The buffer fills in the first N - 2 steps.
        chained_exit_trains_head: whether the chained exit of the last leaf trains the
            final head. With False it reads the head through detached parameters, so
            only the nodes that end at boundary N on message inputs train the head
            that every cut shares.
        comm: where the nodes live (see ``NodeComm``); by default all in this process.
            ``hbll.distributed.TreeComm`` spreads them over processes, and the engine
            then computes the local losses of this process's nodes only.

    ``compute_losses`` takes ``progress``, the fraction of training done, which drives the
    schedules above and those of ``objective``. Without it the schedules sit at their
    final values.
    """

    name = "reference"

    def __init__(
        self,
        objective: Optional[ObjectiveConfig] = None,
        consistency_sweeps: int = 0,
        sweeps_from: float = 0.0,
        chain_length: int = 0,
        chained_exit_weight: float = 3.0,
        chained_exit_trains_head: bool = True,
        comm: Optional[NodeComm] = None,
    ) -> None:
        check_sweep_options(consistency_sweeps, sweeps_from)
        if chain_length < 0:
            raise ValueError(f"chain_length must be >= 0, got {chain_length}")
        if chained_exit_weight < 0:
            raise ValueError(f"chained_exit_weight must be >= 0, got {chained_exit_weight}")
        self.objective = objective or ObjectiveConfig()
        self.consistency_sweeps = consistency_sweeps
        self.sweeps_from = sweeps_from
        self.chain_length = chain_length
        self.chained_exit_weight = chained_exit_weight
        self.chained_exit_trains_head = chained_exit_trains_head
        self.comm = comm or LocalComm()
        # pipeline[i]: a detached chained activation at boundary i and its labels, for the
        # leaves this process owns. _pipeline_labels and _pipeline_states contain the labels
        # and the batch context of every boundary.
        self.pipeline: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pipeline_labels: dict[int, torch.Tensor] = {}
        self._pipeline_states: dict[int, Any] = {}

    def run_modules(self, modules: Sequence[Callable[[torch.Tensor], torch.Tensor]], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return ``modules[k](inputs[k])`` for every k; the modules of one call are independent.

        The reference engine calls them one after another. ``FusedEngine`` runs modules
        of one structure as one batched call.
        """
        return [module(module_input) for module, module_input in zip(modules, inputs)]

    def reset_pipeline(self) -> None:
        """Empty the buffer of pipelined chained activations, for example after loading weights."""
        self.pipeline = {}
        self._pipeline_labels = {}
        self._pipeline_states = {}

    def compute_losses(self, model: HBLLModel, x: Any, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one HBLL step on the batch ``(x, y)`` and return the summed local losses.

        ``progress`` is the fraction of training done, from 0 to 1. With a ``comm`` that
        places nodes on several processes, the result contains the losses of this process's
        nodes only, and its critical path is that of the whole step. ``x`` is whatever the
        stem takes, for example a mapping of ``input_ids`` and ``attention_mask``.
        """
        with model.batch(x) as batch_state:
            return self._compute_losses(model, x, y, progress, batch_state)

    def _compute_losses(self, model: HBLLModel, x: Any, y: torch.Tensor, progress: float, batch_state: Any) -> StepResult:
        objective = self.objective.at(progress)
        sweeps = self.consistency_sweeps if progress >= self.sweeps_from else 0
        tree, comm = model.tree, self.comm
        graph = TaskGraph()
        # Nodes whose span starts at 0 read z_0 with its graph, so only their owners run the stem.
        needs_stem = any(comm.owns(node) for node in tree.left_spine(tree.root))
        hidden_states = model.stem(x) if needs_stem else None
        stem_task = graph.add("stem")
        comm.begin_step(hidden_states)

        messages, message_tasks = self._forward_messages(model, hidden_states, stem_task, graph)
        self._refine_leaf_messages(model, messages, message_tasks, graph, sweeps)
        self._chain_leaf_messages(model, messages, message_tasks, graph)
        outputs, output_tasks = self._node_outputs(model, hidden_states, messages, message_tasks, graph)
        local_losses = self._local_losses(model, objective, outputs, output_tasks, messages, y, graph)
        if self.chained_exit_weight > 0:
            self._add_chained_exits(model, objective, outputs, y, batch_state, local_losses, graph)
        node_losses = {
            node.name: {part: value.detach() for part, value in parts.items() if part != "total"}
            for node, parts in local_losses.items()
        }
        losses = {node: parts["total"] for node, parts in local_losses.items()}
        loss = torch.stack(list(losses.values())).sum()
        return StepResult(loss, node_losses, graph.critical_path, messages, losses, graph)

    def _forward_messages(
        self, model: HBLLModel, hidden_states: Optional[torch.Tensor], stem_task: Task, graph: TaskGraph
    ) -> tuple[dict[Node, torch.Tensor], dict[Node, Task]]:
        # Level l + 1 needs only level l, so all messages exist after L rounds. Messages
        # carry no gradient: they are the detached inputs of the nodes below. The message
        # of a right child r is also the message of every node that starts where r starts.
        tree, comm = model.tree, self.comm
        messages: dict[Node, torch.Tensor] = {}
        if hidden_states is not None:
            messages.update(dict.fromkeys(tree.left_spine(tree.root), hidden_states.detach()))
        tasks = {tree.root: stem_task}
        with torch.no_grad():
            for level in tree.levels[:-1]:
                routes, jobs = [], []
                for node in level:
                    if node.is_leaf:
                        continue
                    left, right = tree.children(node)
                    tasks[left] = tasks[node]
                    tasks[right] = graph.add(f"message {right}", [tasks[node]])
                    routes.append(Route(("message", right), left, tuple(tree.left_spine(right))))
                    if comm.owns(left):
                        jobs.append((node, left, right))
                results = self.run_modules([model.node_module(left) for _, left, _ in jobs], [messages[node] for node, _, _ in jobs])
                produced = {}
                for (node, left, right), right_message in zip(jobs, results):
                    check_hidden_shape(left, messages[node], right_message)
                    produced[("message", right)] = right_message
                for (_, right), message in comm.exchange(produced, routes).items():
                    messages.update(dict.fromkeys(tree.left_spine(right), message))
        return messages, tasks

    def _refine_leaf_messages(
        self, model: HBLLModel, messages: dict[Node, torch.Tensor], tasks: dict[Node, Task], graph: TaskGraph, sweeps: int
    ) -> None:
        # Jacobi sweeps u_i <- B_{i-1}(u_{i-1}) for all i >= 1 at once. Each sweep is one
        # synchronous round over all leaves, so its task waits for the whole previous round.
        leaves, comm = model.tree.leaves, self.comm
        sweeps = min(sweeps, len(leaves) - 1)
        with torch.no_grad():
            for sweep in range(sweeps):
                round_task = graph.add(f"sweep {sweep}", [tasks[leaf] for leaf in leaves])
                routes, sources = [], []
                for i in range(1, len(leaves)):
                    routes.append(Route(("sweep", leaves[i]), leaves[i - 1], (leaves[i],)))
                    if comm.owns(leaves[i - 1]):
                        sources.append(i - 1)
                    tasks[leaves[i]] = round_task
                results = self.run_modules([model.blocks[i] for i in sources], [messages[leaves[i]] for i in sources])
                produced = {("sweep", leaves[i + 1]): message for i, message in zip(sources, results)}
                for (_, leaf), message in comm.exchange(produced, routes).items():
                    messages[leaf] = message

    def _chain_leaf_messages(
        self, model: HBLLModel, messages: dict[Node, torch.Tensor], tasks: dict[Node, Task], graph: TaskGraph
    ) -> None:
        # A chain of c sequential block evaluations from a random leaf's message; the
        # random start comes from torch's global generator, so seeding makes it repeatable.
        leaves, comm = model.tree.leaves, self.comm
        if self.chain_length == 0 or len(leaves) < 2:
            return
        start = int(torch.randint(0, len(leaves) - 1, ()))
        end = min(start + self.chain_length, len(leaves) - 1)
        with torch.no_grad():
            for i in range(start + 1, end + 1):
                produced = {}
                if comm.owns(leaves[i - 1]):
                    produced[("chain", leaves[i])] = model.blocks[i - 1](messages[leaves[i - 1]])
                route = Route(("chain", leaves[i]), leaves[i - 1], (leaves[i],))
                for (_, leaf), message in comm.exchange(produced, [route]).items():
                    messages[leaf] = message
                tasks[leaves[i]] = graph.add(f"chain {leaves[i]}", [tasks[leaves[i - 1]]])

    def _node_outputs(
        self,
        model: HBLLModel,
        hidden_states: Optional[torch.Tensor],
        messages: dict[Node, torch.Tensor],
        message_tasks: dict[Node, Task],
        graph: TaskGraph,
    ) -> tuple[dict[Node, torch.Tensor], dict[Node, Task]]:
        # Nodes whose span starts at 0 read z_0 with its graph, so the stem learns through
        # them. Every other node reads its detached message, so no gradient crosses a node.
        tasks = {node: graph.add(f"forward {node}", [message_tasks[node]]) for node in model.tree.nodes}
        owned = [node for node in model.tree.nodes if self.comm.owns(node)]
        inputs = [hidden_states if node.start == 0 else messages[node].detach() for node in owned]
        outputs = dict(zip(owned, self.run_modules([model.node_module(node) for node in owned], inputs)))
        for node, node_input in zip(owned, inputs):
            check_hidden_shape(node, node_input, outputs[node])
        return outputs, tasks

    def _local_losses(
        self,
        model: HBLLModel,
        objective: ObjectiveConfig,
        outputs: dict[Node, torch.Tensor],
        output_tasks: dict[Node, Task],
        messages: dict[Node, torch.Tensor],
        y: torch.Tensor,
        graph: TaskGraph,
    ) -> dict[Node, dict[str, torch.Tensor]]:
        """Return, per owned node, its ``"exit"`` and ``"consistency"`` terms and their weighted ``"total"``."""
        tree, comm = model.tree, self.comm
        owned = [node for node in tree.nodes if comm.owns(node)]
        zero = outputs[owned[0]].new_zeros(())
        exit_terms = dict.fromkeys(owned, zero)
        consistency = dict.fromkeys(owned, zero)
        loss_deps: dict[Node, list[Task]] = {node: [output_tasks[node]] for node in tree.nodes}
        use_consistency = objective.consistency_weight > 0
        peers = self._exchange_consistency_peers(model, outputs) if use_consistency else {}
        if objective.exit_weight > 0:
            all_logits = self.run_modules([model.exit_head(node.end) for node in owned], [outputs[node] for node in owned])
            exit_terms = {node: objective.task_loss(logits, y) for node, logits in zip(owned, all_logits)}

        for node in tree.nodes:
            if objective.exit_weight > 0:
                loss_deps[node] = [graph.add(f"exit {node}", [output_tasks[node]])]
            if node.is_leaf or not use_consistency:
                continue
            _, right = tree.children(node)
            loss_deps[node].append(output_tasks[right])
            loss_deps[right].append(output_tasks[node])
            if not (comm.owns(node) or comm.owns(right)):
                continue
            if comm.owns(node):
                coarse_output, log_sigma = outputs[node], model.log_sigma[node.name]
                if node.start == 0 and not objective.stem_consistency:
                    # The same shortcut output, but from a detached z_0: the stem could
                    # otherwise lower this term by collapsing z_0 so that estimates agree.
                    # The extra evaluation runs in the same round as the node's forward.
                    coarse_output = model.node_module(node)(messages[node].detach())
            else:
                coarse_output, log_sigma = peers[("output", node)], peers[("log_sigma", node)]
            fine_output = outputs[right] if comm.owns(right) else peers[("output", right)]
            coarse, fine = consistency_terms(coarse_output, fine_output, log_sigma, objective.consistency_lambda)
            if comm.owns(node):
                consistency[node] = consistency[node] + coarse
            if comm.owns(right):
                consistency[right] = consistency[right] + fine

        # Backward: each node's gradient runs through its exit head and its own module
        # only. The stem's backward waits for the nodes whose span starts at 0.
        stem_deps = []
        for node in tree.nodes:
            exit_backward = graph.add(f"backward exit {node}", loss_deps[node])
            node_backward = graph.add(f"backward {node}", [exit_backward])
            if node.start == 0:
                stem_deps.append(node_backward)
        graph.add("backward stem", stem_deps)

        return {
            node: {
                "exit": exit_terms[node],
                "consistency": consistency[node],
                "total": objective.exit_weight * exit_terms[node] + objective.consistency_weight * consistency[node],
            }
            for node in owned
        }

    def _exchange_consistency_peers(
        self, model: HBLLModel, outputs: dict[Node, torch.Tensor]
    ) -> dict[tuple[str, Node], torch.Tensor]:
        # Each consistency pair (node, right child) needs the other side's detached output,
        # and the right child needs the node's σ; these are the only values besides the
        # messages that move between the owners of two nodes.
        tree, comm = model.tree, self.comm
        consumers: dict[tuple[str, Node], list[Node]] = {}
        for node in tree.internal_nodes:
            _, right = tree.children(node)
            consumers.setdefault(("output", node), []).append(right)
            consumers.setdefault(("log_sigma", node), []).append(right)
            consumers.setdefault(("output", right), []).append(node)
        routes = [Route(key, key[1], tuple(nodes), scalar=key[0] == "log_sigma") for key, nodes in consumers.items()]
        produced = {}
        for kind, node in consumers:
            if comm.owns(node):
                produced[(kind, node)] = (outputs[node] if kind == "output" else model.log_sigma[node.name]).detach()
        return comm.exchange(produced, routes)

    def _add_chained_exits(
        self,
        model: HBLLModel,
        objective: ObjectiveConfig,
        outputs: dict[Node, torch.Tensor],
        y: torch.Tensor,
        batch_state: Any,
        local_losses: dict[Node, dict[str, torch.Tensor]],
        graph: TaskGraph,
    ) -> None:
        leaves, comm = model.tree.leaves, self.comm
        if len(leaves) < 3:
            return
        # Every process tracks the labels and the batch context of every buffer, so only
        # activations move.
        next_labels, next_states = {2: y}, {2: batch_state}
        routes = [Route(("pipeline", 2), leaves[1], (leaves[2],))]
        produced = {("pipeline", 2): outputs[leaves[1]].detach()} if comm.owns(leaves[1]) else {}
        jobs: list[int] = []
        for i in range(2, len(leaves)):
            if i not in self._pipeline_labels:
                continue
            labels = self._pipeline_labels[i]
            if i + 1 < len(leaves):
                next_labels[i + 1] = labels
                next_states[i + 1] = self._pipeline_states[i]
                routes.append(Route(("pipeline", i + 1), leaves[i], (leaves[i + 1],)))
            # The buffered input exists when the step starts: a forward, an exit head and
            # their backward, all off the critical path.
            task = graph.add(f"chained forward {leaves[i]}")
            task = graph.add(f"chained exit {leaves[i]}", [task])
            graph.add(f"backward chained {leaves[i]}", [graph.add(f"backward chained exit {leaves[i]}", [task])])
            if comm.owns(leaves[i]):
                jobs.append(i)
        # Each buffer came with its own batch, so blocks that read a batch context run one
        # at a time inside it.
        blocks, inputs = [model.blocks[i] for i in jobs], [self.pipeline[i][0] for i in jobs]
        if model.context is None:
            block_outputs = self.run_modules(blocks, inputs)
        else:
            block_outputs = []
            for i, block, block_input in zip(jobs, blocks, inputs):
                with model.batch_state(self._pipeline_states[i]):
                    block_outputs.append(block(block_input))
        heads = [
            model.frozen_head if i + 1 == len(leaves) and not self.chained_exit_trains_head else model.exit_head(i + 1)
            for i in jobs
        ]
        for i, output, logits in zip(jobs, block_outputs, self.run_modules(heads, block_outputs)):
            chained_exit = objective.task_loss(logits, self._pipeline_labels[i])
            parts = local_losses[leaves[i]]
            parts["chained_exit"] = chained_exit
            parts["total"] = parts["total"] + self.chained_exit_weight * chained_exit
            if i + 1 < len(leaves):
                produced[("pipeline", i + 1)] = output.detach()
        received = comm.exchange(produced, routes)
        self.pipeline = {
            i: (received[("pipeline", i)], labels)
            for i, labels in next_labels.items()
            if comm.owns(leaves[i]) and ("pipeline", i) in received
        }
        self._pipeline_labels = next_labels
        self._pipeline_states = next_states


class BackpropEngine:
    """End-to-end backprop through the full network: stem, all N blocks, head.

    It trains exactly the network that ``model(x)`` runs, so comparisons with HBLL use the
    same architecture. Shortcuts and exit heads receive no gradient.
    """

    name = "backprop"

    def __init__(self, objective: Optional[ObjectiveConfig] = None) -> None:
        self.objective = objective or ObjectiveConfig()

    def compute_losses(self, model: HBLLModel, x: Any, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one backprop step; ``progress`` is accepted for a common interface and unused."""
        with model.batch(x):
            return self._compute_losses(model, x, y)

    def _compute_losses(self, model: HBLLModel, x: Any, y: torch.Tensor) -> StepResult:
        graph = TaskGraph()
        forward_tasks = [graph.add("stem")]
        hidden_states = model.stem(x)
        for node in model.tree.leaves:
            output = model.blocks[node.start](hidden_states)
            check_hidden_shape(node, hidden_states, output)
            hidden_states = output
            forward_tasks.append(graph.add(f"forward {node}", [forward_tasks[-1]]))
        logits = model.head(hidden_states)
        forward_tasks.append(graph.add("head", [forward_tasks[-1]]))
        loss = self.objective.task_loss(logits, y)

        # The backward pass is the forward chain in reverse: 2N + 4 evaluations in all.
        backward_task = forward_tasks[-1]
        for _ in reversed(forward_tasks):
            backward_task = graph.add("backward", [backward_task])
        return StepResult(loss, {"full": {"task": loss.detach()}}, graph.critical_path, task_graph=graph)


ENGINES = ("auto", "fused", "reference")


def build_engine(
    method: str, objective: Optional[ObjectiveConfig] = None, engine: str = "auto", **engine_options
) -> ReferenceEngine | BackpropEngine:
    """Return the engine for ``method``: ``"hbll"`` or ``"backprop"``.

    ``engine`` picks how an HBLL step runs: ``"fused"`` batches the module calls of each
    round (``hbll.fused.FusedEngine``), ``"reference"`` runs them one at a time, and
    ``"auto"`` (the default) batches on CUDA devices and runs one at a time on the CPU,
    where batched convolutions and attention measured slower. ``engine_options`` go to
    the engine: ``consistency_sweeps``, ``sweeps_from``, ``chain_length``,
    ``chained_exit_weight``, ``chained_exit_trains_head`` and ``comm``. Backprop has no
    such options and ignores them, so one set of settings can build both engines of a
    comparison.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if method == "hbll":
        if engine == "reference":
            return ReferenceEngine(objective, **engine_options)
        from hbll.fused import FusedEngine

        return FusedEngine(objective, device_types=("cuda",) if engine == "auto" else None, **engine_options)
    if method == "backprop":
        return BackpropEngine(objective)
    raise ValueError(f"method must be 'hbll' or 'backprop', got {method!r}")


def train_step(
    engine: ReferenceEngine | BackpropEngine,
    model: HBLLModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    progress: float = 1.0,
) -> StepResult:
    """Run one full training step: local losses, one ``backward()``, one optimizer step.

    ``progress`` is the fraction of training done, which drives the engine's schedules.
    """
    optimizer.zero_grad(set_to_none=True)
    result = engine.compute_losses(model, x, y, progress)
    result.loss.backward()
    optimizer.step()
    return result
