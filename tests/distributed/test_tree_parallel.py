"""Tree-parallel training: placement, mesh checks, and equality with the one-process engine."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from hbll.distributed import balanced_placement, check_mesh, describe_placement, preorder, resolve_placement
from tests.conftest import make_tiny_model
from tests.distributed.workers import build_model, free_port, reference_parameters, tree_parallel_worker


def test_balanced_placement_keeps_subtrees_together():
    model = make_tiny_model(8)
    placement = balanced_placement(model, 2)
    tree = model.tree
    left, right = tree.children(tree.root)
    assert {placement[node] for node in tree.nodes if node.start >= 4} == {1}
    assert {placement[node] for node in tree.nodes if node.end <= 4} == {0}
    assert placement[tree.root] == 0
    assert "1 of 14 parent-child edges cross ranks" in describe_placement(model, placement)


@pytest.mark.parametrize("num_blocks,tree_groups", [(8, 3), (16, 5), (5, 9), (6, 11)])
def test_balanced_placement_is_contiguous_and_uses_every_rank(num_blocks, tree_groups):
    model = make_tiny_model(num_blocks)
    placement = balanced_placement(model, tree_groups)
    ranks = [placement[node] for node in preorder(model.tree)]
    assert ranks == sorted(ranks)
    assert set(ranks) == set(range(tree_groups))
    counts = [ranks.count(rank) for rank in range(tree_groups)]
    # Every node module here has the same cost, so the counts differ by at most one node
    # unless fewer runs than ranks forced a split.
    assert max(counts) <= -(-len(ranks) // tree_groups) + 1


def test_explicit_placement_by_name_span_and_node():
    model = make_tiny_model(2)
    tree = model.tree
    left, right = tree.children(tree.root)
    placement = resolve_placement({"0_2": 0, (0, 1): 1, right: 1}, model, 2)
    assert placement == {tree.root: 0, left: 1, right: 1}
    assert resolve_placement(lambda m, groups: {n: 0 for n in m.tree.nodes}, model, 1)[tree.root] == 0


@pytest.mark.parametrize(
    "placement,tree_groups,message",
    [
        ({"0_2": 0, "0_1": 0}, 2, "leaves 1 nodes without a rank"),
        ({"0_2": 0, "0_1": 0, "1_2": 0}, 2, r"gives tree ranks \[1\] no node"),
        ({"0_2": 0, "0_1": 2, "1_2": 1}, 2, "tree ranks are 0..1"),
        ({"0_3": 0}, 2, "not in the tree"),
        ("balanced", 4, "tree_groups=4 exceeds the 3 nodes"),
    ],
)
def test_impossible_placements_name_the_numbers(placement, tree_groups, message):
    with pytest.raises(ValueError, match=message):
        resolve_placement(placement, make_tiny_model(2), tree_groups)


def test_mesh_checks_name_the_numbers():
    with pytest.raises(ValueError, match="world size 6 is not divisible by tree_groups=4"):
        check_mesh(6, 4)
    with pytest.raises(ValueError, match="tree_groups must be a positive int"):
        check_mesh(4, 0)
    check_mesh(4, 2, num_nodes=3)


# All leaf-input options are on, so every kind of exchange happens: messages,
# sweeps, the chain, consistency peers and the pipelined chained activations.
ALL_EXCHANGES = {"chained_exit_weight": 3.0, "consistency_sweeps": 1, "chain_length": 2}


@pytest.mark.parametrize(
    "world_size,tree_groups", [(2, 2), (4, 4), (4, 2)], ids=["tree-2", "tree-4", "tree-2x-data-2"]
)
def test_tree_parallel_training_matches_one_process(world_size, tree_groups, tmp_path):
    steps = 20
    expected = reference_parameters(steps, world_size // tree_groups, ALL_EXCHANGES)
    out = tmp_path / "parameters.pt"
    mp.spawn(
        tree_parallel_worker,
        args=(world_size, free_port(), tree_groups, steps, ALL_EXCHANGES, str(out)),
        nprocs=world_size,
        start_method="spawn",
    )
    got = torch.load(out)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The run moved parameters: a comparison of two untrained models would pass too.
    initial = dict(build_model().named_parameters())
    assert any((initial[name] - value).abs().max() > 1e-3 for name, value in expected.items())
