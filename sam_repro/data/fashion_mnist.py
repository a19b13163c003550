"""Fashion-MNIST readers: the official idx files, gzipped (`train-images-idx3-ubyte.gz`, ...).

idx format: a 4-byte magic (two zero bytes, a type code, 0x08 = uint8, and the number of dimensions), then one
big-endian uint32 per dimension, then the data in C order. Images are 28 x 28 and come back as N x 28 x 28 x 1.

Offline fallback: Debian's `dataset-fashion-mnist` package installs the same four files under
`/usr/share/datasets/fashion-mnist/`. Debian re-compressed them, so their MD5 differs from the official files; the
decoded arrays are identical, which the SHA-256 checksums in `sources.py` verify.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from sam_repro.data.arrays import Splits
from sam_repro.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_UBYTE = 0x08


def decode_idx(raw: bytes, name: str) -> np.ndarray:
    """Bytes of an (uncompressed) idx file -> uint8 array of the shape its header gives."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise DataError(f"{name}: not an idx file of unsigned bytes; delete it and prepare again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"{name}: header says shape {shape}, file holds {len(raw) - header} values; delete it and prepare again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_idx_gz(path: Path) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .gz file ({exc}); delete it and prepare again") from exc
    return decode_idx(raw, str(path))


def read_fashion_mnist(folder: Path) -> Splits:
    """The four official .gz files in `folder` -> Splits (images N x 28 x 28 x 1)."""
    arrays = {key: read_idx_gz(folder / filename) for key, filename in FILES.items()}
    for kind in ("train", "test"):
        images = arrays[f"{kind}_images"]
        if images.ndim != 3 or images.shape[0] != arrays[f"{kind}_labels"].shape[0]:
            raise DataError(
                f"{folder / FILES[f'{kind}_images']}: expected N x 28 x 28 images, one per label "
                f"(got {images.shape} for {arrays[f'{kind}_labels'].shape[0]} labels)"
            )
        arrays[f"{kind}_images"] = images[..., None]  # a channel axis, like every other dataset here
    return Splits(**arrays)
