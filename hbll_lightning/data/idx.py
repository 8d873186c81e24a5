"""Reader for the IDX format that MNIST and Fashion-MNIST ship in.

An IDX file starts with a 4-byte magic number: two zero bytes, a dtype byte
and the number of dimensions. Then come one big-endian uint32 size per
dimension and the array data in big-endian C order. The file may be
gzip-compressed, which is detected from the gzip magic bytes, not from the
file name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch

__all__ = ["DataFormatError", "IDX_DTYPES", "read_idx"]

# IDX dtype byte -> big-endian NumPy dtype of one element.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_REINSTALL_HINT = (
    "Re-download the file or, for the system copy in /usr/share/datasets/fashion-mnist, "
    "reinstall the Debian package dataset-fashion-mnist "
    "(apt-get install --reinstall -y dataset-fashion-mnist)."
)


class DataFormatError(ValueError):
    """Error for a data file whose content does not match its format."""


def _format_error(path: str | os.PathLike[str], problem: str) -> DataFormatError:
    return DataFormatError(f"Invalid IDX file {os.fspath(path)}: {problem}. {_REINSTALL_HINT}")


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as file:
        raw = file.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise _format_error(path, f"corrupt or truncated gzip stream ({error})") from error


def _parse_header(path: str | os.PathLike[str], raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse the magic number and sizes. Return the dtype, the shape and the data offset."""
    if len(raw) < 4:
        raise _format_error(path, f"expected a 4-byte magic number, found {len(raw)} bytes")
    zero_bytes, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero_bytes != 0 or dtype_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise _format_error(
            path,
            f"expected magic 0x0000 followed by a dtype byte in ({known}), found 0x{raw[:4].hex().upper()}",
        )
    if ndim == 0:
        raise _format_error(path, "expected at least 1 dimension, found 0")

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise _format_error(
            path, f"expected a {header_size}-byte header for {ndim} dimensions, found {len(raw)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    return IDX_DTYPES[dtype_code], shape, header_size


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file, raw or gzip-compressed, into a tensor of its shape and dtype.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: the file is truncated, has an invalid magic number,
            contains a corrupt gzip stream or has bytes after the data.
    """
    raw = _read_bytes(path)
    dtype, shape, offset = _parse_header(path, raw)

    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - offset
    if found < expected:
        raise _format_error(path, f"truncated: expected {expected} data bytes for shape {shape}, found {found}")
    if found > expected:
        raise _format_error(
            path, f"expected {expected} data bytes for shape {shape}, found {found - expected} trailing bytes"
        )

    array = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=offset)
    # astype converts to native byte order and copies out of the read-only buffer.
    native = array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    return torch.from_numpy(native)
