import pytest
import torch
from torch import nn

from hbll import BackpropEngine, HBLLModel, ObjectiveConfig, ReferenceEngine, build_engine, train_step
from tests.conftest import TinyBlock, make_tiny_model


def _owned_parameters(model: HBLLModel, node) -> set[str]:
    """Names of the parameters that node's local loss may touch."""
    prefixes = ["blocks.%d." % node.start if node.is_leaf else f"shortcuts.{node.name}."]
    if node.end == model.num_blocks:
        prefixes.append("head.")
    elif model.exit_head_policy == "local":
        prefixes.append(f"exit_heads.{node.end}.")
    if not node.is_leaf:
        prefixes.append(f"log_sigma.{node.name}")
    if node.start == 0:
        prefixes.append("stem.")
    return {name for name, _ in model.named_parameters() if any(name.startswith(p) for p in prefixes)}


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 8])
@pytest.mark.parametrize("exit_heads", ["local", "shared"])
def test_engine_local_loss_reaches_only_its_node(num_blocks, exit_heads, tiny_batch):
    model = make_tiny_model(num_blocks, exit_heads=exit_heads)
    x, y = tiny_batch
    result = ReferenceEngine(consistency_sweeps=2).compute_losses(model, x, y)
    for node, local_loss in result.local_losses.items():
        model.zero_grad(set_to_none=True)
        local_loss.backward(retain_graph=True)
        touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        allowed = _owned_parameters(model, node)
        assert touched <= allowed, f"node {node} leaked gradient into {sorted(touched - allowed)}"
        module_prefix = f"blocks.{node.start}." if node.is_leaf else f"shortcuts.{node.name}."
        assert any(name.startswith(module_prefix) for name in touched), f"node {node} trains no own parameter"


def test_engine_local_losses_sum_to_loss(tiny_batch):
    model = make_tiny_model(6)
    result = ReferenceEngine().compute_losses(model, *tiny_batch)
    torch.testing.assert_close(result.loss, torch.stack(list(result.local_losses.values())).sum())
    assert set(result.node_losses) == {node.name for node in model.tree.nodes}


def _linear_model(num_blocks: int) -> HBLLModel:
    blocks = [nn.Linear(2, 2) for _ in range(num_blocks)]
    return HBLLModel(nn.Linear(3, 2), blocks, nn.Linear(2, 2))


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 8, 64, 1024])
@pytest.mark.parametrize("sweeps", [0, 1, 3])
def test_engine_critical_path_is_depth_plus_sweeps(num_blocks, sweeps):
    """The counted path is L + K + 5 (stem, L message rounds, K sweeps, node forward, exit
    head, exit backward, node backward). N = 1 has no messages and no sweeps, and its
    stem's backward follows the single node's backward, so its path is 6."""
    torch.manual_seed(0)
    model = _linear_model(num_blocks)
    x, y = torch.randn(2, 3), torch.randint(0, 2, (2,))
    result = ReferenceEngine(consistency_sweeps=sweeps).compute_losses(model, x, y)
    effective_sweeps = min(sweeps, num_blocks - 1)
    expected = 6 if num_blocks == 1 else model.depth + effective_sweeps + 5
    assert result.critical_path == expected
    assert result.task_graph.count("sweep") == effective_sweeps


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 8, 64, 1024])
def test_engine_backprop_critical_path_is_two_n(num_blocks):
    torch.manual_seed(0)
    model = _linear_model(num_blocks)
    result = BackpropEngine().compute_losses(model, torch.randn(2, 3), torch.randint(0, 2, (2,)))
    assert result.critical_path == 2 * num_blocks + 4


@pytest.mark.parametrize("num_blocks", [2, 5, 8])
def test_engine_sweeps_n_give_exact_activations(num_blocks, tiny_batch):
    model = make_tiny_model(num_blocks)
    x, y = tiny_batch
    result = ReferenceEngine(consistency_sweeps=num_blocks).compute_losses(model, x, y)
    with torch.no_grad():
        hidden_states = model.stem(x)
        for leaf in model.tree.leaves:
            torch.testing.assert_close(result.messages[leaf], hidden_states, rtol=0, atol=1e-6)
            hidden_states = model.blocks[leaf.start](hidden_states)


def test_engine_without_sweeps_leaf_messages_are_inexact(tiny_batch):
    model = make_tiny_model(8)
    x, y = tiny_batch
    result = ReferenceEngine().compute_losses(model, x, y)
    with torch.no_grad():
        exact = model.blocks[1](model.blocks[0](model.stem(x)))
    # Leaf [2, 3) reads the shortcut of [0, 2), not the two blocks it replaces.
    assert not torch.allclose(result.messages[model.tree.node(2, 3)], exact)


def test_engine_negative_sweeps_raises():
    with pytest.raises(ValueError, match="consistency_sweeps must be >= 0, got -1"):
        ReferenceEngine(consistency_sweeps=-1)


def test_engine_shape_changing_block_raises(tiny_batch):
    model = HBLLModel(nn.Linear(5, 6), [TinyBlock(6), nn.Linear(6, 7)], nn.Linear(7, 3))
    with pytest.raises(ValueError, match="changed the shape of hidden_states"):
        ReferenceEngine().compute_losses(model, *tiny_batch)


def test_engine_unknown_method_raises():
    with pytest.raises(ValueError, match="method must be 'hbll' or 'backprop', got 'sgd'"):
        build_engine("sgd")


def test_objective_negative_weight_raises():
    with pytest.raises(ValueError, match="consistency_lambda must be >= 0, got -0.5"):
        ObjectiveConfig(consistency_lambda=-0.5)


@pytest.mark.parametrize("method", ["hbll", "backprop"])
def test_engine_training_lowers_loss(method):
    torch.manual_seed(0)
    model = make_tiny_model(4)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    engine = build_engine(method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(x), y)
    for _ in range(60):
        train_step(engine, model, optimizer, x, y)
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y)
    assert after < 0.7 * before


def test_engine_fixed_sigma_gets_no_gradient(tiny_batch):
    model = make_tiny_model(4, learn_sigma=False, init_sigma=0.5)
    result = ReferenceEngine().compute_losses(model, *tiny_batch)
    result.loss.backward()
    assert all(p.grad is None for p in model.log_sigma.values())
    torch.testing.assert_close(model.log_sigma["0_4"].exp(), torch.tensor(0.5))
