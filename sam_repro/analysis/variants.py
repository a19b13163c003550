"""Runs -> the price-of-SAM table: every optimizer variant of one setting against SGD and against SAM, with its cost.

`sam-tables RUNS --variants` builds it. A *setting* is a table cell without its epochs (dataset, model, augment,
label noise, training subset and any `--group-by` keys); within a setting, a *variant* is one configuration of the
optimizer and the budget: the `optimizer.*` keys and `trainer.epochs`. SGD at twice the epochs, SAM from epoch 60,
SAM every 2nd step and GSAM with another alpha are each a variant of their own.

Each variant is labelled by its optimizer and the keys that set it apart from the other runs of that optimizer
(`sam[sam_start=60]`, `sgd[epochs=160]`, `gsam[alpha=0.1]`): a SAM schedule key (`sam_start`, `sam_every`,
`sam_probability`) is named when it makes fewer SAM steps than the most-SAM value among the optimizer's runs (the
earliest start, every step, always: SAM from epoch 5 is plain `sam` where every SAM run has an SGD warm start); any
other key when its value is not the one most of the optimizer's runs in the setting share (the epochs: most runs of
the setting). The two references are the
variants labelled plain `sgd` and `sam`.

Per variant: the mean ± 95% t-interval of the final test error; its difference to SGD and to SAM, paired by seed
over the seeds both ran (Welch's interval when no seed is shared, or a seed ran twice); any `--show` summary keys;
forward-backward passes per step (counted by the trainer) and in all relative to SGD's; and the time per epoch
relative to SGD's, from a benchmark's measured ratios (`--costs benchmarks/results/sam_overhead.json`): measured
where the benchmark timed that variant, derived from SGD's and SAM's where a variant is SGD-then-SAM (late-phase
SAM: its share of plain and SAM steps), and scaled by the epochs for a longer budget.

Orders and numbers are fixed, so the same runs and costs give byte-identical files (`render_variants_*`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam_repro.analysis.aggregate import DUPLICATE, Exclusion, duplicate_runs
from sam_repro.analysis.grouping import (
    ABSENT,
    BASELINE,
    Grouping,
    cell_label,
    cell_order,
    freeze,
    is_number,
    mixed_config_warnings,
    sort_key,
    value_label,
)
from sam_repro.analysis.render import format_difference, format_estimate, number_text, runs_csv
from sam_repro.analysis.runs import RunRecord
from sam_repro.analysis.stats import Difference, Estimate, difference, mean_ci, paired_difference
from sam_repro.errors import DataError
from sam_repro.files import atomic_write_text
from sam_repro.run_keys import flatten

REFERENCE_SAM = "sam"
EPOCHS_KEY = "trainer.epochs"
# The optimizer keys that define a variant's update, shown in the "hyperparameters" column when set (the schedule
# keys only away from their defaults: SAM at every step from the first).
HYPERPARAMETERS = ("rho", "rho_max", "rho_min", "alpha", "k", "eta", "sam_start", "sam_every", "sam_probability")
TRIVIAL = {"sam_start": 0, "sam_every": 1, "sam_probability": 1.0, "eta": 0.0}
# The SAM schedule keys, and of their values in a setting the one that makes the most SAM steps: the plain form
# (SAM from the earliest start, at every step, always), which the other schedules are named against.
SCHEDULE_KEYS = {"optimizer.sam_start": min, "optimizer.sam_every": min, "optimizer.sam_probability": max}
# Keys that never tell variants apart (the optimizer's name is the label itself; lr_min follows the schedule).
NOT_A_VARIANT_KEY = ("optimizer.name", "optimizer.lr_min")

LEGEND = (
    "error: mean ± 95% t-interval of the final test error (%) over the finished runs (their number in parentheses). "
    "− SGD, − SAM: this variant minus the plain SGD and SAM runs, paired by seed over the seeds both ran (Welch's "
    "interval when none is shared), with the number of seeds paired; negative is better. "
    "passes/step: forward-backward passes per optimizer step, "
    "counted by the trainer; passes: all of a run's passes relative to SGD's. time: time per run relative to "
    "SGD's, from the benchmark's measured ratio per step (derived: from SGD's and SAM's ratios, by the share of "
    "plain and SAM steps) times the epochs' ratio."
)


@dataclass(frozen=True)
class Cost:
    """A variant's time relative to SGD's run, and how it was obtained ("measured", "derived" or "" when unknown)."""

    ratio: float | None
    how: str
    key: str = ""  # the benchmark's name for the variant's step


@dataclass(frozen=True)
class VariantRow:
    setting: Mapping[str, Any]
    variant: str
    hyperparameters: str
    epochs: int | float | None
    error: Estimate | None
    vs_sgd: Difference | None
    vs_sam: Difference | None
    passes_per_step: float | None
    passes_vs_sgd: float | None
    cost: Cost
    extras: Mapping[str, Estimate | None] = field(default_factory=dict)
    seeds: tuple[int | None, ...] = ()
    values: tuple[float, ...] = ()
    not_finished: int = 0


@dataclass
class VariantsReport:
    rows: list[VariantRow]
    runs: list[RunRecord]
    labels: Mapping[str, str]  # run source -> its variant's label
    settings: Mapping[str, Mapping[str, Any]]  # run source -> its setting
    columns: tuple[str, ...]  # the setting keys shown
    excluded: list[Exclusion]
    warnings: list[str]
    extra_metrics: tuple[str, ...] = ()
    costs_source: str | None = None


def load_costs(path: str | os.PathLike | None) -> dict[str, float]:
    """The benchmark's ratios per step ({name: ratio}) from its JSON (benchmarks/sam_overhead.py writes them)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
        ratios = data["ratios"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"--costs {path}: not a benchmark result with a `ratios` mapping ({type(exc).__name__}); "
            "pass the JSON benchmarks/sam_overhead.py writes"
        ) from exc
    if not isinstance(ratios, Mapping) or not all(is_number(v) for v in ratios.values()):
        raise DataError(f"--costs {path}: `ratios` must map step names to numbers")
    return {str(k): float(v) for k, v in ratios.items()}


