"""`sam-tables --variants`: each optimizer variant against plain SGD and SAM, with its cost.

Every number is checked against a hand computation: the paired t-interval of three differences, the derived time of
late-phase SAM from the benchmark's ratios, the epochs' scaling of SGD at twice the budget.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from helpers.run_dirs import write_run
from sam_repro.analysis.runs import load_runs
from sam_repro.analysis.variants import Cost, build_variants, load_costs, render_variants_csv, step_cost
from sam_repro.cli import tables as tables_cli
from sam_repro.errors import DataError

T_975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # t(0.975, 2) in closed form (see test_tables.py)
RATIOS = {"sgd": 1.0, "sam": 2.0, "sam_every2": 1.5, "looksam_k5": 1.2, "gsam": 2.1, "msam": 1.01}
SAM_KEYS = {"sam_start": 0, "sam_every": 1, "sam_probability": 1.0}


def _variant(root: Path, optimizer: str, errors, *, epochs: int = 80, keys=None, passes_per_step: float = 1.0):
    for seed, error in enumerate(errors):
        steps = 10 * epochs
        write_run(
            root,
            optimizer=optimizer,
            seed=seed,
            test_error=error,
            model="resnet20",
            epochs=epochs,
            label_noise=0.4,
            rho=0.1 if optimizer != "sgd" else None,
            optimizer_keys={**(SAM_KEYS if optimizer != "sgd" else {}), **(keys or {})},
            summary_keys={"passes": round(steps * passes_per_step), "passes_per_step": passes_per_step,
                          "memorized": 90.0 - 10 * seed},
            name=f"{optimizer}-{epochs}-{'-'.join(f'{k}{v}' for k, v in (keys or {}).items())}",
        )  # fmt: skip


@pytest.fixture
def variants_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _variant(root, "sgd", [60.0, 62.0, 64.0])
    _variant(root, "sgd", [59.0, 62.5, 63.0], epochs=160)
    _variant(root, "sam", [52.0, 55.0, 56.0], passes_per_step=2.0)
    _variant(root, "sam", [57.0, 58.0, 61.0], keys={"sam_start": 60}, passes_per_step=1.25)
    _variant(root, "sam", [53.0, 56.0], keys={"sam_every": 2}, passes_per_step=1.5)  # seed 2 not yet run
    return root


def _row(report, variant):
    (row,) = [r for r in report.rows if r.variant == variant]
    return row


def test_variants_are_labelled_by_what_sets_them_apart(variants_root: Path):
    report = build_variants(load_runs([variants_root]), costs=RATIOS)
    assert [r.variant for r in report.rows] == [
        "sgd", "sgd[epochs=160]", "sam", "sam[sam_every=2]", "sam[sam_start=60]",
    ]  # fmt: skip
    assert _row(report, "sam[sam_start=60]").hyperparameters == "rho=0.1, sam_start=60"
    assert _row(report, "sam").hyperparameters == "rho=0.1"
    assert report.warnings == []


def test_differences_are_paired_by_seed_by_hand(variants_root: Path):
    report = build_variants(load_runs([variants_root]), costs=RATIOS)
    late = _row(report, "sam[sam_start=60]")
    # vs SGD: (57-60, 58-62, 61-64) = (-3, -4, -3): mean -10/3, s = sqrt(1/3), half-width t * s / sqrt(3) = t / 3
    assert late.vs_sgd.method == "paired" and late.vs_sgd.n == 3
    assert late.vs_sgd.mean == pytest.approx(-10 / 3, abs=1e-12)
    assert late.vs_sgd.half_width == pytest.approx(T_975_DF2 / 3, rel=1e-9)
    # vs SAM: (5, 3, 5): mean 13/3, s = sqrt(4/3), half-width 2t / 3
    assert late.vs_sam.mean == pytest.approx(13 / 3, abs=1e-12)
    assert late.vs_sam.half_width == pytest.approx(2 * T_975_DF2 / 3, rel=1e-9)
    # A variant with fewer seeds is paired over the seeds it shares: (53-60, 56-62) = (-7, -6)
    every = _row(report, "sam[sam_every=2]")
    assert (every.vs_sgd.method, every.vs_sgd.n, every.vs_sgd.mean) == ("paired", 2, -6.5)
    assert every.seeds == (0, 1)
    assert _row(report, "sam").vs_sam is None and _row(report, "sgd").vs_sgd is None


def test_cost_measured_derived_and_scaled_by_the_epochs(variants_root: Path):
    report = build_variants(load_runs([variants_root]), costs=RATIOS)
    assert _row(report, "sam").cost == Cost(2.0, "measured", "sam")
    assert _row(report, "sam[sam_every=2]").cost == Cost(1.5, "measured", "sam_every2")
    # SAM from epoch 60 of 80: 3/4 of the steps at SGD's cost, 1/4 at SAM's
    assert _row(report, "sam[sam_start=60]").cost.ratio == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)
    assert _row(report, "sam[sam_start=60]").cost.how == "derived"
    assert _row(report, "sgd[epochs=160]").cost == Cost(2.0, "measured", "sgd")
    # passes: counted by the trainer, relative to SGD's run
    assert _row(report, "sgd[epochs=160]").passes_vs_sgd == pytest.approx(2.0)
    assert _row(report, "sam[sam_start=60]").passes_vs_sgd == pytest.approx(1.25)
    config = {"optimizer": {"name": "looksam", "k": 5, **SAM_KEYS}, "trainer": {"epochs": 80}}
    assert step_cost(config, RATIOS, 80) == Cost(1.2, "measured", "looksam_k5")
    config = {"optimizer": {"name": "sam", **SAM_KEYS, "sam_probability": 0.5}, "trainer": {"epochs": 80}}
    assert step_cost(config, RATIOS, 80) == Cost(None, "", "sam_p0.5")  # not benchmarked: no number made up


def test_cli_writes_byte_identical_tables_and_the_figure(variants_root: Path, tmp_path: Path, capsys):
    costs = tmp_path / "bench.json"
    costs.write_text(json.dumps({"ratios": RATIOS}))
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = [str(variants_root), "--variants", "--costs", str(costs), "--show", "memorized", "--out", str(out)]
        assert tables_cli.main(argv) == 0
        outputs.append({f: (out / f).read_bytes() for f in ("tables.md", "tables.csv", "runs.csv")})
        assert (out / "gain_vs_cost.png").stat().st_size > 0
        assert json.loads((out / "provenance.json").read_text())["command"][:2] == ["sam-tables", str(variants_root)]
    assert outputs[0] == outputs[1]
    table = outputs[0]["tables.md"].decode()
    assert "| sam[sam_start=60] | rho=0.1, sam_start=60 | 80 | 58.67 ± 5.17 (3) | -3.33 ± 1.43 (3 paired) |" in table
    assert "| 1.25 | 1.25 | 1.25 (derived) |" in table
    runs_csv = outputs[0]["runs.csv"].decode().splitlines()
    assert len(runs_csv) == 1 + 14 and all(",finished," in line and ",yes," in line for line in runs_csv[1:])


def test_csv_carries_the_numbers_unrounded_to_the_table(variants_root: Path):
    report = build_variants(load_runs([variants_root]), costs=RATIOS, extra_metrics=["memorized"])
    rows = list(csv.DictReader(io.StringIO(render_variants_csv(report))))
    (late,) = [row for row in rows if row["variant"] == "sam[sam_start=60]"]
    assert late["hyperparameters"] == "rho=0.1, sam_start=60"
    assert late["vs_sgd"] == "-3.3333" and late["vs_sgd_method"] == "paired" and late["time_how"] == "derived"
    assert late["memorized_mean"] == "80.0000"


def test_bad_costs_and_flags_are_one_line_errors(variants_root: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="--costs .*bench.json"):
        load_costs(bad)
    assert tables_cli.main([str(variants_root), "--variants", "--costs", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    for argv in ([str(variants_root), "--costs", str(bad)], [str(variants_root), "--variants", "--latex"]):
        with pytest.raises(SystemExit) as exit_info:
            tables_cli.main(argv)
        assert exit_info.value.code == 2


def test_unfinished_runs_are_listed_not_averaged(variants_root: Path):
    write_run(variants_root, optimizer="sam", seed=3, test_error=None, status="running", model="resnet20",
              epochs=80, label_noise=0.4, rho=0.1, optimizer_keys=SAM_KEYS, name="sam-80-")  # fmt: skip
    report = build_variants(load_runs([variants_root]), costs=RATIOS)
    assert _row(report, "sam").not_finished == 1 and _row(report, "sam").error.n == 3
    assert [e.status for e in report.excluded] == ["running"]


def test_plain_sam_stays_the_reference_when_a_schedule_has_as_many_runs(tmp_path: Path):
    """Three runs of SAM and three of SAM from epoch 60: a tie by count, yet SAM at every step is plain `sam`."""
    root = tmp_path / "runs"
    _variant(root, "sgd", [60.0, 62.0, 64.0])
    _variant(root, "sam", [52.0, 55.0, 56.0], passes_per_step=2.0)
    _variant(root, "sam", [57.0, 58.0, 61.0], keys={"sam_start": 60}, passes_per_step=1.25)
    report = build_variants(load_runs([root]), costs=RATIOS)
    assert [r.variant for r in report.rows] == ["sgd", "sam", "sam[sam_start=60]"]
    assert _row(report, "sam").vs_sgd.mean == pytest.approx(-23 / 3)


def test_a_warm_start_shared_by_every_sam_run_is_the_plain_form(tmp_path: Path):
    """Where every SAM run starts after an SGD warm start, SAM from epoch 5 is plain `sam`, and later starts and
    sparser schedules are named against it."""
    root = tmp_path / "runs"
    _variant(root, "sgd", [60.0, 62.0, 64.0])
    _variant(root, "sam", [52.0, 55.0, 56.0], keys={"sam_start": 5}, passes_per_step=1.9)
    _variant(root, "sam", [57.0, 58.0, 61.0], keys={"sam_start": 60}, passes_per_step=1.25)
    _variant(root, "sam", [53.0, 56.0, 57.0], keys={"sam_start": 5, "sam_every": 2}, passes_per_step=1.45)
    report = build_variants(load_runs([root]), costs=RATIOS)
    assert [r.variant for r in report.rows] == ["sgd", "sam", "sam[sam_every=2]", "sam[sam_start=60]"]
    assert _row(report, "sam").hyperparameters == "rho=0.1, sam_start=5"
    assert _row(report, "sam[sam_every=2]").vs_sam.mean == pytest.approx(1.0)


def _overlap(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_labels_of_points_at_one_place_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sam_repro.analysis.plots import _annotate_apart

    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    points = [("sam", 2.0, 7.5), ("asam", 1.98, 7.3), ("gsam", 2.0, 7.1), ("sgd", 1.0, 0.0)]
    axes.plot([x for _, x, _ in points], [y for _, _, y in points], "o")
    axes.set_xlim(0.9, 2.5)
    axes.set_ylim(-5, 15)
    _annotate_apart(axes, [(text, x, y, False) for text, x, y in points])
    renderer = figure.canvas.get_renderer()
    boxes = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
    assert sorted(boxes) == ["asam", "gsam", "sam", "sgd"]
    names = sorted(boxes)
    assert [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if _overlap(boxes[a], boxes[b])] == []


def test_variants_with_fewer_than_three_seeds_are_drawn_hollow(variants_root: Path):
    from sam_repro.analysis.plots import gain_vs_cost_figure

    figure = gain_vs_cost_figure(build_variants(load_runs([variants_root]), costs=RATIOS))
    (axes,) = figure.axes
    markers = [line for line in axes.lines if line.get_marker() in ("o", "s")]
    hollow = [line for line in markers if line.get_markerfacecolor() == "none"]
    assert len(markers) == 5 and len(hollow) == 1  # sam[sam_every=2]: seeds 0 and 1 only
    (faded,) = [text.get_text() for text in axes.texts if text.get_alpha() == 0.6]
    assert faded == "sam[sam_every=2]"
