"""Data modules and file readers for HBLL training with PyTorch Lightning."""

from hbll_lightning.data.idx import DataFormatError, read_idx
from hbll_lightning.data.text import LMDataModule, build_gpt2_tokenizer, load_corpus
from hbll_lightning.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataFormatError",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "LMDataModule",
    "build_gpt2_tokenizer",
    "load_corpus",
    "read_idx",
]
