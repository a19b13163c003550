"""Analysis of finished runs: the paper's tables, plots and the sharpness measurements.

Modules (import the one you need; nothing is imported here, so that `sam-tables` does not pay for torch):
    runs          read run directories (config.yaml, summary.json, metrics.jsonl) into RunRecords
    wandb_source  the same RunRecords from a W&B project through the public API
    stats         t-intervals over seeds, paired and Welch differences
    grouping      which runs are averaged together: table cells, optimizer arms, keys that may differ
    aggregate     runs -> Report: intervals over seeds, SAM - SGD, the paper's value (from sam_repro.paper)
    render        Report -> Markdown / CSV / LaTeX, and the files sam-tables writes
    plots         test-error curves and ours-vs-paper bar charts (matplotlib, Agg)
"""
