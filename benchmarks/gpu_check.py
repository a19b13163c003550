"""The GPU acceptance run: correctness of the step on CUDA, throughput and MFU of the paper's networks, GPU-hours for
Tables 1, 2, 4 and 5 on this GPU, and a short real-data SGD-vs-SAM run, within --budget-s (default 540 s).

    python benchmarks/gpu_check.py [--budget-s 540] [--data cifar10-subset10000.npz] [--out $OUT/gpu_check.json]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json     # the same code on a CPU at toy sizes

Needs only PyTorch (and numpy): it runs from a checkout on a node where the project is not installed (timm adds
ResNet-50; hydra-core and omegaconf add the parts that run the real trainer: two checks and the real-data run;
`make gpu-bundle` brings them). Results go to $OUT/gpu_check-<gpu>-<date>.json and .md where OUT is set, else to
benchmarks/results/, rewritten after every part.
The code lives in sam_repro/acceptance/; its correctness checks are also `pytest -m cuda` (tests/test_cuda.py).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import sam_repro  # noqa: F401
except ImportError:
    # Kept on purpose: `make gpu-check` runs this file with the node's own python3 (PyTorch alone) from a checkout
    # where the package is not installed (a GPU node, often offline); the checkout's package is put on the path.
    sys.path.insert(0, str(ROOT))

from sam_repro.acceptance.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
