"""HBLL over time: locality, critical path, exact states, LSTM states and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbll.objectives import ObjectiveConfig
from hbll.recurrent import (
    BPTTEngine,
    RecurrentEngine,
    RecurrentHBLL,
    build_recurrent_engine,
    flat_state,
    parse_method,
)

VOCAB, EMBED, HIDDEN, BATCH = 11, 6, 8, 3


def make_model(cell: str = "gru", steps: int = 16, seed: int = 0) -> RecurrentHBLL:
    torch.manual_seed(seed)
    cell_module = nn.GRUCell(EMBED, HIDDEN) if cell == "gru" else nn.LSTMCell(EMBED, HIDDEN)
    return RecurrentHBLL(nn.Embedding(VOCAB, EMBED), cell_module, nn.Linear(HIDDEN, VOCAB), max_steps=steps)


def batch(steps: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, steps + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def cell_grads(model: RecurrentHBLL) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.cell.parameters()]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_leaf_gradients_add_up_from_one_step_each(cell):
    # With the exit term only, the cell's gradient must equal the sum over steps of the
    # gradient of one cell step on the detached message: no gradient crosses a time step.
    model, (x, y) = make_model(cell), batch(16)
    engine = RecurrentEngine(ObjectiveConfig(consistency_weight=0.0))
    result = engine.compute_losses(model, x, y)
    result.loss.backward()
    engine_grads = cell_grads(model)

    model.zero_grad()
    for leaf in model.tree_for(16).leaves:
        message = result.messages[leaf]
        assert all(not part.requires_grad for part in (message if isinstance(message, tuple) else (message,)))
        state = model.cell(model.stem(x[:, leaf.start]), message)
        logits = model.head(model.readout(state))
        F.cross_entropy(logits, y[:, leaf.start]).backward()
    for engine_grad, local_grad in zip(engine_grads, cell_grads(model)):
        torch.testing.assert_close(engine_grad, local_grad, rtol=1e-5, atol=1e-6)


def test_input_gradient_stays_inside_each_node():
    # A node's loss reaches the inputs of its own span only. So changing the target of
    # step 0 moves the input gradient of the nodes that end at boundary 1, and only leaf
    # [0, 1) ends there.
    model, (x, y) = make_model(steps=8), batch(8)
    inputs = model.stem(x).detach().requires_grad_(True)
    model.stem = nn.Identity()
    engine = RecurrentEngine(ObjectiveConfig(consistency_weight=0.0))
    engine.compute_losses(model, inputs, y).loss.backward()
    base = inputs.grad.clone()
    inputs.grad = None
    changed = y.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    engine.compute_losses(model, inputs, changed).loss.backward()
    moved = (inputs.grad - base).abs().sum(dim=(0, 2))
    assert moved[0] > 0
    assert torch.all(moved[1:] == 0)


def test_every_module_gets_its_gradient():
    model, (x, y) = make_model(steps=8), batch(8)
    RecurrentEngine().compute_losses(model, x, y).loss.backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0
    for shortcut in model.shortcuts.values():
        assert all(p.grad is not None for p in shortcut.parameters())
    for log_sigma in model.log_sigma.values():
        assert log_sigma.grad is not None


@pytest.mark.parametrize("steps", [8, 16, 32, 64, 128, 256])
def test_critical_path_grows_like_log_steps(steps):
    model, (x, y) = make_model(steps=steps), batch(steps)
    hbll = RecurrentEngine().compute_losses(model, x, y).critical_path
    assert hbll == math.ceil(math.log2(steps)) + 6
    assert BPTTEngine().compute_losses(model, x, y).critical_path == 2 * steps + 4
    assert BPTTEngine(truncation=4).compute_losses(model, x, y).critical_path == steps + 4 + 4


def test_sweeps_add_one_round_each():
    model, (x, y) = make_model(steps=16), batch(16)
    paths = [RecurrentEngine(consistency_sweeps=k).compute_losses(model, x, y).critical_path for k in (0, 1, 3)]
    assert paths == [10, 11, 13]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("steps", [16, 13])
def test_sweeps_over_every_step_give_the_exact_states(cell, steps):
    model, (x, y) = make_model(cell, steps), batch(steps)
    exact = model.sequence_states(x)
    result = RecurrentEngine(consistency_sweeps=steps).compute_losses(model, x, y)
    for leaf in model.tree_for(steps).leaves[1:]:
        torch.testing.assert_close(flat_state(result.messages[leaf]), flat_state(exact[leaf.start - 1]))
    for estimate, state in zip(model.approximate_states(x, sweeps=steps), exact):
        torch.testing.assert_close(flat_state(estimate), flat_state(state))
    # Without sweeps the tree's estimates differ from the exact states.
    assert not torch.allclose(flat_state(model.approximate_states(x)[-1]), flat_state(exact[-1]))


def test_lstm_state_pair_is_carried():
    model, (x, y) = make_model("lstm", 16), batch(16)
    result = RecurrentEngine().compute_losses(model, x, y)
    for message in result.messages.values():
        assert isinstance(message, tuple) and len(message) == 2
        assert message[0].shape == message[1].shape == (BATCH, HIDDEN)
    # The first leaf's message is the initial state; the cell state c of later leaves is non-zero.
    assert torch.all(result.messages[model.tree_for(16).leaves[0]][1] == 0)
    assert result.messages[model.tree_for(16).leaves[9]][1].abs().sum() > 0
    result.loss.backward()
    assert all(p.grad is not None for p in model.cell.parameters())
    root = model.cut_state(x, depth=0)
    assert isinstance(root, tuple) and root[1].shape == (BATCH, HIDDEN)
    exact = model.sequence_states(x)[-1]
    full = model.cut_state(x)
    torch.testing.assert_close(full[0], exact[0])
    torch.testing.assert_close(full[1], exact[1])


def test_level_cuts_take_fewer_sequential_evaluations():
    model, (x, _) = make_model(steps=16), batch(16)
    calls = []
    handles = [m.register_forward_hook(lambda *args: calls.append(1)) for m in (model.cell, *model.shortcuts.values())]
    for depth, expected in [(0, 1), (2, 4), (4, 16)]:
        calls.clear()
        model.cut_state(x, depth=depth)
        assert len(calls) == expected
    for handle in handles:
        handle.remove()


def test_user_cell_trains():
    class AddCell(nn.Module):
        """h' = tanh(W x + U h): the plain cell interface with its own initial state."""

        def __init__(self) -> None:
            super().__init__()
            self.input_size = EMBED
            self.x_proj = nn.Linear(EMBED, HIDDEN)
            self.h_proj = nn.Linear(HIDDEN, HIDDEN)

        def initial_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
            return like.new_zeros(batch_size, HIDDEN)

        def forward(self, x_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.x_proj(x_t) + self.h_proj(state))

    torch.manual_seed(0)
    model = RecurrentHBLL(nn.Embedding(VOCAB, EMBED), AddCell(), nn.Linear(HIDDEN, VOCAB), max_steps=8)
    x, y = batch(8)
    RecurrentEngine().compute_losses(model, x, y).loss.backward()
    assert model.cell.x_proj.weight.grad.abs().sum() > 0
    assert model(x).shape == (BATCH, 8, VOCAB)


