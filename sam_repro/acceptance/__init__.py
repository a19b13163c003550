"""The GPU acceptance run (`benchmarks/gpu_check.py`): correctness of the step on the device, throughput and MFU of
the paper's networks, GPU-hours for the paper's tables, and a short real-data SGD-vs-SAM run, within a time budget.

It needs PyTorch (and numpy) only: no W&B, no network, no prepared dataset. The parts that run the real trainer (the
deterministic and resume checks through `trainer_worker`, the real-data run through `sam-train`) need hydra-core and
omegaconf and say so when they are missing; `make gpu-bundle` brings them to a node.

  run.py          the command line, the time budget, the JSON and Markdown outputs
  checks.py       correctness checks (`{name, status, detail}`)
  throughput.py   images/s, peak memory, FLOPs per step, MFU, the data path's share
  cost.py         GPU-hours for every cell of Tables 1, 2, 4 and 5 from paper_cells.json and the measured rates
  training.py     the short SGD-vs-SAM run on real CIFAR-10 through `sam-train` (an export or the prepared cache)
  common.py       what those share: optimizers without a config, synthetic data, autocast
"""
