"""sam-report: figures per table and per cell, and an index.md that ties them to the tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from helpers.run_dirs import write_run  # the same fake run folders as the table tests
from sam_repro.analysis.plots import Curve, cell_slug, curve_band
from sam_repro.cli import report as report_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def report_runs(tmp_path: Path) -> Path:
    """CIFAR-10 WRN-28-10 basic 200 ep with curves: SGD and SAM seeds 0-2, plus a SAM seed still running."""
    root = tmp_path / "runs"
    epochs = np.arange(1, 201)
    for seed in range(3):
        for optimizer, final in (("sgd", 3.5), ("sam", 2.7)):
            curve = list(final + 80.0 * np.exp(-epochs / 25.0) + 0.1 * seed)
            write_run(root, optimizer=optimizer, seed=seed, test_error=curve[-1], curve=curve)
    write_run(root, optimizer="sam", seed=3, test_error=None, status="running", curve=[85.0, 60.0, 41.0])
    write_run(root, optimizer="sgd", seed=0, test_error=8.1, model="resnet20", epochs=10, curve=[40.0, 8.1])
    return root


def test_report_writes_figures_and_an_index_linking_them(report_runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert report_cli.main([str(report_runs), "--out", str(out)]) == 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == [
        "bars/other.png",
        "bars/table1.png",
        "curves/cifar10-resnet20-basic-10ep.png",
        "curves/cifar10-wrn28_10-basic-200ep.png",
    ]
    for png in pngs:
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        image = imread(out / png)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas

    index = (out / "index.md").read_text()
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", index)) == pngs  # every figure linked, no dangling link
    assert "## Table 1: CIFAR-10 and CIFAR-100, trained from scratch" in index
    sam_mean = 2.7 + 80.0 * np.exp(-200 / 25.0) + 0.1  # seeds add 0, 0.1, 0.2; s = 0.1 -> half-width 0.248
    assert f"| cifar10 | wrn28_10 | basic | 200 | sam | {sam_mean:.2f} ± 0.25 (3) | 2.7 ± 0.1 | -0.80 ± 0.00 |" in index
    assert "optimizer=sam/seed3 | running |" in index
    assert {"tables.md", "tables.csv", "runs.csv", "provenance.json"} <= {p.name for p in out.iterdir()}


def test_report_fails_in_one_line_without_runs(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_cli.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no runs found") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_curve_band_averages_over_the_runs_that_reached_each_epoch():
    long = Curve(np.array([1.0, 2.0, 3.0]), np.array([50.0, 20.0, 10.0]), True)
    short = Curve(np.array([1.0, 2.0]), np.array([40.0, 30.0]), True)
    epochs, mean, low, high = curve_band([long, short])
    assert epochs.tolist() == [1.0, 2.0, 3.0]
    assert mean.tolist() == [45.0, 25.0, 10.0]
    assert low.tolist() == [40.0, 20.0, 10.0] and high.tolist() == [50.0, 30.0, 10.0]


def test_cell_slug_is_a_file_name():
    cell = {
        "dataset": "cifar10",
        "model": "wrn28_10",
        "augment": "basic",
        "epochs": 200,
        "label_noise": 0.4,
        "train_subset": None,
        "trainer.m": 32,
        "model.pretrained_path": "/ckpt/b7 final.pt",
    }
    assert cell_slug(cell) == (
        "cifar10-wrn28_10-basic-200ep-noise0.4-trainer.m=32-model.pretrained_path=_ckpt_b7_final.pt"
    )


def test_memorized_share_is_drawn_beside_the_test_error(tmp_path: Path):
    from sam_repro.analysis.plots import error_curves_figure

    root = tmp_path / "runs"
    for seed, shift in enumerate((0.0, 10.0)):
        for optimizer, memorized in (("sgd", [20.0, 50.0, 80.0]), ("sam", [10.0, 12.0, 15.0])):
            run = write_run(
                root,
                optimizer=optimizer,
                seed=seed,
                test_error=60.0,
                model="resnet20",
                epochs=3,
                label_noise=0.4,
                curve=[70.0, 65.0, 60.0],
            )
            rows = [
                {**json.loads(line), "memorized": m + shift}
                for line, m in zip((run / "metrics.jsonl").read_text().splitlines(), memorized)
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    assert report_cli.main([str(root), "--out", str(out)]) == 0
    index = (out / "index.md").read_text()
    assert "![test error and memorized share per epoch](curves/cifar10-resnet20-basic-3ep-noise0.4.png)" in index
    # The figure itself: two panels, the right one the mean memorized share over the two seeds, per epoch.
    curves = {
        arm: [Curve(np.arange(1.0, 4.0), np.array(m) + shift, True) for shift in (0.0, 10.0)]
        for arm, m in (("sgd", [20.0, 50.0, 80.0]), ("sam", [10.0, 12.0, 15.0]))
    }
    errors = {arm: [Curve(np.arange(1.0, 4.0), np.array([70.0, 65.0, 60.0]), True)] for arm in curves}
    figure = error_curves_figure("noisy", errors, {}, curves)
    assert len(figure.axes) == 2 and figure.axes[1].get_ylim() == (0.0, 100.0)
    drawn = {line.get_label().split(" ")[0]: line.get_ydata().tolist() for line in figure.axes[1].lines}
    assert drawn == {"sgd": [25.0, 55.0, 85.0], "sam": [15.0, 17.0, 20.0]}
    assert len(error_curves_figure("clean", errors, {}).axes) == 1  # no memorized share: one panel


def _figures(monkeypatch, root: Path, out: Path) -> dict[str, object]:
    """sam-report on `root`, with every figure it saves kept by file name (bars/table1.png, curves/...)."""
    from sam_repro.analysis import plots

    figures, save = {}, plots.save_figure

    def keep(figure, path, *args, **kwargs):
        figures[Path(path).relative_to(out).as_posix()] = figure
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    assert report_cli.main([str(root), "--out", str(out)]) == 0
    return figures


def _outside(figure, legend, axes) -> bool:
    renderer = figure.canvas.get_renderer()
    return legend.get_window_extent(renderer).x0 >= axes.get_window_extent(renderer).x1


def test_bars_show_each_seed_and_no_interval_over_two(tmp_path: Path, monkeypatch):
    root = tmp_path / "runs"
    for seed, (sgd, sam) in enumerate([(60.0, 50.0), (10.0, 8.0)]):  # 2 seeds: a t-interval of ±318
        write_run(root, optimizer="sgd", seed=seed, test_error=sgd)
        write_run(root, optimizer="sam", seed=seed, test_error=sam)
    figure = _figures(monkeypatch, root, tmp_path / "report")["bars/table1.png"]
    axes = figure.axes[0]
    low, high = axes.get_ylim()
    assert 0.0 <= low and high <= 100.0
    from matplotlib.collections import PathCollection

    points = sorted(float(y) for c in axes.collections if isinstance(c, PathCollection) for y in c.get_offsets()[:, 1])
    assert points == [8.0, 10.0, 50.0, 60.0]  # every run, beside its mean
    ours = [c for c in axes.containers if c.get_label().endswith("ours")]
    assert ours and all(c.errorbar is None for c in ours)  # no interval over fewer than 3 seeds
    assert _outside(figure, axes.get_legend(), axes)


def test_curve_legend_gives_the_table_value_and_one_epoch_cells_are_drawn(tmp_path: Path, monkeypatch):
    root = tmp_path / "runs"
    write_run(root, optimizer="sgd", seed=0, test_error=58.4, curve=[70.0, 58.4], epochs=2, model="resnet8")
    capped = write_run(root, optimizer="sgd", seed=1, test_error=84.6, curve=[84.6], epochs=2, model="resnet8")
    summary = json.loads((capped / "summary.json").read_text())
    (capped / "summary.json").write_text(json.dumps({**summary, "stopped_early": True, "epochs": 1}))
    for seed, error in enumerate([71.0, 73.0]):  # one-epoch runs: one point each
        write_run(root, optimizer="sam", seed=seed, test_error=error, curve=[error], epochs=1, model="resnet8")
    out = tmp_path / "report"
    figures = _figures(monkeypatch, root, out)
    two = figures["curves/cifar10-resnet8-basic-2ep.png"]
    index = (out / "index.md").read_text()
    assert "| cifar10 | resnet8 | basic | 2 | sgd | 58.40 (1) |" in index
    labels = [t.get_text() for t in two.axes[0].get_legend().get_texts()]
    assert "sgd (mean of 1, final 58.40%)" in labels and "sgd, 1 unfinished (not averaged)" in labels
    assert _outside(two, two.axes[0].get_legend(), two.axes[0])
    one = figures["curves/cifar10-resnet8-basic-1ep.png"].axes[0]
    [line] = [line for line in one.lines if line.get_label().startswith("sam")]
    assert line.get_ydata().tolist() == [72.0] and line.get_marker() not in ("None", None, "")
