import pytest
import torch
from torch import nn

from hbll import HBLLModel
from tests.conftest import TinyBlock, make_tiny_model


@pytest.mark.parametrize("num_blocks", [1, 3, 8])
def test_model_full_depth_equals_sequential_blocks(num_blocks, tiny_batch):
    model = make_tiny_model(num_blocks)
    x, _ = tiny_batch
    hidden_states = model.stem(x)
    for block in model.blocks:
        hidden_states = block(hidden_states)
    expected = model.head(hidden_states)
    torch.testing.assert_close(model(x, depth=model.depth), expected)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 8])
def test_model_every_level_cut_has_head_shape(num_blocks, tiny_batch):
    model = make_tiny_model(num_blocks)
    x, _ = tiny_batch
    for depth in range(model.depth + 1):
        assert model(x, depth=depth).shape == (4, 3)


def test_model_explicit_cut_runs_named_nodes(tiny_batch):
    model = make_tiny_model(8)
    x, _ = tiny_batch
    hidden_states = model.shortcuts["0_4"](model.stem(x))
    hidden_states = model.shortcuts["4_6"](hidden_states)
    hidden_states = model.blocks[6](hidden_states)
    hidden_states = model.blocks[7](hidden_states)
    expected = model.head(hidden_states)
    torch.testing.assert_close(model(x, cut=[(0, 4), (4, 6), (6, 7), (7, 8)]), expected)


def test_model_invalid_depth_names_range(tiny_batch):
    model = make_tiny_model(8)
    with pytest.raises(ValueError, match=r"depth must be an int in 0\.\.3"):
        model(tiny_batch[0], depth=5)


def test_model_invalid_cut_raises(tiny_batch):
    model = make_tiny_model(8)
    with pytest.raises(ValueError, match="does not partition"):
        model(tiny_batch[0], cut=[(0, 4), (4, 6)])


def test_model_depth_and_cut_together_raises(tiny_batch):
    model = make_tiny_model(4)
    with pytest.raises(ValueError, match="either depth or cut"):
        model(tiny_batch[0], depth=1, cut=[(0, 4)])


def test_model_zero_blocks_raises():
    with pytest.raises(ValueError, match="got 0.*pass a non-empty list of blocks"):
        HBLLModel(nn.Linear(5, 6), [], nn.Linear(6, 3))


def test_model_shape_changing_block_raises(tiny_batch):
    blocks = [TinyBlock(6), nn.Linear(6, 7)]
    model = HBLLModel(nn.Linear(5, 6), blocks, nn.Linear(7, 3))
    with pytest.raises(ValueError, match=r"block 1 changed the shape of hidden_states from \(4, 6\) to \(4, 7\).*stem or the head"):
        model(tiny_batch[0])


def test_model_unknown_exit_head_policy_raises():
    with pytest.raises(ValueError, match="exit_heads must be 'local' or 'shared', got 'none'"):
        make_tiny_model(2, exit_heads="none")


def test_model_shortcuts_are_fresh_block_instances():
    model = make_tiny_model(4)
    assert set(model.shortcuts) == {"0_4", "0_2", "2_4"}
    for shortcut in model.shortcuts.values():
        assert isinstance(shortcut, TinyBlock)
    assert not torch.equal(model.shortcuts["0_2"].linear.weight, model.blocks[0].linear.weight)


def test_model_local_exit_head_per_boundary():
    assert set(make_tiny_model(5).exit_heads) == {"1", "2", "3", "4"}
    assert len(make_tiny_model(5, exit_heads="shared").exit_heads) == 0


def test_model_predict_anytime_stops_at_threshold(tiny_batch):
    model = make_tiny_model(4)
    x, _ = tiny_batch
    logits, stopped_at = model.predict_anytime(x, threshold=1e-6)
    assert stopped_at.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(logits, model(x, depth=0))
    logits, stopped_at = model.predict_anytime(x, threshold=1.0)
    assert stopped_at.tolist() == [model.depth] * 4
    torch.testing.assert_close(logits, model(x))


def test_model_predict_anytime_invalid_threshold_raises(tiny_batch):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        make_tiny_model(2).predict_anytime(tiny_batch[0], threshold=1.5)


def test_cut_network_equals_the_cut():
    from tests.conftest import make_tiny_model

    model = make_tiny_model(5).eval()
    x = torch.randn(3, 5)
    for depth in range(model.depth + 1):
        network = model.cut_network(depth)
        assert len(network) == len(model.tree.level_cut(depth)) + 2
        torch.testing.assert_close(network(x), model(x, depth=depth), rtol=0, atol=0)
    assert network[1] is model.blocks[0]