def step_cost(config: Mapping[str, Any], ratios: Mapping[str, float], base_epochs: float | None) -> Cost:
    """Time of a run with `config` relative to an SGD run of `base_epochs`, from the benchmark's per-step ratios.

    The benchmark's names: `sgd`, `sam`, `asam`, `gsam`, `msam`, `looksam_k<k>`, `sam_every<k>`, `sam_p<p>`.
    A SAM start (late-phase SAM) is derived: (share of plain steps) x SGD + (share of SAM steps) x the variant."""
    if not ratios:
        return Cost(None, "")
    flat = flatten(config)
    name = str(flat.get("optimizer.name"))
    epochs = flat.get(EPOCHS_KEY)
    scale = float(epochs) / float(base_epochs) if is_number(epochs) and base_epochs else 1.0
    key = f"looksam_k{flat.get('optimizer.k')}" if name == "looksam" else name
    every = flat.get("optimizer.sam_every", 1) or 1
    probability = flat.get("optimizer.sam_probability", 1.0)
    if every != 1:
        key = f"{key}_every{every}"
    if is_number(probability) and probability < 1:
        key = f"{key}_p{probability:g}"
    if key not in ratios or "sgd" not in ratios:
        return Cost(None, "", key)
    start = flat.get("optimizer.sam_start", 0) or 0
    if start and is_number(epochs) and epochs > 0:
        share = min(1.0, float(start) / float(epochs))  # of the steps, plain ones
        per_step = share * ratios["sgd"] + (1 - share) * ratios[key]
        return Cost(per_step * scale / ratios["sgd"], "derived", key)
    return Cost(ratios[key] * scale / ratios["sgd"], "measured", key)


def _identity(run: RunRecord) -> tuple:
    flat = flatten(run.config)
    keys = sorted(k for k in flat if k.startswith("optimizer.") or k == EPOCHS_KEY)
    return tuple((k, json.dumps(flat[k], sort_keys=True, default=str)) for k in keys)


