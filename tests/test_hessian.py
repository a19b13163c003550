"""Hessian eigenvalues against problems whose Hessian is known exactly.

* a quadratic 0.5 w^T A w + b^T w with a chosen spectrum (Hessian A);
* linear least squares 0.5 * mean (x^T w - y)^2 (Hessian X^T X / n), in float32 through nn.Linear, in chunks;
* a tiny convnet with BatchNorm, against the dense Hessian from torch.autograd.functional.hessian;
* `sam-analyze hessian` end to end on a checkpoint, against the dense Hessian of the same sample.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from helpers.checkpoints import MEAN, STD, write_run
from helpers.quadratic import TOP, Quadratic, half_mse, mean_output, quadratic_problem
from sam_repro.analysis.hessian import HessianOperator, hessian_spectrum, lanczos, power_iteration
from sam_repro.analysis.loading import file_stem
from sam_repro.cli.analyze import main as analyze


def as64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def quadratic_in_chunks(chunk: int = 5) -> tuple[Quadratic, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The 60-dimensional quadratic and its 12 inputs, in chunks of `chunk` (the last one shorter)."""
    model, b = quadratic_problem(dim=60, n=12, seed=2)
    return model, [(b[i : i + chunk], torch.zeros(b[i : i + chunk].shape[0])) for i in range(0, len(b), chunk)]


def test_operator_is_the_quadratic_matrix():
    model, chunks = quadratic_in_chunks()
    operator = HessianOperator(model, chunks, mean_output)
    v = torch.randn(60, dtype=torch.float64)
    torch.testing.assert_close(operator(v), model.a @ v, rtol=1e-12, atol=1e-12)
    assert operator.matvecs == 1


def test_lanczos_quadratic_chosen_spectrum():
    report = hessian_spectrum(*quadratic_in_chunks(), k=5, criterion=mean_output)
    torch.testing.assert_close(as64(report["eigenvalues"]), as64(TOP), rtol=1e-9, atol=0)
    assert report["lambda_max"] == pytest.approx(40.0, rel=1e-9)
    assert report["lambda_max_over_lambda_5"] == pytest.approx(8.0, rel=1e-9)
    assert report["bn_mode"] == "absent" and report["num_parameters"] == 60 and report["num_examples"] == 12
    assert max(report["residuals"]) < 1e-6


def test_power_iteration_quadratic_chosen_spectrum():
    report = hessian_spectrum(
        *quadratic_in_chunks(), k=5, method="power", iterations=300, tol=1e-6, criterion=mean_output
    )
    torch.testing.assert_close(as64(report["eigenvalues"]), as64(TOP), rtol=1e-8, atol=0)
    assert report["method"] == "power_iteration"


def test_lanczos_finds_the_top_not_the_largest_magnitude():
    """With a negative eigenvalue larger in magnitude than the top, Lanczos still returns the algebraic top."""
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    eigenvalues = torch.cat([torch.tensor([10.0, 6.0, -50.0]), torch.linspace(-2, 2, 27)]).double()
    a = q @ torch.diag(eigenvalues) @ q.T
    spectrum = lanczos(lambda v: a @ v, 30, k=2, dtype=torch.float64)
    assert spectrum.eigenvalues == pytest.approx([10.0, 6.0], rel=1e-9)
    assert power_iteration(
        lambda v: a @ v, 30, k=1, max_iterations=500, tol=1e-8, dtype=torch.float64
    ).eigenvalues == pytest.approx([-50.0], rel=1e-9)


