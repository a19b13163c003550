"""benchmarks/vs_common_loop.py: its common SAM port takes the engine's step (so the benchmark compares like with
like), and the script runs end to end on random arrays, printing what it writes."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.scripts import load_file
from sam_repro.engine.step import StepContext, sam_step, sgd_step
from sam_repro.models import create_model
from sam_repro.optim.sam import SAM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_common_loop.py"


bench = load_file("benchmarks/vs_common_loop.py", "vs_common_loop")


def batches(n_batches=2, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))
        for _ in range(n_batches)
    ]


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("wd, mode", [(0.0, "l2"), (5e-3, "base_optimizer")])
def test_common_sam_port_takes_the_engines_sam_step(wd, mode):
    """Two steps from the same weights on the same batches: the same weights, momentum and BatchNorm running
    statistics (float64). Weight decay is applied at w after the ascent by the port; the engine does the same in
    its base_optimizer mode (its default, l2, puts it into eps as the paper's code: compared with wd = 0)."""
    torch.manual_seed(0)
    engine = create_model("resnet8", num_classes=10).double().train()
    common = copy.deepcopy(engine)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=wd)
    engine_opt = SAM(engine.parameters(), torch.optim.SGD, rho=0.05, weight_decay_mode=mode, **kw)
    common_opt = bench.CommonSAM(common.parameters(), torch.optim.SGD, rho=0.05, **kw)
    initial = [p.detach().clone() for p in engine.parameters()]
    data = batches()
    for x, y in data:
        sam_step(engine, engine_opt, x, y, StepContext(group_size=len(x)))
        bench.common_sam_step(common, common_opt, x, y)
    for (name, a), b in zip(engine.named_parameters(), common.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert max((a - w).abs().max().item() for a, w in zip(engine.parameters(), initial)) > 1e-3  # they moved
    for a, b in zip(bn_layers(engine), bn_layers(common)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)
        assert a.momentum == b.momentum == 0.1  # the port's momentum-0 trick is undone after the step
        # The one difference: momentum 0 still counts the perturbed pass (unused while momentum is set).
        assert int(a.num_batches_tracked) == len(data) and int(b.num_batches_tracked) == 2 * len(data)
    for p_engine, p_common in zip(engine.parameters(), common.parameters()):
        torch.testing.assert_close(
            engine_opt.base_optimizer.state[p_engine]["momentum_buffer"],
            common_opt.base_optimizer.state[p_common]["momentum_buffer"],
            rtol=0,
            atol=1e-10,
        )


def test_common_sgd_step_takes_the_engines_sgd_step():
    """Plain SGD with weight_decay against the engine's sgd_step with the same coefficient as its L2 gradient."""
    torch.manual_seed(0)
    engine = create_model("resnet8", num_classes=10).double().train()
    common = copy.deepcopy(engine)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-3)
    engine_opt = torch.optim.SGD(engine.parameters(), lr=0.1, momentum=0.9)
    for g in engine_opt.param_groups:
        g["l2_weight_decay"] = kw["weight_decay"]
    common_opt = torch.optim.SGD(common.parameters(), **kw)
    for x, y in batches():
        sgd_step(engine, engine_opt, x, y, StepContext(group_size=len(x)))
        bench.common_sgd_step(common, common_opt, x, y)
    for (name, a), b in zip(engine.named_parameters(), common.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    for a, b in zip(bn_layers(engine), bn_layers(common)):
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-12)


def test_without_cifar10_it_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM_DATA_DIR", str(tmp_path))
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sam-data cifar10" in err[0]
    assert not (tmp_path / "out.json").exists()


def test_end_to_end_on_random_arrays_prints_what_it_writes(tmp_path):
    out = tmp_path / "result.json"
    args = ["--synthetic", "--device", "cpu", "--model", "resnet8", "--images", "256", "--rounds", "2"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--warmup-steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    lines = result.stdout.splitlines()
    found = {}
    for key, pattern in (
        ("sgd_speedup", r"sgd speedup (\d+\.\d\d) \(target >= 1\.15: (met|missed)\)"),
        ("sam_speedup", r"sam speedup (\d+\.\d\d) \(target >= 1\.00: (met|missed)\)"),
        ("data_share", r"engine data path share (\d+\.\d)% \(target < 5%: (met|missed)\)"),
    ):
        match = [m for m in map(re.compile(pattern).fullmatch, lines) if m]
        assert len(match) == 1, (key, result.stdout)
        found[key] = match[0]
    assert found["sgd_speedup"][1] == f"{written['sgd_speedup']:.2f}"
    assert found["sam_speedup"][1] == f"{written['sam_speedup']:.2f}"
    assert found["data_share"][1] == f"{written['data_share'] * 100:.1f}"
    for key, match in found.items():
        assert (match[2] == "met") == written["met"][key]
    seconds = written["epoch_seconds"]
    assert set(seconds) == {"engine_sgd", "common_sgd", "engine_sam", "common_sam", "engine_loader"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in seconds.values())
    ratios = [c / e for c, e in zip(seconds["common_sam"], seconds["engine_sam"])]
    assert written["per_round"]["sam_speedup"] == ratios
    assert written["sam_speedup"] == pytest.approx(sum(ratios) / 2)  # the median of two
    assert written["steps_per_epoch"] == 2 and written["threads"] >= 1
    assert written["provenance"]["command"][0] == "vs_common_loop.py" and "packages" in written["provenance"]
    assert written["targets"] == {"sgd_speedup": ">= 1.15", "sam_speedup": ">= 1.0", "data_share": "< 0.05"}
