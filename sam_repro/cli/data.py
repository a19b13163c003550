"""`sam-data`: prepare a dataset's verified cache before training (training would otherwise do it on first use).

    sam-data cifar10|cifar100|svhn|svhn_extra|fashion_mnist [--root DIR] [--force] [--verify]
    sam-data cifar10 --export-subset N [--test-subset M] [--out FILE]

Prints one summary line on stdout: the shapes, the checksum verdict, the training set's per-channel mean/std (to
compare with the dataset config) and where the cache lies. `--export-subset N` then also writes a small extract
that checks itself (N training images as `dataset.train_subset=N` picks them, the first M test images; at most
40 MB; sam_repro/data/export.py) for a machine that cannot download the dataset, e.g. for
`benchmarks/gpu_check.py --data FILE`. Progress goes to stderr. Errors: one line `error: ...` on stderr, exit
status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from sam_repro.data.export import export_subset
from sam_repro.data.sources import DATASETS, cache_path, default_root, prepare, verify
from sam_repro.errors import SamReproError


def channel_stats(images: np.ndarray, chunk: int = 16384) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] of uint8 N x H x W x C images, computed exactly from
    per-channel histograms of the 256 pixel values (fast, and no float copy of SVHN's 1.9 GB)."""
    channels = images.shape[-1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels)
        for c in range(channels):
            hist[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255
    count = hist.sum(1)
    mean = hist @ values / count
    std = np.sqrt(hist @ values**2 / count - mean**2)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=list(DATASETS), help="dataset to prepare")
    parser.add_argument(
        "--root",
        default=None,
        help=f"data root (default: $SAM_DATA_DIR, else {default_root()}); the cache is <root>/<name>/prepared.npz",
    )
    parser.add_argument("--force", action="store_true", help="rebuild the cache from the sources")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="only check the existing cache (every array's SHA-256); download and build nothing",
    )
    parser.add_argument(
        "--export-subset",
        type=int,
        metavar="N",
        default=None,
        help="also write N training images and --test-subset test images to --out (at most 40 MB)",
    )
    parser.add_argument(
        "--test-subset",
        type=int,
        metavar="M",
        default=2000,
        help="test images in the export: the first M (default 2000)",
    )
    parser.add_argument("--out", default=None, help="the export's file (default: ./<name>-subset<N>.npz)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    try:
        if args.verify and args.force:
            raise SamReproError("--verify checks the cache as it is; it cannot be combined with --force")
        if not args.verify:
            prepare(args.name, args.root, force=args.force)
        arrays, meta = verify(args.name, args.root)
        if args.export_subset is not None:
            out = args.out or f"{args.name}-subset{args.export_subset}.npz"
            export_subset(
                arrays,
                args.export_subset,
                args.test_subset,
                out,
                source={"cache": str(cache_path(args.name, args.root)), "sha256": meta["sha256"]},
            )
            print(
                f"{args.name}: exported {args.export_subset} training and {args.test_subset} test images to {out} "
                f"({os.path.getsize(out) / 1e6:.1f} MB, every array's SHA-256 recorded)"
            )
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mean, std = channel_stats(arrays.train_images)
    shape = lambda a: "x".join(map(str, a.shape))  # noqa: E731
    verdict = "match the published values" if DATASETS[args.name].sha256 else "match those recorded when prepared"
    print(
        f"{args.name}: train {shape(arrays.train_images)}, test {shape(arrays.test_images)}, "
        f"{arrays.num_classes} classes; SHA-256 of all 4 arrays OK ({verdict}); train mean {mean} std {std}; "
        f"from {meta['source']}; {cache_path(args.name, args.root)} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
