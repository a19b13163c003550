"""`sam-analyze`: the paper's sharpness analyses (section 4) on trained runs.

    sam-analyze hessian    RUN [RUN ...] [--k 5] [--method lanczos|power] [--iterations N] [--subset 1000]
    sam-analyze msharpness RUN [RUN ...] [--m 1 4 16 64 256] [--rho 0.01 0.02 0.05 0.1 0.15] [--subset 1024]
    sam-analyze landscape  RUN [RUN ...] [--mode 1d|2d|interpolate] [--range -1 1] [--points N]

RUN is a run directory (its `checkpoints/last.pt`) or a `.pt` checkpoint. Every run is analysed on the same seeded
sample of `--subset` examples of `--split` (default: train, i.e. the examples and labels the run trained on, so the
training loss), so an SGD and a SAM run given together are compared on identical data. Outputs in `--out` (default:
`analysis/` in the first run's directory): one `<run>.<settings>.json` per run (the result, the run, the data sample
and the provenance: command, git commit, machine, versions, time) and `<runs>.<settings>.png` plots that overlay the
runs (provenance in their PNG text chunks). `<settings>` names the analysis and what distinguishes it, e.g.
`hessian.train-1000.seed0.lanczos-k5` or `landscape_1d.test-500.seed1.points11` (the analysis, `--split`,
`--subset`, `--seed`, then the method and every setting not at its default), so analyses with other settings or of
other runs never overwrite each other. Errors: one line `error: ...` on stderr, exit status 2.

Cost, measured on ResNet-8 (75 K parameters), 256 CIFAR-10 training images, 2 CPU cores, torch 2.14: Lanczos k=5
(30 Hessian-vector products) 70-100 s per run; power iteration k=3 (81 products) 200 s; m-sharpness m in
{1, 16, 256} x 3 rho 3 s per run; a 1D landscape of 11 points 2 s per run. A Hessian-vector product costs about
three forward-backward passes over the sample; on a GPU the same commands take seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sam_repro.analysis.hessian import bn_mode, hessian_spectrum, plot_spectra
from sam_repro.analysis.landscape import (
    filter_normalized_direction,
    interpolation_curve,
    linspace,
    loss_curve,
    loss_surface,
    plot_curves,
    plot_surface,
    plot_surfaces,
)
from sam_repro.analysis.loading import (
    ImageSplit,
    Run,
    file_stem,
    load_split,
    open_run,
    write_json,
)
from sam_repro.analysis.plots import save_figure
from sam_repro.analysis.sharpness import m_sharpness, plot_m_sharpness
from sam_repro.cli.eval import add_progress_argument
from sam_repro.engine.compat import set_tf32
from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.loggers import progress_mode
from sam_repro.engine.provenance import provenance
from sam_repro.engine.rundir import RunFiles
from sam_repro.errors import CheckpointError, ConfigError, SamReproError


class _Session:
    """What every subcommand shares: the device (in IEEE float32), the data sample (loaded once per dataset),
    outputs, provenance."""

    def __init__(self, args: argparse.Namespace, analysis: str) -> None:
        self.args = args
        self.analysis = analysis
        self.device = resolve_device(args.device, option="--device")
        set_tf32(False)  # Hessian-vector products and small-rho sharpness need IEEE, not TF32
        self.out = Path(args.out) if args.out is not None else beside_run(args.runs[0])
        self.progress = progress_mode(args.progress) == "bar"  # bars on a terminal only
        self.provenance = provenance()
        self._splits: dict[tuple[str, str], ImageSplit] = {}
        self._stems: set[str] = set()
        self._labels: set[str] = set()

    def open(self, path: str) -> Run:
        return open_run(path, self.device)

    def sample(self, run: Run) -> ImageSplit:
        """The seeded `--subset` of `--split` of the run's data, on the device.

        Loaded once per distinct dataset config: runs that differ only in optimizer or seed share one sample, while
        runs trained on another train_subset or label noise get their own training set.
        """
        args = self.args
        root = args.data_root if args.data_root is not None else str(run.cfg.dataset.root)
        key = (root, json.dumps(OmegaConf.to_container(run.cfg.dataset, resolve=True), sort_keys=True, default=str))
        if key not in self._splits:
            self._splits[key] = load_split(run.cfg, args.split, args.subset, args.seed, root).to(self.device)
        return self._splits[key]

    def stem(self, path: str) -> str:
        """A unique file stem per run within this invocation."""
        return _unique(file_stem(path), self._stems, "{name}-{copy}")

    def output(self, stem: str, suffix: str) -> str:
        """`<stem>.<settings>.<suffix>`: the file name of one output, carrying the settings that distinguish it."""
        return f"{stem}.{settings_tag(self.args, self.analysis)}.{suffix}"

    def combined(self, suffix: str) -> str:
        """The file name of an output over all the runs of this invocation (the overlay plots)."""
        return self.output(runs_stem(self.args.runs), suffix)

    def legend(self, run: Run) -> str:
        """The run's label, made unique within this invocation (two `sgd seed0` runs of different experiments)."""
        return _unique(run.label, self._labels)

    def record(self, run: Run, sample: ImageSplit, result: dict[str, Any], **data: Any) -> dict[str, Any]:
        return {
            "analysis": self.analysis,
            "run": run.describe(),
            "data": {
                "dataset": str(run.cfg.dataset.name),
                "split": sample.split,
                "subset": self.args.subset,
                "seed": self.args.seed,
                "num_examples": len(sample),
                "label_noise": sample.label_noise,
                **data,
            },
            "result": result,
            "provenance": self.provenance,
        }

    def write(self, name: str, payload: dict[str, Any]) -> Path:
        path = write_json(self.out / name, payload)
        print(f"wrote {path}", file=sys.stderr)
        return path

    def save(self, name: str, figure) -> Path:
        path = save_figure(figure, self.out / name, self.provenance, dpi=150, tight=True)
        print(f"wrote {path}", file=sys.stderr)
        return path


