"""The GPU acceptance run: `python benchmarks/gpu_check.py [--budget-s 540] [--data FILE] [--out FILE]`.

Within the time budget (compilation and warm-up included) and in this order: a bf16 matmul probe, the correctness
checks, throughput rows (WRN-28-10 in fp32, TF32, bf16, bf16 + channels_last and bf16 + compile; Shake-Shake 26
2x96d, PyramidNet-272, ResNet-32 and ResNet-50 at 224 px in the best of those modes), the cost table, and a short
real-data SGD-vs-SAM run when CIFAR-10 is on the machine. A part whose estimate no longer fits is skipped and listed
with the reason. Writes `gpu_check-<gpu>-<date>.json` and `.md` under $OUT where it is set, else under
benchmarks/results/ (or `--out FILE` and FILE with .md), after every check, row and part, so that a run killed
later keeps what finished; a check, row or part that raises is recorded with its error and the run goes on. Prints
one line per check and per row, and ends with `gpu check: N of M correctness checks passed`; exit status 1 if a
check, row or part failed.

`--smoke --out FILE` runs the same code on a CPU at toy sizes (compile with the aot_eager backend), CUDA-only parts
reported as skipped; the test suite runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sam_repro.acceptance import checks, cost, throughput, training
from sam_repro.acceptance.throughput import Bench, RowSpec, Timing
from sam_repro.engine.distributed import resolve_device
from sam_repro.engine.provenance import command_line, provenance
from sam_repro.errors import SamReproError
from sam_repro.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RESERVE_S = 10.0  # kept for the cost table and writing the outputs


@dataclass(frozen=True)
class Network:
    """One network of the throughput table: its size in the real run and at smoke size."""

    model: str
    image_size: int
    batch: int
    m: int  # the paper's per-perturbation m for this network (the second m is the whole batch)
    num_classes: int = 10
    smoke_arch: tuple = ()
    smoke_image: int = 16
    smoke_batch: int = 16
    smoke_m: int = 8
    first_row_s: float = 5.0  # building the network (eager)
    compile_s: float = 90.0  # torch.compile with inductor, all graphs of its rows
    row_s: float = 4.0


WRN = Network("wrn28_10", 32, 256, 32, smoke_arch=(("depth", 10), ("widen_factor", 1)))
OTHERS = (
    Network("shake_shake_26_2x96d", 32, 256, 32, smoke_arch=(("depth", 8), ("width", 8)), compile_s=120.0),
    Network("pyramidnet272", 32, 256, 32, smoke_arch=(("alpha", 8), ("depth", 11)), compile_s=300.0, row_s=6.0),
    Network("resnet32", 32, 256, 32, smoke_arch=(("depth", 8),), compile_s=40.0, row_s=2.0),
    Network(
        "resnet50",
        224,
        256,
        128,
        num_classes=1000,
        smoke_image=32,
        smoke_batch=8,
        smoke_m=4,
        compile_s=120.0,
        row_s=6.0,
    ),
)
WRN_MODES = (("fp32", "eager"), ("tf32", "eager"), ("bf16", "eager"), ("bf16", "channels_last"), ("bf16", "compile"))
SMOKE_WRN_MODES = (("fp32", "eager"), ("bf16", "channels_last"), ("bf16", "compile"))  # toy sizes: fewer rows
CHECK_ESTIMATE_S = {"compiled equals eager within tolerance": 60.0, "deterministic mode on CUDA": 40.0}
CHECK_DEFAULT_S, TRAINER_CHECK_S = 10.0, 45.0
REAL_DATA_MIN_S = 90.0  # sam-train's start-up twice, a probe epoch and one epoch of SGD and of SAM


class Budget:
    """Seconds left of --budget-s; a part runs only if its estimate fits, else it is listed as skipped."""

    def __init__(self, seconds: float, clock=time.perf_counter) -> None:
        self.seconds, self.clock, self.start = seconds, clock, clock()
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.seconds - RESERVE_S - (self.clock() - self.start)

    def take(self, part: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            return True
        self.skipped.append(
            {"part": part, "reason": f"needs about {estimate_s:.0f} s, {max(0, self.left()):.0f} s of the budget left"}
        )
        return False


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run's time limit (default 540)")
    parser.add_argument("--smoke", action="store_true", help="the same code on a CPU at toy sizes (needs --out)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON file (the .md beside it); default $OUT/gpu_check-<gpu>-<date>.json where OUT is set (what comes "
        "back from a lent node), else benchmarks/results/",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a `sam-data cifar10 --export-subset N` file for the real-data part (default: the "
        "prepared cache if there is one)",
    )
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto)")
    args = parser.parse_args(argv)
    if args.smoke and args.out is None:
        parser.error("--smoke needs --out FILE: toy-sized numbers are not results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except SamReproError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    budget = Budget(args.budget_s)
    device = resolve_device(args.device or "auto", option="--device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    smoke = args.smoke
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"gpu check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, budget {args.budget_s:.0f} s"
        + (" (smoke: toy sizes)" if smoke else ""),
        flush=True,
    )
    report: dict = {
        "gpu": gpu,
        "device": str(device),
        "smoke": smoke,
        "budget_s": args.budget_s,
        "matmul": {"n": 256 if smoke else 8192, "dtype": "bf16", "tflops": None, "datasheet_bf16_tflops": None},
        "correctness": [],
        "throughput": [],
        "failed_rows": [],
        "comparisons": [],
        "targets": [],
        "cost": None,
        "real_data": None,
        "errors": [],
        "skipped": budget.skipped,
        "provenance": provenance(),
    }
    results: list[dict] = report["correctness"]
    rows: list[dict] = report["throughput"]
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out = args.out or base / f"gpu_check-{slug(gpu)}-{time.strftime('%Y-%m-%d')}.json"

    def save() -> None:
        """After every part: a run killed later keeps what finished."""
        report["elapsed_s"] = round(budget.clock() - budget.start, 1)
        atomic_write_json(out, report)
        atomic_write_text(out.with_suffix(".md"), render_markdown(report))

    def part_failed(part: str, exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        report["errors"].append({"part": part, "error": f"{type(exc).__name__}: {first}"})
        print(f"failed: {part}: {type(exc).__name__}: {first}", flush=True)

    save()

    # ---- the matmul probe: the rate MFU is also measured against
    datasheet = throughput.datasheet_peak(gpu) if device.type == "cuda" else None
    matmul = None
    if budget.take("bf16 matmul probe", 5):
        n, iterations = (256, 3) if smoke else (8192, 50)
        try:
            matmul = throughput.measure_matmul(device, n, iterations)
        except Exception as exc:  # recorded; MFU against the measured rate is then not given
            part_failed("bf16 matmul probe", exc)
    if matmul is not None:
        print(
            f"matmul: bf16 {n}x{n}x{n}: {matmul:.3g} TFLOP/s"
            + (f" (datasheet dense bf16 peak {datasheet:.0f})" if datasheet else " (no datasheet peak known)"),
            flush=True,
        )
    report["matmul"] = {
        "n": 256 if smoke else 8192,
        "dtype": "bf16",
        "tflops": matmul,
        "datasheet_bf16_tflops": datasheet,
    }
    save()

    # ---- correctness
    env = checks.CheckEnv(device, smoke=smoke, compile_backend="aot_eager" if smoke else "inductor")
    for check in checks.CHECKS:
        estimate = (
            TRAINER_CHECK_S
            if check.run in (checks.deterministic_mode, checks.resume_equals_uninterrupted)
            else CHECK_ESTIMATE_S.get(check.name, CHECK_DEFAULT_S)
        )
        if smoke:
            estimate = 1.0
        if not budget.take(check.name, estimate):
            results.append(
                {"name": check.name, "status": "skipped", "detail": "not run: the time budget", "seconds": 0.0}
            )
        else:
            results.append(checks.run_check(check, env))
        r = results[-1]
        print(f"check {r['status']}: {r['name']}: {r['detail']} ({r['seconds']:.0f} s)", flush=True)
        save()
    report["correctness"] = results
    shutil.rmtree(env.workdir, ignore_errors=True)  # the trainer checks' run directories and checkpoints

    # ---- throughput
    bench = Bench(
        device,
        Timing(0, 1, 1, 0.0) if smoke else Timing(),
        compile_backend=env.compile_backend,
        datasheet=datasheet,
        matmul_tflops=matmul,
    )

    # Compile estimates are scaled by what WRN-28-10's first compiled row measured on this machine: a node that
    # compiles slower than expected gets fewer compiled networks, not a run cut off by the command's time limit.
    compile_scale = [1.0]

    def measure(net: Network, precision: str, mode: str, compiles: bool, whole_batch: bool = True) -> None:
        batch, m = (net.smoke_batch, net.smoke_m) if smoke else (net.batch, net.m)
        for optimizer in ("sgd", "sam"):
            for group in (m, batch) if whole_batch else (m,):
                spec = RowSpec(
                    net.model,
                    optimizer,
                    group,
                    precision,
                    mode,
                    batch,
                    net.smoke_image if smoke else net.image_size,
                    net.num_classes,
                    net.smoke_arch if smoke else (),
                )
                first = not any(r["model"] == net.model and r["mode"] == mode for r in rows)
                compile_s = net.compile_s * compile_scale[0] if compiles and first else 0.0
                estimate = 1.0 if smoke else net.row_s + compile_s + (net.first_row_s if first else 0)
                if not budget.take(f"throughput {spec.label}", estimate):
                    continue
                started = budget.clock()
                try:
                    row = bench.row(spec)
                except Exception as exc:  # a row that fails is recorded with its error; the next one runs
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    report["failed_rows"].append({"row": spec.label, "error": f"{type(exc).__name__}: {first}"})
                    print(f"throughput failed: {spec.label}: {type(exc).__name__}: {first}", flush=True)
                    save()
                    continue
                row["wall_s"] = round(budget.clock() - started, 1)
                if compiles and first and net is WRN and not smoke:
                    measured = max(0.0, row["wall_s"] - net.row_s - net.first_row_s)
                    compile_scale[0] = max(0.25, measured / net.compile_s)
                    report["compile_scale"] = round(compile_scale[0], 2)
                rows.append(row)
                print("throughput " + throughput.format_row(row), flush=True)
                save()

    for precision, mode in SMOKE_WRN_MODES if smoke else WRN_MODES:
        if precision == "tf32" and device.type != "cuda":
            budget.skipped.append({"part": f"throughput {WRN.model} tf32", "reason": "TF32 needs CUDA"})
            continue
        if mode == "compile" and any(
            r["model"] == WRN.model and r["mode"] == "channels_last" and r["images_per_second"] for r in rows
        ):
            mode = "channels_last+compile" if _faster(rows, WRN.model, "channels_last", "eager") else "compile"
        measure(WRN, precision, mode, compiles="compile" in mode)
    best_eager = _best_mode(rows, WRN.model, eager_only=True)
    best_any = _best_mode(rows, WRN.model, eager_only=False)
    for net in OTHERS:
        if net.model.startswith("resnet50") and importlib.util.find_spec("timm") is None:
            budget.skipped.append({"part": f"throughput {net.model}", "reason": "timm is not installed"})
            continue
        mode = best_any if best_any and not smoke else best_eager
        if (
            mode
            and "compile" in mode
            and not smoke
            and budget.left() < net.compile_s * compile_scale[0] + 4 * net.row_s + REAL_DATA_MIN_S
        ):
            budget.skipped.append(
                {
                    "part": f"throughput {net.model} {mode}",
                    "reason": f"compiling it needs about {net.compile_s * compile_scale[0]:.0f} s; measured in "
                    f"{best_eager} instead",
                }
            )
            mode = best_eager
        if mode:
            # resnet32 is timed for Table 4's cost only (its m = 32); at smoke size every other network too.
            measure(net, "bf16", mode, compiles="compile" in mode, whole_batch=not smoke and net.model != "resnet32")
    report["comparisons"] = _comparisons(rows)
    for line in report["comparisons"]:
        print(f"comparison: {line['name']}: {line['ratio']:.2f}", flush=True)
    report["targets"] = _targets(rows, results, smoke)
    for target in report["targets"]:
        print(f"target {target['status']}: {target['name']}: {target['detail']}", flush=True)
    save()

    # ---- cost
    flops_cache: dict = {}
    arches = {net.model: net.smoke_arch for net in (WRN, *OTHERS)} if smoke else {}

    def flops(model: str, size: int, channels: int, classes: int) -> float:
        key = (model, size, channels, classes)
        if key not in flops_cache:
            flops_cache[key] = throughput.flops_per_image(model, size, channels, classes, arches.get(model, ()))
        return flops_cache[key]

    smoke_m = {net.model: {net.m: net.smoke_m} for net in (WRN, *OTHERS)}
    try:
        table = cost.cost_table(
            cost.load_cells(),
            rows,
            flops,
            measured_m=(lambda model, m: smoke_m.get(model, {}).get(m, m)) if smoke else (lambda model, m: m),
        )
    except Exception as exc:
        part_failed("cost table", exc)
        table = {"totals": {}}
    else:
        report["cost"] = table
        save()
    for name, total in table["totals"].items():
        print(
            f"cost {name}: {total['gpu_hours']:.1f} GPU-hours for {total['cells'] - total['not_measured']} of "
            f"{total['cells']} cells on this GPU",
            flush=True,
        )

    # ---- real data: the real sam-train on CIFAR-10, with what is left of the budget
    try:
        found = training.find_cifar10(args.data)
    except Exception as exc:
        part_failed("real data: reading CIFAR-10", exc)
        found = None
    run = None
    if found is None:
        budget.skipped.append(
            {
                "part": "real data",
                "reason": "no CIFAR-10 here: run `sam-data cifar10 --export-subset 10000` where it is and pass --data",
            }
        )
    elif importlib.util.find_spec("hydra") is None or importlib.util.find_spec("omegaconf") is None:
        budget.skipped.append({"part": "real data", "reason": "sam-train needs hydra-core and omegaconf"})
    elif budget.take("real data", 1.0 if smoke else REAL_DATA_MIN_S):
        overrides, source, num_test = found
        try:
            run = training.short_training(
                overrides,
                num_test,
                "cuda" if device.type == "cuda" else "cpu",
                seconds=budget.left() - 5,
                smoke=smoke,
                workdir=out.parent / f"{out.stem}-runs",
            )
        except Exception as exc:
            part_failed("real data", exc)
        finally:
            shutil.rmtree(out.parent / f"{out.stem}-runs", ignore_errors=True)  # run folders do not come back
    if run is not None:
        run["source"] = source
        report["real_data"] = run
        print(
            f"real data: {run['epochs']} epochs on {run['num_train']} images: "
            f"SAM - SGD = {run['sam_minus_sgd']:+.2f} "
            f"points of test error",
            flush=True,
        )
    for skipped in budget.skipped:
        print(f"skipped: {skipped['part']}: {skipped['reason']}", flush=True)

    save()
    print(f"wrote {out} and {out.with_suffix('.md')} ({report['elapsed_s']:.0f} s)", flush=True)
    passed = sum(r["status"] == "passed" for r in results)
    print(f"gpu check: {passed} of {len(results)} correctness checks passed", flush=True)
    failed = any(r["status"] == "failed" for r in results) or report["errors"] or report["failed_rows"]
    return 1 if failed else 0


# ---- summaries ----------------------------------------------------------------------------------------------------


def _rate(
    rows: list[dict],
    model: str,
    optimizer: str,
    m: int | None = None,
    precision: str | None = None,
    mode: str | None = None,
) -> float | None:
    found = [
        r["images_per_second"]
        for r in rows
        if r["model"] == model
        and r["optimizer"] == optimizer
        and (m is None or r["m"] == m)
        and (precision is None or r["precision"] == precision)
        and (mode is None or r["mode"] == mode)
        and r["images_per_second"]
    ]
    return max(found) if found else None


def _faster(rows: list[dict], model: str, mode: str, than: str) -> bool:
    a = _rate(rows, model, "sgd", precision="bf16", mode=mode)
    b = _rate(rows, model, "sgd", precision="bf16", mode=than)
    return bool(a and b and a > b)


def _best_mode(rows: list[dict], model: str, eager_only: bool) -> str | None:
    """The bf16 mode in which SAM with the smaller m ran fastest."""
    candidates = [
        r
        for r in rows
        if r["model"] == model
        and r["precision"] == "bf16"
        and r["optimizer"] == "sam"
        and r["images_per_second"]
        and not (eager_only and "compile" in r["mode"])
    ]
    if not candidates:
        return None
    small_m = min(r["m"] for r in candidates)
    return max((r for r in candidates if r["m"] == small_m), key=lambda r: r["images_per_second"])["mode"]


def _comparisons(rows: list[dict]) -> list[dict]:
    out = []
    for model, precision, mode in sorted({(r["model"], r["precision"], r["mode"]) for r in rows}):
        ms = sorted({r["m"] for r in rows if (r["model"], r["precision"], r["mode"]) == (model, precision, mode)})
        if len(ms) < 2:
            continue
        small, whole = ms[0], ms[-1]
        where = f"{model} {precision} {mode}"
        pairs = {
            f"SGD with m = {small} BatchNorm groups vs the whole batch ({where})": (("sgd", small), ("sgd", whole)),
            f"SAM m = {small} vs SGD m = {small} ({where})": (("sam", small), ("sgd", small)),
            f"SAM vs SGD, whole batch ({where})": (("sam", whole), ("sgd", whole)),
        }
        for name, ((opt_a, m_a), (opt_b, m_b)) in pairs.items():
            a = _rate(rows, model, opt_a, m_a, precision, mode)
            b = _rate(rows, model, opt_b, m_b, precision, mode)
            if a and b:
                out.append({"name": name, "ratio": round(a / b, 3)})
    return out


def _targets(rows: list[dict], results: list[dict], smoke: bool) -> list[dict]:
    """The issue's targets for WRN-28-10, batch 256, bf16 + channels_last."""
    m = 8 if smoke else 32
    sgd = next(
        (
            r
            for r in rows
            if (r["model"], r["optimizer"], r["m"], r["precision"], r["mode"])
            == ("wrn28_10", "sgd", m, "bf16", "channels_last")
            and r["images_per_second"]
        ),
        None,
    )
    sam = _rate(rows, "wrn28_10", "sam", m, "bf16", "channels_last")
    out = []
    mfu = sgd["mfu"]["measured_matmul"] if sgd else None
    out.append(
        {
            "name": f"WRN-28-10 SGD (m = {m}) at >= 50% MFU against the measured matmul",
            "status": "not measured" if mfu is None else ("met" if mfu >= 0.5 else "not met"),
            "detail": "no row" if mfu is None else f"{100 * mfu:.1f}%",
        }
    )
    ratio = sam / sgd["images_per_second"] if sgd and sam else None
    out.append(
        {
            "name": f"WRN-28-10 SAM m = {m} at >= 0.49x the images/s of SGD with the same m",
            "status": "not measured" if ratio is None else ("met" if ratio >= 0.49 else "not met"),
            "detail": "no rows" if ratio is None else f"{ratio:.3f}x",
        }
    )
    sync = next((r for r in results if r["name"].startswith("host reads per step")), None)
    out.append(
        {
            "name": "no synchronisation per step but fp16's one read",
            "status": {"passed": "met", "failed": "not met"}.get(sync["status"], "not measured")
            if sync
            else "not measured",
            "detail": sync["detail"] if sync else "no check",
        }
    )
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def render_markdown(report: dict) -> str:
    prov = report["provenance"]
    pkgs = prov["packages"]
    results = report["correctness"]
    passed = sum(r["status"] == "passed" for r in results)
    matmul = report["matmul"]
    lines = [
        f"# GPU check: {report['gpu']}{' (smoke: toy sizes, not results)' if report['smoke'] else ''}",
        "",
        f"`{command_line(prov)}` at {prov['time']}, commit {prov['git_commit']}; torch {pkgs.get('torch')}, "
        f"CUDA {prov['machine'].get('cuda')}, Python {pkgs.get('python')}; {report['elapsed_s']:.0f} s of a "
        f"{report['budget_s']:.0f} s budget.",
        "",
        f"## Correctness: {passed} of {len(results)} checks passed",
        "",
        "| check | status | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r['detail']} |" for r in results]
    lines += [
        "",
        "## Throughput",
        "",
        f"MFU: achieved FLOP/s (FlopCounterMode's count of one step) over the datasheet dense bf16 peak "
        f"({_cell(matmul['datasheet_bf16_tflops'])} TFLOP/s) and over a {matmul['n']}^3 bf16 matmul measured in "
        f"this run ({_cell(matmul['tflops'])} TFLOP/s). Data path: the device-resident loader's share of a step.",
        "",
        "| model | optimizer | m | batch | precision | mode | images/s | peak GB | MFU datasheet | "
        "MFU matmul | data path | TFLOP/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["throughput"]:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['m']} | {r['batch']} | {r['precision']} | {r['mode']} | "
            f"{_cell(r['images_per_second'])} | {_cell(r['peak_memory_gb'])} | "
            f"{_cell(r['mfu']['datasheet'])} | {_cell(r['mfu']['measured_matmul'])} | "
            f"{_cell(r['data_share'])} | {_cell(r['step_tflop'])} |"
        )
    lines += ["", "## Comparisons and targets", ""]
    lines += [f"- {c['name']}: {c['ratio']:.2f}" for c in report["comparisons"]]
    lines += [f"- target {t['status']}: {t['name']} ({t['detail']})" for t in report["targets"]]
    lines += [f"- throughput row failed: {f['row']}: {f['error']}" for f in report.get("failed_rows", [])]
    lines += _cost_markdown(report["cost"])
    lines += _real_data_markdown(report["real_data"])
    lines += ["", "## Errors", ""]
    lines += [f"- {e['part']}: {e['error']}" for e in report.get("errors", [])] or ["None."]
    lines += ["", "## Skipped", ""]
    lines += [f"- {s['part']}: {s['reason']}" for s in report["skipped"]] or ["Nothing."]
    return "\n".join(lines) + "\n"


