"""What several test modules share (test modules never import from each other):

    run_dirs       run directories as sam-train leaves them for the tables (config.yaml, summary.json, metrics.jsonl)
    checkpoints    a tiny trained-looking run (config.yaml + checkpoints/last.pt) and fake dataset arrays
    quadratic      a quadratic loss with a chosen Hessian spectrum and its inputs, for the Hessian, sharpness and
                   landscape tests
    tiny_net       the tiny BatchNorm MLP the step and optimizer tests check against hand-written updates, and a batch
    step_variants  the training step in each variant (optimizer x precision), built as the trainer builds it
    fake_cuda      tensors on `cuda:0` without a GPU, for device-placement tests on the CPU
    training       running `sam-train` as a subprocess with `debug=tiny`, and reading back what it wrote (JSON lines)
    processes      waiting for a file that a child process writes
    environ        environments for child processes: without launcher variables, or as a user's shell on a node
    slurm          the state of the local SLURM cluster and the environment jobs are submitted with
    scripts        a script or benchmark (outside the package) imported by path
    wandb_records  an offline W&B run file read back with W&B's record schema

Fixtures (`fake_dataset`) and the CIFAR-10 skip of tests marked `data` live in tests/conftest.py.
"""
