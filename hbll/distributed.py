"""Tree-parallel HBLL training across processes with ``torch.distributed``.

P processes form a 2-D mesh of ``tree_groups`` × ``replicas``. The nodes of the tree are
split over the ``tree_groups`` ranks of one replica (a tree group). Replicas train the
same nodes on different data, as in data parallelism. Rank ``r`` sits at tree position
``r % tree_groups`` of replica ``r // tree_groups``.

In one step:

- the ranks that own a node whose span starts at 0 run the stem;
- messages move between the owners of nodes level by level, through one ``all_gather``
  per round inside the tree group, and only in rounds where some message changes rank;
- each rank computes the local losses of its own nodes;
- after ``backward()``, the gradients of a node's parameters are averaged over its
  data-parallel group (the ranks at the same tree position). The stem, the head and the
  exit heads are read by nodes on several ranks, so their gradients are summed over the
  tree group and averaged over the replicas.

Every rank keeps a full copy of the model. The parameters of nodes a rank does not own go
stale during training. ``sync_parameters`` copies them from their owners, and the Lightning
strategy calls it before evaluation, checkpoints and the end of training.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from hbll.engine import Route
from hbll.model import HBLLModel
from hbll.tree import Node, Tree

__all__ = [
    "TreeMesh",
    "TreeComm",
    "TreeParallel",
    "Placement",
    "balanced_placement",
    "resolve_placement",
    "describe_placement",
]

log = logging.getLogger(__name__)

Placement = Union[str, Mapping[Union[str, Node, tuple], int], Callable[[HBLLModel, int], Mapping[Node, int]]]

# dtype codes for the per-step header that sends every rank the shape of hidden_states.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class TreeMesh:
    """The process groups of a ``tree_groups`` × ``replicas`` mesh over the default group.

    Every rank must construct the mesh, in the same order relative to other collectives,
    because ``torch.distributed.new_group`` is collective.
    """

    def __init__(self, tree_groups: Optional[int] = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TreeMesh needs an initialised default process group; call "
                "torch.distributed.init_process_group first, or launch through the Lightning "
                "strategy, torchrun or accelerate launch"
            )
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.tree_groups = self.world_size if tree_groups is None else tree_groups
        check_mesh(self.world_size, self.tree_groups)
        self.replicas = self.world_size // self.tree_groups
        self.tree_rank = self.rank % self.tree_groups
        self.replica = self.rank // self.tree_groups

        self.tree_group = self.data_group = None
        for replica in range(self.replicas):
            ranks = [replica * self.tree_groups + t for t in range(self.tree_groups)]
            group = dist.new_group(ranks)
            if replica == self.replica:
                self.tree_group, self.tree_group_ranks = group, ranks
        for position in range(self.tree_groups):
            ranks = [replica * self.tree_groups + position for replica in range(self.replicas)]
            group = dist.new_group(ranks)
            if position == self.tree_rank:
                self.data_group = group

    def global_rank(self, tree_rank: int) -> int:
        """Return the global rank at tree position ``tree_rank`` of this rank's replica."""
        return self.tree_group_ranks[tree_rank]

    def __repr__(self) -> str:
        return (
            f"TreeMesh(world_size={self.world_size}, tree_groups={self.tree_groups}, "
            f"replicas={self.replicas}, rank={self.rank})"
        )


def check_mesh(world_size: int, tree_groups: int, num_nodes: Optional[int] = None) -> None:
    """Raise a ``ValueError`` naming the numbers if the mesh cannot be built."""
    if isinstance(tree_groups, bool) or not isinstance(tree_groups, int) or tree_groups < 1:
        raise ValueError(f"tree_groups must be a positive int, got {tree_groups!r}")
    if world_size % tree_groups:
        raise ValueError(
            f"world size {world_size} is not divisible by tree_groups={tree_groups}; the mesh is "
            f"tree_groups × replicas, so use a tree_groups that divides {world_size}"
        )
    if num_nodes is not None and tree_groups > num_nodes:
        raise ValueError(
            f"tree_groups={tree_groups} exceeds the {num_nodes} nodes of the tree, so some rank "
            f"would own no node; use tree_groups <= {num_nodes}"
        )


# Placement -------------------------------------------------------------------------------


def node_cost(model: HBLLModel, node: Node) -> int:
    """Return the compute proxy of a node: the parameter count of its module."""
    return sum(p.numel() for p in model.node_module(node).parameters())


def preorder(tree: Tree) -> list[Node]:
    order, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        order.append(node)
        if not node.is_leaf:
            left, right = tree.children(node)
            stack.extend((right, left))
    return order


