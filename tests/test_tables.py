"""sam-tables: the paper's numbers as data, intervals over seeds, grouping of runs into table cells, rendering.

Every number is checked against a hand computation (the t-interval of 2, 3, 4 is 3.0 ± 2.4841), a second
computation (scipy's own t-tests) or the reference transcription of the paper.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from scipy import stats as scipy_stats

from helpers.run_dirs import write_run
from sam_repro.analysis import stats
from sam_repro.analysis.aggregate import build_report
from sam_repro.analysis.render import render_csv, render_markdown
from sam_repro.analysis.runs import RunRecord, find_run_dirs, load_metrics, load_runs
from sam_repro.cli import tables as tables_cli
from sam_repro.errors import ConfigError, DataError
from sam_repro.paper import load_paper_tables, parse_paper_value

REPOSITORY = Path(__file__).resolve().parents[1]
REFERENCE_CANDIDATES = (REPOSITORY / "docs" / "paper_reference.md",)
WANDB_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "wandb_api"

# t(0.975, 2) in closed form: the t(2) CDF is 1/2 + t / (2 sqrt(2 + t^2)), so t / sqrt(2 + t^2) = 0.95.
T_975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # 4.30265...
T_975_DF4 = 2.776445105  # t(0.975, 4), from a printed t table (9 digits)


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """A small grid with known numbers.

    CIFAR-10 WRN-28-10 basic 200 ep: SGD seeds 0-2 -> 2, 3, 4; SAM seeds 0-2 -> 1.5, 2.0, 3.1 (paired), plus a
    failed SAM seed 3 and a running SAM seed 4 (listed, not averaged).
    CIFAR-100 WRN-28-10 cutout 200 ep: SGD seeds 0, 1 -> 17, 18; SAM seeds 0-2 -> 14, 15, 16 (Welch).
    CIFAR-10 Shake-Shake basic: SAM only (SGD missing).
    """
    root = tmp_path / "runs"
    for seed, error in enumerate([2.0, 3.0, 4.0]):
        write_run(root, optimizer="sgd", seed=seed, test_error=error)
    for seed, error in enumerate([1.5, 2.0, 3.1]):
        write_run(root, optimizer="sam", seed=seed, test_error=error)
    write_run(root, optimizer="sam", seed=3, test_error=None, status="failed", reason="loss is NaN at step 120")
    write_run(root, optimizer="sam", seed=4, test_error=None, status="running")
    for seed, error in enumerate([17.0, 18.0]):
        write_run(root, optimizer="sgd", seed=seed, test_error=error, dataset="cifar100", augment="cutout")
    for seed, error in enumerate([14.0, 15.0, 16.0]):
        write_run(root, optimizer="sam", seed=seed, test_error=error, dataset="cifar100", augment="cutout")
    write_run(root, optimizer="sam", seed=0, test_error=2.4, model="shake_shake_26_2x96d", epochs=1800)
    return root


def _row(report, table_id, arm, metric=None, **cell):
    """The one row of `arm` (and `metric`, where a table has several) whose cell has the given values."""
    table = next(t for t in report.tables if t.id == table_id)
    matches = [
        r
        for r in table.rows
        if r.arm == arm and (metric is None or r.metric == metric) and all(r.cell.get(k) == v for k, v in cell.items())
    ]
    assert len(matches) == 1, (arm, metric, cell, [(r.cell, r.arm, r.metric) for r in table.rows])
    return matches[0]


# ----------------------------------------------------------------------------------------------------------------
# The paper's numbers
# ----------------------------------------------------------------------------------------------------------------


def _reference_text() -> str:
    for path in REFERENCE_CANDIDATES:
        if path.exists():
            return path.read_text()
    raise AssertionError("docs/paper_reference.md is missing from the checkout")


def _markdown_rows(text: str, section: str) -> list[list[str]]:
    """Body rows of the first Markdown table after the heading that starts with `section`."""
    body = text.split(section, 1)[1].split("\n### ", 1)[0]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines() if line.startswith("|")
    ]
    return [r for r in rows[2:]]  # drop the header and the |---| line


TABLE1_ROWS = {
    "WRN-28-10 (200 ep)": ("wrn28_10", 200),
    "WRN-28-10 (1800 ep)": ("wrn28_10", 1800),
    "Shake-Shake (26 2x96d)": ("shake_shake_26_2x96d", None),
    "PyramidNet": ("pyramidnet272", None),
    "PyramidNet+ShakeDrop": ("pyramidnet272_shakedrop", None),
}
AUGMENTS = {"Basic": "basic", "Cutout": "cutout", "AA": "autoaugment"}
TABLE3_DATASETS = {
    "FGVC Aircraft": "fgvc_aircraft",
    "Flowers": "flowers102",
    "Oxford-IIIT Pets": "oxford_iiit_pet",
    "Stanford Cars": "stanford_cars",
    "CIFAR-10": "cifar10",
    "CIFAR-100": "cifar100",
    "Birdsnap": "birdsnap",
    "Food101": "food101",
    "ImageNet": "imagenet",
}
TABLE4_METHODS = {
    "Sanchez et al. (2019)": "sanchez2019",
    "Zhang & Sabuncu (2018)": "zhang_sabuncu2018",
    "Lee et al. (2019)": "lee2019",
    "Chen et al. (2019)": "chen2019",
    "Huang et al. (2019)": "huang2019",
    "MentorNet (2017)": "mentornet2017",
    "Mixup (2017)": "mixup2017",
    "MentorMix (2019)": "mentormix2019",
    "**SGD** (ours)": "sgd",
    "**Mixup** (ours)": "mixup",
    "**Bootstrap + Mixup**": "bootstrap_mixup",
    "**SAM**": "sam",
    "**Bootstrap + SAM**": "bootstrap_sam",
}


def _text(value) -> str | None:
    return value.text if value is not None else None


def test_paper_tables_equal_the_reference_transcription():
    """Every value of Tables 1-5 in tables.yaml is the string printed in the reference, cell by cell."""
    text = _reference_text()
    paper = load_paper_tables()
    checked = 0
    for row in _markdown_rows(text, "### 1.1 Table 1"):
        model, epochs = TABLE1_ROWS[row[0]]
        for dataset, (sam, sgd) in {"cifar10": row[2:4], "cifar100": row[4:6]}.items():
            keys = dict(dataset=dataset, model=model, epochs=epochs, augment=AUGMENTS[row[1]])
            assert _text(paper[1].lookup("sam", **keys)) == sam, keys
            assert _text(paper[1].lookup("sgd", **keys)) == sgd, keys
            checked += 2
    for row in _markdown_rows(text, "### 1.2 Table 2"):
        keys = dict(dataset="imagenet", model=row[0].lower().replace("-", ""), epochs=int(row[1]))
        for optimizer, top1, top5 in (("sam", row[2], row[3]), ("sgd", row[4], row[5])):
            assert _text(paper[2].lookup(optimizer, metric="test_error", **keys)) == top1, keys
            assert _text(paper[2].lookup(optimizer, metric="test_error_top5", **keys)) == top5, keys
            checked += 2
    for row in _markdown_rows(text, "### 1.3 Table 4"):
        for noise, printed in zip((0.2, 0.4, 0.6, 0.8), row[1:], strict=True):
            keys = dict(dataset="cifar10", model="resnet32", epochs=200, label_noise=noise)
            expected = None if printed == "–" else printed
            assert _text(paper[4].lookup(TABLE4_METHODS[row[0]], **keys)) == expected, (row[0], noise)
            checked += 1
    for row in _markdown_rows(text, "### 1.4 Table 3"):
        dataset = TABLE3_DATASETS[row[0]]
        for model, sam, sgd in (("efficientnet_b7", row[1], row[2]), ("efficientnet_l2", row[3], row[4])):
            assert _text(paper[3].lookup("sam", dataset=dataset, model=model)) == sam, (dataset, model)
            assert _text(paper[3].lookup("sgd", dataset=dataset, model=model)) == sgd, (dataset, model)
            checked += 2
    # Table 5 is prose in the reference: "SAM x±y / base x±y" pairs, in the order of tables.yaml's cells.
    sentence = text.split("Also reported [P Table 5", 1)[1].split("\n", 1)[0]
    pairs = re.findall(r"(\d+\.\d+±\d+\.\d+) / (?:base )?(\d+\.\d+±\d+\.\d+)", sentence)
    assert [(_text(c.values["sam"]), _text(c.values["sgd"])) for c in paper[5].cells] == pairs
    checked += 2 * len(pairs)
    assert checked == 60 + 36 + 52 + 36 + 16  # every printed value of the five tables (Table 4: "–" included)


def test_paper_values_parse_and_carry_their_unit():
    paper = load_paper_tables()
    bound = paper[1].lookup("sam", dataset="cifar10", model="wrn28_10", epochs=200, augment="autoaugment")
    assert (bound.value, bound.half_width, bound.bound, bound.display()) == (2.1, 0.1, True, "2.1 ± <0.1")
    plain = paper[3].lookup("sgd", dataset="imagenet", model="efficientnet_b7")
    assert (plain.value, plain.half_width) == (15.3, None)
    assert (
        paper[2].lookup("sam", metric="test_error_top5", dataset="imagenet", model="resnet50", epochs=400).value == 5.51
    )
    # Table 4 is accuracy, everything else error; Shake-Shake's epochs are not printed, so any epochs match.
    assert {t: paper[t].unit for t in paper} == {1: "error", 2: "error", 3: "error", 4: "accuracy", 5: "error"}
    assert (
        paper[1].lookup("sgd", dataset="cifar100", model="shake_shake_26_2x96d", augment="cutout", epochs=1234).text
        == "15.7±0.2"
    )
    with pytest.raises(KeyError):
        paper[1].lookup("sam", dataset="cifar10", model="wrn28_10", epochs=400, augment="basic")
    with pytest.raises(DataError):
        parse_paper_value("2.7+-0.1")


# ----------------------------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------------------------


def test_mean_ci_is_the_t_interval():
    estimate = stats.mean_ci([2.0, 3.0, 4.0])
    assert estimate.mean == 3.0 and estimate.n == 3
    assert estimate.half_width == pytest.approx(T_975_DF2 * 1.0 / math.sqrt(3), abs=1e-12)
    assert estimate.half_width == pytest.approx(2.4841, abs=1e-4)
    five = stats.mean_ci([2.6, 2.7, 2.8, 2.9, 3.0])  # s = sqrt(0.025)
    assert five.half_width == pytest.approx(T_975_DF4 * math.sqrt(0.025 / 5), abs=1e-9)
    assert stats.mean_ci([3.5]) == stats.Estimate(3.5, None, 1)  # one run: no interval, not a zero one


def test_paired_difference_by_hand():
    sam = {0: 2.0, 1: 2.5, 2: 3.1}
    sgd = {0: 3.0, 1: 3.3, 2: 4.0}
    # d = -1.0, -0.8, -0.9: mean -0.9, s = 0.1
    diff = stats.paired_difference(sam, sgd)
    assert diff.method == "paired" and diff.n == 3 and diff.df == 2
    assert diff.mean == pytest.approx(-0.9, abs=1e-12)
    assert diff.half_width == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3), abs=1e-12)
    low, high = scipy_stats.ttest_rel([2.0, 2.5, 3.1], [3.0, 3.3, 4.0]).confidence_interval()
    assert (low, high) == pytest.approx((diff.mean - diff.half_width, diff.mean + diff.half_width))


def test_welch_difference_by_hand():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    # var a = 1, var b = 20/3: se^2 = 1/3 + 5/3 = 2; df = 4 / ((1/3)^2/2 + (5/3)^2/3) = 4 / (1/18 + 25/27)
    df = 4 / (1 / 18 + 25 / 27)
    diff = stats.welch_difference(a, b)
    assert diff.method == "welch" and diff.n == 7
    assert diff.mean == -3.0 and diff.df == pytest.approx(df, abs=1e-12)
    assert diff.half_width == pytest.approx(scipy_stats.t.ppf(0.975, df) * math.sqrt(2.0), abs=1e-12)
    low, high = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert (low, high) == pytest.approx((-3.0 - diff.half_width, -3.0 + diff.half_width))


def test_difference_pairs_only_identical_seed_sets():
    same = stats.difference({0: [2.0], 1: [3.0]}, {0: [2.5], 1: [3.6]})
    assert same.method == "paired"
    other_seeds = stats.difference({0: [2.0], 1: [3.0]}, {0: [2.5], 2: [3.6]})
    assert other_seeds.method == "welch"
    rerun = stats.difference({0: [2.0, 2.1], 1: [3.0]}, {0: [2.5], 1: [3.6]})  # seed 0 twice: cannot pair
    assert rerun.method == "welch" and rerun.n == 5


# ----------------------------------------------------------------------------------------------------------------
# Runs on disk -> tables
# ----------------------------------------------------------------------------------------------------------------


def test_report_on_fake_runs(runs_root: Path):
    report = build_report(load_runs([runs_root]))
    assert [t.id for t in report.tables] == [1]

    sgd = _row(report, 1, "sgd", dataset="cifar10", model="wrn28_10", augment="basic", epochs=200)
    assert (sgd.ours.mean, sgd.ours.n) == (3.0, 3)
    assert sgd.ours.half_width == pytest.approx(2.4841, abs=1e-4)
    assert sgd.paper.text == "3.5±0.1"

    # SAM: the failed and the running seed are counted as not finished, never averaged.
    sam = _row(report, 1, "sam", dataset="cifar10", model="wrn28_10", augment="basic", epochs=200)
    assert sam.ours.n == 3 and sam.not_finished == 2 and sam.seeds == (0, 1, 2)
    assert sam.ours.mean == pytest.approx((1.5 + 2.0 + 3.1) / 3)
    # Paired: d = -0.5, -1.0, -0.9 -> mean -0.8, s = sqrt(0.07).
    assert sam.diff.method == "paired"
    assert sam.diff.mean == pytest.approx(-0.8)
    assert sam.diff.half_width == pytest.approx(T_975_DF2 * math.sqrt(0.07) / math.sqrt(3), abs=1e-12)
    assert str(sam.paper_diff) == "-0.8"

    # CIFAR-100: SGD ran seeds 0, 1 and SAM 0, 1, 2 -> Welch: var 1 (n 3) and 0.5 (n 2).
    welch = _row(report, 1, "sam", dataset="cifar100", augment="cutout")
    df = (1 / 3 + 0.25) ** 2 / ((1 / 3) ** 2 / 2 + 0.25**2 / 1)
    assert welch.diff.method == "welch" and welch.diff.df == pytest.approx(df)
    assert welch.diff.mean == pytest.approx(15.0 - 17.5)
    assert welch.diff.half_width == pytest.approx(scipy_stats.t.ppf(0.975, df) * math.sqrt(1 / 3 + 0.25))

    # Shake-Shake: SAM only. The SGD cell is shown as missing (with the paper's value), never filled in.
    missing = _row(report, 1, "sgd", model="shake_shake_26_2x96d")
    assert missing.ours is None and missing.paper.text == "2.7±0.1"
    lonely = _row(report, 1, "sam", model="shake_shake_26_2x96d")
    assert lonely.ours == stats.Estimate(2.4, None, 1) and lonely.diff is None and lonely.diff_note == "no SGD run"

    assert [(e.status, e.reason) for e in report.excluded] == [("failed", "loss is NaN at step 120"), ("running", None)]

    markdown = render_markdown(report)
    assert "| cifar10 | wrn28_10 | basic | 200 | sgd | 3.00 ± 2.48 (3) | 3.5 ± 0.1 |" in markdown
    assert "| sam | 2.20 ± 2.03 (3) | 2.7 ± 0.1 | -0.80 ± 0.66 | -0.8 | paired, 3 seeds |" in markdown
    assert "| Welch, 5 runs, df 2.9 |" in markdown
    assert "| cifar10 | shake_shake_26_2x96d | basic | 1800 | sgd | missing | 2.7 ± 0.1 |" in markdown
    assert "| 1800 | sam | 2.40 (1) | 2.3 ± <0.1 | no SGD run | -0.4 |" in markdown
    not_averaged = markdown.split("## Runs not averaged", 1)[1]
    assert "optimizer=sam/seed3 | failed | loss is NaN at step 120 |" in not_averaged
    assert "optimizer=sam/seed4 | running | — |" in not_averaged


def test_selected_table_lists_every_paper_cell(runs_root: Path):
    report = build_report(load_runs([runs_root]), table="1")
    (table,) = report.tables
    assert len(table.rows) == 60  # 30 cells x {sgd, sam}: every one, run or not
    unrun = _row(report, 1, "sam", dataset="cifar100", model="pyramidnet272_shakedrop", augment="autoaugment")
    assert unrun.ours is None and unrun.paper.text == "10.3±0.1" and unrun.diff_note is None
    assert report.tables[0].rows[0].cell["model"] == "wrn28_10"  # the paper's order
    csv_rows = render_csv(report).splitlines()
    assert len(csv_rows) == 61
    assert any(
        r.startswith(
            "1,cifar10,wrn28_10,basic,200,0,,sgd,test_error,error,3,3.0000,2.4841,0 1 2,0,3.5±0.1,3.5000,0.1000,"
        )
        for r in csv_rows
    )


def test_label_noise_table_is_accuracy(tmp_path: Path):
    for seed, (sgd, sam) in enumerate([(15.0, 5.0), (16.0, 6.5), (17.0, 6.0)]):
        for optimizer, error in (("sgd", sgd), ("sam", sam)):
            write_run(tmp_path, optimizer=optimizer, seed=seed, test_error=error, model="resnet32", label_noise=0.4)
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=9.0, model="resnet32")  # clean: not Table 4
    report = build_report(load_runs([tmp_path]))
    assert [t.id for t in report.tables] == [4, None]
    sam = _row(report, 4, "sam", label_noise=0.4)
    assert sam.ours.mean == pytest.approx(100 - 17.5 / 3) and sam.paper.text == "93.4"
    # accuracy differences: +10, +9.5, +11 -> mean 10.1667
    assert sam.diff.mean == pytest.approx(30.5 / 3) and sam.diff.method == "paired"
    assert str(sam.paper_diff) == "24.6"
    assert "test accuracy (%), higher is better" in render_markdown(report)


def test_imagenet_rows_carry_top1_and_top5(tmp_path: Path):
    for seed in range(2):
        write_run(
            tmp_path,
            optimizer="sam",
            seed=seed,
            test_error=22.4 + seed * 0.2,
            top5=6.2 + seed * 0.1,
            dataset="imagenet",
            model="resnet50",
            epochs=100,
            augment="imagenet",
        )
    report = build_report(load_runs([tmp_path]))
    top1 = _row(report, 2, "sam", metric="test_error", model="resnet50", epochs=100)
    top5 = _row(report, 2, "sam", metric="test_error_top5", model="resnet50", epochs=100)
    assert (top1.ours.mean, top1.ours.n, top1.paper.text) == (pytest.approx(22.5), 2, "22.5±0.1")
    assert (top5.ours.mean, top5.ours.n, top5.paper.text) == (pytest.approx(6.25), 2, "6.28±0.08")
    # Two seeds: half-width t(0.975, 1) s / sqrt(2) with t(0.975, 1) = tan(0.475 pi) = 12.706, s = 0.1 sqrt(2)
    # (top-1) and 0.05 sqrt(2) (top-5): 1.27 and 0.64.
    assert math.tan(0.475 * math.pi) * 0.1 == pytest.approx(top1.ours.half_width)
    markdown = render_markdown(report)
    assert "| imagenet | resnet50 | imagenet | 100 | sam | top-1 | 22.50 ± 1.27 (2) | 22.5 ± 0.1 |" in markdown
    assert "| imagenet | resnet50 | imagenet | 100 | sam | top-5 | 6.25 ± 0.64 (2) | 6.28 ± 0.08 |" in markdown


def test_finished_run_without_a_finite_error_is_listed_not_averaged(tmp_path: Path):
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0)
    write_run(tmp_path, optimizer="sgd", seed=1, test_error=float("nan"))  # diverged, yet marked finished
    report = build_report(load_runs([tmp_path]))
    sgd = _row(report, 1, "sgd", model="wrn28_10")
    assert sgd.ours == stats.Estimate(3.0, None, 1) and sgd.not_finished == 1
    assert [(e.status, e.reason) for e in report.excluded] == [
        ("finished", "finished, but summary.json has no finite test_error")
    ]


def test_cells_outside_the_paper_sort_numerically(tmp_path: Path):
    for epochs in (100, 3, 20):
        write_run(tmp_path, optimizer="sgd", seed=0, test_error=10.0, model="resnet20", epochs=epochs)
    report = build_report(load_runs([tmp_path]))
    assert [t.id for t in report.tables] == [None]
    assert [r.cell["epochs"] for r in report.tables[0].rows] == [3, 20, 100]  # not "100" < "20" < "3"


def test_group_by_optimizer_key_splits_the_arm_and_flags_mixed_runs(tmp_path: Path):
    for seed in range(2):
        write_run(tmp_path, optimizer="sgd", seed=seed, test_error=3.5 + seed)
        write_run(tmp_path, optimizer="sam", seed=seed, test_error=2.5 + seed, rho=0.05, name="rho0.05/sam")
        write_run(tmp_path, optimizer="sam", seed=seed, test_error=2.0 + seed, rho=0.1, name="rho0.1/sam")
    mixed = build_report(load_runs([tmp_path]))
    assert any("averaged runs differ in optimizer.rho" in w for w in mixed.warnings)
    split = build_report(load_runs([tmp_path]), group_by=["optimizer.rho"])
    assert not split.warnings
    arms = [r.arm for r in split.tables[0].rows]
    assert arms == ["sgd", "sam[rho=0.05]", "sam[rho=0.1]"]
    assert _row(split, 1, "sam[rho=0.1]").diff.mean == pytest.approx(-1.5)
    with pytest.raises(ConfigError, match="optimzer.rho"):
        build_report(load_runs([tmp_path]), group_by=["optimzer.rho"])


def test_run_discovery_skips_hydra_folders_and_reads_truncated_metrics(tmp_path: Path):
    run = write_run(tmp_path / "multirun", optimizer="sgd", seed=0, test_error=3.0, curve=[50.0, 20.0])
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run.parent / ".hydra").mkdir()
    (run.parent / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "test_err')  # killed while writing
    assert find_run_dirs([tmp_path, tmp_path / "multirun"]) == [Path(run)]
    assert [r["epoch"] for r in load_metrics(run)] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli_output_is_byte_identical_and_provenance_is_separate(runs_root: Path, tmp_path: Path, capsys):
    # Warnings from several cells and optimizers, so that their order is part of what must not change.
    for seed, lr in ((0, 0.1), (1, 0.2)):
        write_run(runs_root, optimizer="sgd", seed=seed, test_error=5.0, lr=lr, model="wrn16_8")
        write_run(runs_root, optimizer="asam", seed=seed, test_error=4.0, lr=lr, model="wrn16_8")
    # Two processes with different string hashes: any set or dict order leaking into the files shows up here.
    first, second = tmp_path / "a", tmp_path / "b"
    for out, hash_seed in ((first, "1"), (second, "2")):
        command = [sys.executable, "-m", "sam_repro.cli.tables", str(runs_root), "--out", str(out), "--latex"]
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
        assert result.returncode == 0, result.stderr
    for name in ("tables.md", "tables.csv", "runs.csv", "tables.tex"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "tables.md").read_text().count("averaged runs differ in optimizer.lr") == 2
    provenance = json.loads((first / "provenance.json").read_text())
    assert provenance["command"] == ["sam-tables", str(runs_root), "--out", str(first), "--latex"]
    assert {"git_commit", "created", "runs", "paper_tables"} <= set(provenance) and provenance["runs"] == 18
    assert r"2.20 $\pm$ 2.03 (3)" in (first / "tables.tex").read_text()
    assert "averaged" in (first / "runs.csv").read_text().splitlines()[0]

    capsys.readouterr()
    assert tables_cli.main([str(runs_root)]) == 0  # no --out: Markdown on stdout, nothing written
    assert capsys.readouterr().out == (first / "tables.md").read_text()


def test_cli_errors_are_one_line(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert tables_cli.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no runs found under") and err.count("\n") == 1

    broken = write_run(tmp_path / "runs", optimizer="sgd", seed=0, test_error=3.0)
    (broken / "summary.json").write_text('{"status": "finis')
    assert tables_cli.main([str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "summary.json: unreadable summary" in err and err.count("\n") == 1

    assert tables_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# W&B
# ----------------------------------------------------------------------------------------------------------------


class RecordedServer:
    """Stands in for the client's connection to the W&B server: answers every query with the recorded page."""

    app_url = "https://wandb.example/"

    def __init__(self, page: dict):
        self.page = page
        self.queries: list[dict] = []

    def execute_graphql(self, query, variables):
        self.queries.append(dict(variables))
        return self.page


