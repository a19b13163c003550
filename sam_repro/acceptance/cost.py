"""GPU-hours for every cell of the paper's Tables 1, 2, 4 and 5 on the GPU the check ran on.

The cells (model, dataset and its size, optimizer, epochs, batch, m) come from paper_cells.json, which
`scripts/write_hyperparameters.py` writes from the presets (plain JSON: no OmegaConf on the node). A cell's rate is
the best images/s measured for its network, optimizer and m; a cell whose network or input size was not measured
(ResNet-101/152, PyramidNet with ShakeDrop, 28 x 28 Fashion-MNIST) takes a measured rate scaled by the ratio of FLOPs
per image, and says so. GPU-hours = epochs x training images / rate / 3600, for one seed on one GPU (the same
GPU-hours spread over more GPUs, less what communication costs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

CELLS = Path(__file__).resolve().parent / "paper_cells.json"

# Networks the check does not time, and the measured one whose rate (scaled by FLOPs) stands in for them.
STAND_INS = {"pyramidnet272_shakedrop": "pyramidnet272", "resnet101": "resnet50", "resnet152": "resnet50"}


def load_cells(path: Path = CELLS) -> dict:
    return json.loads(Path(path).read_text())


def best_rates(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """(model, optimizer, m) -> the fastest measured row."""
    best: dict[tuple[str, str, int], dict] = {}
    for row in rows:
        if row.get("images_per_second") is None:
            continue
        key = (row["model"], row["optimizer"], row["m"])
        if key not in best or row["images_per_second"] > best[key]["images_per_second"]:
            best[key] = row
    return best


def cost_table(
    cells: dict,
    rows: list[dict],
    flops: Callable[[str, int, int, int], float],
    measured_m: Callable[[str, int], int] = lambda model, m: m,
) -> dict:
    """`flops(model, image_size, in_channels, num_classes)`: FLOPs per training image, for the FLOP-ratio estimates;
    `measured_m(model, m)`: the m the rows of `model` stand for a cell's m with (itself, but at smoke size)."""
    rates = best_rates(rows)
    out, totals = [], {}
    for name, cell in cells["cells"].items():
        data = cells["datasets"][cell["dataset"]]
        classes = 1000 if cell["dataset"] == "imagenet" else (100 if cell["dataset"] == "cifar100" else 10)
        own = (cell["model"], cell["optimizer"], measured_m(cell["model"], cell["m"]))
        source_model = cell["model"] if own in rates else STAND_INS.get(cell["model"])
        measured = (
            rates.get((source_model, cell["optimizer"], measured_m(source_model, cell["m"]))) if source_model else None
        )
        row = {
            "cell": name,
            "table": cell["table"],
            "model": cell["model"],
            "dataset": cell["dataset"],
            "optimizer": cell["optimizer"],
            "epochs": cell["epochs"],
            "m": cell["m"],
            "images": cell["epochs"] * data["num_train"],
            "images_per_second": None,
            "gpu_hours": None,
            "source": "not measured",
        }
        if measured is not None:
            rate = measured["images_per_second"]
            same_input = (measured["image_size"], 3) == (data["image_size"], data["in_channels"])
            if source_model != cell["model"] or not same_input:
                ratio = flops(source_model, measured["image_size"], 3, classes) / flops(
                    cell["model"], data["image_size"], data["in_channels"], classes
                )
                rate *= ratio
                row["source"] = (
                    f"estimated: {source_model} at {measured['image_size']} px measured "
                    f"({measured['precision']} {measured['mode']}) x FLOP ratio {ratio:.3f}"
                )
            else:
                row["source"] = f"measured ({measured['precision']} {measured['mode']})"
            row["images_per_second"] = float(f"{rate:.6g}")
            row["gpu_hours"] = float(f"{row['images'] / rate / 3600:.6g}")
        out.append(row)
        table = f"table{cell['table']}"
        totals.setdefault(table, {"cells": 0, "gpu_hours": 0.0, "not_measured": 0})
        totals[table]["cells"] += 1
        if row["gpu_hours"] is None:
            totals[table]["not_measured"] += 1
        else:
            totals[table]["gpu_hours"] = float(f"{totals[table]['gpu_hours'] + row['gpu_hours']:.6g}")
    grand = float(f"{sum(t['gpu_hours'] for t in totals.values()):.6g}")
    return {
        "cells": out,
        "totals": totals,
        "total_gpu_hours": grand,
        "note": "one seed per cell; the paper reports means over seeds, and its SGD baseline also runs at twice "
        "the epochs (docs/presets.md): multiply accordingly",
    }
