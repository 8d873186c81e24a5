"""The fused engine trains exactly like the reference engine, and falls back where it cannot fuse."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from hbll import ConvResNet, CausalTransformer, ObjectiveConfig, ReferenceEngine
from hbll.fused import FusedEngine, fusion_key
from tests.conftest import make_tiny_model


def _train(model, engine, batches, steps=20, optimizer_class="adamw"):
    torch.manual_seed(1)  # the chain's random start leaf
    if optimizer_class == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        engine.compute_losses(model, x, y, progress=step / (steps - 1)).loss.backward()
        optimizer.step()
    return model


def _conv_batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 12, 12, generator=generator), torch.randint(0, 10, (8,), generator=generator)) for _ in range(4)]


def _lm_batches():
    generator = torch.Generator().manual_seed(0)
    return [(ids[:, :-1], ids[:, 1:]) for ids in (torch.randint(0, 50, (4, 17), generator=generator) for _ in range(4))]


CASES = {
    "conv-local-heads": (lambda: ConvResNet(num_blocks=6, in_channels=1, num_classes=10, width=8).build_model(), _conv_batches),
    "transformer-shared-head": (
        lambda: CausalTransformer(num_blocks=5, vocab_size=50, max_positions=16, d_model=16, num_heads=2).build_model(),
        _lm_batches,
    ),
    "mlp-sweeps-chain": (lambda: make_tiny_model(7), lambda: [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_reference_after_20_steps(case):
    build, batches = CASES[case]
    torch.manual_seed(0)
    model = build()
    data = batches()
    options = {"consistency_sweeps": 2, "chain_length": 2} if case == "mlp-sweeps-chain" else {}
    objective = ObjectiveConfig(consistency_weight=0.3)
    # The attention key bias has an exactly zero gradient (softmax ignores a constant
    # shift), so AdamW turns rounding noise into steps of size lr there, whichever engine
    # runs; SGD keeps both runs within rounding.
    optimizer_class = "sgd" if case == "transformer-shared-head" else "adamw"
    # Multithreaded convolutions split their sums differently in a batched call, and
    # AdamW amplifies that rounding on small gradients; one thread keeps both runs comparable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _train(copy.deepcopy(model), ReferenceEngine(objective, **options), data, optimizer_class=optimizer_class)
        fused = _train(copy.deepcopy(model), FusedEngine(objective, **options), data, optimizer_class=optimizer_class)
    finally:
        torch.set_num_threads(threads)
    for (name, expected), (_, actual) in zip(reference.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, msg=name)
    x = data[0][0]
    with torch.no_grad():
        for depth in range(reference.depth + 1):
            torch.testing.assert_close(fused(x, depth=depth), reference(x, depth=depth), rtol=0, atol=1e-5)


def test_fused_groups_a_level_into_one_call():
    model = make_tiny_model(8)
    engine = FusedEngine()
    calls = []
    original = engine._stacked_call

    def counting(modules, inputs):
        calls.append(len(modules))
        return original(modules, inputs)

    engine._stacked_call = counting
    engine.compute_losses(model, torch.randn(4, 5), torch.randint(0, 3, (4,)))
    # Node outputs: 8 leaves and 7 shortcuts share one structure, so one call covers all 15.
    assert 15 in calls
    # Messages: one call per level with more than one left child (levels 1 and 2).
    assert 2 in calls
    assert 4 in calls


class BatchStatBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states):
        return hidden_states + self.linear(self.norm(hidden_states))


def test_batch_statistics_are_never_fused():
    block = BatchStatBlock(4).train()
    assert fusion_key(block, torch.zeros(2, 4)) is None
    assert fusion_key(block.eval(), torch.zeros(2, 4)) is not None


class UnbatchableBlock(nn.Module):
    """A block whose forward calls .item(), which vmap cannot batch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states):
        scale = float(hidden_states.abs().max().item()) + 1.0
        return hidden_states + self.linear(hidden_states) / scale


def test_unfusable_modules_fall_back_with_one_debug_line(caplog):
    from hbll import HBLLModel

    torch.manual_seed(0)
    model = HBLLModel(nn.Linear(5, 4), [UnbatchableBlock(4) for _ in range(4)], nn.Linear(4, 3))
    batch = (torch.randn(6, 5), torch.randint(0, 3, (6,)))
    reference = _train(copy.deepcopy(model), ReferenceEngine(), [batch], steps=3)
    engine = FusedEngine()
    with caplog.at_level(logging.DEBUG, logger="hbll.fused"):
        fused = _train(copy.deepcopy(model), engine, [batch], steps=3)
    lines = [record for record in caplog.records if "run one at a time" in record.getMessage()]
    assert len(lines) == len(engine.unfusable) >= 1
    assert "UnbatchableBlock" in lines[0].getMessage()
    for (name, expected), (_, actual) in zip(reference.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_invalid_randomness_raises():
    with pytest.raises(ValueError, match="randomness"):
        FusedEngine(randomness="other")


def test_build_engine_picks_the_fused_engine():
    from hbll import build_engine

    auto = build_engine("hbll")
    assert isinstance(auto, FusedEngine) and auto.device_types == ("cuda",)
    assert build_engine("hbll", engine="fused").device_types is None
    assert type(build_engine("hbll", engine="reference")) is ReferenceEngine
    with pytest.raises(ValueError, match="engine must be one of"):
        build_engine("hbll", engine="vmap")


def test_auto_engine_runs_cpu_calls_one_at_a_time():
    engine = FusedEngine(device_types=("cuda",))
    engine._stacked_call = lambda modules, inputs: pytest.fail("CPU calls must not be batched under device_types=('cuda',)")
    engine.compute_losses(make_tiny_model(4), torch.randn(4, 5), torch.randint(0, 3, (4,)))
