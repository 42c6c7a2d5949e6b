"""Seaborn figures drawn from stored records alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from cifarlab.data import atomic_file


def save(fig, path: Path) -> Path:
    """Write the figure atomically (``atomic_file``): a killed process never leaves half a PNG."""
    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def lrfind_figure(frame: pd.DataFrame, suggestions: dict[str, float], path: Path, title: str) -> Path:
    """Smoothed loss against LR on a log axis, raw loss faint behind it, each suggestion marked."""
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=frame, x="lr", y="loss", ax=ax, color="0.75", linewidth=0.8, label="loss (raw)")
    sns.lineplot(data=frame, x="lr", y="smoothed_loss", ax=ax, color="C0", label="loss (smoothed)")
    ax.set_xscale("log")
    finite = frame["smoothed_loss"][frame["smoothed_loss"].abs() < float("inf")]
    if len(finite):
        ax.set_ylim(finite.min() * 0.9, min(finite.max(), finite.iloc[0] * 1.6) * 1.05)
    for i, (name, lr) in enumerate(suggestions.items()):
        ax.axvline(lr, color=f"C{i + 1}", linestyle="--", label=f"{name}: {lr:.2e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return save(fig, path)


def run_curves_figure(epochs: pd.DataFrame, path: Path, title: str) -> Path:
    """Loss, accuracy and learning rate by epoch for one run."""
    sns.set_theme(style="whitegrid")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    # A run with no validation split (--val-size 0) has no val columns worth a line: draw only what exists.
    loss_cols = [c for c in ("train_loss", "val_loss") if c in epochs and epochs[c].notna().any()]
    acc_cols = [c for c in ("train_accuracy", "val_accuracy") if c in epochs and epochs[c].notna().any()]
    loss = epochs.melt("epoch", loss_cols, var_name="split", value_name="loss")
    sns.lineplot(data=loss, x="epoch", y="loss", hue="split", marker="o", ax=axes[0])
    axes[0].set(title="loss", ylabel="cross-entropy")
    acc = epochs.melt("epoch", acc_cols, var_name="split", value_name="accuracy")
    acc["accuracy"] *= 100
    sns.lineplot(data=acc, x="epoch", y="accuracy", hue="split", marker="o", ax=axes[1])
    axes[1].set(title="accuracy", ylabel="accuracy (%)")
    sns.lineplot(data=epochs, x="epoch", y="lr", marker="o", ax=axes[2])
    axes[2].set(title="learning rate at epoch end", ylabel="learning rate")
    fig.suptitle(title)
    return save(fig, path)
