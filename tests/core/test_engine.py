import pytest
import torch
from torch import nn

from hbll import BackpropEngine, HBLLModel, ObjectiveConfig, ReferenceEngine, build_engine, level_param_groups, train_step
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


@pytest.mark.parametrize("progress, expected_sweeps", [(0.0, 0), (0.49, 0), (0.5, 3), (1.0, 3)])
def test_engine_sweeps_from_runs_sweeps_late_only(progress, expected_sweeps, tiny_batch):
    model = make_tiny_model(8)
    engine = ReferenceEngine(consistency_sweeps=3, sweeps_from=0.5)
    result = engine.compute_losses(model, *tiny_batch, progress=progress)
    assert result.task_graph.count("sweep") == expected_sweeps
    assert result.critical_path == model.depth + expected_sweeps + 5


@pytest.mark.parametrize("num_blocks, chain_length", [(2, 1), (8, 3), (8, 8), (5, 2)])
def test_engine_chain_feeds_leaves_chained_inputs(num_blocks, chain_length, tiny_batch):
    model = make_tiny_model(num_blocks)
    x, y = tiny_batch
    reference = ReferenceEngine().compute_losses(model, x, y)
    torch.manual_seed(3)
    result = ReferenceEngine(chain_length=chain_length).compute_losses(model, x, y)
    leaves = model.tree.leaves
    chained = [i for i, leaf in enumerate(leaves) if f"chain {leaf}" in result.task_graph.labels("chain")]
    assert 1 <= len(chained) <= chain_length
    assert chained == list(range(chained[0], chained[0] + len(chained)))
    # Each chained leaf reads the block before it applied to that block's own input.
    for i in chained:
        with torch.no_grad():
            expected = model.blocks[i - 1](result.messages[leaves[i - 1]])
        torch.testing.assert_close(result.messages[leaves[i]], expected)
    for i in set(range(len(leaves))) - set(chained):
        assert torch.equal(result.messages[leaves[i]], reference.messages[leaves[i]])
    assert model.depth + 5 <= result.critical_path <= model.depth + chain_length + 5


def test_engine_chain_keeps_gradient_local(tiny_batch):
    model = make_tiny_model(6)
    torch.manual_seed(0)
    result = ReferenceEngine(chain_length=6, consistency_sweeps=1).compute_losses(model, *tiny_batch)
    for node, local_loss in result.local_losses.items():
        model.zero_grad(set_to_none=True)
        local_loss.backward(retain_graph=True)
        touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched <= _owned_parameters(model, node)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sweeps_from": 1.5}, "sweeps_from must be in \\[0, 1\\], got 1.5"),
        ({"chain_length": -2}, "chain_length must be >= 0, got -2"),
        ({"chained_exit_weight": -1.0}, "chained_exit_weight must be >= 0, got -1.0"),
    ],
)
def test_engine_invalid_schedule_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReferenceEngine(**kwargs)


def test_objective_schedule_interpolates_weights():
    objective = ObjectiveConfig(consistency_weight=0.1, consistency_weight_final=0.5, consistency_lambda_final=0.0)
    midway = objective.at(0.5)
    assert midway.consistency_weight == pytest.approx(0.3)
    assert midway.consistency_lambda == pytest.approx(0.5)
    assert objective.at(1.0).consistency_weight == pytest.approx(0.5)
    assert ObjectiveConfig(consistency_weight=0.3).at(0.7).consistency_weight == 0.3
    with pytest.raises(ValueError, match="progress must be in \\[0, 1\\], got 2"):
        objective.at(2)
    with pytest.raises(ValueError, match="consistency_weight_final must be >= 0, got -0.5"):
        ObjectiveConfig(consistency_weight_final=-0.5)


def test_engine_progress_drives_consistency_weight(tiny_batch):
    model = make_tiny_model(4)
    engine = ReferenceEngine(ObjectiveConfig(consistency_weight=0.0, consistency_weight_final=1.0))
    early = engine.compute_losses(model, *tiny_batch, progress=0.0)
    late = engine.compute_losses(model, *tiny_batch, progress=1.0)
    exit_sum = sum(parts["exit"] for parts in early.node_losses.values())
    torch.testing.assert_close(early.loss.detach(), exit_sum)
    assert late.loss > early.loss


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_level_param_groups_scale_rate_per_level(scale):
    model = make_tiny_model(4)
    groups = level_param_groups(model, 1e-3, scale)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    rates = {id(p): group["lr"] for group in groups for p in group["params"]}
    for node in model.tree.nodes:
        for param in model.node_module(node).parameters():
            assert rates[id(param)] == pytest.approx(1e-3 * scale**node.level)
    for param in model.stem.parameters():
        assert rates[id(param)] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="level_lr_scale must be > 0"):
        level_param_groups(model, 1e-3, 0.0)


def test_engine_pipeline_holds_exact_chained_activations():
    torch.manual_seed(0)
    model = make_tiny_model(6)
    engine = ReferenceEngine(chained_exit_weight=1.0)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(6)]
    for step, (x, y) in enumerate(batches):
        result = engine.compute_losses(model, x, y)
    # After step t, the buffer of boundary i holds the batch of step t - (i - 2), carried
    # through blocks 0 … i - 1: the full network's activation, with that batch's labels.
    for boundary, (hidden_states, labels) in engine.pipeline.items():
        x, y = batches[step - (boundary - 2)]
        with torch.no_grad():
            exact = model.stem(x)
            for block in model.blocks[:boundary]:
                exact = block(exact)
        torch.testing.assert_close(hidden_states, exact)
        assert torch.equal(labels, y)
    assert sorted(engine.pipeline) == [2, 3, 4, 5]
    assert {name for name, parts in result.node_losses.items() if "chained_exit" in parts} == {"2_3", "3_4", "4_5", "5_6"}


def test_engine_chained_exits_stay_local(tiny_batch):
    torch.manual_seed(0)
    model = make_tiny_model(8)
    engine = ReferenceEngine(chained_exit_weight=0.5)
    for _ in range(7):
        result = engine.compute_losses(model, *tiny_batch)
    assert result.critical_path == model.depth + 5
    for node, local_loss in result.local_losses.items():
        model.zero_grad(set_to_none=True)
        local_loss.backward(retain_graph=True)
        touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert touched <= _owned_parameters(model, node)
    engine.reset_pipeline()
    assert engine.pipeline == {}


@pytest.mark.parametrize("trains_head", [True, False])
def test_engine_chained_exit_head_training_is_optional(trains_head, tiny_batch):
    torch.manual_seed(0)
    model = make_tiny_model(4)
    # With the other terms weighted 0, the last leaf's loss is its chained exit alone.
    objective = ObjectiveConfig(exit_weight=0.0, consistency_weight=0.0)
    engine = ReferenceEngine(objective, chained_exit_weight=1.0, chained_exit_trains_head=trains_head)
    for _ in range(3):
        result = engine.compute_losses(model, *tiny_batch)
    last_leaf = model.tree.leaves[-1]
    assert "chained_exit" in result.node_losses[last_leaf.name]
    model.zero_grad(set_to_none=True)
    result.local_losses[last_leaf].backward()
    head_grad = model.head.weight.grad
    if trains_head:
        assert head_grad is not None
        assert head_grad.abs().sum() > 0
    else:
        assert head_grad is None
    assert model.blocks[last_leaf.start].linear.weight.grad.abs().sum() > 0
