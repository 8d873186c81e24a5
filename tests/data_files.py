"""Writers of tiny data files in the real formats, for tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    code = IDX_CODES[array.dtype.type]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_fashion_mnist(directory: Path, num_train: int, num_test: int, compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, count in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


# An `hbll run` job of HBLL and backprop on a 3-block network: 5 training steps.
JOB_CONFIG = """\
seed_everything: 3
methods: [hbll, backprop]
model:
  network:
    class_path: hbll.networks.ConvResNet
    init_args: {num_blocks: 3, width: 8, downsample: 4}
  lr: 0.01
data:
  class_path: hbll_lightning.data.FashionMNISTDataModule
  init_args: {batch_size: 32, val_size: 40}
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def write_job_files(directory: Path) -> tuple[Path, Path]:
    """Write ``JOB_CONFIG`` and its tiny Fashion-MNIST files, and return the config and data paths."""
    data_dir = write_fashion_mnist(directory / "fashion-mnist", num_train=200, num_test=60)
    config = directory / "job.yaml"
    config.write_text(JOB_CONFIG)
    return config, data_dir
