"""The adapters reproduce the stock models layer by layer, with padding in the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbll import ReferenceEngine
from hbll_hf import find_architecture, from_transformers, shift_labels
from tests.hf import tiny_models


FAMILIES = {
    "gpt2": tiny_models.gpt2_lm,
    "llama": tiny_models.llama_lm,
    "bert": tiny_models.bert_encoder,
    "bert-classifier": tiny_models.bert_classifier,
    "llama-classifier": tiny_models.llama_classifier,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_reproduce_stock_hidden_states(family):
    torch.manual_seed(0)
    stock = FAMILIES[family]()
    batch = tiny_models.padded_batch()
    with torch.no_grad():
        reference = stock(**batch, output_hidden_states=True)
        model, arch = from_transformers(stock)
        with model.batch(batch):
            hidden_states = model.stem(batch)
            torch.testing.assert_close(hidden_states, reference.hidden_states[0], rtol=0, atol=1e-6)
            for index, block in enumerate(model.blocks):
                hidden_states = block(hidden_states)
                expected = reference.hidden_states[index + 1]
                # The stock models apply the final norm to the last entry of hidden_states.
                if index + 1 == len(model.blocks) and arch.final_norm:
                    torch.testing.assert_close(model.head.norm(hidden_states), expected, rtol=0, atol=1e-5)
                else:
                    torch.testing.assert_close(hidden_states, expected, rtol=0, atol=1e-5)
        output = model(batch)
    expected = reference.logits if hasattr(reference, "logits") else reference.last_hidden_state
    if output.dim() == 3:
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(output[keep], expected[keep], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "family, expected",
    [
        ("gpt2", ("causal_lm", "transformer", "h", "ln_f", "lm_head")),
        ("llama", ("causal_lm", "model", "layers", "norm", "lm_head")),
        ("bert", ("base", "", "encoder.layer", None, None)),
        ("bert-classifier", ("sequence_classification", "bert", "encoder.layer", None, "classifier")),
    ],
)
def test_architecture_is_found_generically(family, expected):
    arch = find_architecture(FAMILIES[family]())
    assert (arch.task, arch.base_prefix, arch.layers, arch.final_norm, arch.output) == expected


def test_adapter_shares_the_stock_modules():
    stock = tiny_models.llama_lm(num_layers=4)
    model, _ = from_transformers(stock)
    assert model.blocks[2].layer is stock.model.layers[2]
    assert model.head.output is stock.lm_head
    assert model.stem.base.embed_tokens is stock.model.embed_tokens
    # The stem contains no layer and no final norm, so no parameter is counted twice.
    assert not any("layers" in name or name.endswith("norm.weight") for name, _ in model.stem.named_parameters())
    assert model.exit_head_policy == "shared"


@pytest.mark.parametrize("init, source", [("first", 0), ("middle", 1), ("last", 3)])
def test_shortcuts_start_from_a_layer_of_their_span(init, source):
    stock = tiny_models.gpt2_lm(num_layers=4)
    model, _ = from_transformers(stock, shortcut_init=init)
    root = model.shortcuts["0_4"].layer
    for (name, copied), (_, original) in zip(root.state_dict().items(), stock.transformer.h[source].state_dict().items()):
        torch.testing.assert_close(copied, original, msg=name)
    assert root is not stock.transformer.h[source]


def test_fresh_shortcuts_differ_from_every_layer():
    torch.manual_seed(0)
    stock = tiny_models.gpt2_lm(num_layers=4)
    model, _ = from_transformers(stock, shortcut_init="fresh")
    weight = model.shortcuts["0_4"].layer.attn.c_attn.weight
    assert all(not torch.equal(weight, layer.attn.c_attn.weight) for layer in stock.transformer.h)


def test_unknown_layer_list_error():
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 4)

    class Odd(nn.Module):
        base_model_prefix = "trunk"

        def __init__(self):
            super().__init__()
            self.trunk = Trunk()
            self.config = None

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match=r"cannot find the layer list.*layers / h / layer.*layers='decoder.layers'"):
        find_architecture(Odd(), task="base")


def test_layers_outside_a_batch_raise_a_clear_error():
    model, _ = from_transformers(tiny_models.llama_lm(num_layers=2))
    with pytest.raises(RuntimeError, match="outside a batch"):
        model.blocks[0](torch.zeros(1, 4, 32))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_engine_step_stays_local(family):
    torch.manual_seed(0)
    stock = FAMILIES[family](num_layers=4).train()
    model, _ = from_transformers(stock)
    batch = tiny_models.padded_batch(batch=4)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    engine = ReferenceEngine()
    for _ in range(3):  # fills the chained-exit pipeline
        model.zero_grad()
        result = engine.compute_losses(model, batch, shift_labels(labels))
    assert torch.isfinite(result.loss)
    # One leaf's local loss reaches only that leaf's block (and the shared stem/head for the first).
    leaf = model.tree.leaves[2]
    model.zero_grad()
    result.local_losses[leaf].backward()
    touched = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"blocks.2"}


def test_minilm_encodes_through_the_bert_adapter():
    from hbll_hf import load_minilm

    encoder, tokenizer = load_minilm()
    batch = tokenizer(["A cat sits on the mat.", "Stock markets fell sharply today after the report."], padding=True, return_tensors="pt")
    model, arch = from_transformers(encoder)
    assert (arch.task, arch.layers, model.num_blocks) == ("base", "encoder.layer", 6)
    with torch.no_grad():
        expected = encoder(**batch).last_hidden_state
        hidden = model(dict(batch))
        torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)
        # Sentence embeddings (mean over real tokens) from every level cut: 384 numbers each.
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for depth in range(model.depth + 1):
            pooled = (model(dict(batch), depth=depth) * mask).sum(1) / mask.sum(1)
            assert pooled.shape == (2, 384)
            assert torch.isfinite(pooled).all()
