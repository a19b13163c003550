"""The paper's numbers as package data (`sam_repro.paper`): the lookup of a run's paper value from its config, the
loader's errors, and `sam-tables` from an installed wheel, run outside any checkout.

The values themselves are checked against the reference transcription in test_tables.py, and the hyperparameters
against the presets in test_presets.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from helpers.run_dirs import write_run
from sam_repro import paper
from sam_repro.errors import ConfigError, DataError

REPOSITORY = Path(__file__).resolve().parents[1]


def run_config(
    experiment=None,
    dataset="cifar10",
    model="wrn28_10",
    augment="basic",
    optimizer="sam",
    epochs=200,
    epoch_scale=1.0,
    label_noise=0.0,
    train_subset=None,
) -> dict:
    """The keys of a run's config.yaml that place it in a table (the rest plays no part)."""
    return {
        "experiment": experiment,
        "dataset": {"name": dataset, "label_noise": label_noise, "train_subset": train_subset},
        "model": {"name": model},
        "augment": {"name": augment},
        "optimizer": {"name": optimizer},
        "trainer": {"epochs": epochs, "epoch_scale": epoch_scale},
    }  # fmt: skip


def test_the_data_files_are_inside_the_package():
    package = Path(paper.__file__).parent
    assert paper.TABLES_FILE.parent == package == paper.HYPERPARAMETERS_FILE.parent
    assert package == REPOSITORY / "sam_repro" / "paper"
    assert sorted(paper.paper_tables()) == list(paper.TABLE_IDS) == [1, 2, 3, 4, 5]
    assert len(paper.hyperparameters()) == 108  # every cell of Tables 1-5, SGD and SAM (test_presets.py)


def test_paper_value_of_a_run_config():
    cell = dict(experiment="table1/wrn28_10_200ep", dataset="cifar100", augment="cutout")
    assert paper.paper_value(run_config(**cell)).text == "14.9±0.2"
    assert paper.paper_value(run_config(**cell, optimizer="sgd")).text == "16.9±0.1"
    assert paper.paper_value(run_config(**cell), optimizer="sgd").text == "16.9±0.1"
    assert paper.paper_value(run_config(**cell, optimizer="looksam")) is None  # the paper has no such column
    # Not the paper's cell: a tenth of the epochs, a training subset, another preset's data, a CPU-scale run.
    assert paper.paper_value(run_config(**cell, epoch_scale=0.1)) is None
    assert paper.paper_value(run_config(**cell, train_subset=5000)) is None
    assert paper.paper_value(run_config("table1/wrn28_10_200ep", dataset="svhn_extra")) is None
    assert paper.paper_value(run_config("cpu_scale", model="resnet8", epochs=60, train_subset=5000)) is None
    # Table 4 is accuracy; its cell is found by the noise level, with or without the preset's name.
    noisy = dict(model="resnet32", label_noise=0.4)
    found = paper.paper_cell(run_config("table4/resnet32_noise", **noisy))
    assert paper.paper_table(found.table).unit == "accuracy" and found.values["sam"].text == "93.4"
    assert paper.paper_cell(run_config(**noisy)) == found
    # Shake-Shake's epochs are not printed: any epochs match.
    shake = run_config("table1/shake_shake_26_2x96d", model="shake_shake_26_2x96d", epochs=1800, optimizer="sgd")
    assert paper.paper_value(shake).text == "2.7±0.1"
    # Table 2 has top-1 and top-5 cells.
    resnet = run_config("table2/resnet50", dataset="imagenet", model="resnet50", augment="imagenet", epochs=400)
    assert paper.paper_value(resnet, metric="test_error_top5").text == "5.51±0.03"


def test_every_preset_cell_finds_its_paper_value():
    """Each of the 108 commands of hyperparameters.yaml, as the config it resolves to, has the paper's value of its
    table and cell (looked up independently by the table's printed keys)."""
    tables = {1: "table1", 2: "table2", 3: "table3", 4: "table4", 5: "table5"}
    for cell_id, values in paper.hyperparameters().items():
        experiment = next(o.split("=", 1)[1] for o in values["overrides"] if o.startswith("experiment="))
        config = run_config(
            experiment,
            values["dataset"],
            values["model"],
            values["augment"],
            values["optimizer"],
            values["epochs"],
            label_noise=values["label_noise"],
        )
        table_id = next(t for t, prefix in tables.items() if cell_id.startswith(prefix + "/"))
        table = paper.paper_table(table_id)
        keys = {k: config_value for k, config_value in paper.run_cell(config).items() if k in table.keys}
        expected = table.lookup(values["optimizer"], metric="test_error", **keys)
        assert expected is not None, cell_id
        assert paper.paper_value(config) == expected, cell_id


