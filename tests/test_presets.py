"""The paper's experiments as presets: every table cell must compose to the paper's hyperparameters.

Three independent sources are checked against each other, so that neither a wrong preset nor a stale file passes:
  1. the values typed below from docs/paper_reference.md section 2 (Tables 4, 6, 7, sections 2.3-2.4, plus the
     documented inferred values) against sam_repro/paper/hyperparameters.yaml (read through sam_repro.paper);
  2. every cell composed from the presets (`hydra.compose`, as `sam-train` does) against that file;
  3. `sam-train ... --cfg job --resolve`, run as a subprocess on one cell, against the file.
Also: the SGD/SAM split of rho, the required keys, the Table 1 SLURM array and the commands in docs/presets.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from sam_repro.paper import HYPERPARAMETERS_FILE, load_hyperparameters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sam_repro" / "configs"
SUBMIT_TABLE1 = ROOT / "scripts" / "slurm" / "submit_table1.sh"
DOCS = ROOT / "docs" / "presets.md"
COST_CELLS = ROOT / "sam_repro" / "acceptance" / "paper_cells.json"  # the GPU check's cost table reads it, no OmegaConf

# ---- the paper's values, typed from docs/paper_reference.md (independently of the presets) ----------------------

CIFAR_RECIPE = dict(
    momentum=0.9,
    nesterov=True,
    schedule="cosine",
    warmup_epochs=0.0,
    batch_size=256,
    m=32,
    grad_clip=5.0,
    label_smoothing=0.0,
    label_noise=0.0,
)  # [P C.1, 3.1], [GR]
IMAGENET_RECIPE = dict(
    momentum=0.9,
    nesterov=True,
    schedule="cosine",
    warmup_epochs=0.0,
    batch_size=4096,
    m=128,
    grad_clip=5.0,
    label_smoothing=0.1,
    label_noise=0.0,
    lr=1.0,
    weight_decay=1e-4,
    dataset="imagenet",
    augment="imagenet",
)  # docs/paper_reference.md 2.3
# Table 6: row -> (model, epochs, {dataset: (lr, weight decay, rho)}); epochs past WRN are inferred (1800, [FM]).
TABLE1 = {
    "wrn28_10_200ep": ("wrn28_10", 200, {"cifar10": (0.1, 5e-4, 0.05), "cifar100": (0.1, 5e-4, 0.1)}),
    "wrn28_10_1800ep": ("wrn28_10", 1800, {"cifar10": (0.05, 1e-3, 0.05), "cifar100": (0.05, 1e-3, 0.1)}),
    "shake_shake_26_2x96d": (
        "shake_shake_26_2x96d",
        1800,
        {"cifar10": (0.02, 1e-3, 0.02), "cifar100": (0.02, 1e-3, 0.05)},
    ),
    "pyramidnet272": ("pyramidnet272", 1800, {"cifar10": (0.05, 5e-4, 0.05), "cifar100": (0.05, 5e-4, 0.2)}),
    "pyramidnet272_shakedrop": (
        "pyramidnet272_shakedrop",
        1800,
        {"cifar10": (0.02, 5e-4, 0.05), "cifar100": (0.05, 5e-4, 0.05)},
    ),
}
TABLE1_AUGMENTS = ("basic", "cutout", "autoaugment")
TABLE2_MODELS = ("resnet50", "resnet101", "resnet152")
# docs/paper_reference.md 2.4 (b7): batch 1024, wd 1e-5, 5k steps = 104 epochs of CIFAR; ImageNet 10 epochs at lr 0.1.
# dataset -> (augment, lr, epochs, label smoothing); rho 0.05 (Table 10), m 16, clip 1.0 are inferred.
TABLE3 = {
    "cifar10": ("autoaugment", 0.016, 104, 0.0),
    "cifar100": ("autoaugment", 0.016, 104, 0.0),
    "imagenet": ("imagenet", 0.1, 10, 0.1),
}
TABLE4_RHO = {0.2: 0.1, 0.4: 0.1, 0.6: 0.1, 0.8: 0.05}  # Table 4 caption
# Table 7 / B.1: (row, dataset) -> (lr, weight decay, rho); 200 epochs inferred.
TABLE5 = {
    ("wrn28_10", "svhn_extra"): (0.01, 5e-4, 0.01),
    ("shake_shake_26_2x96d", "svhn_extra"): (0.01, 5e-4, 0.01),
    ("wrn28_10", "fashion_mnist"): (0.1, 5e-4, 0.05),
    ("shake_shake_26_2x96d", "fashion_mnist"): (0.1, 5e-4, 0.02),
}
TABLE5_AUGMENTS = {"svhn_extra": ("basic", "autoaugment_svhn"), "fashion_mnist": ("basic", "cutout")}


def _both_optimizers(cell: str, values: dict, rho: float) -> dict[str, dict]:
    return {
        f"{cell}/sgd": {**values, "optimizer": "sgd", "rho": None},
        f"{cell}/sam": {**values, "optimizer": "sam", "rho": rho},
    }


def paper_cells() -> dict[str, dict]:
    """Every cell of Tables 1-5 with the hyperparameters the paper (or a documented inference) gives it."""
    cells = {}
    for row, (model, epochs, per_dataset) in TABLE1.items():
        for dataset, (lr, wd, rho) in per_dataset.items():
            for augment in TABLE1_AUGMENTS:
                values = dict(
                    CIFAR_RECIPE, model=model, dataset=dataset, augment=augment, lr=lr, weight_decay=wd, epochs=epochs
                )
                cells |= _both_optimizers(f"table1/{row}/{dataset}/{augment}", values, rho)
    for model in TABLE2_MODELS:
        for epochs in (100, 200, 400):
            values = dict(IMAGENET_RECIPE, model=model, epochs=epochs)
            cells |= _both_optimizers(f"table2/{model}/{epochs}ep", values, 0.05)
    for dataset, (augment, lr, epochs, smoothing) in TABLE3.items():
        values = dict(
            model="efficientnet_b7",
            dataset=dataset,
            augment=augment,
            lr=lr,
            weight_decay=1e-5,
            epochs=epochs,
            label_smoothing=smoothing,
            momentum=0.9,
            nesterov=True,
            schedule="cosine",
            warmup_epochs=0.0,
            batch_size=1024,
            m=16,
            grad_clip=1.0,
            label_noise=0.0,
        )
        cells |= _both_optimizers(f"table3/efficientnet_b7/{dataset}", values, 0.05)
    for noise, rho in TABLE4_RHO.items():
        values = dict(
            CIFAR_RECIPE,
            model="resnet32",
            dataset="cifar10",
            augment="basic",
            lr=0.1,
            weight_decay=5e-4,
            epochs=200,
            label_noise=noise,
        )
        cells |= _both_optimizers(f"table4/resnet32_noise/noise{noise}", values, rho)
    for (row, dataset), (lr, wd, rho) in TABLE5.items():
        for augment in TABLE5_AUGMENTS[dataset]:
            values = dict(CIFAR_RECIPE, model=row, dataset=dataset, augment=augment, lr=lr, weight_decay=wd, epochs=200)
            cells |= _both_optimizers(f"table5/{row}/{dataset}/{augment}", values, rho)
    return cells


PAPER = paper_cells()


def test_paper_grid_size():
    # 5 rows x 2 datasets x 3 augmentations, 3 ResNets x 3 epoch budgets, 3 finetuning datasets, 4 noise levels,
    # 2 models x 2 datasets x 2 augmentations; every one for SGD and SAM.
    assert len(PAPER) == 2 * (5 * 2 * 3 + 3 * 3 + 3 + 4 + 2 * 2 * 2) == 108


# ---- 1. the file against the paper ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict]:
    if not HYPERPARAMETERS_FILE.exists():
        pytest.fail(f"{HYPERPARAMETERS_FILE} is missing: run `python scripts/write_hyperparameters.py`")
    return load_hyperparameters()


def test_file_has_every_paper_cell(recorded):
    assert sorted(recorded) == sorted(PAPER)


@pytest.mark.parametrize("cell", sorted(PAPER))
def test_file_matches_paper(recorded, cell):
    values = {k: v for k, v in recorded[cell].items() if k != "overrides"}
    assert values == PAPER[cell]


# ---- 2. the presets against the file ----------------------------------------------------------------------------


def _missing_config_files(cell: dict) -> list[str]:
    needed = [f"model/{cell['model']}.yaml", f"dataset/{cell['dataset']}.yaml", f"augment/{cell['augment']}.yaml"]
    return [path for path in needed if not (CONFIGS / path).exists()]


def test_config_files_of_every_cell_exist():
    missing = sorted({path for cell in PAPER.values() for path in _missing_config_files(cell)})
    assert not missing, "the paper's presets need these config files: " + ", ".join(
        f"sam_repro/configs/{path}" for path in missing
    )


@pytest.fixture(scope="module")
def compose_train():
    try:
        with initialize_config_module("sam_repro.configs", version_base="1.3"):
            yield lambda overrides: compose("train", overrides=list(overrides))
    except MissingConfigException as exc:
        pytest.fail(f"Hydra cannot load the package sam_repro.configs (is sam_repro/configs/__init__.py there?): {exc}")


def hyperparameters(cfg: DictConfig) -> dict:
    """The values that define a paper cell; a second extraction, independent of scripts/write_hyperparameters.py."""
    return dict(
        model=cfg.model.name,
        dataset=cfg.dataset.name,
        label_noise=cfg.dataset.label_noise,
        augment=cfg.augment.name,
        optimizer=cfg.optimizer.name,
        lr=cfg.optimizer.lr,
        momentum=cfg.optimizer.momentum,
        nesterov=cfg.optimizer.nesterov,
        weight_decay=cfg.optimizer.weight_decay,
        rho=cfg.optimizer.get("rho"),
        schedule=cfg.schedule.name,
        warmup_epochs=cfg.schedule.warmup_epochs,
        epochs=cfg.trainer.epochs,
        batch_size=cfg.trainer.batch_size,
        m=cfg.trainer.m,
        grad_clip=cfg.trainer.grad_clip,
        label_smoothing=cfg.trainer.label_smoothing,
    )


@pytest.mark.parametrize("cell", sorted(PAPER))
def test_preset_composes_to_file(recorded, compose_train, cell):
    missing = _missing_config_files(PAPER[cell])
    if missing:
        pytest.fail(f"{cell} needs sam_repro/configs/{', '.join(missing)}")
    cfg = compose_train(recorded[cell]["overrides"])
    assert hyperparameters(cfg) == {k: v for k, v in recorded[cell].items() if k != "overrides"}
    # SGD configs carry no rho at all: the presets hand rho to optimizer/sam.yaml only.
    assert ("rho" in cfg.optimizer) == (cfg.optimizer.name == "sam")


@pytest.mark.slow
def test_file_is_what_the_generator_writes():
    """The committed file is byte-identical to a fresh run of the generator (same overrides, order and format).

    Slow (a second composition of all 108 cells); the cell values themselves are checked by the tests above.
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "write_hyperparameters.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_cost_cells_are_tables_1_2_4_5_of_the_file(recorded):
    """The JSON the GPU check reads (without OmegaConf) says what the checked hyperparameters file says."""
    data = json.loads(COST_CELLS.read_text())
    assert set(data["cells"]) == {
        cell for cell in recorded if cell.split("/")[0] in ("table1", "table2", "table4", "table5")
    }
    for cell, row in data["cells"].items():
        values = recorded[cell]
        assert row == {
            "table": int(cell.split("/")[0][-1]),
            "model": values["model"],
            "dataset": values["dataset"],
            "optimizer": values["optimizer"],
            "epochs": values["epochs"],
            "batch_size": values["batch_size"],
            "m": values["m"],
        }, cell
    assert set(data["datasets"]) == {row["dataset"] for row in data["cells"].values()}