def beside_run(path: str) -> Path:
    """The default output folder: `analysis/` in the run directory (of a checkpoint: the run directory holding its
    `checkpoints/`, else the folder holding the file), never a shared folder where runs overwrite each other."""
    path = Path(path).expanduser()
    if path.is_dir():
        return RunFiles(path).analysis
    return (RunFiles.of_checkpoint(path) if RunFiles.in_checkpoints(path) else RunFiles(path.parent)).analysis


def _number(value: float) -> str:
    return f"{value:g}"


def settings_tag(args: argparse.Namespace, analysis: str) -> str:
    """What distinguishes one analysis from another of the same runs: the analysis (with its mode), the data sample
    (`--split`, `--subset`, `--seed`), the method, then every result-changing setting not at its default.

    `hessian.train-1000.seed0.lanczos-k5`, `msharpness.train-1024.seed0.m1-16-256.rho0.05-0.1`,
    `landscape_1d.test-500.seed1.points11.range-0.5_0.5`, `landscape_interpolate.train-1000.seed0`. Device, chunk
    size and data root do not change a result and are not named.
    """
    parts = [analysis, f"{args.split}-{args.subset}", f"seed{args.seed}"]
    if analysis == "hessian":
        parts.append(f"{args.method}-k{args.k}")
        if args.iterations is not None:
            parts.append(f"it{args.iterations}")
        if args.method == "power" and args.tol != _DEFAULT_TOL:
            parts.append(f"tol{_number(args.tol)}")
    elif analysis == "msharpness":
        if args.m != _DEFAULT_M:
            parts.append("m" + "-".join(str(m) for m in args.m))
        if args.rho != _DEFAULT_RHO:
            parts.append("rho" + "-".join(_number(rho) for rho in args.rho))
    else:  # landscape_1d, landscape_2d, landscape_interpolate
        mode = analysis.removeprefix("landscape_")
        if args.points is not None and args.points != _DEFAULT_POINTS[mode]:
            parts.append(f"points{args.points}")
        if args.range is not None and tuple(args.range) != _DEFAULT_RANGE[mode]:
            parts.append(f"range{_number(args.range[0])}_{_number(args.range[1])}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", ".".join(parts))


_MAX_STEM = 120


def runs_stem(paths: Sequence[str]) -> str:
    """A file-name stem for the runs an overlay plot shows: their stems joined by `+` (`sgd__seed0+sam__seed0`), or,
    past 120 characters, the first run's stem, how many more and a short hash of all their paths."""
    stems = [file_stem(path) for path in paths]
    joined = "+".join(stems)
    if len(joined) <= _MAX_STEM:
        return joined
    resolved = "\n".join(str(Path(path).expanduser().resolve()) for path in paths)
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return f"{stems[0][:_MAX_STEM]}+{len(stems) - 1}-more-{digest}"


def _unique(name: str, taken: set[str], template: str = "{name} ({copy})") -> str:
    candidate, copy = name, 1
    while candidate in taken:
        copy += 1
        candidate = template.format(name=name, copy=copy)
    taken.add(candidate)
    return candidate


