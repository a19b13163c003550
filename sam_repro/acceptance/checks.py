"""Correctness on the device, each check a closed form or a second computation it must equal.

A check returns (status, detail); `run_check` turns an exception into `failed` with its first line. Checks marked
`needs_cuda` are reported `skipped` on a CPU; where their code can run there anyway (the trainer's resume, the
process group with gloo instead of NCCL) it does, so that `--smoke` keeps it working, and a failure there is
reported as `failed`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sam_repro.acceptance.common import (
    endless,
    make_optimizer,
    step_context,
    sync,
    synthetic_images,
    synthetic_loader,
)
from sam_repro.engine.backends import deterministic_cudnn
from sam_repro.engine.compat import set_tf32, tf32_enabled
from sam_repro.engine.host_reads import HostReads
from sam_repro.engine.step import StepContext, sam_step, sgd_step
from sam_repro.models import create_model

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CheckEnv:
    device: torch.device
    smoke: bool
    compile_backend: str = "inductor"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu-check-")))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def wrn(self) -> nn.Module:
        """A small Wide ResNet with BatchNorm: WRN-16-4 on a GPU, WRN-10-1 at smoke size."""
        arch = {"depth": 10, "widen_factor": 1} if self.smoke else {}
        return create_model("wrn16_4", num_classes=10, **arch)

    @property
    def batch(self) -> tuple[int, int]:
        """(batch, m) of the checks' steps."""
        return (16, 8) if self.smoke else (128, 32)

    @property
    def image(self) -> int:
        return 8 if self.smoke else 32

    def inputs(self, seed: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        batch, _ = self.batch
        x = torch.randn(batch, 3, self.image, self.image, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return x.to(device or self.device), y.to(device or self.device)


@dataclass
class Check:
    name: str
    run: Callable[[CheckEnv], tuple[str, str]]
    needs_cuda: bool = False
    runs_on_cpu: bool = False  # a CUDA check whose code path still runs (and can fail) on a CPU


def slug(name: str) -> str:
    """A check's name as a test id: `pytest -m cuda -k <slug>` runs that check alone."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_check(check: Check, env: CheckEnv) -> dict:
    start = time.perf_counter()
    if check.needs_cuda and not env.cuda and not check.runs_on_cpu:
        return {"name": check.name, "status": "skipped", "detail": "needs CUDA", "seconds": 0.0}
    tf32 = tf32_enabled() if env.cuda else None
    try:
        status, detail = check.run(env)
    except Exception as exc:  # a check that raises has failed; its first line says why
        status, detail = "failed", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
    finally:
        if tf32 is not None:
            set_tf32(tf32)
    if check.needs_cuda and not env.cuda and status == "passed":
        status, detail = "skipped", f"needs CUDA; its code ran on the CPU: {detail}"
    return {"name": check.name, "status": status, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}


def _verdict(ok: bool, detail: str) -> tuple[str, str]:
    return ("passed" if ok else "failed"), detail


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _relative_update_error(
    before: list[torch.Tensor], after: list[torch.Tensor], ref_before: list[torch.Tensor], ref_after: list[torch.Tensor]
) -> float:
    """|| (a1 - a0) - (r1 - r0) || / || r1 - r0 ||, in float64 on the CPU."""
    num = den = 0.0
    for a0, a1, r0, r1 in zip(before, after, ref_before, ref_after):
        da = a1.double().cpu() - a0.double().cpu()
        dr = r1.double().cpu() - r0.double().cpu()
        num += float(((da - dr) ** 2).sum())
        den += float((dr**2).sum())
    return (num / max(den, 1e-300)) ** 0.5


# ---- the checks ------------------------------------------------------------------------------------------------


def sam_equals_float64_reference(env: CheckEnv) -> tuple[str, str]:
    """Two SAM steps (m-groups, L2 weight decay, a clip that binds, Nesterov momentum) in float32 on the device, TF32
    off, against the same steps in float64 on the CPU: the parameter updates and BatchNorm statistics agree."""
    tolerance = 1e-4
    if env.cuda:
        set_tf32(False)
    torch.manual_seed(0)
    reference = env.wrn()
    batch, m = env.batch
    x, y = env.inputs(0, torch.device("cpu"))
    models = {"device": copy.deepcopy(reference).to(env.device), "cpu64": copy.deepcopy(reference).double()}
    inputs = {"device": (x.to(env.device), y.to(env.device)), "cpu64": (x.double(), y)}
    probe = copy.deepcopy(models["cpu64"])
    nn.functional.cross_entropy(probe(x.double()), y).backward()
    clip = 0.5 * float(torch.sqrt(sum((p.grad**2).sum() for p in probe.parameters())))  # binds
    before = {k: _params(v) for k, v in models.items()}
    for name, model in models.items():
        opt = make_optimizer("sam", model)
        for _ in range(2):
            sam_step(model, opt, *inputs[name], StepContext(group_size=m, grad_clip=clip))
    after = {k: _params(v) for k, v in models.items()}
    error = _relative_update_error(before["device"], after["device"], before["cpu64"], after["cpu64"])
    bn = [
        (a.running_var.double().cpu(), b.running_var)
        for a, b in zip(
            (mod for mod in models["device"].modules() if isinstance(mod, nn.BatchNorm2d)),
            (mod for mod in models["cpu64"].modules() if isinstance(mod, nn.BatchNorm2d)),
        )
    ]
    bn_error = max(float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) for a, b in bn)
    ok = error < tolerance and bn_error < tolerance
    return _verdict(
        ok,
        f"relative update difference {error:.1e}, BatchNorm running variance {bn_error:.1e} "
        f"(tolerance {tolerance:g}; batch {batch}, m = {m}, 2 steps, clipped at half the gradient's "
        f"norm)",
    )


def _fixed_batch_losses(env: CheckEnv, precision: str, steps: int) -> tuple[list[float], int]:
    torch.manual_seed(1)
    model = env.wrn().to(env.device)
    batch, m = env.batch
    x, y = env.inputs(1)
    scaler = torch.amp.GradScaler(env.device.type) if precision == "fp16" else None
    ctx = step_context(m, precision, env.device, scaler=scaler)
    opt = make_optimizer("sam", model, lr=0.05)
    losses, skipped = [], 0
    for _ in range(steps):
        scale = scaler.get_scale() if scaler else None
        stats = sam_step(model, opt, x, y, ctx)
        losses.append(stats.loss_sum / stats.count)
        if scaler and scaler.get_scale() < scale:
            skipped += 1
    return [float(v) for v in torch.stack(losses).tolist()], skipped


def _decreasing(env: CheckEnv, precision: str) -> tuple[str, str]:
    steps, window = (6, 2) if env.smoke else (50, 5)
    losses, skipped = _fixed_batch_losses(env, precision, steps)
    finite = all(v == v and abs(v) != float("inf") for v in losses)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    ok = finite and last < 0.8 * first
    extra = f", {skipped} steps skipped by the scaler" if precision == "fp16" else ""
    return _verdict(
        ok,
        f"loss {first:.3f} (first {window} of {steps} steps) -> {last:.3f} (last {window}), all "
        f"finite: {finite}{extra}",
    )


def bf16_decreasing(env: CheckEnv) -> tuple[str, str]:
    return _decreasing(env, "bf16")


def fp16_decreasing(env: CheckEnv) -> tuple[str, str]:
    return _decreasing(env, "fp16")


def fp16_overflow_skips(env: CheckEnv) -> tuple[str, str]:
    """An inf injected into the first pass's gradient: the scaler skips the whole SAM step (no parameter or momentum
    changes) and halves the scale once; the next step goes through."""
    torch.manual_seed(2)
    model = env.wrn().to(env.device)
    batch, m = env.batch
    x, y = env.inputs(1)
    opt = make_optimizer("sam", model)
    scaler = torch.amp.GradScaler(env.device.type, init_scale=2.0**8)
    ctx = step_context(m, "fp16", env.device, scaler=scaler)
    before = _params(model)
    calls = {"n": 0}
    first_weight = next(model.parameters())
    handle = first_weight.register_hook(lambda grad: _inf_the_first_time(grad, calls))
    sam_step(model, opt, x, y, ctx)
    handle.remove()
    unchanged = all(torch.equal(a, b) for a, b in zip(_params(model), before))
    no_momentum = all("momentum_buffer" not in opt.base_optimizer.state.get(p, {}) for p in model.parameters())
    scale = scaler.get_scale()
    sam_step(model, opt, x, y, ctx)
    moved = any(not torch.equal(a, b) for a, b in zip(_params(model), before))
    ok = unchanged and no_momentum and scale == 2.0**7 and moved
    return _verdict(
        ok,
        f"parameters unchanged: {unchanged}, no momentum taken: {no_momentum}, scale 256 -> "
        f"{scale:g}; next step moves the weights: {moved}",
    )


def _inf_the_first_time(grad: torch.Tensor, calls: dict) -> torch.Tensor:
    """A gradient hook's body: inf for the first gradient it sees (counted in `calls`), the gradient after that."""
    calls["n"] += 1
    return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad


def mixed_precision_equals_fp32(env: CheckEnv) -> tuple[str, str]:
    """One SAM step (m-groups, clipping) from the same weights in bf16 and in fp16 (with its scaler) against fp32 with
    TF32 off: the updates agree to within what the half types give two passes of a small network (0.23 for bf16 and
    0.09 for fp16 measured at smoke size on a CPU). The tolerances catch the gross errors: a skipped step differs by
    1, a loss scale left in the update by orders of magnitude."""
    tolerances = {"bf16": 0.5, "fp16": 0.25}
    if env.cuda:
        set_tf32(False)
    torch.manual_seed(7)
    reference = env.wrn().to(env.device)
    batch, m = env.batch
    x, y = env.inputs(7)
    start = _params(reference)
    updates = {}
    for precision in ("fp32", "bf16", "fp16"):
        model = copy.deepcopy(reference)
        scaler = torch.amp.GradScaler(env.device.type) if precision == "fp16" else None
        sam_step(model, make_optimizer("sam", model), x, y, step_context(m, precision, env.device, scaler=scaler))
        updates[precision] = _params(model)
    errors = {p: _relative_update_error(start, updates[p], start, updates["fp32"]) for p in tolerances}
    ok = all(errors[p] < tolerances[p] for p in tolerances)
    return _verdict(
        ok,
        ", ".join(
            f"{p} vs fp32: relative update difference {errors[p]:.1e} (tolerance {tolerances[p]:g})" for p in errors
        ),
    )


def tf32_only_when_asked(env: CheckEnv) -> tuple[str, str]:
    """The trainer's numerics (`backends.configure`): with `trainer.tf32=false` a float32 matmul and convolution on
    the device equal float64 to float32's precision; with `trainer.tf32=true` they may not (on Ampere and later they
    differ by about 1e-3, TF32's 10-bit mantissa)."""
    from sam_repro.engine.backends import configure

    deterministic = torch.are_deterministic_algorithms_enabled()
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)
    image, kernel = torch.randn(8, 64, 16, 16, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    matmul64 = a.double() @ b.double()
    conv64 = nn.functional.conv2d(image.double(), kernel.double(), padding=1)

    inputs = (env.device, a, b, image, kernel, matmul64, conv64)
    try:
        configure(deterministic=False, tf32=False)
        ieee = _float32_errors(*inputs)
        configure(deterministic=False, tf32=True)
        tf32 = _float32_errors(*inputs)
    finally:
        configure(deterministic=deterministic, tf32=False)
    ok = max(ieee) < 1e-5
    ampere = env.cuda and torch.cuda.get_device_capability(env.device)[0] >= 8
    if ampere:
        ok &= min(tf32) > 1e-5  # the switch does something where TF32 exists
    return _verdict(
        ok,
        f"tf32=false: matmul {ieee[0]:.1e}, conv {ieee[1]:.1e} from float64 (tolerance 1e-5); tf32=true: "
        f"matmul {tf32[0]:.1e}, conv {tf32[1]:.1e}" + ("" if ampere else " (no TF32 on this device)"),
    )


def _float32_errors(
    device: torch.device,
    a: torch.Tensor,
    b: torch.Tensor,
    image: torch.Tensor,
    kernel: torch.Tensor,
    matmul64: torch.Tensor,
    conv64: torch.Tensor,
) -> tuple[float, float]:
    """The relative errors of a float32 matmul a @ b and convolution of `image` by `kernel` on `device`, against
    their float64 values."""
    mm = (a.to(device) @ b.to(device)).double().cpu()
    cv = nn.functional.conv2d(image.to(device), kernel.to(device), padding=1).double().cpu()
    rel = lambda got, want: float((got - want).norm() / want.norm())  # noqa: E731
    return rel(mm, matmul64), rel(cv, conv64)


def device_loader_copies(env: CheckEnv) -> tuple[str, str]:
    """The device-resident loader's copies (the epoch's plan from pinned memory, AutoAugment's batches copied without
    blocking while the next is made): its batches on the device equal the same loader's on the CPU bit for bit, for
    two epochs, with and without AutoAugment."""
    from sam_repro.acceptance.common import basic_augment
    from sam_repro.data.loader import TrainLoader

    try:
        from sam_repro.data.autoaugment import autoaugment_batch
    except ImportError:
        autoaugment_batch = None
    images, labels = synthetic_images(96, 32, 3, torch.device("cpu"), seed=9)
    facts, ok = [], True
    kinds = {"basic": None}
    if autoaugment_batch is not None:
        kinds["AutoAugment"] = lambda batch, generator: autoaugment_batch(batch, "cifar10", generator)
    for kind, cpu_augment in kinds.items():
        batches = {}
        for where in ("cpu", "device"):
            device = torch.device("cpu") if where == "cpu" else env.device
            loader = TrainLoader(
                images.to(device), labels.to(device), 32, basic_augment(32), seed=3, cpu_augment=cpu_augment
            )
            got = []
            for epoch in range(2):
                loader.set_epoch(epoch)
                got += [(x.cpu(), y.cpu()) for x, y in loader]
            batches[where] = got
        same = len(batches["cpu"]) == len(batches["device"]) == 6 and all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches["cpu"], batches["device"])
        )
        ok &= same
        facts.append(f"{kind}: 6 batches equal to the CPU loader's bitwise: {same}")
    if autoaugment_batch is None:
        facts.append("AutoAugment: needs torchvision")
    return _verdict(ok, "; ".join(facts))


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def stochastic_draws_replayed(env: CheckEnv) -> tuple[str, str]:
    """With rho = 0 the perturbed point is w itself, so the perturbed loss equals the clean one bit for bit exactly
    when the perturbed pass replays the clean pass's dropout and ShakeDrop draws (on the device's generator). The
    same forward without the replay differs, which shows the draws are random at all."""
    details, ok = [], True
    arch = {"depth": 20, "alpha": 12} if env.smoke else {"depth": 38, "alpha": 48}
    for name, build in (
        ("ShakeDrop", lambda: create_model("pyramidnet110_shakedrop", num_classes=10, **arch)),
        ("dropout", _DropoutNet),
    ):
        torch.manual_seed(3)
        model = build().to(env.device)
        batch, m = env.batch
        x, y = env.inputs(1)
        opt = make_optimizer("sam", model, rho=0.0)
        with deterministic_cudnn():
            stats = sam_step(model, opt, x, y, StepContext(group_size=m))
            model.train()
            with torch.no_grad():
                a, b = model(x[:m]), model(x[:m])
        same = torch.equal(stats.loss_sum, stats.perturbed_loss_sum)
        random = not torch.equal(a, b)
        ok &= same and random
        details.append(f"{name}: perturbed loss == clean loss bitwise: {same}, draws differ without replay: {random}")
    return _verdict(ok, "; ".join(details))