def test_cost_datasets_match_the_dataset_configs(compose_train):
    data = json.loads(COST_CELLS.read_text())["datasets"]
    # Training-set sizes as the dataset configs state them (the official splits).
    assert {name: d["num_train"] for name, d in data.items()} == {
        "cifar10": 50_000,
        "cifar100": 50_000,
        "svhn_extra": 73_257 + 531_131,
        "fashion_mnist": 60_000,
        "imagenet": 1_281_167,
    }
    for name, info in data.items():
        cfg = compose_train([f"dataset={name}"])
        assert (info["image_size"], info["in_channels"]) == (cfg.dataset.image_size, cfg.dataset.in_channels), name


# ---- how rho reaches SAM and only SAM ---------------------------------------------------------------------------


def test_sam_reads_rho_from_the_preset(compose_train):
    cfg = compose_train(["experiment=table1/wrn28_10_200ep", "dataset=cifar100", "optimizer=sam"])
    assert cfg.optimizer.rho == 0.1, (
        "optimizer/sam.yaml must take rho from the preset's per-dataset table: "
        "`rho: ${oc.select:paper.rho.${dataset.name},0.05}` (see docs/presets.md)"
    )


def test_rho_without_a_preset_is_sams_default(compose_train):
    assert compose_train(["optimizer=sam"]).optimizer.rho == 0.05
    assert compose_train(["optimizer=sam", "dataset=cifar100"]).optimizer.rho == 0.05