def _check_wandb_report(runs: list[RunRecord]) -> None:
    assert [r.source for r in runs][:2] == ["wandb:sam-team/sam-repro/3kq9x1ab", "wandb:sam-team/sam-repro/7mzr2c0d"]
    report = build_report(runs)
    sam = _row(report, 1, "sam", dataset="cifar10", model="wrn28_10", augment="basic", epochs=200)
    assert sam.ours.n == 3 and sam.ours.mean == pytest.approx((2.61 + 2.82 + 2.90) / 3)
    # d = -0.80, -0.70, -0.80: s = sqrt(1/300)
    assert sam.diff.method == "paired" and sam.diff.mean == pytest.approx(-23 / 30)
    assert sam.diff.half_width == pytest.approx(T_975_DF2 * math.sqrt(1 / 300) / math.sqrt(3))
    assert [(e.source, e.status) for e in report.excluded] == [("wandb:sam-team/sam-repro/g8uu0m3n", "failed")]
    assert not report.warnings  # the _wandb bookkeeping keys are not mistaken for differing hyperparameters


def test_wandb_source_through_the_public_api_client(monkeypatch, tmp_path: Path):
    """The recorded page goes through wandb's own Runs/Run parsing (config unwrapping, summary JSON)."""
    import wandb
    from wandb.apis import public

    from sam_repro.analysis.wandb_source import load_wandb_runs

    page = json.loads((WANDB_FIXTURES / "runs_page.json").read_text())
    server = RecordedServer(page)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # Run() creates a scratch folder under it

    class RecordedApi:
        def runs(self, path):
            entity, project = path.split("/")
            try:
                return public.Runs(server, entity, project, lazy=False)
            except TypeError as exc:
                pytest.skip(f"this wandb's Runs() differs from the one the page was shaped for: {exc}")

    monkeypatch.setattr(wandb, "Api", RecordedApi)
    runs = load_wandb_runs("sam-team/sam-repro")
    assert server.queries and server.queries[0]["entity"] == "sam-team"
    assert runs[0].value("dataset.name") == "cifar10" and runs[0].value("optimizer.name") == "sgd"
    _check_wandb_report(runs)


