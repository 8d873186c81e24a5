"""The binary tree of spans over the N blocks of a trunk.

A node is a span ``[start, end)`` of blocks. The root is ``[0, N)``. An internal node
splits at ``mid = (start + end) // 2`` into a left child ``[start, mid)`` and a right
child ``[mid, end)``. A leaf has ``end - start == 1``. The midpoint split makes the
deepest leaf sit at level ``L = ceil(log2 N)``, also when N is not a power of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

__all__ = ["Node", "Tree", "CutLike"]


@dataclass(frozen=True, order=True)
class Node:
    """A span ``[start, end)`` of blocks at distance ``level`` from the root."""

    start: int
    end: int
    level: int

    @property
    def is_leaf(self) -> bool:
        return self.end - self.start == 1

    @property
    def mid(self) -> int:
        return (self.start + self.end) // 2

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def name(self) -> str:
        """Stable key used in module names, logs and checkpoints, e.g. ``"4_8"``."""
        return f"{self.start}_{self.end}"

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


CutLike = Sequence[Union[Node, tuple[int, int]]]


class Tree:
    """The span tree over ``num_blocks`` blocks, with its levels and level cuts."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
            raise TypeError(f"num_blocks must be an int, got {type(num_blocks).__name__}")
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks must be at least 1, got {num_blocks}: an HBLL trunk needs one "
                "or more blocks, so pass a non-empty list of blocks"
            )
        self.num_blocks = num_blocks
        self.depth = math.ceil(math.log2(num_blocks)) if num_blocks > 1 else 0
        self.levels: list[list[Node]] = []
        self._children: dict[Node, tuple[Node, Node]] = {}
        self._parent: dict[Node, Node] = {}
        self._by_span: dict[tuple[int, int], Node] = {}
        self._build()

    def _build(self) -> None:
        frontier = [Node(0, self.num_blocks, 0)]
        while frontier:
            self.levels.append(frontier)
            next_frontier = []
            for node in frontier:
                self._by_span[(node.start, node.end)] = node
                if node.is_leaf:
                    continue
                left = Node(node.start, node.mid, node.level + 1)
                right = Node(node.mid, node.end, node.level + 1)
                self._children[node] = (left, right)
                self._parent[left] = node
                self._parent[right] = node
                next_frontier.extend((left, right))
            frontier = next_frontier

    @property
    def root(self) -> Node:
        return self.levels[0][0]

    @property
    def nodes(self) -> list[Node]:
        """All nodes, level by level, each level in span order."""
        return [node for level in self.levels for node in level]

    @property
    def internal_nodes(self) -> list[Node]:
        return [node for node in self.nodes if not node.is_leaf]

    @property
    def leaves(self) -> list[Node]:
        """The N leaves in span order."""
        return sorted((node for node in self.nodes if node.is_leaf), key=lambda n: n.start)

    def children(self, node: Node) -> tuple[Node, Node]:
        """Return ``(left, right)`` of an internal node."""
        if node not in self._children:
            raise ValueError(f"node {node} is a leaf or not in this tree and has no children")
        return self._children[node]

    def parent(self, node: Node) -> Node | None:
        return self._parent.get(node)

    def left_spine(self, node: Node) -> list[Node]:
        """Return ``node`` and its left descendants down to the leaf: the nodes that start where it starts."""
        spine = [node]
        while not spine[-1].is_leaf:
            spine.append(self.children(spine[-1])[0])
        return spine

    def node(self, start: int, end: int) -> Node:
        """Return the node with span ``[start, end)``."""
        try:
            return self._by_span[(start, end)]
        except KeyError:
            raise ValueError(
                f"[{start}, {end}) is not a span of the tree over {self.num_blocks} blocks; "
                f"valid spans are {[str(n) for n in self.nodes][:16]}"
                + (" ..." if len(self._by_span) > 16 else "")
            ) from None

    def level_cut(self, level: int) -> list[Node]:
        """Return cut ``C_level``: the nodes at ``level`` plus shallower leaves, in span order."""
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.depth:
            raise ValueError(
                f"depth must be an int in 0..{self.depth} for a tree over {self.num_blocks} "
                f"blocks (L = ceil(log2 N) = {self.depth}), got {level!r}; "
                "pass depth=None for the full network"
            )
        cut = [n for n in self.nodes if n.level == level or (n.is_leaf and n.level < level)]
        return sorted(cut, key=lambda n: n.start)

    def resolve_cut(self, cut: Iterable[Node | tuple[int, int]]) -> list[Node]:
        """Validate that ``cut`` is a list of tree nodes partitioning ``[0, N)`` and return it.

        Items are ``Node`` objects or ``(start, end)`` tuples, in any order.
        """
        nodes = []
        for item in cut:
            if isinstance(item, Node):
                nodes.append(self.node(item.start, item.end))
            else:
                start, end = item
                nodes.append(self.node(int(start), int(end)))
        nodes.sort(key=lambda n: n.start)

        expected = 0
        for node in nodes:
            if node.start != expected:
                raise ValueError(
                    f"cut {[str(n) for n in nodes]} does not partition [0, {self.num_blocks}): "
                    f"expected a span starting at {expected}, got {node}; a valid cut covers "
                    f"every block 0..{self.num_blocks - 1} exactly once"
                )
            expected = node.end
        if expected != self.num_blocks:
            raise ValueError(
                f"cut {[str(n) for n in nodes]} does not partition [0, {self.num_blocks}): "
                f"it ends at boundary {expected}; add spans up to boundary {self.num_blocks}"
            )
        return nodes

    def __repr__(self) -> str:
        return f"Tree(num_blocks={self.num_blocks}, depth={self.depth}, nodes={len(self.nodes)})"
