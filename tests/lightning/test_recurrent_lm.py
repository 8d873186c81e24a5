"""A character-level RNN trained by HBLL over time through HBLLModule, the strategy and ``hbll run``."""

import json
import math

import datasets
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import hbll_lightning  # noqa: F401  registers strategy="hbll"
from hbll.checkpoint import load_checkpoint
from hbll.networks import CausalTransformer, CharRNN
from hbll.recurrent import BPTTEngine, RecurrentEngine, RecurrentHBLL
from hbll_lightning import HBLLModule
from hbll_lightning.cli import main
from hbll_lightning.data import LMDataModule


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def shakespeare_chars(block_size: int = 64, max_tokens: int = 200_000) -> LMDataModule:
    return LMDataModule(corpus="shakespeare", tokenizer="char", block_size=block_size, batch_size=32, max_tokens=max_tokens)


def test_short_run_on_shakespeare_learns_well_below_unigram(tmp_path):
    seed_everything(0)
    data = shakespeare_chars()
    module = HBLLModule(CharRNN(max_steps=64, embedding_dim=32, hidden_size=96, lookahead=1), lr=5e-3)
    trainer = Trainer(
        strategy="hbll", accelerator="cpu", max_steps=120, limit_val_batches=5, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert isinstance(module.model, RecurrentHBLL) and isinstance(trainer.strategy.engine, RecurrentEngine)
    rows = {row["path"]: row for row in module.depth_metrics("val")}
    unigram = data.unigram_bits_per_token("val")
    assert 4.5 < unigram < 5.0
    sequential = rows["sequential"]["bits_per_char"]
    assert sequential == pytest.approx(rows["sequential"]["loss"] / math.log(2))
    assert sequential < unigram - 1.0
    assert rows["tree"]["bits_per_char"] < unigram - 0.5
    assert module.last_critical_path == math.ceil(math.log2(64)) + 6
    assert module.mean_step_time() > 0


def test_truncated_backprop_needs_a_recurrent_network():
    with pytest.raises(ValueError, match="needs a recurrent network"):
        HBLLModule(CausalTransformer(num_blocks=2, vocab_size=10, d_model=8, num_heads=2), method="tbptt16")
    module = HBLLModule(CharRNN(max_steps=8, vocab_size=5, hidden_size=8), method="tbptt4")
    assert isinstance(module.engine, BPTTEngine) and module.engine.truncation == 4
    with pytest.raises(NotImplementedError, match="one process"):
        module.build_engine(comm=object())
    with pytest.raises(ValueError, match="consistency_sweeps instead"):
        HBLLModule(CharRNN(max_steps=8, vocab_size=5), chain_length=2)
    with pytest.raises(ValueError, match="trains at one lr"):
        HBLLModule(CharRNN(max_steps=8, vocab_size=5), level_lr_scale=0.5)
    with pytest.raises(ValueError, match="runs step by step"):
        module(torch.zeros(2, 8, dtype=torch.long), depth=0)
    assert module(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 5)


JOB = """\
seed_everything: 0
methods: [hbll, tbptt4]
model:
  network:
    class_path: hbll.networks.CharRNN
    init_args: {max_steps: 16, embedding_dim: 8, hidden_size: 16, lookahead: 1}
  lr: 0.01
data:
  class_path: hbll_lightning.data.LMDataModule
  init_args: {corpus: files, tokenizer: char, block_size: 16, batch_size: 8, val_fraction: 0.2, test_fraction: 0.2}
trainer:
  accelerator: cpu
  strategy: hbll
  max_steps: 6
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def test_run_compares_methods_and_saves_a_loadable_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"To be, or not to be, that is question {i}. Whether 'tis nobler." for i in range(40)))
    config = tmp_path / "job.yaml"
    config.write_text(JOB)
    output = tmp_path / "out"
    assert main(["run", "--config", str(config), "--data.init_args.data_files", f"[{corpus}]", "--output_dir", str(output)]) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["metric"] == "bits_per_char"
    # The vocabulary is every character of the corpus (all occur in the training split)
    # plus the unknown id.
    assert report["network"]["init_args"]["vocab_size"] == len(set(corpus.read_text())) + 1
    assert (output / "depth_vs_bits_per_char.png").is_file()
    hbll, truncated = report["methods"]["hbll"], report["methods"]["tbptt4"]
    assert [row["path"] for row in hbll["test"]] == ["sequential", "tree"]
    assert hbll["critical_path_per_step"] == 4 + 6
    assert truncated["critical_path_per_step"] == 16 + 4 + 4
    assert hbll["step_time_s"] > 0
    assert truncated["step_time_s"] > 0

    model = load_checkpoint(output / "checkpoint")
    assert isinstance(model, RecurrentHBLL) and len(model.lookahead_heads) == 1
    x = torch.randint(0, model.head.out_features, (2, 16))
    torch.testing.assert_close(model(x), model.head(torch.stack([s for s in model.sequence_states(x)], dim=1)))