def test_wandb_source_on_plain_api_objects():
    """The same page as the public Run objects expose it (unwrapped config, summary dict), no wandb needed."""
    from sam_repro.analysis.wandb_source import load_wandb_runs

    page = json.loads((WANDB_FIXTURES / "runs_page.json").read_text())
    objects = []
    for edge in page["project"]["runs"]["edges"]:
        node = edge["node"]
        config = {k: v["value"] for k, v in json.loads(node["config"]).items()}
        objects.append(
            SimpleNamespace(
                id=node["name"], state=node["state"], config=config, summary_metrics=json.loads(node["summaryMetrics"])
            )
        )
    api = SimpleNamespace(runs=lambda path: list(reversed(objects)))
    _check_wandb_report(load_wandb_runs("sam-team/sam-repro", api=api))


def test_wandb_source_accepts_flattened_configs_and_rejects_bad_paths():
    from sam_repro.analysis.wandb_source import _unflatten, load_wandb_runs

    assert _unflatten({"dataset.name": "cifar10", "dataset/label_noise": 0.2, "seed": 1, "model": {"name": "x"}}) == {
        "dataset": {"name": "cifar10", "label_noise": 0.2},
        "seed": 1,
        "model": {"name": "x"},
    }
    with pytest.raises(ConfigError):
        load_wandb_runs("just-a-project", api=SimpleNamespace())