def _chunks(sample: ImageSplit, chunk_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1 (got {chunk_size})")
    return list(sample.batches(chunk_size))


# ----------------------------------------------------------------------------------------------------- hessian


def run_hessian(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1 (got {args.k})")
    if args.iterations is not None and args.iterations < (args.k if args.method == "lanczos" else 1):
        raise ConfigError(f"--iterations {args.iterations} is too few for --k {args.k} with --method {args.method}")
    session = _Session(args, "hessian")
    spectra: dict[str, list[float]] = {}
    for path in args.runs:
        run = session.open(path)
        sample = session.sample(run)
        report = hessian_spectrum(
            run.model,
            _chunks(sample, args.chunk_size),
            k=args.k,
            method=args.method,
            iterations=args.iterations,
            tol=args.tol,
            seed=args.seed,
            progress=session.progress,
        )
        session.write(
            session.output(session.stem(path), "json"),
            session.record(run, sample, report, chunk_size=args.chunk_size),
        )
        ratio = report["lambda_max_over_lambda_5"]
        print(
            f"{run.label}: lambda_max {report['lambda_max']:.4g}"
            + (f"  lambda_max/lambda_5 {ratio:.3g}" if ratio is not None else "")
            + f"  (bn {report['bn_mode']}, {report['num_examples']} examples, {report['matvecs']} Hv)"
        )
        spectra[session.legend(run)] = report["eigenvalues"]
    session.save(session.combined("png"), plot_spectra(spectra))
    return 0


# ----------------------------------------------------------------------------------------------------- m-sharpness


def run_msharpness(args: argparse.Namespace) -> int:
    if any(rho < 0 for rho in args.rho):
        raise ConfigError(f"--rho values must be >= 0 (got {args.rho})")
    session = _Session(args, "msharpness")
    reports: dict[str, dict[str, Any]] = {}
    for path in args.runs:
        run = session.open(path)
        sample = session.sample(run)
        too_large = [m for m in args.m if m < 1 or m > len(sample)]
        if too_large:
            raise ConfigError(f"--m {too_large} must be between 1 and the sample size {len(sample)} (see --subset)")
        inputs, targets = sample.tensors()
        report = m_sharpness(run.model, inputs, targets, args.m, args.rho, seed=args.seed, progress=session.progress)
        session.write(session.output(session.stem(path), "json"), session.record(run, sample, report))
        at_last_rho = "  ".join(f"m={m} {row[-1]:.4g}" for m, row in zip(report["m"], report["sharpness"]))
        print(f"{run.label}: m-sharpness at rho={args.rho[-1]}: {at_last_rho}")
        reports[session.legend(run)] = report
    session.save(session.combined("png"), plot_m_sharpness(reports))
    return 0


# ----------------------------------------------------------------------------------------------------- landscape


_DEFAULT_TOL = 1e-3
_DEFAULT_M = [1, 4, 16, 64, 256]
_DEFAULT_RHO = [0.01, 0.02, 0.05, 0.1, 0.15]
_DEFAULT_RANGE = {"1d": (-1.0, 1.0), "2d": (-1.0, 1.0), "interpolate": (-0.5, 1.5)}
_DEFAULT_POINTS = {"1d": 41, "2d": 21, "interpolate": 41}


def run_landscape(args: argparse.Namespace) -> int:
    start, stop = args.range or _DEFAULT_RANGE[args.mode]
    points = args.points or _DEFAULT_POINTS[args.mode]
    if points < 2:
        raise ConfigError(f"--points must be >= 2 (got {points})")
    grid = linspace(start, stop, points)
    session = _Session(args, f"landscape_{args.mode}")
    if args.mode == "interpolate":
        return _interpolate(session, grid)
    curves: dict[str, dict[str, Any]] = {}
    surfaces: dict[str, dict[str, Any]] = {}
    for path in args.runs:
        run = session.open(path)
        sample = session.sample(run)
        batches = _chunks(sample, args.chunk_size)
        # The same seed for every run: each gets the same Gaussian draw, normalized to its own filters.
        generator = torch.Generator().manual_seed(args.seed)
        stem = session.stem(path)
        if args.mode == "1d":
            direction = filter_normalized_direction(run.model, generator)
            result = loss_curve(run.model, batches, direction, grid, progress=session.progress)
            curves[session.legend(run)] = result
            centre = result["loss"][points // 2]
        else:
            directions = (
                filter_normalized_direction(run.model, generator),
                filter_normalized_direction(run.model, generator),
            )
            result = loss_surface(run.model, batches, directions, grid, grid, progress=session.progress)
            session.save(session.output(stem, "png"), plot_surface(result, title=f"{run.label} ({sample.split} loss)"))
            surfaces[session.legend(run)] = result
            centre = result["loss"][points // 2][points // 2]
        result |= {
            "direction": "filter-normalized Gaussian (Li et al. 2018), bias/BatchNorm directions zero",
            "direction_seed": args.seed,
            "bn_mode": bn_mode(run.model),
        }
        session.write(session.output(stem, "json"), session.record(run, sample, result, chunk_size=args.chunk_size))
        shape = f"{points}x{points}" if args.mode == "2d" else f"{points}"
        print(
            f"{run.label}: {args.mode} landscape on {shape} points in [{start}, {stop}], "
            f"loss {centre:.4g} at the grid centre"
        )
    if curves:
        session.save(session.combined("png"), plot_curves(curves, title=f"{args.split} loss along a random direction"))
    if len(surfaces) > 1:  # the runs side by side, on the same contour levels
        session.save(session.combined("png"), plot_surfaces(surfaces, title=f"{args.split} loss on a random plane"))
    return 0


def _interpolate(session: _Session, grid: list[float]) -> int:
    args = session.args
    if len(args.runs) != 2:
        raise ConfigError(f"--mode interpolate takes exactly two runs (got {len(args.runs)})")
    run_a, run_b = (session.open(path) for path in args.runs)
    sample = session.sample(run_a)
    try:
        result = interpolation_curve(
            run_a.model, run_b.model, _chunks(sample, args.chunk_size), grid, progress=session.progress
        )
    except ValueError as error:
        raise CheckpointError(f"{run_a.checkpoint} and {run_b.checkpoint}: {error}") from error
    result |= {"from": run_a.describe(), "to": run_b.describe()}
    session.write(session.combined("json"), session.record(run_a, sample, result, chunk_size=args.chunk_size))
    label = f"{run_a.label} -> {run_b.label}"
    session.save(
        session.combined("png"),
        plot_curves({label: result}, xlabel=r"$\alpha$: $(1-\alpha)\,w_a + \alpha\,w_b$", title="Linear interpolation"),
    )
    print(f"{label}: loss {result['loss'][0]:.4g} ... {result['loss'][-1]:.4g} over alpha in [{grid[0]}, {grid[-1]}]")
    return 0


# ----------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("runs", nargs="+", metavar="RUN", help="run directories or .pt checkpoints")
    common.add_argument(
        "--out", default=None, help="output directory (default: analysis/ in the (first) run's directory)"
    )
    common.add_argument("--split", default="train", choices=("train", "test"), help="data split (default: train)")
    common.add_argument("--seed", type=int, default=0, help="seed of the data sample, start vectors and directions")
    common.add_argument("--chunk-size", type=int, default=250, help="examples per forward/backward (bounds memory)")
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    common.add_argument("--data-root", default=None, help="override dataset.root stored in the run's config")
    add_progress_argument(common)

    parser = argparse.ArgumentParser(
        prog="sam-analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    hessian = commands.add_parser(
        "hessian", parents=[common], help="top-k Hessian eigenvalues (lambda_max, lambda_max/lambda_5)"
    )
    hessian.add_argument("--subset", type=int, default=1000, help="examples in the sample (default: %(default)s)")
    hessian.add_argument("--k", type=int, default=5, help="number of top eigenvalues (default: 5)")
    hessian.add_argument("--method", default="lanczos", choices=("lanczos", "power"))
    hessian.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="Lanczos steps (default max(3k, 30)) or power-iteration cap per eigenvalue (100)",
    )
    hessian.add_argument(
        "--tol", type=float, default=_DEFAULT_TOL, help="power iteration: relative residual to stop at"
    )
    hessian.set_defaults(handler=run_hessian)

    msharp = commands.add_parser("msharpness", parents=[common], help="m-sharpness for several m and rho")
    msharp.add_argument("--subset", type=int, default=1024, help="examples in the sample (default: %(default)s)")
    msharp.add_argument("--m", type=int, nargs="+", default=_DEFAULT_M, help="group sizes")
    msharp.add_argument("--rho", type=float, nargs="+", default=_DEFAULT_RHO, help="radii")
    msharp.set_defaults(handler=run_msharpness)

    landscape = commands.add_parser("landscape", parents=[common], help="1D/2D loss landscapes, interpolation")
    landscape.add_argument("--subset", type=int, default=1000, help="examples in the sample (default: %(default)s)")
    landscape.add_argument("--mode", default="1d", choices=("1d", "2d", "interpolate"))
    landscape.add_argument(
        "--range",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "STOP"),
        help="coordinate range (default: -1 1; interpolate: -0.5 1.5)",
    )
    landscape.add_argument(
        "--points", type=int, default=None, help="grid points per axis (default: 41 for 1d and interpolate, 21 for 2d)"
    )
    landscape.set_defaults(handler=run_landscape)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
