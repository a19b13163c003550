"""Loss landscapes: filter normalization (Li et al. 2018), curves and surfaces against closed forms, interpolation,
plots with provenance, and `sam-analyze landscape` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from helpers.checkpoints import run_config, write_run
from helpers.quadratic import half_mse, mean_output, quadratic_problem
from sam_repro.analysis.landscape import (
    filter_normalized_direction,
    interpolation_curve,
    loss_curve,
    loss_surface,
    plot_curves,
    plot_surface,
    plot_surfaces,
)
from sam_repro.analysis.loading import evaluate_batches, file_stem, load_split
from sam_repro.analysis.plots import save_figure
from sam_repro.cli.analyze import main as analyze


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7), nn.LayerNorm(7)
    )


def test_filter_normalization_matches_weight_filter_norms():
    model = convnet()
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for (name, param), d in zip(model.named_parameters(), direction):
        assert d.shape == param.shape
        if param.dim() <= 1:  # biases, BatchNorm and LayerNorm scale/shift
            assert torch.count_nonzero(d) == 0, name
            continue
        # Every filter (output channel of the conv, row of the linear layer) has the norm of the weights' filter.
        torch.testing.assert_close(
            d.flatten(1).norm(dim=1), param.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=0, msg=name
        )
        # ... and is not simply the weight filter itself (the direction stays random).
        assert not torch.allclose(d, param.detach()), name


def test_filter_normalization_is_seeded():
    model = convnet()
    first = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    again = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    other = filter_normalized_direction(model, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])


def quadratic_setup():
    model, b = quadratic_problem(dim=10, n=9, seed=8)
    a = model.a
    batches = [(b[:4], torch.zeros(4)), (b[4:], torch.zeros(5))]

    def exact(w: torch.Tensor) -> float:
        return float(0.5 * w @ a @ w + b.mean(0) @ w)

    return model, batches, exact


def test_loss_curve_and_surface_equal_the_quadratic():
    model, batches, exact = quadratic_setup()
    w = model.w.detach().clone()
    generator = torch.Generator().manual_seed(9)
    d1 = [torch.randn(10, dtype=torch.float64, generator=generator)]
    d2 = [torch.randn(10, dtype=torch.float64, generator=generator)]
    alphas = [-1.0, -0.25, 0.0, 0.5, 2.0]
    curve = loss_curve(model, batches, d1, alphas, criterion=mean_output)
    assert curve["loss"] == pytest.approx([exact(w + a * d1[0]) for a in alphas], rel=1e-12)
    assert curve["error"] == [None] * len(alphas)  # not a classifier

    betas = [-0.5, 0.0, 1.0]
    surface = loss_surface(model, batches, (d1, d2), alphas, betas, criterion=mean_output)
    for i, beta in enumerate(betas):
        assert surface["loss"][i] == pytest.approx([exact(w + a * d1[0] + beta * d2[0]) for a in alphas], rel=1e-12)
    assert torch.equal(model.w.detach(), w)  # restored


def test_interpolation_matches_least_squares():
    generator = torch.Generator().manual_seed(10)
    x, y = torch.randn(30, 4, generator=generator), torch.randn(30, generator=generator)
    model_a, model_b = nn.Linear(4, 1), nn.Linear(4, 1)
    wa, wb = model_a.weight.detach().clone(), model_b.weight.detach().clone()
    ba, bb = model_a.bias.detach().clone(), model_b.bias.detach().clone()
    alphas = [-0.5, 0.0, 0.3, 1.0, 1.5]
    curve = interpolation_curve(model_a, model_b, [(x[:16], y[:16]), (x[16:], y[16:])], alphas, criterion=half_mse)
    for alpha, loss in zip(alphas, curve["loss"]):
        w, b = (1 - alpha) * wa + alpha * wb, (1 - alpha) * ba + alpha * bb
        assert loss == pytest.approx(float(0.5 * ((x @ w.T).squeeze(1) + b - y).pow(2).mean()), rel=1e-5)
    assert torch.equal(model_a.weight, wa) and torch.equal(model_b.weight, wb)  # neither model modified
    with pytest.raises(ValueError):
        interpolation_curve(model_a, nn.Linear(4, 2), [(x, y)], alphas, criterion=half_mse)


def test_interpolation_extrapolates_weights_but_not_batchnorm_statistics():
    """Beyond the endpoints running_var would turn negative (NaN loss); the statistics stop at the endpoint."""
    torch.manual_seed(1)
    model_a, model_b = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval() for _ in range(2))
    with torch.no_grad():
        model_a[1].running_var.fill_(0.2)
        model_b[1].running_var.fill_(3.0)  # at alpha = -0.5 a linear mix gives 0.2 - 0.5 * 2.8 < 0
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    curve = interpolation_curve(model_a, model_b, [(x, y)], [-0.5, 0.5])
    expected = {}
    for alpha in (-0.5, 0.5):
        reference = copy.deepcopy(model_a)
        with torch.no_grad():
            for p, pa, pb in zip(reference.parameters(), model_a.parameters(), model_b.parameters()):
                p.copy_((1 - alpha) * pa + alpha * pb)
            clipped = min(max(alpha, 0.0), 1.0)
            reference[1].running_var.copy_((1 - clipped) * model_a[1].running_var + clipped * model_b[1].running_var)
            reference[1].running_mean.copy_((1 - clipped) * model_a[1].running_mean + clipped * model_b[1].running_mean)
            expected[alpha] = float(F.cross_entropy(reference(x), y))
    assert curve["loss"] == pytest.approx([expected[-0.5], expected[0.5]], rel=1e-5)


def test_curve_on_a_classifier_reports_error_and_restores_eval_state():
    model = convnet()[:5].train()  # conv, BN, ReLU, flatten, linear
    inputs = torch.randn(12, 3, 6, 6)
    targets = torch.randint(0, 7, (12,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    curve = loss_curve(model, [(inputs, targets)], direction, [0.0, 1.0])
    with torch.no_grad():
        expected = (model.eval()(inputs).argmax(1) != targets).float().mean().item() * 100
    assert curve["error"][0] == pytest.approx(expected)  # alpha = 0 is the model itself, in eval mode
    assert curve["loss"][1] != curve["loss"][0]
    model.train()
    loss_curve(model, [(inputs, targets)], direction, [0.5])
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_plots_are_pngs_carrying_provenance(tmp_path):
    curves = {
        "sgd": {"alpha": [0, 1, 2], "loss": [1.0, 0.5, 1.0], "error": [10.0, 5.0, 10.0]},
        "sam": {"alpha": [0, 1, 2], "loss": [0.8, 0.6, 0.8], "error": [9.0, 6.0, 9.0]},
    }
    surface = {
        "alpha": [-1.0, 0.0, 1.0],
        "beta": [-1.0, 0.0, 1.0],
        "loss": [[a * a + b * b for a in (-1, 0, 1)] for b in (-1, 0, 1)],
    }
    record = {"command": "sam-analyze landscape run", "git_commit": "abc123"}
    for name, figure in [("curves.png", plot_curves(curves)), ("surface.png", plot_surface(surface))]:
        path = save_figure(figure, tmp_path / name, record)
        image = Image.open(path)
        assert image.format == "PNG" and image.size[0] > 300
        assert json.loads(image.text["Description"]) == record


def test_side_by_side_surfaces_share_their_contour_levels():
    """SGD beside SAM on the same levels: the sharp bowl gets more rings than the wide one, never rescaled."""
    axis = [-1.0, -0.5, 0.0, 0.5, 1.0]
    sharp = {"alpha": axis, "beta": axis, "loss": [[1 + 8 * (a * a + b * b) for a in axis] for b in axis]}
    wide = {"alpha": axis, "beta": axis, "loss": [[1 + (a * a + b * b) for a in axis] for b in axis]}
    figure = plot_surfaces({"sgd": sharp, "sam": wide})
    panels = [axes for axes in figure.axes if axes.get_title() in ("sgd", "sam")]
    assert [axes.get_title() for axes in panels] == ["sgd", "sam"]
    levels = [axes.collections[0].levels for axes in panels]
    assert list(levels[0]) == list(levels[1])
    assert levels[0][0] == pytest.approx(1.0) and levels[0][-1] == pytest.approx(17.0)  # global min and max


def test_sam_analyze_landscape_end_to_end(tmp_path, fake_dataset, capsys):
    sgd_model = write_run(tmp_path / "sgd", optimizer="sgd", seed=0)
    write_run(tmp_path / "sam", optimizer="sam", seed=1)
    common = ["--subset", "16", "--device", "cpu", "--no-progress", "--points", "5"]
    out = tmp_path / "out"
    sgd_stem, sam_stem = file_stem(tmp_path / "sgd"), file_stem(tmp_path / "sam")
    both = f"{sgd_stem}+{sam_stem}"

    assert analyze(["landscape", str(tmp_path / "sgd"), str(tmp_path / "sam"), "--out", str(out), *common]) == 0
    settings = "landscape_1d.train-16.seed0.points5"
    assert (out / f"{both}.{settings}.png").exists()
    sgd = json.loads((out / f"{sgd_stem}.{settings}.json").read_text())
    assert (out / f"{sam_stem}.{settings}.json").exists()
    assert sgd["result"]["alpha"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    # alpha = 0 is the trained network: the centre of the curve is its loss on the sample.
    sample = load_split(OmegaConf.create(run_config()), "train", 16, 0)
    assert sgd["result"]["loss"][2] == pytest.approx(
        evaluate_batches(sgd_model, list(sample.batches(250))).loss, rel=1e-5
    )

    assert (
        analyze(["landscape", str(tmp_path / "sgd"), str(tmp_path / "sam"), "--mode", "2d", "--out", str(out), *common])
        == 0
    )
    settings = "landscape_2d.train-16.seed0.points5"
    surface_jsons = sorted(out.glob(f"*.{settings}.json"))
    assert len(surface_jsons) == 2
    surface = json.loads(surface_jsons[0].read_text())["result"]
    assert len(surface["loss"]) == 5 and len(surface["loss"][0]) == 5
    assert {p.name for p in out.glob(f"*.{settings}.png")} == {  # one per run + side by side
        f"{sgd_stem}.{settings}.png",
        f"{sam_stem}.{settings}.png",
        f"{both}.{settings}.png",
    }

    assert (
        analyze(
            [
                "landscape",
                str(tmp_path / "sgd"),
                str(tmp_path / "sam"),
                "--mode",
                "interpolate",
                "--out",
                str(out),
                *common,
            ]
        )
        == 0
    )
    settings = "landscape_interpolate.train-16.seed0.points5"
    interpolation = json.loads((out / f"{both}.{settings}.json").read_text())["result"]
    assert interpolation["alpha"][0] == -0.5 and interpolation["alpha"][-1] == 1.5
    assert (out / f"{both}.{settings}.png").exists()

    assert analyze(["landscape", str(tmp_path / "sgd"), "--mode", "interpolate", "--out", str(out), *common]) == 2
    assert "exactly two runs" in capsys.readouterr().err

    # The same run twice: two result files and two legend entries, nothing overwritten.
    twice = tmp_path / "twice"
    assert analyze(["landscape", str(tmp_path / "sgd"), str(tmp_path / "sgd"), "--out", str(twice), *common]) == 0
    assert len(list(twice.glob("*.landscape_1d.*.json"))) == 2


def test_sam_analyze_analyses_with_other_settings_or_runs_into_one_folder_all_survive(tmp_path, fake_dataset, capsys):
    """Two analyses into one folder that differ in split, subset, seed, grid or runs write different files: each
    keeps its own results, nothing is overwritten, and the same command again rewrites its own files only."""
    write_run(tmp_path / "sgd", optimizer="sgd", seed=0)
    write_run(tmp_path / "sam", optimizer="sam", seed=1)
    out = tmp_path / "out"
    sgd, sam = str(tmp_path / "sgd"), str(tmp_path / "sam")
    base = ["--device", "cpu", "--no-progress", "--out", str(out)]
    commands = [
        ["landscape", sgd, sam, "--subset", "16", "--points", "5", *base],
        ["landscape", sgd, sam, "--subset", "16", "--points", "3", *base],  # another grid
        ["landscape", sgd, sam, "--subset", "8", "--points", "5", *base],  # another sample size
        ["landscape", sgd, sam, "--subset", "16", "--points", "5", "--seed", "1", *base],  # another seed
        ["landscape", sgd, sam, "--subset", "16", "--points", "5", "--split", "test", *base],  # another split
        ["landscape", sgd, "--subset", "16", "--points", "5", *base],  # another set of runs
    ]

    def contents() -> dict[str, object]:  # a record without its provenance (the time), a plot's bytes
        return {
            p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "provenance"}
            if p.suffix == ".json"
            else p.read_bytes()
            for p in out.glob("*")
        }

    written: list[set[str]] = []
    for command in commands:
        before = contents() if out.exists() else {}
        assert analyze(command) == 0, capsys.readouterr().err
        after = contents()
        assert {name for name, content in before.items() if after.get(name) != content} == set()  # nothing overwritten
        new = set(after) - set(before)
        assert new, f"{command} wrote no new file: it overwrote another analysis"
        written.append(new)
    # Every analysis is still there, its settings in its records.
    # (the sgd run alone shares its per-run record with the first command: the same analysis of the same run)
    curves = [name for names in written for name in names if name.endswith(".json")]
    assert len(curves) == 2 * 5
    assert len([name for names in written for name in names if name.endswith(".png")]) == 6  # one plot per command
    points = {len(json.loads((out / name).read_text())["result"]["alpha"]) for name in curves}
    assert points == {3, 5}
    assert {json.loads((out / name).read_text())["data"]["split"] for name in curves} == {"train", "test"}
    # The same command again rewrites its own files and adds nothing.
    names = {p.name for p in out.glob("*")}
    assert analyze(commands[1]) == 0
    assert {p.name for p in out.glob("*")} == names


def test_sam_analyze_writes_beside_the_run_without_out(tmp_path, fake_dataset, capsys, monkeypatch):
    write_run(tmp_path / "sgd", optimizer="sgd", seed=0)
    monkeypatch.chdir(tmp_path)
    common = ["--subset", "16", "--device", "cpu", "--points", "5"]  # progress auto: not a terminal here
    assert analyze(["landscape", str(tmp_path / "sgd"), *common]) == 0
    plot = f"{file_stem(tmp_path / 'sgd')}.landscape_1d.train-16.seed0.points5.png"
    assert (tmp_path / "sgd" / "analysis" / plot).exists()
    assert not (tmp_path / "results").exists()
    err = capsys.readouterr().err
    assert "\r" not in err and "landscape 1d" not in err  # no tqdm bar in a log
