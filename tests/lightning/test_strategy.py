import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hbll_lightning  # noqa: F401  registers strategy="hbll"
from hbll_lightning import HBLLModule, HBLLStrategy
from hbll_lightning.strategy import ProcessLayoutError
from tests.conftest import TinyBlock, make_tiny_model


def _loaders(num_samples: int = 64) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, 5, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    dataset = TensorDataset(x, y)
    return DataLoader(dataset, batch_size=16, shuffle=True), DataLoader(dataset, batch_size=32)


def _module(num_blocks: int = 4, **kwargs) -> HBLLModule:
    return HBLLModule.from_modules(
        nn.Linear(5, 8), [TinyBlock(8) for _ in range(num_blocks)], nn.Linear(8, 3), lr=1e-2, **kwargs
    )


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        strategy="hbll", accelerator="cpu", devices=1, max_steps=8, log_every_n_steps=1,
        default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=False,
    )
    return Trainer(**{**defaults, **kwargs})


def test_strategy_name_selects_hbll_strategy(tmp_path):
    assert isinstance(_trainer(tmp_path).strategy, HBLLStrategy)


def test_strategy_trains_with_local_losses(tmp_path):
    torch.manual_seed(0)
    module = _module()
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    train, val = _loaders()
    trainer = _trainer(tmp_path)
    trainer.fit(module, train, val)
    assert trainer.global_step == 8
    assert trainer.strategy.engine.name == "fused"
    changed = {name for name, p in module.model.named_parameters() if not torch.equal(p, before[name])}
    assert "shortcuts.0_4.linear.weight" in changed
    assert "exit_heads.2.weight" in changed
    assert module.last_critical_path == module.model.depth + 5


def test_strategy_logs_every_node_and_depth(tmp_path):
    module = _module()
    train, val = _loaders()
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train)
    logged = dict(trainer.callback_metrics)
    for node in module.model.tree.nodes:
        assert f"train/node/{node.name}/exit" in logged
        assert f"train/node/{node.name}/consistency" in logged
    trainer.validate(module, val, verbose=False)
    logged = trainer.callback_metrics
    for depth in range(module.model.depth + 1):
        assert f"val/depth{depth}/accuracy" in logged
        assert f"val/depth{depth}/loss" in logged


def test_strategy_backprop_method_trains_full_network_only(tmp_path):
    module = _module(method="backprop")
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    train, val = _loaders()
    trainer = _trainer(tmp_path)
    trainer.fit(module, train, val)
    assert trainer.strategy.engine.name == "backprop"
    assert module.last_critical_path == 2 * 4 + 4
    assert not torch.equal(module.model.blocks[3].linear.weight, before["blocks.3.linear.weight"])
    assert torch.equal(module.model.shortcuts["0_4"].linear.weight, before["shortcuts.0_4.linear.weight"])


def test_module_trains_without_hbll_strategy(tmp_path):
    module = _module()
    train, val = _loaders()
    trainer = _trainer(tmp_path, strategy="auto")
    trainer.fit(module, train, val)
    assert trainer.global_step == 8
    assert module.last_critical_path == module.model.depth + 5


def test_strategy_rejects_plain_lightning_module(tmp_path):
    class Plain(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 3)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train, _ = _loaders()
    with pytest.raises(TypeError, match="strategy='hbll' trains an hbll_lightning.HBLLModule, got Plain"):
        _trainer(tmp_path).fit(Plain(), train)


def test_module_unknown_method_raises():
    with pytest.raises(ValueError, match="method must be 'hbll', 'backprop' or 'tbptt<k>'.*got 'dgl'"):
        _module(method="dgl")


def test_module_from_model_trains_given_model(tmp_path):
    model = make_tiny_model(4, width=8)
    module = HBLLModule.from_model(model, lr=1e-2)
    assert module.model is model
    before = model.shortcuts["0_4"].linear.weight.detach().clone()
    train, _ = _loaders()
    _trainer(tmp_path, max_steps=3).fit(module, train)
    assert not torch.equal(model.shortcuts["0_4"].linear.weight, before)


def test_module_from_model_conflicting_exit_heads_raises():
    with pytest.raises(ValueError, match="exit_heads='shared' conflicts with the given model"):
        HBLLModule.from_model(make_tiny_model(2), exit_heads="shared")


def test_strategy_drives_schedules_and_level_rates(tmp_path):
    torch.manual_seed(0)
    module = _module(
        num_blocks=6,
        consistency_sweeps=2,
        sweeps_from=0.5,
        chained_exit_weight=1.0,
        level_lr_scale=0.5,
        consistency_weight=0.1,
        consistency_weight_final=0.5,
    )
    train, _ = _loaders(num_samples=160)
    trainer = _trainer(tmp_path, max_steps=10)
    seen = []
    original = module.run_engine_step

    def record(engine, batch, parallel=None):
        seen.append((module.training_progress(), engine.objective.at(module.training_progress()).consistency_weight))
        loss = original(engine, batch, parallel)
        seen[-1] += (module.last_critical_path,)
        return loss

    module.run_engine_step = record
    trainer.fit(module, train)
    progress = [p for p, _, _ in seen]
    assert progress[0] == 0.0
    assert progress[-1] == 1.0
    assert seen[-1][1] == pytest.approx(0.5)
    # Sweeps add to the critical path only in the second half of training.
    assert [path for p, _, path in seen] == [module.model.depth + 5 + (2 if p >= 0.5 else 0) for p in progress]
    assert sorted(trainer.strategy.engine.pipeline) == [2, 3, 4, 5]
    rates = sorted({group["initial_lr"] for group in trainer.optimizers[0].param_groups})
    assert rates == pytest.approx([1e-2 * 0.5**level for level in (3, 2, 1, 0)])


def test_device_count_mismatch_is_rejected(tmp_path, monkeypatch):
    # What torchrun --nproc_per_node 2 sets, for a trainer set to one device.
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, _ = _loaders()
    expected = r"launcher started 2 processes \(WORLD_SIZE=2\), but the trainer is set to devices=1"
    with pytest.raises(ProcessLayoutError, match=expected):
        _trainer(tmp_path).fit(_module(), train)
