"""The speed benchmarks' contracts (benchmarks/): what they print, in what order, and that it is what they wrote.

Tiny settings (ResNet-8, one round): the numbers are not the point here, the lines and the files are.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from helpers.scripts import load_file


def test_sam_overhead_prints_sam_ratio_first_then_sgd_m32(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sam_overhead.json"
    argv = ["sam_overhead.py", "--model", "resnet8", "--batch", "64", "--repeats", "1", "--max-repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert load_file("benchmarks/sam_overhead.py", "bench_sam_overhead").main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"sam ratio \d+\.\d\d", lines[0])
    assert re.fullmatch(r"sgd_m32 ratio \d+\.\d\d", lines[1])
    result = json.loads(out.read_text())
    assert float(lines[0].split()[-1]) == pytest.approx(result["ratios"]["sam"], abs=0.005)
    assert float(lines[1].split()[-1]) == pytest.approx(result["ratios"]["sgd_m32"], abs=0.005)
    assert result["ratios"]["sgd"] == 1.0 and result["provenance"]["command"]
    # SAM dispatches more operations than SGD (two passes), m = 32 more than m = the batch (a pass per group)
    ops = result["dispatched_ops_per_step"]
    assert ops["sam"] > 1.5 * ops["sgd"] and ops["sam_m32"] > ops["sam"]
    # one line per variant, each the JSON's value; the passes counted from the steps taken
    printed = dict(re.findall(r"^(\S+) ratio (\d+\.\d\d)", "\n".join(lines), re.M))
    assert set(printed) == set(result["ratios"]) - {"sgd"}
    for name, value in printed.items():
        assert float(value) == pytest.approx(result["ratios"][name], abs=0.005)
    expected = {"sgd": 1, "sgd_m32": 1, "sam": 2, "sam_m32": 2, "asam": 2, "gsam": 2, "msam": 1}
    expected |= {"looksam_k5": 1.2, "sam_every2": 1.5, "late_sam_0.25": 1.25}
    passes = result["passes_per_step"]
    assert {k: passes[k] for k in expected} == pytest.approx(expected)
    assert 1 < passes["sam_p0.5"] < 2
    late = result["ratios"]["late_sam_0.25"]
    assert late == pytest.approx(0.75 + 0.25 * result["ratios"]["sam"]) and result["derived_ratios"] == [
        "late_sam_0.25"
    ]


def test_compile_speedup_reports_each_variant_and_the_graphs_the_trainer_test_expects(tmp_path, capsys):
    out = tmp_path / "compile_speedup.json"
    bench = load_file("benchmarks/compile_speedup.py", "bench_compile_speedup")
    argv = ["--model", "resnet8", "--batch", "64", "--rounds", "1", "--steps", "1", "--backend", "eager"]
    assert bench.main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    printed = dict(
        (m.group(1), float(m.group(2)))
        for m in re.finditer(r"^compile speedup (\w+) (\d+\.\d\d)$", capsys.readouterr().out, re.M)
    )
    result = json.loads(out.read_text())
    assert set(printed) == {"sgd", "sam", "sam_m32"}
    for name, value in printed.items():
        assert value == pytest.approx(result["speedups"][name], abs=0.005)
    # SGD one graph; SAM two (the perturbed pass toggles BatchNorm's track_running_stats), with m = 32 too
    assert result["graphs"] == {"sgd": 1, "sam": 2, "sam_m32": 2}
    assert len(result["seconds_per_step"]["sam_compiled"]) == 1 and result["provenance"]["git_commit"]