def test_sgd_shows_the_better_of_standard_and_doubled_epochs(tmp_path: Path):
    """The paper's baseline rule: SGD-only runs at 2x epochs compete with SGD at 1x; the lower mean is shown."""
    for seed, (standard, doubled) in enumerate(((4.0, 3.6), (4.2, 3.8), (4.4, 3.7))):
        write_run(tmp_path, optimizer="sgd", seed=seed, test_error=standard)
        write_run(tmp_path, optimizer="sgd", seed=seed, test_error=doubled, epochs=400)
        write_run(tmp_path, optimizer="sam", seed=seed, test_error=3.0 + 0.1 * seed)
    # CIFAR-100: the doubled budget is worse, so the standard one stays.
    for seed in range(2):
        write_run(tmp_path, optimizer="sgd", seed=seed, test_error=18.0, dataset="cifar100")
        write_run(tmp_path, optimizer="sgd", seed=seed, test_error=19.0, dataset="cifar100", epochs=400)
        write_run(tmp_path, optimizer="sam", seed=seed, test_error=16.0, dataset="cifar100")
    report = build_report(load_runs([tmp_path]))

    sgd = _row(report, 1, "sgd", dataset="cifar10", epochs=200)
    assert sgd.ours.mean == pytest.approx((3.6 + 3.8 + 3.7) / 3) and sgd.epochs_used == 400
    sam = _row(report, 1, "sam", dataset="cifar10", epochs=200)
    # Paired with the 400-epoch SGD runs: d = 3.0-3.6, 3.1-3.8, 3.2-3.7.
    assert sam.diff.method == "paired" and sam.diff.mean == pytest.approx((-0.6 - 0.7 - 0.5) / 3)
    c100 = _row(report, 1, "sgd", dataset="cifar100", epochs=200)
    assert c100.ours.mean == pytest.approx(18.0) and c100.epochs_used is None
    # The 400-epoch SGD-only cells are consumed: no row of their own.
    assert not [r for t in report.tables for r in t.rows if r.cell.get("epochs") == 400]
    assert [(c.cell["dataset"], c.used) for c in report.baseline_choices] == [("cifar10", 400), ("cifar100", 200)]
    markdown = render_markdown(report)
    assert f"| {(3.6 + 3.8 + 3.7) / 3:.2f} ± " in markdown and "(3), 400 ep |" in markdown
    assert (
        "| dataset=cifar10, model=wrn28_10, augment=basic, epochs=200 | 4.20 (200 ep) | 3.70 (400 ep) | 400 ep |"
        in markdown
    )
    assert render_csv(report).splitlines()[0].endswith(",epochs_used")

    # --sgd-epochs as-run: every budget its own cell, as the runs were.
    as_run = build_report(load_runs([tmp_path]), sgd_best_of_doubled=False)
    assert _row(as_run, 1, "sgd", dataset="cifar10", epochs=200).ours.mean == pytest.approx(4.2)
    assert as_run.baseline_choices == []


