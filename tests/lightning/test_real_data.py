"""Short runs on the real Fashion-MNIST files installed by scripts/setup.sh."""

import torch
from lightning.pytorch import Trainer, seed_everything

import hbll_lightning  # noqa: F401  registers strategy="hbll"
from hbll.networks import ConvResNet
from hbll_lightning import HBLLModule
from hbll_lightning.data import FashionMNISTDataModule


def test_fashion_mnist_short_run_beats_chance(tmp_path):
    seed_everything(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    data = FashionMNISTDataModule(batch_size=128)
    module = HBLLModule(ConvResNet(num_blocks=4, width=32), consistency_weight=0.3, lr=3e-3, warmup_steps=20)
    trainer = Trainer(
        strategy="hbll", accelerator="cpu", max_epochs=1, limit_train_batches=250, limit_val_batches=0,
        limit_test_batches=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    try:
        trainer.fit(module, datamodule=data)
        trainer.test(module, datamodule=data, verbose=False)
    finally:
        # Later tests in this process compare runs and must keep the thread count they had.
        torch.set_num_threads(threads)

    rows = module.depth_metrics("test")
    assert [row["depth"] for row in rows] == [0, 1, 2]
    for row in rows:
        # Chance is 10%; this run reached about 74% at every depth.
        assert row["accuracy"] > 0.6, f"depth {row['depth']} reached only {row['accuracy']:.3f}"
