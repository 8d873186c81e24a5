"""A tiny causal LM trained through HBLLModule on a text file tokenized with GPT-2's BPE."""

import math

import datasets
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import hbll_lightning  # noqa: F401  registers strategy="hbll"
from hbll.networks import CausalTransformer
from hbll_lightning import HBLLModule
from hbll_lightning.data import LMDataModule

TEXT = "\n\n".join(
    f"The {animal} of {place} sleeps by the river, and the river runs to the sea number {i}."
    for i, (animal, place) in enumerate(
        [("fox", "Kent"), ("owl", "York"), ("hare", "Wales"), ("crow", "Fife"), ("wren", "Bath")] * 8
    )
)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def test_language_model_reports_perplexity_per_depth(tmp_path):
    seed_everything(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    data = LMDataModule(corpus="files", data_files=[str(corpus)], block_size=16, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    network = CausalTransformer(num_blocks=3, d_model=16, num_heads=2, max_positions=16)
    module = HBLLModule(network, lr=1e-2)
    assert module.model is None

    trainer = Trainer(
        strategy="hbll", accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)

    assert network.vocab_size == data.vocab_size
    assert module.model.exit_head_policy == "shared"
    rows = module.depth_metrics("test")
    assert [row["depth"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-5)
        # A model that learned nothing scores about vocab_size.
        assert row["perplexity"] < data.vocab_size / 2


def test_language_model_missing_vocab_without_datamodule_raises(tmp_path):
    module = HBLLModule(CausalTransformer(num_blocks=2, d_model=16, num_heads=2, max_positions=16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long)))
    trainer = Trainer(strategy="hbll", accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"network arguments \['vocab_size'\] are None"):
        trainer.fit(module, loader)
