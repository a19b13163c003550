"""Shared test set-up: the test tiers (below), one torch thread per test process (the CI machine has two cores; the
heavier tests run training subprocesses beside the test process), the skip of tests that need the real CIFAR-10,
fixtures that several modules use, and `figures`, lines a test leaves for the end of the run (how many cases a fuzz
test tried), printed in pytest's terminal summary. Shared helper functions live in tests/helpers/.

Tiers (markers registered in pyproject.toml):
  * `make test`, the fast tier (`pytest --fast`, or `-m FAST`): unit tests and in-process integration, plus one
    subprocess test per command-line contract (`contract`: exit code, one line, no traceback, no directory);
  * `make test-all`: every test, the tiers below included.
  * `e2e`: launches processes (sam-train runs, DDP ranks, scripts, make); `slow`: minutes each; `slurm`: needs the
    local SLURM cluster; `network`: needs PyPI once; `cuda`: needs a GPU; `data`: needs the real CIFAR-10.
Most markers are given here, by module and test name, rather than in the test files: one list says what runs where,
and a test moves between tiers with a one-line change. A test file may also mark its own tests.
"""

import types

import pytest
import torch

from helpers.checkpoints import fake_arrays
from sam_repro.data import sources

CIFAR10_MISSING = "CIFAR-10 is not prepared: run `sam-data cifar10` (make test does)"
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False); run `pytest -m cuda` on a GPU node"
FIGURES = pytest.StashKey[list]()

# The fast tier (`pytest --fast` selects it), as a `pytest -m` expression.
FAST = "not (slow or slurm or network) and (contract or not e2e)"

ALL = "*"  # every test of the module
# Tests that launch processes, by module: test names (parametrised cases included) or ALL.
E2E: dict[str, str | set[str]] = {
    "test_backends.py": {"test_kept_memory_takes_the_page_faults_out_of_a_sam_step"},
    "test_checkpoint_safety.py": {
        "test_everything_sam_train_writes_loads_weights_only",
        "test_resume_refuses_a_checkpoint_with_code",
    },
    "test_config_fuzz.py": {"test_sam_train_refuses_with_one_line_and_leaves_no_run_directory"},
    "test_data_export.py": {"test_cli_exports_real_cifar10_within_40_mb"},
    "test_data_sources.py": {"test_sam_train_never_creates_a_mistyped_data_root"},
    "test_ddp.py": ALL,  # DDP ranks
    "test_demo.py": {
        "test_make_demo_passes_the_profile",
        "test_gpu_profile_code_path_at_toy_size",
        "test_cpu_demo_closing_table_equals_the_two_summaries",
    },
    "test_distributed_env.py": {"test_two_ranks_from_torchrun_variables", "test_two_ranks_from_slurm_variables"},
    "test_eval_cli.py": {
        "test_console_entry_point_prints_no_traceback",
        "test_sam_eval_on_a_trained_run_reproduces_its_test_error",
    },
    "test_gpu_bundle.py": ALL,  # make gpu-bundle, and run.sh on a simulated node
    "test_gpu_check.py": {"test_smoke_without_out_is_refused"},  # and every test of its `smoke` fixture (below)
    "test_kill_resume.py": ALL,
    "test_no_secrets.py": {"test_planted_credentials_reach_no_output"},
    "test_overrides.py": {"test_the_cli_refuses_a_key_of_another_option_in_one_line"},
    "test_paper.py": {"test_sam_tables_from_an_installed_wheel_outside_the_checkout"},
    "test_portability.py": {
        "test_the_core_imports_and_steps_with_pytorch_alone",
        "test_the_blocker_does_block",
        "test_offline_install_beside_an_existing_pytorch_trains",
    },
    "test_preemption.py": {
        "test_two_ranks_stop_after_the_same_step",
        "test_torchrun_agent_forwards_usr1_to_its_workers",
    },
    "test_preset_smoke.py": ALL,
    "test_presets.py": {
        "test_file_is_what_the_generator_writes",
        "test_cli_prints_the_resolved_cell",
        "test_submit_table1_dry_run_is_the_whole_grid",
        "test_submit_table1_sgd_2x_doubles_each_rows_epochs",
        "test_submit_table1_rejects_an_unknown_row",
        "test_submit_table1_array_task_runs_its_own_line",
    },
    "test_run_dirs.py": {"test_the_module_prints_it_for_shell_scripts"},
    "test_run_identity.py": {
        "test_a_changed_value_in_an_explicit_run_dir_is_refused_before_any_work",
        "test_an_edited_preset_is_refused_and_force_continues_on_record",
        "test_keys_that_change_nothing_and_older_records_resume",
        "test_a_refused_new_run_leaves_no_directory_behind",
        "test_a_second_process_on_the_same_run_dir_is_refused",
        "test_force_on_a_finished_run_is_refused_with_the_command_for_a_longer_run",
    },
    "test_slurm_cluster.py": ALL,  # jobs on the local cluster
    "test_slurm_trainer.py": ALL,
    "test_soak.py": ALL,
    "test_tables.py": {
        "test_cli_output_is_byte_identical_and_provenance_is_separate",
        "test_committed_tables_regenerate_exactly",
    },
    "test_tooling.py": {"test_make_help_documents_every_target", "test_ci_stops_when_lint_fails"},
    "test_train_cli.py": ALL,
    "test_vs_common_loop.py": {"test_end_to_end_on_random_arrays_prints_what_it_writes"},
    "test_wandb_dashboard.py": {"test_offline_run_carries_step_and_epoch_rows_summary_and_paper_value"},
    "test_wandb_logging.py": {
        "test_offline_run_is_written_beside_the_metrics",
        "test_unreachable_wandb_server_does_not_stop_training",
    },
}
E2E_FIXTURES = {"smoke"}  # tests/test_gpu_check.py: benchmarks/gpu_check.py --smoke, run once for its tests