def compiled_equals_eager(env: CheckEnv) -> tuple[str, str]:
    """One SGD and one SAM step (m-groups) of the same network, eager and `torch.compile`d (the trainer compiles the
    model, not the step), in float32 with TF32 off: the updates agree within the tolerance."""
    tolerance = 1e-3
    if env.cuda:
        set_tf32(False)
    torch.manual_seed(4)
    eager = env.wrn().to(env.device)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=env.compile_backend)
    batch, m = env.batch
    x, y = env.inputs(1)
    before = _compiled_graphs()
    start = _params(eager)
    for net in (eager, compiled):
        sgd_step(net, make_optimizer("sgd", twin if net is compiled else eager), x, y, StepContext(group_size=batch))
    mid_eager, mid_compiled = _params(eager), _params(twin)
    sgd_error = _relative_update_error(start, mid_compiled, start, mid_eager)
    for net, module in ((eager, eager), (compiled, twin)):
        sam_step(net, make_optimizer("sam", module), x, y, StepContext(group_size=m))
    sam_error = _relative_update_error(mid_compiled, _params(twin), mid_eager, _params(eager))
    graphs = _compiled_graphs() - before
    ok = sgd_error < tolerance and sam_error < tolerance and (graphs > 0 or before < 0)
    return _verdict(
        ok,
        f"relative update difference SGD {sgd_error:.1e}, SAM {sam_error:.1e} (tolerance "
        f"{tolerance:g}, backend {env.compile_backend}, {graphs} graphs compiled)",
    )