def _labels(runs: Sequence[RunRecord]) -> dict[str, str]:
    """source -> variant label, for the runs of one setting (see the module docstring)."""
    flats = {run.source: flatten(run.config) for run in runs}
    by_name: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        by_name[str(run.value("optimizer.name", "unknown"))].append(run.source)
    labels = {}
    for name, sources in by_name.items():
        keys = sorted(
            {k for s in sources for k in flats[s] if k.startswith("optimizer.") and k not in NOT_A_VARIANT_KEY}
        )
        peers = {"optimizer": sources, "epochs": [run.source for run in runs]}  # epochs: against the whole setting
        for source in sources:
            parts = []
            for key in [*keys, EPOCHS_KEY]:
                group = peers["epochs" if key == EPOCHS_KEY else "optimizer"]
                values = Counter(json.dumps(flats[s].get(key), sort_keys=True, default=str) for s in group)
                if len(values) < 2:
                    continue
                (top, count), *rest = values.most_common()
                value = flats[source].get(key)
                most_sam = SCHEDULE_KEYS.get(key)
                if most_sam is not None:  # named when it makes fewer SAM steps than the most-SAM schedule run
                    present = [flats[s][key] for s in group if is_number(flats[s].get(key))]
                    shown = is_number(value) and value != most_sam(present)
                else:  # named unless it is the value most runs share (a tie names both)
                    shown = json.dumps(value, sort_keys=True, default=str) != top or (rest and rest[0][1] == count)
                if shown:
                    parts.append(f"{key.split('.')[-1]}={value_label(flats[source].get(key))}")
            labels[source] = f"{name}[{','.join(parts)}]" if parts else name
    return labels


def _hyperparameters(run: RunRecord) -> str:
    parts = []
    for key in HYPERPARAMETERS:
        value = run.value(f"optimizer.{key}")
        if value is None or (key in TRIVIAL and value == TRIVIAL[key]):
            continue
        if key == "rho" and run.value("optimizer.rho_max") is not None:
            continue  # GSAM: rho is rho_max
        parts.append(f"{key}={value_label(value)}")
    return ", ".join(parts) or ABSENT


def _variant_order(label: str) -> tuple:
    name = label.split("[")[0]
    return (0 if name == BASELINE else 1 if name == REFERENCE_SAM else 2, label != name, label)


def _by_seed(runs: Sequence[RunRecord], key: str = "test_error") -> dict[int | None, list[float]]:
    out: dict[int | None, list[float]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.source):
        out[run.seed].append(float(run.summary[key]))
    return dict(out)


def versus(mine: Mapping[int | None, list[float]], reference: Mapping[int | None, list[float]]) -> Difference | None:
    """mine − reference: paired over the seeds both ran once each, else Welch over all runs (None: either empty)."""
    if not mine or not reference:
        return None
    common = sorted((s for s in set(mine) & set(reference) if s is not None), key=sort_key)
    if common and all(len(mine[s]) == 1 and len(reference[s]) == 1 for s in common):
        return paired_difference({s: mine[s][0] for s in common}, {s: reference[s][0] for s in common})
    return difference(mine, reference)


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _variant_row(
    setting: dict[str, Any],
    label: str,
    runs: Sequence[RunRecord],
    done: Sequence[RunRecord],
    sgd: Sequence[RunRecord],
    sam: Sequence[RunRecord],
    left_out: set[str],
) -> VariantRow:
    """One variant's row: its error, its differences to SGD and SAM, its passes (`passes_vs_sgd` holds the mean
    count of passes until the caller divides it by SGD's) and no cost yet."""
    values = _by_seed(done)
    flat_values = [v for seed in sorted(values, key=sort_key) for v in values[seed]]
    passes = [float(r.summary["passes"]) for r in done if is_number(r.summary.get("passes"))]
    per_step = [float(r.summary["passes_per_step"]) for r in done if is_number(r.summary.get("passes_per_step"))]
    return VariantRow(
        setting=setting,
        variant=label,
        hyperparameters=_hyperparameters(runs[0]),
        epochs=runs[0].value(EPOCHS_KEY),
        error=mean_ci(flat_values) if flat_values else None,
        vs_sgd=versus(values, _by_seed(sgd)) if label != BASELINE else None,
        vs_sam=versus(values, _by_seed(sam)) if label != REFERENCE_SAM else None,
        passes_per_step=_mean(per_step),
        passes_vs_sgd=_mean(passes),
        cost=Cost(None, ""),
        seeds=tuple(sorted(values, key=sort_key)),
        values=tuple(flat_values),
        not_finished=sum(1 for r in runs if r.source in left_out),
    )


def _extras(runs: Sequence[RunRecord], keys: Sequence[str]) -> dict[str, Estimate | None]:
    out = {}
    for key in keys:
        found = [float(r.summary[key]) for r in runs if is_number(r.summary.get(key))]
        out[key] = mean_ci(found) if found else None
    return out


