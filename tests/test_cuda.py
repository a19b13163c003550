"""The CUDA tier: the GPU check's correctness checks (sam_repro/acceptance/checks.py) as tests, each a closed form or
a second computation the device must equal. Skipped without CUDA (tests/conftest.py); on a GPU node:

    pytest -m cuda

The checks live in the package so that `benchmarks/gpu_check.py` runs the same code from an installed wheel, records
each result and goes on; here each is one test that fails with the check's detail. On a CPU the checks whose code
runs there anyway are exercised by tests/test_gpu_check.py's smoke run, tests/test_host_reads.py and
tests/test_backends.py; device placement by tests/test_fake_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from sam_repro.acceptance import checks


@pytest.fixture
def env(tmp_path):
    """A check's environment on cuda:0 at full size, TF32 put back afterwards as the GPU check does."""
    from sam_repro.engine.compat import set_tf32, tf32_enabled

    torch.cuda.set_device(0)
    tf32 = tf32_enabled()
    yield checks.CheckEnv(torch.device("cuda", 0), smoke=False, workdir=tmp_path)
    set_tf32(tf32)


@pytest.mark.cuda
@pytest.mark.parametrize("check", checks.CHECKS, ids=[checks.slug(c.name) for c in checks.CHECKS])
def test_check_passes_on_the_gpu(check, env):
    status, detail = check.run(env)
    if status == "skipped":  # what the node lacks (hydra-core for the trainer's checks, torchvision), with the reason
        pytest.skip(detail)
    assert status == "passed", detail


def test_every_check_is_in_the_cuda_tier():
    """The tier and the GPU check cannot drift apart: one list, and each check named once."""
    names = [c.name for c in checks.CHECKS]
    assert len(set(names)) == len(names) == len({checks.slug(n) for n in names})
