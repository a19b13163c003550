"""sam-repro: Sharpness-Aware Minimization (Foret et al., ICLR 2021) reproduced in PyTorch.

Layers (arrows point down only):
    cli / train.py  ->  engine (trainer, distributed, checkpoints, loggers)
                    ->  optim (SAM and variants) | models | data
                    ->  analysis (tables, plots, Hessian, landscapes)
"""

__version__ = "0.1.0"
