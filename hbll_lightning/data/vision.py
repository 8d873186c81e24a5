"""Lightning data modules for Fashion-MNIST, CIFAR-10 and CIFAR-100.

Each module loads the whole dataset into memory as float32 tensors, scaled to
[0, 1] and then normalised per channel with the mean and standard deviation
of its training split. A seeded random subset of the official training set
becomes the validation split, and the official test set is the test split.
Batches are ``(x, y)`` tuples with ``x`` of shape ``(B, *input_shape)`` and
``y`` int64 class indices.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from hbll_lightning.data.idx import DataFormatError, read_idx

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "FASHION_MNIST_DIR",
    "FashionMNISTDataModule",
    "ImageDataModule",
]

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_MNIST_FIX = (
    "Install the files with `apt-get install -y dataset-fashion-mnist`, "
    "or pass --data.data_dir with a directory that contains them."
)
_CIFAR_FIX = (
    "Download the '{name} python version' archive from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it and pass --data.data_dir with the extracted {subdir} directory or its parent."
)


class ImageDataModule(pl.LightningDataModule):
    """Base data module for in-memory image classification datasets.

    Subclasses set ``num_classes`` and ``input_shape`` and implement
    ``load_arrays``. Loading happens once, in the first ``setup`` call.
    """

    num_classes: int
    input_shape: tuple[int, int, int]

    @property
    def in_channels(self) -> int:
        """Channels of one image, the first entry of ``input_shape``."""
        return self.input_shape[0]

    def __init__(self, batch_size: int, val_size: int, num_workers: int, split_seed: int) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("val_size", val_size, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Load ``(train_images, train_labels, test_images, test_labels)``.

        Images are uint8 of shape ``(N, *input_shape)`` and labels are int64 of shape ``(N,)``.
        """
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load, split and normalise the dataset on the first call. Later calls do nothing."""
        if self.train_set is not None:
            return
        train_images, train_labels, test_images, test_labels = self.load_arrays()
        self._check_arrays("training", train_images, train_labels)
        self._check_arrays("test", test_images, test_labels)

        train_index, val_index = self._split_indices(len(train_images))
        train_float = _to_unit_float(train_images[train_index])
        self.mean = train_float.mean(dim=(0, 2, 3))
        self.std = train_float.std(dim=(0, 2, 3)).clamp_min(1e-8)

        val_float = _to_unit_float(train_images[val_index])
        test_float = _to_unit_float(test_images)
        self.train_set = TensorDataset(_normalise(train_float, self.mean, self.std), train_labels[train_index])
        self.val_set = TensorDataset(_normalise(val_float, self.mean, self.std), train_labels[val_index])
        self.test_set = TensorDataset(_normalise(test_float, self.mean, self.std), test_labels)
        log.info(
            "%s: %d training, %d validation, %d test images of shape %s, %d classes",
            type(self).__name__,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
            self.input_shape,
            self.num_classes,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before a dataloader is requested.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _split_indices(self, num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.val_size >= num_train:
            raise ValueError(
                f"val_size={self.val_size} must be smaller than the {num_train} training images. "
                f"Pass a smaller --data.val_size."
            )
        generator = torch.Generator().manual_seed(self.split_seed)
        permutation = torch.randperm(num_train, generator=generator)
        val_index = permutation[: self.val_size].sort().values
        train_index = permutation[self.val_size :].sort().values
        return train_index, val_index

    def _check_arrays(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.input_shape:
            raise DataFormatError(
                f"{type(self).__name__}: expected {split} images as uint8 of shape (N, *{self.input_shape}), "
                f"found {images.dtype} of shape {tuple(images.shape)}. Re-download the dataset files."
            )
        if labels.shape != (len(images),):
            raise DataFormatError(
                f"{type(self).__name__}: expected {len(images)} {split} labels to match the images, "
                f"found shape {tuple(labels.shape)}. Re-download the dataset files."
            )
        if len(labels) > 0 and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataFormatError(
                f"{type(self).__name__}: expected {split} labels in [0, {self.num_classes}), "
                f"found values from {int(labels.min())} to {int(labels.max())}. Re-download the dataset files."
            )


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST: 60,000 training and 10,000 test grayscale 28x28 images in 10 classes.

    ``data_dir`` contains ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
    each gzip-compressed with a ``.gz`` suffix or raw without it. The default
    is the directory that the Debian package dataset-fashion-mnist installs.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_size, num_workers, split_seed)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST directory not found: {self.data_dir}. {_FASHION_MNIST_FIX}")
        arrays = []
        for split in ("train", "t10k"):
            images = read_idx(self._find_file(f"{split}-images-idx3-ubyte"))
            labels = read_idx(self._find_file(f"{split}-labels-idx1-ubyte"))
            arrays += [images.unsqueeze(1), labels.long()]
        return arrays[0], arrays[1], arrays[2], arrays[3]

    def _find_file(self, stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            path = self.data_dir / name
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {self.data_dir / stem}.gz (or {stem} without .gz). {_FASHION_MNIST_FIX}"
        )


class CIFARDataModule(ImageDataModule):
    """Base for CIFAR-10 and CIFAR-100 read from the pickled "python version" batches.

    ``data_dir`` is the extracted directory (``cifar-10-batches-py`` or
    ``cifar-100-python``) or its parent.

    NOTE: the batches are pickles, and loading a pickle can run arbitrary
    code, so pass only files from a trusted source.
    """

    input_shape = (3, 32, 32)
    dataset_name: str
    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_size, num_workers, split_seed)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        directory = self._resolve_dir()
        train_images, train_labels = self._read_batches(directory, self.train_files)
        test_images, test_labels = self._read_batches(directory, self.test_files)
        return train_images, train_labels, test_images, test_labels

    def _fix(self) -> str:
        return _CIFAR_FIX.format(name=self.dataset_name, subdir=self.subdir)

    def _resolve_dir(self) -> Path:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"{self.dataset_name} directory not found: {self.data_dir}. {self._fix()}")
        nested = self.data_dir / self.subdir
        return nested if nested.is_dir() else self.data_dir

    def _read_batches(self, directory: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.dataset_name} file not found: {path}. {self._fix()}")
            batch_images, batch_labels = self._read_batch(path)
            images.append(batch_images)
            labels.append(batch_labels)
        return torch.cat(images), torch.cat(labels)

    def _read_batch(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _unpickle(path, self._fix())
        if not isinstance(batch, dict) or b"data" not in batch or self.label_key not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataFormatError(
                f"Invalid {self.dataset_name} batch {path}: expected a dict with keys b'data' and "
                f"{self.label_key!r}, found {found}. {self._fix()}"
            )
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[self.label_key])
        pixels = int(np.prod(self.input_shape))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
            raise DataFormatError(
                f"Invalid {self.dataset_name} batch {path}: expected b'data' as uint8 of shape (N, {pixels}), "
                f"found {data.dtype} of shape {data.shape}. {self._fix()}"
            )
        if labels.shape != (len(data),):
            raise DataFormatError(
                f"Invalid {self.dataset_name} batch {path}: expected {len(data)} labels under "
                f"{self.label_key!r}, found shape {labels.shape}. {self._fix()}"
            )
        # Rows store the red, green and blue planes one after another (CHW order).
        images = torch.from_numpy(data.copy()).view(len(data), *self.input_shape)
        return images, torch.from_numpy(labels.astype(np.int64))


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: 50,000 training and 10,000 test colour 32x32 images in 10 classes."""

    num_classes = 10
    dataset_name = "CIFAR-10"
    subdir = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{index}" for index in range(1, 6))
    test_files = ("test_batch",)
    label_key = b"labels"


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100: 50,000 training and 10,000 test colour 32x32 images in 100 fine classes."""

    num_classes = 100
    dataset_name = "CIFAR-100"
    subdir = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = b"fine_labels"


def _unpickle(path: Path, fix: str) -> Any:
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="bytes")
    # The pickle documentation lists these exceptions for invalid data, and an
    # unsupported protocol number raises ValueError.
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        raise DataFormatError(f"Invalid pickle file {path}: failed to unpickle ({error!r}). {fix}") from error


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalise ``(N, C, H, W)`` images in place with per-channel ``mean`` and ``std``."""
    return images.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