def test_doubled_epoch_cell_with_sam_runs_keeps_its_own_sgd(tmp_path: Path):
    """A 2x cell that also has SAM runs is an experiment of its own: its SGD is not borrowed by the 1x cell."""
    for seed in range(2):
        for epochs, sgd_error in ((200, 4.0), (400, 3.0)):
            write_run(tmp_path, optimizer="sgd", seed=seed, test_error=sgd_error + seed, epochs=epochs)
            write_run(tmp_path, optimizer="sam", seed=seed, test_error=2.5 + seed, epochs=epochs)
    report = build_report(load_runs([tmp_path]))
    assert _row(report, 1, "sgd", dataset="cifar10", epochs=200).ours.mean == pytest.approx(4.5)
    assert _row(report, 1, "sgd", dataset="cifar10", epochs=400).ours.mean == pytest.approx(3.5)
    assert report.baseline_choices == []


# ----------------------------------------------------------------------------------------------------------------
# The committed CPU-scale reproduction
# ----------------------------------------------------------------------------------------------------------------


COMMITTED_TABLES = sorted(
    p.parent.name for p in (REPOSITORY / "results").glob("*/provenance.json") if (p.parent / "tables.md").exists()
)


@pytest.mark.parametrize("folder", COMMITTED_TABLES)
def test_committed_tables_regenerate_exactly(tmp_path: Path, folder: str):
    """Each committed results folder's tables come back byte for byte from the command its provenance.json
    records (run from the repository root), e.g. `sam-tables results/cpu_scale --out results/cpu_scale`."""
    committed = REPOSITORY / "results" / folder
    command = json.loads((committed / "provenance.json").read_text())["command"]
    assert command[0] == "sam-tables" and "--out" in command
    args = command[1:]
    out = tmp_path / "regenerated"
    args[args.index("--out") + 1] = str(out)
    result = subprocess.run(
        [sys.executable, "-m", "sam_repro.cli.tables", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("tables.md", "tables.csv", "runs.csv"):
        assert (out / name).read_text() == (committed / name).read_text(), name
    # Every committed run is a finished one and is averaged: the table is not built on partial runs.
    rows = (committed / "runs.csv").read_text().splitlines()[1:]
    assert rows and all(",finished," in row and ",yes," in row for row in rows)


def test_show_adds_summary_values_as_mean_and_interval(tmp_path: Path, capsys):
    for seed, (error, memorized) in enumerate([(40.0, 82.0), (44.0, 86.0), (42.0, 90.0)]):
        run = write_run(tmp_path, optimizer="sgd", seed=seed, test_error=error, model="resnet20", label_noise=0.4)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "memorized": memorized}))
    run = write_run(tmp_path, optimizer="sam", seed=0, test_error=30.0, model="resnet20", label_noise=0.4)
    plain = render_markdown(build_report(load_runs([tmp_path])))
    assert "memorized" not in plain  # only when asked
    report = build_report(load_runs([tmp_path]), extra_metrics=["memorized"])
    sgd, sam = (_row(report, None, arm, model="resnet20") for arm in ("sgd", "sam"))
    assert sgd.extras["memorized"].mean == pytest.approx(86.0)
    assert sgd.extras["memorized"].half_width == pytest.approx(T_975_DF2 * 4.0 / math.sqrt(3))  # sd of 82, 86, 90
    assert sam.extras["memorized"] is None  # its summary records none
    text = render_markdown(report)
    assert "| memorized |" in text.splitlines()[6] and f"86.00 ± {T_975_DF2 * 4 / math.sqrt(3):.2f} (3)" in text
    header = render_csv(report).splitlines()[0].split(",")
    assert header[-2:] == ["memorized_mean", "memorized_ci95"]
    assert tables_cli.main([str(tmp_path), "--show", "memorized", "best_test_error"]) == 0
    out = capsys.readouterr().out
    assert "| memorized | best test error |" in out