def balanced_placement(model: HBLLModel, tree_groups: int) -> dict[Node, int]:
    """Split the nodes into ``tree_groups`` contiguous runs of the tree's preorder.

    Preorder lists a node, then its left subtree, then its right subtree, so a contiguous
    run contains whole subtrees: a node's message and its consistency partner mostly stay on
    its rank. The split minimises the largest sum of ``node_cost`` over a rank.
    """
    order = preorder(model.tree)
    check_mesh(tree_groups, tree_groups, len(order))
    costs = [max(node_cost(model, node), 1) for node in order]

    def runs(limit: int) -> Optional[list[int]]:
        # Greedy: start a new run when the next node would exceed `limit`.
        starts, load = [0], 0
        for index, cost in enumerate(costs):
            if load + cost > limit and load > 0:
                starts.append(index)
                load = 0
            load += cost
        return starts if len(starts) <= tree_groups else None

    low, high = max(costs), sum(costs)
    while low < high:
        mid = (low + high) // 2
        if runs(mid) is None:
            low = mid + 1
        else:
            high = mid
    starts = runs(low)
    # Fewer runs than groups: split the longest runs until every group has a node.
    while len(starts) < tree_groups:
        bounds = starts + [len(order)]
        lengths = [bounds[i + 1] - bounds[i] for i in range(len(starts))]
        longest = max(range(len(starts)), key=lengths.__getitem__)
        starts.insert(longest + 1, starts[longest] + lengths[longest] // 2)
    bounds = starts + [len(order)]
    return {node: group for group in range(tree_groups) for node in order[bounds[group] : bounds[group + 1]]}


def resolve_placement(placement: Placement, model: HBLLModel, tree_groups: int) -> dict[Node, int]:
    """Turn a placement setting into a map from every node to a tree rank, and check it.

    ``placement`` is ``"balanced"`` (see ``balanced_placement``), a mapping from nodes,
    ``(start, end)`` spans or node names such as ``"0_4"`` to tree ranks, or a callable
    ``(model, tree_groups) -> mapping``.
    """
    tree = model.tree
    check_mesh(tree_groups, tree_groups, len(tree.nodes))
    if placement == "balanced":
        return balanced_placement(model, tree_groups)
    if callable(placement):
        placement = placement(model, tree_groups)
    if not isinstance(placement, Mapping):
        raise TypeError(
            f"placement must be 'balanced', a mapping from nodes to tree ranks or a callable, got {placement!r}"
        )
    by_name = {node.name: node for node in tree.nodes}
    result: dict[Node, int] = {}
    for key, rank in placement.items():
        if isinstance(key, Node):
            node = tree.node(key.start, key.end)
        elif isinstance(key, str):
            if key not in by_name:
                raise ValueError(f"placement names node {key!r}, which is not in the tree; nodes are {sorted(by_name)}")
            node = by_name[key]
        else:
            node = tree.node(*key)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tree_groups:
            raise ValueError(f"placement puts node {node} on tree rank {rank!r}; tree ranks are 0..{tree_groups - 1}")
        result[node] = rank
    missing = [str(node) for node in tree.nodes if node not in result]
    if missing:
        raise ValueError(f"placement leaves {len(missing)} nodes without a rank: {missing[:8]}")
    empty = sorted(set(range(tree_groups)) - set(result.values()))
    if empty:
        raise ValueError(f"placement gives tree ranks {empty} no node; every one of the {tree_groups} tree ranks needs one")
    return result


def describe_placement(model: HBLLModel, placement: Mapping[Node, int]) -> str:
    """Describe the placement: one line per tree rank with its nodes and cost, then the crossing edges."""
    lines = []
    tree = model.tree
    for rank in sorted(set(placement.values())):
        nodes = [node for node in tree.nodes if placement[node] == rank]
        cost = sum(node_cost(model, node) for node in nodes)
        spans = " ".join(str(node) for node in nodes)
        lines.append(f"tree rank {rank}: {len(nodes)} nodes, {cost:,} parameters: {spans}")
    crossing = sum(
        1
        for node in tree.internal_nodes
        for child in tree.children(node)
        if placement[child] != placement[node]
    )
    lines.append(f"{crossing} of {len(tree.nodes) - 1} parent-child edges cross ranks")
    return "\n".join(lines)


# Communication -------------------------------------------------------------------------------


class TreeComm:
    """The ``NodeComm`` of one rank: which nodes it owns and how it exchanges tensors.

    An exchange packs the tensors this rank produces for other ranks into one flat buffer,
    and one ``all_gather`` inside the tree group delivers every rank's buffer. Rounds in
    which no tensor changes rank skip the collective; every rank derives this from the
    routes, so all ranks skip the same rounds.
    """

    def __init__(self, mesh: TreeMesh, placement: Mapping[Node, int], device: torch.device) -> None:
        self.mesh = mesh
        self.placement = dict(placement)
        self.device = torch.device(device)
        self.root_owner = self.placement[min(self.placement, key=lambda node: node.level)]
        self._shape: Optional[torch.Size] = None
        self._dtype: Optional[torch.dtype] = None

    def owns(self, node: Node) -> bool:
        return self.placement[node] == self.mesh.tree_rank

    def begin_step(self, hidden_states: Optional[torch.Tensor]) -> None:
        # The root's owner runs the stem and sends the other ranks the shape and dtype of
        # hidden_states, so they can size the buffers of this step's exchanges.
        header = torch.zeros(10, dtype=torch.long, device=self.device)
        if self.mesh.tree_rank == self.root_owner:
            if hidden_states is None or hidden_states.dim() > 8:
                raise ValueError("the owner of the root must run the stem and hidden_states must have at most 8 dims")
            header[0] = hidden_states.dim()
            header[1 : 1 + hidden_states.dim()] = torch.tensor(hidden_states.shape)
            header[9] = _DTYPES.index(hidden_states.dtype) if hidden_states.dtype in _DTYPES else 0
        if self.mesh.tree_groups > 1:
            _collective(
                "the shape of hidden_states",
                lambda: dist.broadcast(header, group=self.mesh.tree_group, group_src=self.root_owner),
            )
        header = header.tolist()
        self._shape = torch.Size(header[1 : 1 + header[0]])
        self._dtype = _DTYPES[header[9]]

    def exchange(self, produced: Mapping[Hashable, torch.Tensor], routes: Sequence[Route]) -> dict[Hashable, torch.Tensor]:
        me = self.mesh.tree_rank
        crossing = [
            route
            for route in routes
            if any(self.placement[c] != self.placement[route.producer] for c in route.consumers)
        ]
        result = dict(produced)
        if not crossing:
            return result

        hidden_numel = self._shape.numel()
        # The buffer dtype represents every float dtype exactly, so values arrive bit for bit.
        buffer_dtype = torch.promote_types(self._dtype, torch.float32)
        sizes = [0] * self.mesh.tree_groups
        offsets = {}
        for route in crossing:
            owner = self.placement[route.producer]
            numel = 1 if route.scalar else hidden_numel
            offsets[route.key] = (owner, sizes[owner], numel)
            sizes[owner] += numel

        send = torch.zeros(max(sizes), dtype=buffer_dtype, device=self.device)
        for route in crossing:
            owner, offset, numel = offsets[route.key]
            if owner == me:
                send[offset : offset + numel] = produced[route.key].reshape(-1).to(buffer_dtype)
        gathered = [torch.empty_like(send) for _ in range(self.mesh.tree_groups)]
        _collective("a message exchange", lambda: dist.all_gather(gathered, send, group=self.mesh.tree_group))

        for route in crossing:
            owner, offset, numel = offsets[route.key]
            if owner != me and any(self.placement[c] == me for c in route.consumers):
                value = gathered[owner][offset : offset + numel]
                shape = () if route.scalar else self._shape
                dtype = torch.float32 if route.scalar else self._dtype
                result[route.key] = value.reshape(shape).to(dtype)
        return result


def _collective(operation: str, call: Callable[[], object]) -> None:
    """Run a collective and turn a peer's failure or a timeout into a clear error."""
    try:
        call()
    except RuntimeError as error:
        raise RuntimeError(
            f"rank {dist.get_rank()}: {operation} failed, most likely because another rank raised, "
            f"died or timed out: {error}"
        ) from error


# Training state across ranks ---------------------------------------------------------------


class TreeParallel:
    """The tree-parallel setup of one rank: mesh, placement, comm and parameter ownership.

    Args:
        model: the full ``HBLLModel``; every rank builds the same one from the same seed.
        tree_groups: the ranks that share the nodes of one tree; the world size divided by
            it gives the data-parallel replicas. ``None`` uses every rank for the tree.
        placement: ``"balanced"``, a mapping from nodes to tree ranks, or a callable (see
            ``resolve_placement``).
        device: the device of this rank's model.
    """

    def __init__(
        self,
        model: HBLLModel,
        tree_groups: Optional[int] = None,
        placement: Placement = "balanced",
        device: Optional[torch.device] = None,
    ) -> None:
        self.model = model
        self.mesh = TreeMesh(tree_groups)
        self.placement = resolve_placement(placement, model, self.mesh.tree_groups)
        self.device = device or next(model.parameters()).device
        self.comm = TreeComm(self.mesh, self.placement, self.device)

        # Parameters read by nodes on one tree rank belong to that rank. The rest (stem,
        # head, exit heads, anything two ranks' nodes share) belong to the whole tree group.
        users: dict[int, set[int]] = {}
        for node in model.tree.nodes:
            for param in self.node_parameters(node):
                users.setdefault(id(param), set()).add(self.placement[node])
        self.owner = {pid: next(iter(ranks)) for pid, ranks in users.items() if len(ranks) == 1}
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.shared_parameters = [p for _, p in named if id(p) not in self.owner]
        # A rank that must stop sets stop_requested. The next total_loss sets stop_agreed on
        # every rank at once, so all of them can stop after the same step.
        self.stop_requested = False
        self.stop_agreed = False
        self.owned_parameters = [p for _, p in named if self.owner.get(id(p)) == self.mesh.tree_rank]

    def node_parameters(self, node: Node) -> list[nn.Parameter]:
        params = list(self.model.node_module(node).parameters())
        if not node.is_leaf:
            params.append(self.model.log_sigma[node.name])
        return params

    def trains(self, param: nn.Parameter) -> bool:
        """Return whether this rank's optimizer steps ``param``: its own nodes' and the shared ones."""
        return self.owner.get(id(param), self.mesh.tree_rank) == self.mesh.tree_rank

    def describe(self) -> str:
        mesh = self.mesh
        return (
            f"HBLL tree-parallel: {mesh.world_size} ranks = {mesh.replicas} {'replica' if mesh.replicas == 1 else 'replicas'} × "
            f"{mesh.tree_groups} {'rank' if mesh.tree_groups == 1 else 'ranks'} per tree (tree_groups={mesh.tree_groups})\n"
            + describe_placement(self.model, self.placement)
        )

    def owned_nodes(self) -> list[Node]:
        return [node for node in self.model.tree.nodes if self.comm.owns(node)]

    @torch.no_grad()
    def total_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Return the step's loss over the whole tree, averaged over replicas (for logging).

        The same all-reduce carries ``stop_requested``: afterwards ``stop_agreed`` is
        True on every rank if any rank had requested a stop.
        """
        packed = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(float(self.stop_requested), dtype=torch.float32)])
        _collective("summing the step's loss", lambda: dist.all_reduce(packed))
        self.stop_agreed = bool(packed[1] > 0)
        return (packed[0] / self.mesh.replicas).to(loss.dtype)

    def gather_node_losses(self, node_losses: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Collect the per-node loss parts of the whole tree group (for logging)."""
        gathered: list[Optional[dict]] = [None] * self.mesh.tree_groups
        local = {name: {part: value.cpu() for part, value in parts.items()} for name, parts in node_losses.items()}
        _collective(
            "gathering node losses", lambda: dist.all_gather_object(gathered, local, group=self.mesh.tree_group)
        )
        merged = {}
        for rank_losses in gathered:
            for name, parts in rank_losses.items():
                merged[name] = {part: value.to(self.device) for part, value in parts.items()}
        return merged

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average gradients over replicas; sum the shared parameters' over the tree group first.

        A parameter whose gradient is ``None`` on every rank keeps ``None``, so optimizers
        skip it exactly as in one process.
        """
        mesh = self.mesh
        _reduce(self.shared_parameters, mesh.replicas, None, "the shared parameters' gradients")
        if mesh.replicas > 1:
            _reduce(self.owned_parameters, mesh.replicas, mesh.data_group, "the gradients of this rank's nodes")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the whole model's gradients by their joint norm, as one process would; return the norm.

        Call it after ``reduce_gradients``. A rank holds the gradients of its own nodes and
        identical copies of the shared ones, so the squares of the owned gradients are
        summed over the tree group and the shared ones count once.
        """

        def squares(params: Sequence[nn.Parameter]) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for param in params:
                if param.grad is not None:
                    total += param.grad.float().pow(2).sum()
            return total

        owned = squares(self.owned_parameters)
        _collective("the gradient norm", lambda: dist.all_reduce(owned, group=self.mesh.tree_group))
        norm = (owned + squares(self.shared_parameters)).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for param in (*self.owned_parameters, *self.shared_parameters):
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype))
        return norm

    @torch.no_grad()
    def sync_parameters(self) -> None:
        """Copy every node's parameters and buffers from its owner to the whole tree group.

        Buffers of shared modules (the stem's normalisation statistics, for example) come
        from the root's owner, which runs the stem.
        """
        mesh = self.mesh
        if mesh.tree_groups == 1:
            return
        for rank in range(mesh.tree_groups):
            tensors = []
            seen: set[int] = set()
            for node in self.model.tree.nodes:
                if self.placement[node] != rank:
                    continue
                for tensor in [*self.node_parameters(node), *self.model.node_module(node).buffers()]:
                    if id(tensor) not in seen and self.owner.get(id(tensor), rank) == rank:
                        seen.add(id(tensor))
                        tensors.append(tensor)
            if rank == self.comm.root_owner:
                tensors += [b for b in self._shared_buffers() if id(b) not in seen]
            _broadcast_tensors(tensors, rank, mesh)

    def _shared_buffers(self) -> list[torch.Tensor]:
        node_buffers = {id(b) for node in self.model.tree.nodes for b in self.model.node_module(node).buffers()}
        return [b for b in self.model.buffers() if id(b) not in node_buffers]

    # Optimizer state ------------------------------------------------------------------------

    def restrict_optimizer(self, optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
        """Drop the parameters this rank does not train from ``optimizer``; return the full layout.

        Call it before the first step. The returned layout (the parameters of every group,
        in order) maps this rank's optimizer state to that of one process.
        """
        layout = [list(group["params"]) for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if self.trains(p)]
        return layout

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer, layout: list[list[nn.Parameter]]) -> dict:
        """Return the state dict that one process training all nodes would have.

        Collective: every rank must call it. Each parameter's state comes from its owner
        in replica 0; shared parameters' from rank 0.
        """
        index = {id(p): i for i, p in enumerate(p for group in layout for p in group)}
        mine = {}
        if self.mesh.replica == 0:
            for param, state in optimizer.state.items():
                shared = id(param) not in self.owner
                if (shared and self.mesh.rank == 0) or (not shared and self.trains(param)):
                    mine[index[id(param)]] = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
        gathered: list[Optional[dict]] = [None] * self.mesh.world_size
        _collective("gathering the optimizer state", lambda: dist.all_gather_object(gathered, mine))
        state = {k: v for part in gathered for k, v in part.items()}
        groups, start = [], 0
        for group, params in zip(optimizer.param_groups, layout):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + len(params)))})
            start += len(params)
        return {"state": state, "param_groups": groups}

    def local_optimizer_state(self, full_state: dict, optimizer: torch.optim.Optimizer, layout: list[list[nn.Parameter]]) -> dict:
        """Map a one-process optimizer state dict onto this rank's restricted optimizer."""
        if len(full_state["param_groups"]) != len(layout):
            raise ValueError(
                f"the checkpoint's optimizer has {len(full_state['param_groups'])} parameter groups, "
                f"this run's has {len(layout)}"
            )
        state, groups, local_index, full_index = {}, [], 0, 0
        for saved_group, params in zip(full_state["param_groups"], layout):
            local_params = []
            for param in params:
                if self.trains(param):
                    if full_index in full_state["state"]:
                        state[local_index] = full_state["state"][full_index]
                    local_params.append(local_index)
                    local_index += 1
                full_index += 1
            groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": local_params})
        return {"state": state, "param_groups": groups}


def _reduce(params: Sequence[nn.Parameter], replicas: int, group, operation: str) -> None:
    # One all-reduce carries the gradients and, at the end, one "has a gradient" flag
    # per parameter.
    if not params:
        return
    dtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
    flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p, dtype=dtype)).reshape(-1) for p in params]
    flat = torch.cat([*grads, flags])
    _collective(operation, lambda: dist.all_reduce(flat, group=group))
    present = flat[-len(params) :].tolist()
    offset = 0
    for param, has_grad in zip(params, present):
        numel = param.numel()
        param.grad = (flat[offset : offset + numel] / replicas).view_as(param) if has_grad else None
        offset += numel


def _broadcast_tensors(tensors: Iterable[torch.Tensor], tree_rank: int, mesh: TreeMesh) -> None:
    # One broadcast per dtype, so every value arrives bit for bit.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for dtype, group in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        _collective(
            "copying parameters from their owners",
            lambda: dist.broadcast(flat, group=mesh.tree_group, group_src=tree_rank),
        )
        offset = 0
        for tensor in group:
            numel = tensor.numel()
            tensor.copy_(flat[offset : offset + numel].view_as(tensor))
            offset += numel