def test_rho_follows_the_command_line_dataset(compose_train):
    row = "experiment=table1/shake_shake_26_2x96d"
    rhos = {ds: compose_train([row, f"dataset={ds}", "optimizer=sam"]).optimizer.rho for ds in ("cifar10", "cifar100")}
    assert rhos == {"cifar10": 0.02, "cifar100": 0.05}


def test_explicit_rho_wins_over_the_preset(compose_train):
    # Table 9 of the paper: every run at rho = 0.05.
    cfg = compose_train(["experiment=table1/pyramidnet272", "dataset=cifar100", "optimizer=sam", "optimizer.rho=0.05"])
    assert cfg.optimizer.rho == 0.05


def test_sam_variants_take_the_paper_rho_but_asam_keeps_its_scale(compose_train):
    cell = ["experiment=table1/wrn28_10_200ep", "dataset=cifar100"]
    # LookSAM extends sam.yaml, so it runs at the paper's rho; ASAM's rho lives on another scale (0.5 on CIFAR-10).
    assert compose_train([*cell, "optimizer=looksam"]).optimizer.rho == 0.1
    assert compose_train([*cell, "optimizer=asam"]).optimizer.rho == 0.5


def test_label_noise_rho_is_automatic_and_falls_back_to_0_1(compose_train):
    rho = {
        noise: compose_train(
            ["experiment=table4/resnet32_noise", f"dataset.label_noise={noise}", "optimizer=sam"]
        ).optimizer.rho
        for noise in (0.3, 0.8)
    }
    assert rho == {0.3: 0.1, 0.8: 0.05}