# ----------------------------------------------------------------------------------------------------------------
# Only what belongs together is averaged
# ----------------------------------------------------------------------------------------------------------------


def _edit_summary(run: Path, **changes) -> None:
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **changes}))


def test_a_run_stopped_short_of_its_schedule_is_never_averaged(tmp_path: Path):
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0)
    capped = write_run(tmp_path, optimizer="sgd", seed=1, test_error=90.0)
    _edit_summary(capped, stopped_early=True, epochs=1)  # what the trainer writes after trainer.max_steps=1
    older = write_run(tmp_path, optimizer="sgd", seed=2, test_error=80.0)
    _edit_summary(older, epochs=3)  # 3 of 200 epochs, from before the trainer recorded the stop
    report = build_report(load_runs([tmp_path]))
    row = _row(report, 1, "sgd", dataset="cifar10")
    assert (row.ours.mean, row.ours.n, row.seeds) == (3.0, 1, (0,))
    stopped = {e.source: e for e in report.excluded}
    assert {e.status for e in stopped.values()} == {"stopped-early"}
    assert "after 1 of 200 epochs" in stopped[capped.as_posix()].reason
    assert "after 3 of 200 epochs" in stopped[older.as_posix()].reason


@pytest.mark.data
def test_the_trainer_records_a_stop_by_max_steps(tmp_path: Path):
    from helpers.training import TINY, compose_config
    from sam_repro.engine.trainer import train as train_in_process

    overrides = (*TINY, "trainer.device=cpu", "trainer.progress=off", "trainer.epochs=2")
    capped, whole = tmp_path / "capped", tmp_path / "whole"
    train_in_process(compose_config(*overrides, "trainer.max_steps=1"), capped)
    train_in_process(compose_config(*overrides, "trainer.max_steps=8"), whole)  # 4 steps per epoch: the schedule
    assert json.loads((capped / "summary.json").read_text())["stopped_early"] is True
    assert json.loads((whole / "summary.json").read_text())["stopped_early"] is False
    assert [r.status for r in load_runs([capped, whole])] == ["stopped-early", "finished"]


