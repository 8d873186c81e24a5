import math

import pytest

from hbll import Node, Tree


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8, 13, 64, 1000])
def test_tree_depth_is_ceil_log2(num_blocks):
    tree = Tree(num_blocks)
    assert tree.depth == math.ceil(math.log2(num_blocks))
    assert max(node.level for node in tree.nodes) == tree.depth


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8, 13])
def test_tree_leaves_cover_every_block(num_blocks):
    tree = Tree(num_blocks)
    assert [(leaf.start, leaf.end) for leaf in tree.leaves] == [(i, i + 1) for i in range(num_blocks)]
    assert len(tree.nodes) == 2 * num_blocks - 1


def test_tree_children_split_at_midpoint():
    tree = Tree(7)
    left, right = tree.children(tree.root)
    assert (left.start, left.end, right.start, right.end) == (0, 3, 3, 7)
    assert tree.parent(right) == tree.root


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8, 13])
def test_tree_level_cuts_partition_the_trunk(num_blocks):
    tree = Tree(num_blocks)
    for level in range(tree.depth + 1):
        cut = tree.level_cut(level)
        assert tree.resolve_cut(cut) == cut
    assert tree.level_cut(0) == [tree.root]
    assert tree.level_cut(tree.depth) == tree.leaves


def test_tree_level_cut_keeps_shallow_leaves():
    tree = Tree(3)
    assert [(n.start, n.end) for n in tree.level_cut(2)] == [(0, 1), (1, 2), (2, 3)]
    assert [(n.start, n.end) for n in tree.level_cut(1)] == [(0, 1), (1, 3)]


def test_tree_zero_blocks_raises():
    with pytest.raises(ValueError, match="num_blocks must be at least 1, got 0"):
        Tree(0)


def test_tree_invalid_depth_names_range():
    with pytest.raises(ValueError, match=r"0\.\.3"):
        Tree(8).level_cut(4)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        Tree(8).level_cut(-1)


def test_tree_cut_with_gap_raises():
    tree = Tree(8)
    with pytest.raises(ValueError, match="expected a span starting at 4"):
        tree.resolve_cut([(0, 4), (6, 8)])


def test_tree_cut_short_of_end_raises():
    with pytest.raises(ValueError, match="ends at boundary 4"):
        Tree(8).resolve_cut([(0, 4)])


def test_tree_unknown_span_raises():
    with pytest.raises(ValueError, match=r"\[0, 3\) is not a span"):
        Tree(8).resolve_cut([(0, 3), (3, 8)])


def test_tree_resolve_cut_accepts_nodes_in_any_order():
    tree = Tree(8)
    cut = tree.resolve_cut([Node(4, 8, 1), (0, 4)])
    assert [(n.start, n.end) for n in cut] == [(0, 4), (4, 8)]
