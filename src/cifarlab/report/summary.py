"""The results table: one row per machine kind, from the records stored under a results folder (a tree laid out
as ``reports/``: ``devices/<time>-bench/devices.json`` and ``runs/<time>-<arch>/run.json``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cifarlab.report.devices import machines_frame, runs_frame

ARCHS = ("custom_resnet", "resnet18")
RECIPE_EPOCHS = 10  # the default recipe's length, the runs the table quotes
RECIPE_BATCH = 512


def results_summary(root: Path) -> pd.DataFrame:
    """Per machine: the default path's training images/s and share of the matmul peak per architecture (its newest
    benchmark, batch 512 where measured), and the default recipe's 10-epoch custom-ResNet runs: test accuracy with
    flip TTA and wall time over seeds."""
    speed, runs = machines_frame(root), runs_frame(root)
    machines = list(dict.fromkeys([*speed.get("machine", []), *runs.get("machine", [])]))
    rows = []
    for machine in machines:
        row: dict = {"machine": machine}
        for arch in ARCHS:
            mine = speed[(speed["machine"] == machine) & (speed["arch"] == arch)
                         & (speed["compile"] == "eager")] if len(speed) else speed
            if len(mine):  # the recipe's batch where it was measured, else the largest
                batch = RECIPE_BATCH if (mine["batch_size"] == RECIPE_BATCH).any() else mine["batch_size"].max()
                best = mine[mine["batch_size"] == batch].iloc[0]
                row[f"{arch} images/s"] = best["images_per_second"]
                row[f"{arch} share of peak"] = best["share_of_peak"]
                row["precision"] = best["precision"]
        recipe = runs[(runs["machine"] == machine) & (runs["arch"] == "custom_resnet")
                      & (runs["epochs"] == RECIPE_EPOCHS)] if len(runs) else runs
        if len(recipe):
            acc = recipe["test_accuracy_tta"].dropna()
            row.update({"seeds": len(recipe), "test accuracy (flip TTA) mean": acc.mean(), "min": acc.min(),
                        "max": acc.max(), "wall minutes (median)": recipe["wall_seconds"].median() / 60,
                        "wall minutes (min)": recipe["wall_seconds"].min() / 60,
                        "wall minutes (max)": recipe["wall_seconds"].max() / 60})
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(frame: pd.DataFrame) -> str:
    """The table as Markdown, as the README shows it."""
    head = ("| machine | precision | custom ResNet: images/s (share of matmul peak) | ResNet-18: images/s (share) "
            "| 10-epoch test accuracy, flip TTA (seeds: mean, range) | wall time (median, range) |")
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    def speed(r, arch: str) -> str:
        ips = r.get(f"{arch} images/s")
        return "—" if ips is None or pd.isna(ips) else f"{ips:,.0f} ({r[f'{arch} share of peak']:.0%})"

    for _, r in frame.iterrows():
        if pd.notna(r.get("seeds")):
            acc = f"{int(r['seeds'])}: {r['test accuracy (flip TTA) mean']:.2%}"
            acc += f" ({r['min']:.2%}–{r['max']:.2%})" if r["seeds"] > 1 else ""
            wall = f"{r['wall minutes (median)']:.1f} min"
            wall += f" ({r['wall minutes (min)']:.1f}–{r['wall minutes (max)']:.1f})" if r["seeds"] > 1 else ""
        else:
            acc = wall = "—"
        lines.append(f"| {r['machine']} | {r.get('precision', '—')} | {speed(r, 'custom_resnet')} | "
                     f"{speed(r, 'resnet18')} | {acc} | {wall} |")
    return "\n".join(lines)