def test_one_configuration_spelled_twice_is_one_run(tmp_path: Path):
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0, name="debug=tiny")
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0, name="debug=tiny_optimizer=sgd")
    write_run(tmp_path, optimizer="sgd", seed=1, test_error=4.0, name="debug=tiny")
    write_run(tmp_path, optimizer="sam", seed=0, test_error=2.0, name="sam")
    write_run(tmp_path, optimizer="sam", seed=1, test_error=2.5, name="sam")
    report = build_report(load_runs([tmp_path]))
    sgd, sam = (_row(report, 1, arm, dataset="cifar10") for arm in ("sgd", "sam"))
    assert (sgd.ours.n, sgd.seeds) == (2, (0, 1)) and sam.diff.method == "paired"
    copy = (tmp_path / "debug=tiny_optimizer=sgd" / "seed0").as_posix()  # the later by source
    assert [(e.source, e.status, e.reason) for e in report.excluded] == [
        (copy, "duplicate", f"the same configuration as {(tmp_path / 'debug=tiny' / 'seed0').as_posix()}")
    ]
    assert any(w.startswith(f"{copy}: the same configuration as") for w in report.warnings)


def test_a_run_of_another_experiment_at_twice_the_epochs_never_enters_the_row(tmp_path: Path):
    sweep, other, doubled = tmp_path / "sweep", tmp_path / "other", tmp_path / "doubled"
    for seed in (0, 1):
        write_run(sweep, optimizer="sgd", seed=seed, test_error=60.0, model="resnet8", epochs=5)
        write_run(sweep, optimizer="sam", seed=seed, test_error=58.0, model="resnet8", epochs=5)
    # An unrelated 10-epoch SGD run (another learning rate): not this sweep at twice the budget.
    write_run(other, optimizer="sgd", seed=0, test_error=40.0, model="resnet8", epochs=10, lr=0.05)
    report = build_report(load_runs([sweep, other]))
    sgd = _row(report, None, "sgd", model="resnet8", epochs=5)
    assert (sgd.ours.mean, sgd.ours.n, sgd.epochs_used) == (60.0, 2, None)
    assert report.baseline_choices == []
    assert _row(report, None, "sgd", model="resnet8", epochs=10).ours.mean == 40.0  # a row of its own

    # The same experiment at twice the budget is the paper's rule, and every row it touches says so.
    write_run(doubled, optimizer="sgd", seed=0, test_error=50.0, model="resnet8", epochs=10)
    text = render_markdown(build_report(load_runs([sweep, doubled])))
    sgd_line = next(line for line in text.splitlines() if "| resnet8 |" in line and "| sgd |" in line)
    sam_line = next(line for line in text.splitlines() if "| resnet8 |" in line and "| sam |" in line)
    assert "50.00 (1), 10 ep" in sgd_line and "+8.00 (vs SGD at 10 ep)" in sam_line