@pytest.mark.parametrize("noise, rho", [(0.2, 0.1), (0.4, 0.2), (0.6, 0.2), (0.8, 0.05)])
def test_tuned_table4_preset_is_the_searched_overrides(compose_train, noise, rho):
    """experiment=cpu_scale_table4_tuned trains as the search's runs did (cpu_scale_table4 with a 5-epoch warm-up
    and rho chosen on validation, given as overrides): only the preset's own rho table differs, and every
    optimizer that takes its radius from the preset follows it."""
    from sam_repro.engine.rundir import config_changes

    for optimizer, key in (("sgd", None), ("sam", "rho"), ("looksam", "rho"), ("gsam", "rho_max")):
        base = ["experiment=cpu_scale_table4", f"optimizer={optimizer}", f"dataset.label_noise={noise}"]
        searched = [*base, "schedule.warmup_epochs=5", *([f"optimizer.{key}={rho}"] if key else [])]
        tuned = ["experiment=cpu_scale_table4_tuned", f"optimizer={optimizer}", f"dataset.label_noise={noise}"]
        ref, cfg = (OmegaConf.to_container(compose_train(o), resolve=True) for o in (searched, tuned))
        assert {change.key for change in config_changes(ref, cfg)} <= {"paper.rho.cifar10"}
        assert config_changes(OmegaConf.to_container(compose_train(base), resolve=True), cfg) != []  # can fail
        assert cfg["schedule"]["warmup_epochs"] == 5 and cfg["optimizer"].get("rho") == (rho if key else None)