def _compiled_graphs() -> int:
    """Graphs torch.compile has captured so far in this process (-1 where this PyTorch does not count them), so the
    comparison above cannot pass by running eager twice."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return -1
    return int(counters["stats"]["unique_graphs"])


# The host reads a step makes by design: fp16's GradScaler.step reads found_inf once (sam_repro/engine/host_reads.py).
EXPECTED_HOST_READS = {"sgd_step fp16": 1, "sam_step fp16": 1}


@contextlib.contextmanager
def _count_synchronisations(env: CheckEnv) -> Iterator[Callable[[], tuple[int, list[str]]]]:
    """Within: the host reads the dispatcher sees (`HostReads`) and, on a GPU, the synchronisations CUDA reports
    (`torch.cuda.set_sync_debug_mode("warn")`, which also sees those inside PyTorch's C++). Yields a function giving
    the larger of the two counts and what was seen."""
    seen: list[str] = []
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True)) if env.cuda else []
        if env.cuda:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, 0)
        reads = stack.enter_context(HostReads(count_cpu=not env.cuda))
        yield lambda: _synchronisations(reads, caught, seen)


def _synchronisations(reads: HostReads, caught: list, seen: list[str]) -> tuple[int, list[str]]:
    """The larger of the host reads `reads` counted and the synchronisation warnings CUDA raised into `caught`, and
    what was seen (also left in `seen`)."""
    cuda = [str(w.message).splitlines()[0][:80] for w in caught if "synchroniz" in str(w.message)]
    seen[:] = [f"{op} on {device}" for op, device in reads.reads] + cuda
    return max(len(reads.reads), len(cuda)), seen


def no_synchronisation(env: CheckEnv) -> tuple[str, str]:
    """The host reads of each part of a training step, as the trainer runs it with the progress bar and step logging
    off: the loader's next batch, SGD and SAM steps (fp32, bf16, fp16 with its scaler) and the schedule's step. None,
    except fp16's one read of the scaler's found_inf (`EXPECTED_HOST_READS`). Each part runs once before, so one-time
    set-up does not count. On a CPU only the dispatcher's count exists (every tensor is on the host there)."""
    batch, m = env.batch
    loader = endless(synthetic_loader(4 * batch, 32, batch, env.device))
    model = env.wrn().to(env.device)
    x, y = next(loader)
    sgd, sam = make_optimizer("sgd", model), make_optimizer("sam", model)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0 / (1 + step))
    scaler = torch.amp.GradScaler(env.device.type)
    parts = {
        "loader": lambda: next(loader),
        "sgd_step fp32": lambda: sgd_step(model, sgd, x, y, step_context(m, "fp32", env.device)),
        "sam_step fp32": lambda: sam_step(model, sam, x, y, step_context(m, "fp32", env.device)),
        "sam_step bf16": lambda: sam_step(model, sam, x, y, step_context(m, "bf16", env.device)),
        "sgd_step fp16": lambda: sgd_step(model, sgd, x, y, step_context(m, "fp16", env.device, scaler=scaler)),
        "sam_step fp16": lambda: sam_step(model, sam, x, y, step_context(m, "fp16", env.device, scaler=scaler)),
        "schedule": schedule.step,
    }
    results, ok = [], True
    for name, part in parts.items():
        part()
        sync(env.device)
        with _count_synchronisations(env) as counted:
            part()
        sync(env.device)
        n, seen = counted()
        expected = EXPECTED_HOST_READS.get(name, 0)
        ok &= n == expected
        results.append(f"{name}: {n} (expected {expected}{': ' + ', '.join(seen) if seen else ''})")
    return _verdict(ok, "; ".join(results))


