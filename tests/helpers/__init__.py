"""What several test modules share (test modules never import from each other):

    run_dirs      run directories as sam-train leaves them for the tables (config.yaml, summary.json, metrics.jsonl)
    checkpoints   a tiny trained-looking run (config.yaml + checkpoints/last.pt) and fake dataset arrays
    quadratic     a quadratic loss with a chosen Hessian spectrum, for the Hessian and sharpness tests
    training      running `sam-train` as a subprocess with `debug=tiny`, and reading back what it wrote
    slurm         the state of the local SLURM cluster and the environment jobs are submitted with

Fixtures (`fake_dataset`) and the CIFAR-10 skip of tests marked `data` live in tests/conftest.py.
"""