def test_warnings_come_before_the_tables(tmp_path: Path, capsys):
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0, name="a")
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0, name="b")
    assert tables_cli.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("## Warnings") < out.index("## Runs not averaged") < out.index("## Table 1")


def test_sam_tables_and_the_wandb_report_put_every_run_in_the_same_cell(tmp_path: Path, capsys):
    from sam_repro.analysis.wandb_report import report_spec

    exp = "table1/wrn28_10_200ep"
    write_run(tmp_path, optimizer="sgd", seed=0, test_error=3.0, experiment=exp)
    write_run(tmp_path, optimizer="sam", seed=0, test_error=2.7, experiment=exp, epochs=20)  # shortened
    smoke = write_run(tmp_path, optimizer="sam", seed=0, test_error=80.0, experiment=exp, model="resnet8")
    runs = load_runs([tmp_path])
    report = build_report(runs)
    placed = {
        run.source: (table.id, dict(row.cell))
        for table in report.tables
        for row in table.rows
        for run in runs
        if row.ours and report.grouping.cell(run) == dict(row.cell)
    }
    spec = report_spec(1, None, "sam-repro", runs)
    sections = {r["source"]: dict(s["cell"]) for s in spec["sections"] for r in s["runs"]}
    assert spec["other_runs"] == [smoke.as_posix()] and placed[smoke.as_posix()][0] is None  # "Other runs"
    for source, cell in sections.items():
        table, row_cell = placed[source]
        assert table == 1 and all(row_cell[k] == v for k, v in cell.items()), source
    assert sorted(c["epochs"] for c in sections.values()) == [20, 200]