def autoaugment_leaves_cuda_generator(env: CheckEnv) -> tuple[str, str]:
    """AutoAugment draws its sub-policies on the CPU from the loader's generator: the CUDA generator's state (the
    stochastic layers' draws on the GPU) must be the same after it as before."""
    try:
        from sam_repro.data.autoaugment import autoaugment_batch
    except ImportError as exc:
        return "skipped", f"needs torchvision ({exc})"
    images, _ = synthetic_images(8, 32, 3, torch.device("cpu"))
    cuda_before, cpu_before = torch.cuda.get_rng_state(), torch.get_rng_state()
    autoaugment_batch(images, "cifar10", torch.Generator().manual_seed(0))
    same_cuda = torch.equal(cuda_before, torch.cuda.get_rng_state())
    same_cpu = torch.equal(cpu_before, torch.get_rng_state())
    return _verdict(
        same_cuda and same_cpu, f"CUDA generator untouched: {same_cuda}, CPU generator restored: {same_cpu}"
    )


# ---- the real trainer, in a subprocess (needs hydra-core and omegaconf) -----------------------------------------


def _trainer_worker(env: CheckEnv, mode: str, keep_cublas: bool) -> tuple[str, str]:
    """`keep_cublas`: give the trainer a CUBLAS_WORKSPACE_CONFIG (False: none, as a user who set nothing)."""
    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
    except ImportError:
        return (
            "skipped",
            "needs the project installed (hydra-core, omegaconf): pip install --no-index --find-links wheelhouse .",
        )
    child = dict(os.environ)
    child["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [child.get("PYTHONPATH")])])
    if keep_cublas:
        child.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # so that this check sees the resume path only
    else:
        child.pop("CUBLAS_WORKSPACE_CONFIG", None)
    device = "cuda" if env.cuda else "cpu"
    workdir = env.workdir / mode
    proc = subprocess.run(
        [sys.executable, "-m", "sam_repro.acceptance.trainer_worker", mode, str(workdir), device],
        capture_output=True,
        text=True,
        env=child,
        timeout=600,
    )
    result = next((line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        error = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        return "failed", f"the trainer stopped (exit {proc.returncode}): {error.strip()[:300]}"
    outcome = json.loads(result)
    return _verdict(outcome["ok"], outcome["detail"])


def deterministic_mode(env: CheckEnv) -> tuple[str, str]:
    """`trainer.deterministic=true` trains on the device when the user set nothing else: on CUDA cuBLAS refuses
    deterministic mode unless CUBLAS_WORKSPACE_CONFIG is set before its first call, so the trainer must set it."""
    return _trainer_worker(env, "deterministic", keep_cublas=False)


def resume_equals_uninterrupted(env: CheckEnv) -> tuple[str, str]:
    """The real trainer, deterministic: a run checkpointed after epoch 1 on the device and resumed equals the
    uninterrupted run bit for bit (weights, optimizer state, every RNG state, metrics)."""
    return _trainer_worker(env, "resume", keep_cublas=True)


# ---- one process group of one rank: NCCL on a GPU ---------------------------------------------------------------


def process_group(env: CheckEnv) -> tuple[str, str]:
    """The distributed set-up as torchrun starts it, at world size 1 (NCCL on a GPU, gloo on a CPU): the rank's
    device, `all_gather_object` of RNG states and `broadcast_object` (pickled through this rank's GPU, which
    PyTorch's documentation makes the caller's job via `torch.cuda.set_device`), the all-reduces of the step and
    the trainer on the right device, and a SAM step with SyncBatchNorm equal to one with BatchNorm (PyTorch's
    SyncBatchNorm normalises locally at world size 1: this checks the conversion and the step, not the sync)."""
    import torch.distributed as dist

    from sam_repro.engine.distributed import (
        all_reduce_mean_,
        all_reduce_sum,
        barrier,
        broadcast_object,
        cleanup_distributed,
        free_port,
        init_distributed,
    )
    from sam_repro.engine.step import average_over_ranks

    if dist.is_available() and dist.is_initialized():
        return "failed", "a process group already exists in this process"
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    facts: list[str] = []
    try:
        denv = init_distributed("cuda" if env.cuda else "cpu")
        want_backend = "nccl" if env.cuda else "gloo"
        ok = denv.backend == want_backend == dist.get_backend() and denv.launcher == "torchrun"
        if env.cuda:
            ok &= denv.device == torch.device("cuda", torch.cuda.current_device())
        facts.append(f"{dist.get_backend()} on {denv.device}")

        cpu_ok = _rng_states_round_trip(env, denv.device)
        ok &= cpu_ok
        facts.append(f"all_gather_object of RNG states: CPU uint8 and equal: {cpu_ok}")

        shared = broadcast_object({"run_dir": "runs/x/seed0", "step": 7})
        ok &= shared == {"run_dir": "runs/x/seed0", "step": 7}
        sums = all_reduce_sum(torch.tensor([1.5, 2.0], device=denv.device, dtype=torch.float64))
        listed = all_reduce_sum([3.0, 4.0])
        bn_mean = torch.arange(4.0, device=denv.device)
        all_reduce_mean_(bn_mean)
        placed = sums.device == denv.device and listed.device.type == "cpu" and bn_mean.device == denv.device
        ok &= placed and sums.tolist() == [1.5, 2.0] and listed.tolist() == [3.0, 4.0]
        facts.append(f"broadcast_object and all-reduces on the right devices: {placed}")
        barrier()

        torch.manual_seed(5)
        plain = env.wrn().to(denv.device)
        grads = [torch.randn_like(p) for p in plain.parameters()]
        for p, g in zip(plain.parameters(), grads):
            p.grad = g.clone()
        average_over_ranks(list(plain.parameters()))
        ok &= all(torch.equal(p.grad, g) for p, g in zip(plain.parameters(), grads))
        if env.cuda:
            error, kinds = _sync_batchnorm_difference(env, plain, denv.device)
            ok &= error < 1e-5 and kinds > 0
            facts.append(f"SAM step with {kinds} SyncBatchNorm layers vs BatchNorm: max difference {error:.1e}")
        else:
            facts.append("SyncBatchNorm: GPU only")
        return _verdict(ok, "; ".join(facts))
    finally:
        cleanup_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _rng_states_round_trip(env: CheckEnv, device: torch.device) -> bool:
    """This rank's RNG states through `all_gather_object`, as the trainer's checkpoint gathers every rank's: they come
    back as CPU uint8 tensors, equal, and load back (what a resume does with them)."""
    import torch.distributed as dist

    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if env.cuda else None}
    gathered: list = [None]
    dist.all_gather_object(gathered, rng)
    back = gathered[0]
    ok = back["cpu"].device.type == "cpu" and back["cpu"].dtype == torch.uint8 and torch.equal(back["cpu"], rng["cpu"])
    torch.set_rng_state(back["cpu"])
    if env.cuda:
        ok &= back["cuda"].device.type == "cpu" and torch.equal(back["cuda"], rng["cuda"])
        torch.cuda.set_rng_state(back["cuda"], device)
    return ok


def _sync_batchnorm_difference(env: CheckEnv, plain: nn.Module, device: torch.device) -> tuple[float, int]:
    """(largest parameter difference, SyncBatchNorm layers) after one SAM step of `plain` and of its SyncBatchNorm
    conversion on the same batch."""
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    batch, _ = env.batch
    x, y = env.inputs(6, device)
    for net in (plain, synced):
        net.zero_grad(set_to_none=True)
        sam_step(net, make_optimizer("sam", net), x, y, StepContext(group_size=batch))
    error = max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), synced.parameters()))
    return error, sum(isinstance(mod, nn.SyncBatchNorm) for mod in synced.modules())