# ---- required keys ----------------------------------------------------------------------------------------------


def test_label_noise_preset_requires_the_noise_level(compose_train):
    cfg = compose_train(["experiment=table4/resnet32_noise", "optimizer=sam"])
    with pytest.raises(InterpolationKeyError, match="required.label_noise"):
        _ = cfg.dataset.label_noise
    # Once given, nothing dangles: the whole config resolves, with no placeholder left for a logger to trip on.
    cfg = compose_train(["experiment=table4/resnet32_noise", "optimizer=sam", "dataset.label_noise=0.4"])
    assert "???" not in OmegaConf.to_yaml(cfg, resolve=True)


def test_finetuning_preset_requires_a_local_checkpoint(compose_train):
    # Without it b7 would silently train from scratch: the model config's own default is null.
    cfg = compose_train(["experiment=table3/efficientnet_b7", "optimizer=sam"])
    with pytest.raises(InterpolationKeyError, match="required.pretrained_path"):
        _ = cfg.model.pretrained_path
    cfg = compose_train(["experiment=table3/efficientnet_b7", "optimizer=sam", "model.pretrained_path=/ckpt/b7.pth"])
    assert cfg.model.pretrained_path == "/ckpt/b7.pth"
    assert "???" not in OmegaConf.to_yaml(cfg, resolve=True)


# ---- 3. the CLI prints literal values ---------------------------------------------------------------------------


def _sam_train() -> list[str]:
    script = Path(sys.executable).with_name("sam-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sam_repro.train"]