def build_variants(
    runs: Sequence[RunRecord],
    group_by: Sequence[str] = (),
    costs: Mapping[str, float] | None = None,
    extra_metrics: Sequence[str] = (),
    costs_source: str | None = None,
) -> VariantsReport:
    """The variants table of `runs` (see the module docstring); `costs`: the benchmark's ratios (`load_costs`)."""
    runs = sorted(runs, key=lambda r: r.source)
    grouping = Grouping.parse(group_by)
    duplicates = duplicate_runs(runs)
    excluded = [Exclusion(s, DUPLICATE, f"the same configuration as {k}") for s, k in sorted(duplicates.items())]
    for run in runs:
        if run.source in duplicates:
            continue
        if not run.finished:
            excluded.append(Exclusion(run.source, run.status, run.reason))
        elif not is_number(run.summary.get("test_error")):
            excluded.append(Exclusion(run.source, run.status, "finished, but summary.json has no finite test_error"))
    left_out = {e.source for e in excluded}
    warnings = [f"{copy}: the same configuration as {kept} (spelled differently); counted once"
                for copy, kept in sorted(duplicates.items())]  # fmt: skip

    settings: dict[str, dict[str, Any]] = {}
    by_setting: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in runs:
        setting = {k: v for k, v in grouping.cell(run).items() if k != "epochs"}
        settings[run.source] = setting
        if run.source not in duplicates:
            by_setting[freeze(setting)].append(run)

    rows: list[VariantRow] = []
    labels: dict[str, str] = {}
    groups: dict[tuple, dict[str, list[RunRecord]]] = {}
    for frozen in sorted(by_setting, key=lambda c: cell_order(dict(c))):
        members = by_setting[frozen]
        setting_labels = _labels(members)
        labels.update(setting_labels)
        variants: dict[str, list[RunRecord]] = defaultdict(list)
        identities: dict[str, set[tuple]] = defaultdict(set)
        for run in members:
            variants[setting_labels[run.source]].append(run)
            identities[setting_labels[run.source]].add(_identity(run))
        groups[frozen] = variants
        for label, identity in sorted(identities.items()):
            if len(identity) > 1:
                warnings.append(f"{cell_label(dict(frozen))}, {label}: runs with different optimizer settings share "
                                "one label; split them with --group-by")  # fmt: skip
        averaged = {label: [r for r in rs if r.source not in left_out] for label, rs in variants.items()}
        sgd, sam = averaged.get(BASELINE, []), averaged.get(REFERENCE_SAM, [])
        base_epochs = sgd[0].value(EPOCHS_KEY) if sgd else None
        sgd_passes = _mean([float(r.summary["passes"]) for r in sgd if is_number(r.summary.get("passes"))])
        for label in sorted(variants, key=_variant_order):
            row = _variant_row(dict(frozen), label, variants[label], averaged[label], sgd, sam, left_out)
            rows.append(
                dataclasses.replace(
                    row,
                    passes_vs_sgd=row.passes_vs_sgd / sgd_passes if row.passes_vs_sgd and sgd_passes else None,
                    cost=step_cost(variants[label][0].config, costs or {}, base_epochs),
                    extras=_extras(averaged[label], extra_metrics),
                )
            )
    warnings += mixed_config_warnings(groups, left_out)
    columns = tuple(c for c in grouping.columns if c != "epochs" and any(r.setting.get(c) is not None for r in rows))
    excluded.sort(key=lambda e: e.source)
    return VariantsReport(rows, runs, labels, settings, columns, excluded, warnings, tuple(extra_metrics), costs_source)


# ----------------------------------------------------------------------------------------------------------------
# Text and files
# ----------------------------------------------------------------------------------------------------------------


def _ratio_text(value: float | None) -> str:
    return ABSENT if value is None else number_text(value, 2)


def _difference_text(diff: Difference | None) -> str:
    if diff is None:
        return ABSENT
    how = f"{diff.n} paired" if diff.method == "paired" else "Welch"
    return f"{format_difference(diff, None)} ({how})"


def _cost_text(cost: Cost) -> str:
    if cost.ratio is None:
        return ABSENT
    return number_text(cost.ratio, 2) + (" (derived)" if cost.how == "derived" else "")