# The one subprocess test per command-line contract that the fast tier keeps (exit code, one line, no traceback, no
# directory). Of a parametrised test the first case is kept; the other cases run in `make test-all`.
CONTRACT: dict[str, set[str]] = {
    "test_config_fuzz.py": {"test_sam_train_refuses_with_one_line_and_leaves_no_run_directory"},  # sam-train
    "test_eval_cli.py": {"test_console_entry_point_prints_no_traceback"},  # sam-eval
    "test_gpu_bundle.py": ALL,  # make gpu-bundle, and run.sh on a simulated node
    "test_gpu_check.py": {"test_smoke_without_out_is_refused"},  # benchmarks/gpu_check.py
    "test_presets.py": {"test_submit_table1_rejects_an_unknown_row"},  # scripts/submit_table1.py
    "test_run_dirs.py": {"test_the_module_prints_it_for_shell_scripts"},  # python -m sam_repro.engine.rundir
    "test_tables.py": {"test_cli_output_is_byte_identical_and_provenance_is_separate"},  # sam-tables
    "test_tooling.py": {"test_make_help_documents_every_target", "test_ci_stops_when_lint_fails"},  # make, .ci/run
}

# Long tests (minutes each) beyond those their files mark `slow`, by the fixture they share.
SLOW_FIXTURES = {"smoke"}  # tests/test_gpu_check.py: the GPU check's whole run at smoke size on the CPU


def _name(item) -> str:
    return getattr(item, "originalname", item.name)


def _listed(table: dict, item) -> bool:
    names = table.get(item.path.name, ())
    return names == ALL or _name(item) in names


def assign_tiers(items) -> None:
    """Add the markers of the lists above; unlisted tests keep what their files mark."""
    kept: set[tuple[str, str]] = set()
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _listed(E2E, item) or E2E_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        key = (item.path.name, _name(item))
        if _listed(CONTRACT, item) and key not in kept:
            kept.add(key)
            item.add_marker(pytest.mark.contract)


def in_fast_tier(item) -> bool:
    """FAST, for one test."""
    marks = {mark.name for mark in item.iter_markers()}
    return not marks & {"slow", "slurm", "network"} and ("contract" in marks or "e2e" not in marks)


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true", help=f"only the fast tier (make test): -m '{FAST}'")


def pytest_collection_modifyitems(config, items):
    """The tiers' markers, and `--fast`'s selection; then tests marked `data` (they train or evaluate on the real
    CIFAR-10) and tests marked `cuda` (they need a GPU) are skipped, with the reason, where it is missing."""
    assign_tiers(items)
    if config.getoption("fast"):
        deselected = [item for item in items if not in_fast_tier(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if in_fast_tier(item)]
    skips = {}
    if not sources.cache_path("cifar10").exists():
        skips["data"] = pytest.mark.skip(reason=CIFAR10_MISSING)
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_dataset(monkeypatch):
    """Replace the data layer's `load_arrays` by one that serves `fake_arrays()` and records its calls."""
    arrays, calls = fake_arrays(), []

    def load_arrays(name, root=None):
        calls.append((name, str(root)))
        return arrays

    monkeypatch.setattr(sources, "load_arrays", load_arrays)
    return types.SimpleNamespace(arrays=arrays, calls=calls)


@pytest.fixture(scope="session")
def figures(pytestconfig):
    """`figures(line)` shows `line` in the terminal summary."""
    return pytestconfig.stash.setdefault(FIGURES, []).append


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(FIGURES, [])
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
