"""sam-repro: Sharpness-Aware Minimization (Foret et al., ICLR 2021) reproduced in PyTorch.

Layers (a module imports only from the layers below its own; `errors` and `files` from anywhere):
    train.py, cli/        entry points: parse the arguments, compose the config, call one function
    bench.py              what the speed benchmarks (benchmarks/) share: step variants, the synthetic batch
    analysis/             finished runs: the tables (beside paper/), plots, Hessian, m-sharpness, landscapes
    engine/               the trainer: loop, SAM and SGD steps, distributed set-up, checkpoints, loggers, run dirs
    optim/ models/ data/  SAM and its variants | the networks | data sources, loaders, augmentation (none of the
                          three imports another)
    paper/ run_keys.py    the paper's numbers (package data) | the config keys that change nothing
    files.py              the one atomic writer (temporary file, fsync, rename), for every layer
"""

__version__ = "0.1.0"