def test_cli_prints_the_resolved_cell(recorded):
    pytest.importorskip("sam_repro.train", reason="the trainer (sam_repro/train.py) is not there yet")
    cell = "table1/pyramidnet272_shakedrop/cifar100/autoaugment/sam"
    result = subprocess.run(
        [*_sam_train(), *recorded[cell]["overrides"], "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "${" not in result.stdout, "--resolve left an interpolation unresolved"
    cfg = OmegaConf.create(yaml.safe_load(result.stdout))
    assert hyperparameters(cfg) == {k: v for k, v in recorded[cell].items() if k != "overrides"}


# ---- the Table 1 job array --------------------------------------------------------------------------------------


def _dry_run(*args: str) -> tuple[list[str], str]:
    result = subprocess.run(
        ["bash", str(SUBMIT_TABLE1), "--dry-run", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return [line for line in lines if not line.startswith("#")], lines[-1]


@pytest.mark.parametrize("seeds", [1, 3])
def test_submit_table1_dry_run_is_the_whole_grid(recorded, seeds):
    tasks, summary = _dry_run("--seeds", str(seeds))
    assert len(tasks) == 5 * 3 * 2 * 2 * seeds
    assert summary.startswith(f"# {len(tasks)} array tasks")
    assert len(set(tasks)) == len(tasks)
    table1 = {tuple(c["overrides"]) for name, c in recorded.items() if name.startswith("table1/")}
    listed = {tuple(t.split()[:-1]) for t in tasks}  # every task ends in seed=N
    assert listed == table1
    assert sorted({t.split()[-1] for t in tasks}) == [f"seed={s}" for s in range(seeds)]


def test_submit_table1_sgd_2x_doubles_each_rows_epochs(recorded):
    tasks, _ = _dry_run("--seeds", "2", "--sgd-2x")
    doubled = [t for t in tasks if "trainer.epochs=" in t]
    assert len(tasks) == 5 * 3 * 2 * 3 * 2 and len(doubled) == 5 * 3 * 2 * 2
    for task in doubled:
        *overrides, seed, epochs = task.split()
        cell = next(c for c in recorded.values() if c["overrides"] == overrides)
        assert cell["optimizer"] == "sgd" and epochs == f"trainer.epochs={2 * cell['epochs']}"


def test_submit_table1_rejects_an_unknown_row():
    result = subprocess.run(
        ["bash", str(SUBMIT_TABLE1), "--dry-run", "--rows", "wrn28_10"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown Table 1 row 'wrn28_10'" in result.stderr


def test_submit_table1_array_task_runs_its_own_line(tmp_path):
    """Submit against a stand-in sbatch and train.sbatch; task k must run train.sbatch with line k+1's overrides."""
    repo = tmp_path / "repo"
    (repo / "scripts" / "slurm").mkdir(parents=True)
    shutil.copy(SUBMIT_TABLE1, repo / "scripts" / "slurm" / "submit_table1.sh")
    (repo / "scripts" / "slurm" / "train.sbatch").write_text(
        "#!/usr/bin/env bash\n#SBATCH --gres=gpu:8\n#SBATCH --time=48:00:00\nset -e\n#SBATCH --not-a-directive\n"
        'echo "train $*"\n'
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_sbatch = bin_dir / "sbatch"
    # Records its arguments, then runs array task 7 of the submitted script the way SLURM would.
    fake_sbatch.write_text(
        '#!/usr/bin/env bash\necho "$@" > "$SBATCH_LOG"\n'
        'SLURM_ARRAY_TASK_ID=7 bash "${@: -1}" > "$TASK_LOG"\necho 4242\n'
    )
    fake_sbatch.chmod(fake_sbatch.stat().st_mode | stat.S_IEXEC)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SAM_RUNS_DIR=str(tmp_path / "runs"),
        SBATCH_LOG=str(tmp_path / "sbatch.log"),
        TASK_LOG=str(tmp_path / "task.log"),
    )
    result = subprocess.run(
        [
            "bash",
            str(repo / "scripts" / "slurm" / "submit_table1.sh"),
            "--seeds",
            "2",
            "--max-parallel",
            "8",
            "--",
            "--partition=gpu",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "submitted job array 4242" in result.stdout
    sbatch_args = (tmp_path / "sbatch.log").read_text().split()
    assert "--array=0-119%8" in sbatch_args and "--partition=gpu" in sbatch_args
    tasks, _ = _dry_run("--seeds", "2")
    assert (tmp_path / "task.log").read_text().strip() == f"train {tasks[7]}"
    array_script = Path(sbatch_args[-1]).read_text()
    assert "#SBATCH --gres=gpu:8" in array_script and "#SBATCH --time=48:00:00" in array_script
    assert "--not-a-directive" not in array_script  # sbatch itself stops reading at the first command


# ---- docs/presets.md: one command per cell ----------------------------------------------------------------------


def test_docs_give_one_command_per_cell(recorded):
    commands = re.findall(
        r"`sam-train ([^`]*)`", "\n".join(line for line in DOCS.read_text().splitlines() if line.startswith("|"))
    )
    documented = sorted(
        tuple(sorted(a for a in c.split() if not a.startswith("model.pretrained_path="))) for c in commands
    )
    assert documented == sorted(tuple(sorted(c["overrides"])) for c in recorded.values())
