"""Variable-depth checkpoints: save, load one cut, export a stock model; equal logits throughout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hbll_hf import HBLLConfig, HBLLForCausalLM, HBLLForSequenceClassification
from tests.hf import tiny_models


def _perturb_shortcuts(model):
    # Shortcuts start as layer copies; make every cut distinct from the full network.
    with torch.no_grad():
        for param in model.hbll.shortcuts.parameters():
            param.add_(0.02 * torch.randn_like(param))


CAUSAL = {
    "gpt2": tiny_models.gpt2_lm,
    "llama": tiny_models.llama_lm,
    "llama-tied": lambda: tiny_models.llama_lm(tie=True),
}


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_lm_round_trip_at_every_depth(family, tmp_path):
    torch.manual_seed(0)
    model = HBLLForCausalLM.from_stock(CAUSAL[family](), shortcut_init="middle").eval()
    _perturb_shortcuts(model)
    model.save_pretrained(tmp_path / "hbll")
    batch = tiny_models.padded_batch()
    keep = batch["attention_mask"].bool()
    stock_class = type(model.hbll.head.output).__name__  # sanity: a Linear LM head
    assert stock_class == "Linear"
    for depth in range(model.hbll.depth + 1):
        with torch.no_grad():
            expected = model(**batch, depth=depth).logits
            cut = HBLLForCausalLM.from_pretrained(tmp_path / "hbll", depth=depth)
            torch.testing.assert_close(cut(**batch).logits[keep], expected[keep], rtol=0, atol=1e-5)
            model.export_cut(depth=depth, save_directory=tmp_path / f"cut{depth}")
            stock = AutoModelForCausalLM.from_pretrained(tmp_path / f"cut{depth}").eval()
            assert stock.config.num_hidden_layers == len(model.hbll.tree.level_cut(depth))
            assert type(stock).__name__ == model.config.stock_config["architectures"][0]
            torch.testing.assert_close(stock(**batch).logits[keep], expected[keep], rtol=0, atol=1e-5)
    # The Auto class loads the whole tree once hbll_hf is imported.
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "hbll")
    assert isinstance(whole, HBLLForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(whole(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_cut_loads_only_its_tensors(tmp_path):
    model = HBLLForCausalLM.from_stock(tiny_models.llama_lm(num_layers=8))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        stored = set(file.keys())
    cut = HBLLForCausalLM.from_pretrained(tmp_path, depth=1)
    names = set(cut.state_dict())
    assert names < stored
    node_modules = {name.split(".")[2] for name in names if name.startswith(("hbll.blocks.", "hbll.shortcuts."))}
    assert node_modules == {"0_4", "4_8"}
    assert sum(p.numel() for p in cut.parameters()) < sum(p.numel() for p in model.parameters()) / 3


def test_tied_embeddings_are_stored_once(tmp_path):
    model = HBLLForCausalLM.from_stock(tiny_models.llama_lm(tie=True))
    assert model.hbll.head.output.weight is model.hbll.stem.base.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        tied = json.loads(file.metadata()["hbll_tied"])
    assert tied == {"hbll.head.output.weight": "hbll.stem.base.embed_tokens.weight"}
    loaded = HBLLForCausalLM.from_pretrained(tmp_path)
    assert loaded.hbll.head.output.weight is loaded.hbll.stem.base.embed_tokens.weight


def test_bert_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = HBLLForSequenceClassification.from_stock(tiny_models.bert_classifier()).eval()
    _perturb_shortcuts(model)
    model.save_pretrained(tmp_path / "hbll")
    batch = tiny_models.padded_batch()
    for depth in range(model.hbll.depth + 1):
        with torch.no_grad():
            expected = model(**batch, depth=depth).logits
            cut = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hbll", depth=depth)
            torch.testing.assert_close(cut(**batch).logits, expected, rtol=0, atol=1e-5)
            model.export_cut(depth=depth, save_directory=tmp_path / f"cut{depth}")
            stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"cut{depth}").eval()
            torch.testing.assert_close(stock(**batch).logits, expected, rtol=0, atol=1e-5)


def test_config_records_the_stock_architecture():
    model = HBLLForCausalLM.from_stock(tiny_models.gpt2_lm(num_layers=6))
    config = model.config
    assert isinstance(config, HBLLConfig) and config.model_type == "hbll"
    assert config.num_blocks == 6
    assert config.vocab_size == tiny_models.VOCAB
    assert config.arch.layers == "h"
    assert config.stock().model_type == "gpt2"


def test_depth_errors_name_the_valid_range(tmp_path):
    model = HBLLForCausalLM.from_stock(tiny_models.gpt2_lm(num_layers=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"depth must be in 0\.\.2"):
        HBLLForCausalLM.from_pretrained(tmp_path, depth=3)
    cut = HBLLForCausalLM.from_pretrained(tmp_path, depth=1)
    with pytest.raises(ValueError, match="contains level cut 1 only"):
        cut(**tiny_models.padded_batch(), depth=2)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HBLLForCausalLM.from_pretrained(tmp_path, subfolder="nothing")
