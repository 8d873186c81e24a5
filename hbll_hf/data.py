"""Causal language modelling datasets in the layout that ``transformers.Trainer`` expects.

The corpora, the tokenization and the assignment of documents to splits are those of
``hbll_lightning.data.text``, so with the same fractions and ``seed=0`` both packages hold
out the same documents. The blocks differ: ``LMDataModule`` shifts labels itself and cuts
``block_size + 1`` tokens per block, while transformers causal LMs shift ``labels``
internally, so here ``labels`` equals ``input_ids`` and a block has ``block_size`` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from hbll_lightning.data.text import _join_documents, _split_documents, _tokenize_gpt2, check_fractions, load_corpus

__all__ = ["SPLITS", "lm_datasets"]

log = logging.getLogger(__name__)

# Split names of the returned DatasetDict, mapped to the split names of hbll_lightning.data.text.
SPLITS = {"train": "train", "validation": "val", "test": "test"}

_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int64")),
        "attention_mask": datasets.List(datasets.Value("int64")),
        "labels": datasets.List(datasets.Value("int64")),
    }
)


def lm_datasets(
    tokenizer: PreTrainedTokenizerBase,
    corpus: str = "wikipedia",
    block_size: int = 128,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    data_files: Sequence[str] | None = None,
) -> datasets.DatasetDict:
    """Tokenize a corpus and cut each split into fixed-length blocks for causal LM training.

    Documents are assigned to the ``"train"``, ``"validation"`` and ``"test"`` splits
    by a permutation drawn from ``seed``, and ``seed=0`` gives the split of
    ``LMDataModule``. Within a split the documents are joined with
    ``tokenizer.eos_token_id`` between them, and the stream is cut into
    non-overlapping blocks of ``block_size`` tokens, dropping the remainder. The
    tokenizer's own special tokens, such as a BOS token, are kept in each document.

    Each row has ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (equal to ``input_ids``), all int64 lists of length ``block_size``, so
    ``transformers.default_data_collator`` batches the splits for a causal LM.

    Args:
        tokenizer: any transformers tokenizer with an EOS token.
        corpus: ``"wikipedia"``, ``"shakespeare"`` or ``"files"``
            (see ``hbll_lightning.data.text.load_corpus``).
        block_size: tokens per row.
        max_train_tokens: maximum number of tokens kept from the start of the
            training stream. ``None`` keeps all.
        max_eval_tokens: the same cap for the validation and the test streams, each.
        val_fraction: fraction of documents in the validation split.
        test_fraction: fraction of documents in the test split.
        seed: seed of the document permutation.
        data_files: text files for ``corpus="files"``, one document per paragraph.

    Raises:
        ValueError: an invalid argument, a tokenizer without EOS token, or a split
            with a positive fraction that holds less than one block.
    """
    _check_arguments(tokenizer, block_size, max_train_tokens, max_eval_tokens, val_fraction, test_fraction)
    documents = _tokenize_gpt2(load_corpus(corpus, data_files), tokenizer)
    split_index = _split_documents(len(documents), val_fraction, test_fraction, seed=seed)

    caps = {"train": max_train_tokens, "validation": max_eval_tokens, "test": max_eval_tokens}
    fractions = {"train": 1.0, "validation": val_fraction, "test": test_fraction}
    splits = {}
    sizes = []
    for split, text_split in SPLITS.items():
        indices = split_index[text_split]
        stream = _join_documents([documents[i] for i in indices], eos_id=tokenizer.eos_token_id)
        if caps[split] is not None:
            stream = stream[: caps[split]]
        blocks = _to_blocks(stream, block_size)
        if fractions[split] > 0 and len(blocks) == 0:
            raise ValueError(
                f"The {split} split of corpus {corpus!r} has {len(stream)} tokens, fewer than one block of "
                f"block_size={block_size}. Lower block_size, raise the split's token cap or fraction, "
                f"or use a larger corpus."
            )
        splits[split] = _blocks_dataset(blocks)
        sizes.append(f"{split} {len(indices)} documents / {len(stream)} tokens / {len(blocks)} blocks")

    log.info(
        "lm_datasets corpus=%s tokenizer=%s vocab_size=%d block_size=%d: %s",
        corpus,
        type(tokenizer).__name__,
        len(tokenizer),
        block_size,
        ", ".join(sizes),
    )
    return datasets.DatasetDict(splits)


def _to_blocks(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    num_blocks = len(stream) // block_size
    return stream[: num_blocks * block_size].view(num_blocks, block_size)


def _blocks_dataset(blocks: torch.Tensor) -> datasets.Dataset:
    rows = blocks.tolist()
    return datasets.Dataset.from_dict(
        {
            "input_ids": rows,
            "attention_mask": torch.ones_like(blocks).tolist(),
            "labels": rows,
        },
        features=_FEATURES,
    )


def _check_arguments(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_train_tokens: int | None,
    max_eval_tokens: int | None,
    val_fraction: float,
    test_fraction: float,
) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token, which separates documents. "
            f"Set tokenizer.eos_token first."
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    for name, cap in (("max_train_tokens", max_train_tokens), ("max_eval_tokens", max_eval_tokens)):
        if cap is not None and cap < block_size:
            raise ValueError(
                f"{name}={cap} is smaller than one block of block_size={block_size} tokens. "
                f"Raise {name} or pass None to keep all tokens."
            )
    check_fractions(val_fraction, test_fraction)