def test_paper_value_of_a_composed_config():
    """The trainer's own config object (an OmegaConf DictConfig, as `sam-train` composes it) works the same."""
    overrides = ["experiment=table1/pyramidnet272", "dataset=cifar10", "augment=autoaugment", "optimizer=sam"]
    with initialize_config_module("sam_repro.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.experiment = "table1/pyramidnet272"  # what sam-train records from Hydra's choices
    assert paper.paper_value(cfg).text == "1.6±0.1"


def test_loader_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="Table 9: the paper's tables are 1, 2, 3, 4, 5"):
        paper.paper_table(9)
    broken = tmp_path / "tables.yaml"
    broken.write_text("tables: {1: [unclosed\n")
    with pytest.raises(DataError, match=f"{broken}: cannot read the paper's tables"):
        paper.load_paper_tables(broken)
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text(paper.TABLES_FILE.read_text().replace('sam: "2.7±0.1"', 'sam: "2.7+-0.1"', 1))
    with pytest.raises(DataError, match=rf"{bad_value}: cannot parse paper value '2.7\+-0.1'"):
        paper.load_paper_tables(bad_value)
    no_cells = tmp_path / "hyperparameters.yaml"
    no_cells.write_text("cell: {}\n")
    with pytest.raises(DataError, match=f"{no_cells}: no `cells` mapping"):
        paper.load_hyperparameters(no_cells)


# ----------------------------------------------------------------------------------------------------------------
# The installed wheel
# ----------------------------------------------------------------------------------------------------------------


def _setuptools_problem() -> str | None:
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed (pip install -e '.[dev]' brings it)"
    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"setuptools {setuptools.__version__} < 77 cannot build this pyproject (pip install -e '.[dev]')"
    return None


def _outside_env(site: Path) -> dict[str, str]:
    """The environment of a user who installed the wheel: the install on the path, no checkout (and no
    PYTHONPATH pointing at one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SAM_"))}
    return env | {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}


@pytest.mark.skipif(_setuptools_problem() is not None, reason=_setuptools_problem() or "")
def test_sam_tables_from_an_installed_wheel_outside_the_checkout(tmp_path: Path):
    # The wheel, built offline from a copy of what it is made of (nothing written into the checkout).
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY / "sam_repro", source / "sam_repro", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPOSITORY / name, source / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
             "--wheel-dir", str(wheels), str(source)]  # fmt: skip
    result = subprocess.run(build, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("sam_repro-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "License-Expression: Apache-2.0" in archive.read(metadata).decode()
    assert {"sam_repro/paper/tables.yaml", "sam_repro/paper/hyperparameters.yaml", "sam_repro/configs/train.yaml",
            "sam_repro/configs/debug/tiny.yaml"} <= names  # fmt: skip
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # Installed on its own (its dependencies are this environment's), used from a folder that is no checkout.
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(site),
               str(wheel)]  # fmt: skip
    result = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    elsewhere = tmp_path / "elsewhere"
    write_run(elsewhere / "runs", optimizer="sam", seed=0, test_error=2.9, experiment="table1/wrn28_10_200ep")
    env = _outside_env(site)
    where = subprocess.run([sys.executable, "-c", "import sam_repro.paper as p; print(p.TABLES_FILE)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    tables = subprocess.run([str(site / "bin" / "sam-tables"), "runs"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert tables.returncode == 0, tables.stderr
    assert "| cifar10 | wrn28_10 | basic | 200 | sam | 2.90 (1) | 2.7 ± 0.1 |" in tables.stdout
    assert "| cifar10 | wrn28_10 | basic | 200 | sgd | missing | 3.5 ± 0.1 |" in tables.stdout