CHECKS = (
    Check(
        "SAM step equals a float64 CPU reference (m-groups, L2 weight decay, clipping; TF32 off)",
        sam_equals_float64_reference,
    ),
    Check("bf16 SAM: finite, decreasing loss over 50 steps on a fixed batch (6 at smoke size)", bf16_decreasing),
    Check("fp16 SAM: finite, decreasing loss over 50 steps on a fixed batch (6 at smoke size)", fp16_decreasing),
    Check("bf16 and fp16 SAM steps equal fp32 within their precision", mixed_precision_equals_fp32),
    Check("fp16 with an injected overflow skips the step", fp16_overflow_skips),
    Check("TF32 off unless trainer.tf32=true", tf32_only_when_asked),
    Check("the device loader's copies equal the CPU loader's batches", device_loader_copies),
    Check("dropout and ShakeDrop draws identical in both passes", stochastic_draws_replayed),
    Check("compiled equals eager within tolerance", compiled_equals_eager),
    Check(
        "host reads per step: none, one in fp16 (the scaler's found_inf)",
        no_synchronisation,
        needs_cuda=True,
        runs_on_cpu=True,
    ),
    Check("AutoAugment leaves the CUDA generator alone", autoaugment_leaves_cuda_generator, needs_cuda=True),
    Check("deterministic mode on CUDA", deterministic_mode, needs_cuda=True, runs_on_cpu=True),
    Check(
        "resume on CUDA: checkpointed and resumed equals the uninterrupted run bitwise (deterministic)",
        resume_equals_uninterrupted,
        needs_cuda=True,
        runs_on_cpu=True,
    ),
    Check(
        "DDP on one GPU: NCCL set-up, all_gather_object, broadcasts, all-reduces, SyncBatchNorm",
        process_group,
        needs_cuda=True,
        runs_on_cpu=True,
    ),
)