def test_empty_sequence_raises():
    model = make_model()
    empty = torch.zeros(BATCH, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="length 0"):
        RecurrentEngine().compute_losses(model, empty, empty)
    with pytest.raises(ValueError, match="length 0"):
        model(empty)


def test_state_shape_change_raises():
    class GrowingCell(nn.Module):
        input_size = EMBED

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(EMBED, HIDDEN + 1)

        def initial_state(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
            return like.new_zeros(batch_size, HIDDEN)

        def forward(self, x_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            return self.proj(x_t)

    model = RecurrentHBLL(nn.Embedding(VOCAB, EMBED), GrowingCell(), nn.Linear(HIDDEN, VOCAB), max_steps=8)
    x, y = batch(8)
    message = r"changed the state from \(3, 8\) to \(3, 9\)"
    with pytest.raises(ValueError, match=message):
        RecurrentEngine().compute_losses(model, x, y)
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        BPTTEngine().compute_losses(model, x, y)


def test_bare_cell_needs_sizes_and_state():
    class Bare(nn.Module):
        def forward(self, x_t, state):
            return state

    with pytest.raises(ValueError, match="pass input_size"):
        RecurrentHBLL(nn.Identity(), Bare(), nn.Identity(), max_steps=4)
    with pytest.raises(ValueError, match="initial_state"):
        RecurrentHBLL(nn.Identity(), Bare(), nn.Identity(), max_steps=4, input_size=EMBED)


def test_long_sequence_and_bad_targets_raise():
    model = make_model(steps=8)
    x, y = batch(9)
    with pytest.raises(ValueError, match="max_steps=8"):
        RecurrentEngine().compute_losses(model, x, y)
    x, y = batch(8)
    with pytest.raises(ValueError, match="one target per step"):
        RecurrentEngine().compute_losses(model, x, y[:, :4])


def test_truncated_bptt_stops_gradients_at_window_starts():
    model, (x, y) = make_model(steps=8), batch(8)
    inputs = model.stem(x).detach().requires_grad_(True)
    model.stem = nn.Identity()
    losses = {}
    for truncation in (None, 4):
        inputs.grad = None
        # The loss of the last step only.
        engine = BPTTEngine(ObjectiveConfig(task_loss=lambda logits, target: F.cross_entropy(logits[:, -1], target[:, -1])), truncation)
        engine.compute_losses(model, inputs, y).loss.backward()
        losses[truncation] = inputs.grad.abs().sum(dim=(0, 2))
    assert torch.all(losses[None] > 0)
    assert torch.all(losses[4][:4] == 0)
    assert torch.all(losses[4][4:] > 0)


def test_method_names():
    assert parse_method("hbll") == ("hbll", None)
    assert parse_method("backprop") == ("backprop", None)
    assert parse_method("tbptt32") == ("backprop", 32)
    assert isinstance(build_recurrent_engine("tbptt16"), BPTTEngine)
    assert build_recurrent_engine("tbptt16").truncation == 16
    assert isinstance(build_recurrent_engine("hbll", consistency_sweeps=2), RecurrentEngine)
    for bad in ("tbptt0", "tbptt", "bptt", "HBLL"):
        with pytest.raises(ValueError, match="tbptt<k>"):
            parse_method(bad)


def copy_accuracy(engine, lookahead: int, steps: int = 200) -> float:
    # Predict the previous token: the state after step t must keep x_{t-1}.
    torch.manual_seed(0)
    model = RecurrentHBLL(nn.Embedding(VOCAB, EMBED), nn.GRUCell(EMBED, 16), nn.Linear(16, VOCAB), max_steps=16, lookahead=lookahead)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)

    def copy_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, VOCAB, (size, 16), generator=generator)
        return x, torch.cat([torch.zeros(size, 1, dtype=torch.long), x[:, :-1]], dim=1)

    for _ in range(steps):
        optimizer.zero_grad()
        engine.compute_losses(model, *copy_batch(32)).loss.backward()
        optimizer.step()
    x, y = copy_batch(64)
    with torch.no_grad():
        return float((model(x).argmax(-1)[:, 1:] == y[:, 1:]).float().mean())