def test_lanczos_restarts_when_the_krylov_space_is_exhausted():
    """A has 3 distinct eigenvalues: Krylov spaces stop at dimension 3; the restart finds the repeated top."""
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    eigenvalues = torch.tensor([7.0, 7.0, 7.0] + [3.0] * 4 + [1.0] * 5, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    spectrum = lanczos(lambda v: a @ v, 12, k=4, iterations=12, dtype=torch.float64)
    assert spectrum.eigenvalues == pytest.approx([7.0, 7.0, 7.0, 3.0], rel=1e-9)


def test_least_squares_in_chunks_float32():
    n, d = 100, 40
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=generator) * 1.15 ** -torch.arange(d)  # separated top eigenvalues
    y = torch.randn(n, generator=generator)
    expected = torch.linalg.eigvalsh((x.T @ x / n).double()).flip(0)[:5]
    model = nn.Linear(d, 1, bias=False)
    chunks = [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]  # 32, 32, 32, 4: unequal weights
    for method in ("lanczos", "power"):
        report = hessian_spectrum(model, chunks, k=5, method=method, iterations=200, tol=1e-4, criterion=half_mse)
        torch.testing.assert_close(as64(report["eigenvalues"]), expected, rtol=2e-4, atol=0, msg=method)


def tiny_bn_convnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.double()


def dense_hessian(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the mean cross-entropy, by torch.autograd.functional.hessian over flat parameters."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        params = dict(zip(names, (part.view(s) for part, s in zip(vector.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(functional_call(model, params, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss, flat)


def test_convnet_with_batchnorm_matches_dense_hessian():
    model = tiny_bn_convnet().train()  # hessian_spectrum must switch to eval mode itself, then switch back
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(20, 1, 5, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (20,), generator=generator)
    running_mean = model[1].running_mean.clone()
    dense = dense_hessian(model.eval(), inputs, targets)
    model.train()
    chunks = [(inputs[i : i + 7], targets[i : i + 7]) for i in range(0, 20, 7)]

    operator = HessianOperator(model.eval(), chunks)
    v = torch.randn(operator.dim, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(operator(v), dense @ v, rtol=1e-9, atol=1e-12)

    model.train()
    report = hessian_spectrum(model, chunks, k=5, iterations=operator.dim)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:5]
    torch.testing.assert_close(as64(report["eigenvalues"]), expected, rtol=1e-8, atol=1e-10)
    assert report["bn_mode"] == "eval"
    assert model.training  # restored
    assert torch.equal(model[1].running_mean, running_mean)  # no batch statistics were folded in


def test_sam_analyze_hessian_end_to_end(tmp_path, fake_dataset, capsys):
    """The CLI on a checkpoint: lambda_max equals the dense Hessian's top eigenvalue on the same seeded sample."""
    model = write_run(tmp_path / "run").double()
    out = tmp_path / "out"
    rc = analyze(
        [
            "hessian",
            str(tmp_path / "run"),
            "--subset",
            "24",
            "--seed",
            "3",
            "--k",
            "3",
            "--iterations",
            "60",
            "--chunk-size",
            "10",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    settings = "hessian.train-24.seed3.lanczos-k3.it60"  # the analysis, its sample and its non-default settings
    (json_path,) = out.glob("*.json")
    assert json_path.name == f"{file_stem(tmp_path / 'run')}.{settings}.json"
    record = json.loads(json_path.read_text())
    assert record["data"] == {
        "dataset": "fake10",
        "split": "train",
        "subset": 24,
        "seed": 3,
        "num_examples": 24,
        "label_noise": 0.0,
        "chunk_size": 10,
    }
    assert record["run"]["optimizer"] == "sam" and record["run"]["epoch"] == 3
    assert {"command", "git_commit", "machine", "packages", "time"} <= record["provenance"].keys()
    assert record["result"]["bn_mode"] == "eval"

    # Second computation: the same 24 examples, the dense Hessian in float64.
    from sam_repro.analysis.loading import seeded_subset

    indices = seeded_subset(48, 24, 3)
    images = torch.from_numpy(fake_dataset.arrays.train_images)[indices].double().div(255)
    images = ((images - torch.tensor(MEAN).double()) / torch.tensor(STD).double()).permute(0, 3, 1, 2)
    labels = torch.from_numpy(fake_dataset.arrays.train_labels)[indices]
    expected = torch.linalg.eigvalsh(dense_hessian(model.eval(), images, labels)).flip(0)[:3]
    # The CLI runs in float32: agreement to float32 accuracy.
    assert record["result"]["eigenvalues"] == pytest.approx(expected.tolist(), rel=2e-3)
    assert (out / f"{file_stem(tmp_path / 'run')}.{settings}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lambda_max" in capsys.readouterr().out