def render_variants_markdown(report: VariantsReport) -> str:
    lines = ["# The price of SAM's gain: every variant against SGD and SAM", "", LEGEND]
    if report.costs_source:
        lines += ["", f"time: from {report.costs_source}."]
    for warning in report.warnings:
        lines += ["", f"warning: {warning}"]
    header = ["variant", "hyperparameters", "epochs", "error", "− SGD", "− SAM",
              *(k.replace("_", " ") for k in report.extra_metrics), "passes/step", "passes", "time"]  # fmt: skip
    settings = sorted({freeze(r.setting) for r in report.rows}, key=lambda c: cell_order(dict(c)))
    for frozen in settings:
        setting = dict(frozen)
        shown = {k: v for k, v in setting.items() if k in report.columns}
        lines += ["", f"## {cell_label(shown)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in report.rows if r.setting == setting):
            cells = [
                row.variant,
                row.hyperparameters,
                value_label(row.epochs),
                format_estimate(row.error, row.not_finished),
                _difference_text(row.vs_sgd) if row.variant != BASELINE else "",
                _difference_text(row.vs_sam) if row.variant != REFERENCE_SAM else "",
                *(format_estimate(row.extras.get(k)) for k in report.extra_metrics),
                _ratio_text(row.passes_per_step),
                _ratio_text(row.passes_vs_sgd),
                _cost_text(row.cost),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if report.excluded:
        lines += ["", "## Runs not averaged", ""]
        lines += [f"- {e.source}: {e.status}" + (f" ({e.reason})" if e.reason else "") for e in report.excluded]
    return "\n".join(lines) + "\n"


def _number(value: float | None, decimals: int = 4) -> str:
    return "" if value is None else number_text(value, decimals)


def _diff_fields(diff: Difference | None) -> list[str]:
    if diff is None:
        return ["", "", "", ""]
    return [_number(diff.mean), _number(diff.half_width), diff.method, str(diff.n)]


def render_variants_csv(report: VariantsReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extras = [f"{k}_{part}" for k in report.extra_metrics for part in ("mean", "ci95")]
    writer.writerow(
        [*report.columns, "variant", "hyperparameters", "epochs", "n", "mean", "ci95", "seeds",
         "vs_sgd", "vs_sgd_ci95", "vs_sgd_method", "vs_sgd_n", "vs_sam", "vs_sam_ci95", "vs_sam_method", "vs_sam_n",
         "passes_per_step", "passes_vs_sgd", "time_ratio", "time_how", "benchmark_step", *extras]
    )  # fmt: skip
    for row in report.rows:
        extra_fields = []
        for key in report.extra_metrics:
            estimate = row.extras.get(key)
            extra_fields += [_number(estimate.mean if estimate else None),
                             _number(estimate.half_width if estimate else None)]  # fmt: skip
        writer.writerow(
            [("" if row.setting.get(c) is None else value_label(row.setting.get(c))) for c in report.columns]
            + [row.variant, row.hyperparameters, value_label(row.epochs), str(row.error.n if row.error else 0),
               _number(row.error.mean if row.error else None), _number(row.error.half_width if row.error else None),
               " ".join(value_label(s) for s in row.seeds)]
            + _diff_fields(row.vs_sgd) + _diff_fields(row.vs_sam)
            + [_number(row.passes_per_step), _number(row.passes_vs_sgd), _number(row.cost.ratio), row.cost.how,
               row.cost.key]
            + extra_fields
        )  # fmt: skip
    return buffer.getvalue()


def render_variants_runs_csv(report: VariantsReport) -> str:
    """Every run read, its variant and whether it was averaged."""
    return runs_csv(
        report.runs,
        report.columns,
        lambda run: report.settings[run.source],
        lambda run: report.labels.get(run.source, ""),
        report.excluded,
        arm_heading="variant",
    )


def write_variants(report: VariantsReport, out_dir: str | os.PathLike) -> list[Path]:
    """tables.md, tables.csv, runs.csv and gain_vs_cost.png in `out_dir`; returns the paths written."""
    from sam_repro.analysis.plots import gain_vs_cost_figure, save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write_text(out / "tables.md", render_variants_markdown(report)),
        atomic_write_text(out / "tables.csv", render_variants_csv(report)),
        atomic_write_text(out / "runs.csv", render_variants_runs_csv(report)),
    ]
    figure = gain_vs_cost_figure(report)
    if figure is not None:
        written.append(save_figure(figure, out / "gain_vs_cost.png"))
    return written