def test_lookahead_heads_teach_the_cell_to_remember():
    # No per-step loss needs x_t from the state after step t, so the copy task stays
    # at chance. One lookahead head needs it, and the task is learned.
    assert copy_accuracy(RecurrentEngine(consistency_sweeps=16), lookahead=0) < 0.3
    assert copy_accuracy(RecurrentEngine(consistency_sweeps=16), lookahead=1) > 0.9
    assert copy_accuracy(BPTTEngine(), lookahead=0) > 0.9


def test_long_cut_state_runs_by_window():
    model = make_model(steps=8)
    x, _ = batch(20)
    exact = model.sequence_states(x)
    torch.testing.assert_close(model.cut_state(x), exact[-1])
    calls = []
    handles = [m.register_forward_hook(lambda *args: calls.append(1)) for m in (model.cell, *model.shortcuts.values())]
    model.cut_state(x, depth=0)
    # Windows of 8, 8 and 4 steps, one root evaluation each.
    assert len(calls) == 3
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="max_steps=8"):
        model.cut_state(x, cut=[(0, 20)])


def make_chunked_model(cell: str = "gru", steps: int = 32, leaf_steps: int = 4) -> RecurrentHBLL:
    torch.manual_seed(0)
    cell_module = nn.GRUCell(EMBED, HIDDEN) if cell == "gru" else nn.LSTMCell(EMBED, HIDDEN)
    return RecurrentHBLL(
        nn.Embedding(VOCAB, EMBED), cell_module, nn.Linear(HIDDEN, VOCAB), max_steps=steps, leaf_steps=leaf_steps
    )


