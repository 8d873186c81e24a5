"""Training-step engines: the HBLL reference engine and the backprop baseline.

An engine computes the loss of one training step and records the task graph it executed.
The caller owns ``loss.backward()`` and the optimizer step, so the same engine serves a
plain PyTorch loop, the Lightning strategy and later distributed engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from hbll.critical_path import Task, TaskGraph
from hbll.model import HBLLModel, check_hidden_shape
from hbll.objectives import ObjectiveConfig, consistency_terms
from hbll.tree import Node

__all__ = ["StepResult", "ReferenceEngine", "BackpropEngine", "build_engine", "train_step"]


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
    ) -> None:
        if consistency_sweeps < 0:
            raise ValueError(f"consistency_sweeps must be >= 0, got {consistency_sweeps}")
        if not 0.0 <= sweeps_from <= 1.0:
            raise ValueError(f"sweeps_from must be in [0, 1], got {sweeps_from}")
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
        # pipeline[i]: a detached chained activation at boundary i and its labels.
        self.pipeline: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_pipeline(self) -> None:
        """Empty the buffer of pipelined chained activations, for example after loading weights."""
        self.pipeline = {}

    def compute_losses(self, model: HBLLModel, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one HBLL step on the batch ``(x, y)`` and return the summed local losses.

        ``progress`` is the fraction of training done, from 0 to 1.
        """
        objective = self.objective.at(progress)
        sweeps = self.consistency_sweeps if progress >= self.sweeps_from else 0
        graph = TaskGraph()
        hidden_states = model.stem(x)
        stem_task = graph.add("stem")

        messages, message_tasks = self._forward_messages(model, hidden_states.detach(), stem_task, graph)
        self._refine_leaf_messages(model, messages, message_tasks, graph, sweeps)
        self._chain_leaf_messages(model, messages, message_tasks, graph)
        outputs, output_tasks = self._node_outputs(model, hidden_states, messages, message_tasks, graph)
        local_losses = self._local_losses(model, objective, outputs, output_tasks, messages, y, graph)
        if self.chained_exit_weight > 0:
            self._add_chained_exits(model, objective, outputs, y, local_losses, graph)
        node_losses = {
            node.name: {part: value.detach() for part, value in parts.items() if part != "total"}
            for node, parts in local_losses.items()
        }
        losses = {node: parts["total"] for node, parts in local_losses.items()}
        loss = torch.stack(list(losses.values())).sum()
        return StepResult(loss, node_losses, graph.critical_path, messages, losses, graph)

    def _forward_messages(
        self, model: HBLLModel, z0: torch.Tensor, stem_task: Task, graph: TaskGraph
    ) -> tuple[dict[Node, torch.Tensor], dict[Node, Task]]:
        # Level l + 1 needs only level l, so all messages exist after L rounds. Messages
        # carry no gradient: they are the detached inputs of the nodes below.
        tree = model.tree
        messages = {tree.root: z0}
        tasks = {tree.root: stem_task}
        with torch.no_grad():
            for level in tree.levels[:-1]:
                for node in level:
                    if node.is_leaf:
                        continue
                    left, right = tree.children(node)
                    messages[left], tasks[left] = messages[node], tasks[node]
                    right_message = model.node_module(left)(messages[node])
                    check_hidden_shape(left, messages[node], right_message)
                    messages[right] = right_message
                    tasks[right] = graph.add(f"message {right}", [tasks[node]])
        return messages, tasks

    def _refine_leaf_messages(
        self, model: HBLLModel, messages: dict[Node, torch.Tensor], tasks: dict[Node, Task], graph: TaskGraph, sweeps: int
    ) -> None:
        # Jacobi sweeps u_i <- B_{i-1}(u_{i-1}) for all i >= 1 at once. Each sweep is one
        # synchronous round over all leaves, so its task waits for the whole previous round.
        leaves = model.tree.leaves
        sweeps = min(sweeps, len(leaves) - 1)
        with torch.no_grad():
            for sweep in range(sweeps):
                previous = [messages[leaf] for leaf in leaves]
                round_task = graph.add(f"sweep {sweep}", [tasks[leaf] for leaf in leaves])
                for i in range(1, len(leaves)):
                    messages[leaves[i]] = model.blocks[i - 1](previous[i - 1])
                    tasks[leaves[i]] = round_task

    def _chain_leaf_messages(
        self, model: HBLLModel, messages: dict[Node, torch.Tensor], tasks: dict[Node, Task], graph: TaskGraph
    ) -> None:
        # A chain of c sequential block evaluations from a random leaf's message; the
        # random start comes from torch's global generator, so seeding makes it repeatable.
        leaves = model.tree.leaves
        if self.chain_length == 0 or len(leaves) < 2:
            return
        start = int(torch.randint(0, len(leaves) - 1, ()))
        end = min(start + self.chain_length, len(leaves) - 1)
        with torch.no_grad():
            for i in range(start + 1, end + 1):
                messages[leaves[i]] = model.blocks[i - 1](messages[leaves[i - 1]])
                tasks[leaves[i]] = graph.add(f"chain {leaves[i]}", [tasks[leaves[i - 1]]])

    def _node_outputs(
        self,
        model: HBLLModel,
        hidden_states: torch.Tensor,
        messages: dict[Node, torch.Tensor],
        message_tasks: dict[Node, Task],
        graph: TaskGraph,
    ) -> tuple[dict[Node, torch.Tensor], dict[Node, Task]]:
        # Nodes whose span starts at 0 read z_0 with its graph, so the stem learns through
        # them. Every other node reads its detached message, so no gradient crosses a node.
        outputs, tasks = {}, {}
        for node in model.tree.nodes:
            node_input = hidden_states if node.start == 0 else messages[node].detach()
            outputs[node] = model.node_module(node)(node_input)
            check_hidden_shape(node, node_input, outputs[node])
            tasks[node] = graph.add(f"forward {node}", [message_tasks[node]])
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
        """Return, per node, its ``"exit"`` and ``"consistency"`` terms and their weighted ``"total"``."""
        tree = model.tree
        zero = outputs[tree.root].new_zeros(())
        exit_terms = {node: zero for node in tree.nodes}
        consistency = {node: zero for node in tree.nodes}
        loss_deps: dict[Node, list[Task]] = {node: [output_tasks[node]] for node in tree.nodes}

        for node in tree.nodes:
            if objective.exit_weight > 0:
                logits = model.exit_head(node.end)(outputs[node])
                exit_terms[node] = objective.task_loss(logits, y)
                loss_deps[node] = [graph.add(f"exit {node}", [output_tasks[node]])]
            if node.is_leaf or objective.consistency_weight == 0:
                continue
            _, right = tree.children(node)
            coarse_output = outputs[node]
            if node.start == 0 and not objective.stem_consistency:
                # The same shortcut output, but from a detached z_0: the stem could
                # otherwise lower this term by collapsing z_0 so that estimates agree.
                # The extra evaluation runs in the same round as the node's forward.
                coarse_output = model.node_module(node)(messages[node].detach())
            coarse, fine = consistency_terms(
                coarse_output, outputs[right], model.log_sigma[node.name], objective.consistency_lambda
            )
            consistency[node] = consistency[node] + coarse
            consistency[right] = consistency[right] + fine
            loss_deps[node].append(output_tasks[right])
            loss_deps[right].append(output_tasks[node])

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
            for node in tree.nodes
        }


    def _add_chained_exits(
        self,
        model: HBLLModel,
        objective: ObjectiveConfig,
        outputs: dict[Node, torch.Tensor],
        y: torch.Tensor,
        local_losses: dict[Node, dict[str, torch.Tensor]],
        graph: TaskGraph,
    ) -> None:
        leaves = model.tree.leaves
        if len(leaves) < 3:
            return
        next_pipeline = {2: (outputs[leaves[1]].detach(), y)}
        for i in range(2, len(leaves)):
            if i not in self.pipeline:
                continue
            hidden_states, labels = self.pipeline[i]
            output = model.blocks[i](hidden_states)
            last = i + 1 == len(leaves)
            exit_head = model.frozen_head if last and not self.chained_exit_trains_head else model.exit_head(i + 1)
            chained_exit = objective.task_loss(exit_head(output), labels)
            parts = local_losses[leaves[i]]
            parts["chained_exit"] = chained_exit
            parts["total"] = parts["total"] + self.chained_exit_weight * chained_exit
            if i + 1 < len(leaves):
                next_pipeline[i + 1] = (output.detach(), labels)
            # The buffered input exists when the step starts: a forward, an exit head and
            # their backward, all off the critical path.
            task = graph.add(f"chained forward {leaves[i]}")
            task = graph.add(f"chained exit {leaves[i]}", [task])
            graph.add(f"backward chained {leaves[i]}", [graph.add(f"backward chained exit {leaves[i]}", [task])])
        self.pipeline = next_pipeline


class BackpropEngine:
    """End-to-end backprop through the full network: stem, all N blocks, head.

    It trains exactly the network that ``model(x)`` runs, so comparisons with HBLL use the
    same architecture. Shortcuts and exit heads receive no gradient.
    """

    name = "backprop"

    def __init__(self, objective: Optional[ObjectiveConfig] = None) -> None:
        self.objective = objective or ObjectiveConfig()

    def compute_losses(self, model: HBLLModel, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0) -> StepResult:
        """Run one backprop step; ``progress`` is accepted for a common interface and unused."""
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


def build_engine(
    method: str, objective: Optional[ObjectiveConfig] = None, **engine_options
) -> ReferenceEngine | BackpropEngine:
    """Return the engine for ``method``: ``"hbll"`` (the reference engine) or ``"backprop"``.

    ``engine_options`` go to ``ReferenceEngine``: ``consistency_sweeps``, ``sweeps_from``,
    ``chain_length``, ``chained_exit_weight`` and ``chained_exit_trains_head``. Backprop
    has no such options and ignores them, so one set of settings can build both engines
    of a comparison.
    """
    if method == "hbll":
        return ReferenceEngine(objective, **engine_options)
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
