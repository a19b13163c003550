"""The engine: the training loop and everything around it (distributed set-up, checkpoints, loggers, run
directories). It wires `data`, `models` and `optim` together; none of those know about it."""