@pytest.mark.parametrize("steps", [32, 30])
def test_chunked_leaves_backprop_inside_each_leaf(steps):
    # A leaf of 4 steps trains like truncated BPTT over its steps from its detached message.
    model, (x, y) = make_chunked_model(steps=steps), batch(steps)
    engine = RecurrentEngine(ObjectiveConfig(consistency_weight=0.0))
    result = engine.compute_losses(model, x, y)
    result.loss.backward()
    engine_grads = cell_grads(model)

    model.zero_grad()
    for leaf in model.tree_for(steps).leaves:
        start, end = model.step_span(leaf, steps)
        state, loss = result.messages[leaf], 0.0
        for t in range(start, end):
            state = model.cell(model.stem(x[:, t]), state)
            loss = loss + F.cross_entropy(model.head(model.readout(state)), y[:, t])
        loss.backward()
    for engine_grad, local_grad in zip(engine_grads, cell_grads(model)):
        torch.testing.assert_close(engine_grad, local_grad, rtol=1e-5, atol=1e-6)


def test_chunked_critical_path_adds_two_leaf_lengths():
    model, (x, y) = make_chunked_model(steps=64, leaf_steps=8), batch(64)
    # 8 leaves: 3 message rounds, 8 steps forward and 8 back, stem, exit and their backward.
    assert RecurrentEngine().compute_losses(model, x, y).critical_path == 3 + 2 * 8 + 4
    assert RecurrentEngine(consistency_sweeps=2).compute_losses(model, x, y).critical_path == 3 + 2 * 8 + 4 + 2 * 8


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_chunked_sweeps_give_the_exact_states(cell):
    model, (x, y) = make_chunked_model(cell, steps=30), batch(30)
    exact = model.sequence_states(x)
    for estimate, state in zip(model.approximate_states(x, sweeps=7), exact, strict=True):
        torch.testing.assert_close(flat_state(estimate), flat_state(state))
    torch.testing.assert_close(flat_state(model.cut_state(x)), flat_state(exact[-1]))
    # Level cut 1 of 8 leaves: two shortcuts, one evaluation each.
    assert model.sequential_evaluations(model.tree_for(30).level_cut(1), 30) == 2
    assert model.sequential_evaluations(model.tree_for(30).leaves, 30) == 30


def test_shortcut_shape_error_names_the_cell():
    class GrowingCell(nn.GRUCell):
        def forward(self, x_t, state):
            return torch.cat([super().forward(x_t, state), state[:, :1]], dim=1)

    model = RecurrentHBLL(nn.Embedding(VOCAB, EMBED), GrowingCell(EMBED, HIDDEN), nn.Linear(HIDDEN, VOCAB), max_steps=8)
    x, y = batch(8)
    with pytest.raises(ValueError, match="shortcut of scale \\d \\(built from a copy of the cell GrowingCell\\)"):
        RecurrentEngine().compute_losses(model, x, y)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        RecurrentHBLL(nn.Embedding(VOCAB, EMBED), nn.GRUCell(EMBED, HIDDEN), nn.Linear(HIDDEN, VOCAB), max_steps=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: make_chunked_model(leaf_steps=0), "leaf_steps must be >= 1"),
        (lambda: RecurrentHBLL(nn.Embedding(VOCAB, EMBED), nn.GRUCell(EMBED, HIDDEN), nn.Linear(HIDDEN, VOCAB), max_steps=8, lookahead=-1), "lookahead must be >= 0"),
        (lambda: RecurrentEngine(lookahead_weight=-1.0), "lookahead_weight must be >= 0"),
        (lambda: RecurrentEngine(consistency_sweeps=-1), "consistency_sweeps must be >= 0"),
        (lambda: BPTTEngine(truncation=0), "truncation must be >= 1"),
    ],
)
def test_invalid_options_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()