def _cost_markdown(table: dict | None) -> list[str]:
    """The report's cost section: GPU-hours per table and per cell on this GPU."""
    table = table or {"note": "Not computed yet", "totals": {}, "total_gpu_hours": 0.0, "cells": []}
    lines = [
        "",
        "## Cost on this GPU",
        "",
        table["note"] + ".",
        "",
        "| table | cells | GPU-hours | cells not measured |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {t['cells']} | {t['gpu_hours']:.1f} | {t['not_measured']} |" for name, t in table["totals"].items()
    ]
    lines += [
        f"| all | {sum(t['cells'] for t in table['totals'].values())} | {table['total_gpu_hours']:.1f} | |",
        "",
        "| cell | epochs | images/s | GPU-hours | rate from |",
        "|---|---|---|---|---|",
    ]
    return lines + [
        f"| {c['cell']} | {c['epochs']} | {_cell(c['images_per_second'])} | {_cell(c['gpu_hours'])} | {c['source']} |"
        for c in table["cells"]
    ]


def _real_data_markdown(real: dict | None) -> list[str]:
    """The report's real-data section: SGD's and SAM's test error per epoch."""
    lines = ["", "## Real data", ""]
    if real is None:
        return [*lines, "Not run (see Skipped)."]
    lines += [
        f"{real['model']}, {real['precision']}, batch {real['batch']}, m = {real['m']}, {real['epochs']} "
        f"epochs on {real['num_train']} training images from {real['source']}; test error on "
        f"{real['num_test']} images. SAM - SGD after the last epoch: {real['sam_minus_sgd']:+.2f} points.",
        "",
        "| epoch | SGD test error % | SAM test error % |",
        "|---|---|---|",
    ]
    sgd, sam = real["runs"]["sgd"]["test_error"], real["runs"]["sam"]["test_error"]
    return lines + [f"| {i + 1} | {a:.2f} | {b:.2f} |" for i, (a, b) in enumerate(zip(sgd, sam))]


if __name__ == "__main__":
    sys.exit(main())
