"""A study's page, drawn from a plain study record (never an Optuna object): its ladder of budgets and how far each
rung's ranking held at the next, its trials, the best against the seed configuration, the figures of the search,
and the final retrains."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from cifarlab.config import train_argv
from cifarlab.report import html
from cifarlab.report.figures import plt, save, sns
from cifarlab.report.records import standard_error, tied_with_best, write_csv


def study_slug(name: str) -> str:
    """A file-system-safe folder name for a study, unique even when names differ only in odd characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:50].strip("._") or "study"
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def study_frame(study: dict) -> pd.DataFrame:
    """One row per trial of a study record (built from the storage by ``studies``): with its rung, the standard error
    of its score on the validation split, and whether that score is within two of them of its rung's best."""
    n_val = (study.get("ladder") or {}).get("val_size")
    rows = []
    for t in study["trials"]:
        attrs = t["user_attrs"]
        rows.append({
            "trial": t["number"], "rung": attrs.get("rung", 0), "promoted_from": attrs.get("promoted_from"),
            "state": t["state"], "optimizer": t["params"].get("optimizer"),
            "max_lr": t["params"].get("max_lr"), "batch_size": t["params"].get("batch_size"),
            "val_accuracy": t["value"], "epochs_run": len(attrs.get("epochs", [])), "seconds": t["seconds"],
            "images_per_second": attrs.get("images_per_second"), "train_images": attrs.get("train_images"),
            "epochs_seconds": sum(attrs.get("epoch_seconds") or []) or None,
            "overhead_seconds": attrs.get("overhead_seconds"),
            "eval_seconds": attrs.get("eval_seconds", np.nan),
            "setup_seconds": attrs.get("setup_seconds", np.nan),
            "seed_config": bool(attrs.get("seed_config")),
            "reason": attrs.get("pruned_reason") or attrs.get("fail_reason") or "",
        })
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["se"] = [standard_error(v, n_val) if pd.notna(v) else float("nan") for v in frame["val_accuracy"]]
        done = frame["state"] == "complete"
        frame["tied_with_best"] = False
        if n_val:
            frame.loc[done, "tied_with_best"] = frame[done].groupby("rung")["val_accuracy"].transform(
                lambda scores: tied_with_best(scores, n_val))
    return frame


COMPARED = ("trial", "optimizer", "max_lr", "batch_size", "val_accuracy")


def _ladder_section(study: dict, frame: pd.DataFrame, out_dir: Path) -> str:
    """The rungs with their best score and its standard error, and for each pair of adjacent rungs a scatter of the
    configurations run at both, its rank correlation and the sentence that says whether the ranking held."""
    ladder = study.get("ladder") or {}
    rungs, n_val = ladder.get("rungs") or [], ladder.get("val_size")
    if not rungs:
        return ""
    rows = []
    for r in rungs:
        at = frame[(frame["rung"] == r["index"]) & (frame["state"] == "complete")] if len(frame) else frame
        best = at.loc[at["val_accuracy"].idxmax()] if len(at) else None
        rows.append({"rung": r["index"], "epochs": r["epochs"], "training images": f"{r['train_images']:,}",
                     "complete": len(at), "best trial": "—" if best is None else int(best["trial"]),
                     "best val acc (%)": "—" if best is None else
                     f"{best['val_accuracy']:.2%} ± {best['se']:.2%}".replace("%", ""),
                     "tied with the best": int(at["tied_with_best"].sum()) if len(at) else 0})
    out = ("<h2>Ladder of budgets</h2>" + html.table(pd.DataFrame(rows))
           + f'<p class="note">Every trial is a complete one-cycle run at its rung\'s budget, scored on the same '
             f"{n_val:,} validation images; ± is the standard error of that score, and a trial within two of them of "
             "its rung's best is marked tied with it: the split cannot tell them apart. The top 1/η of a rung is "
             "trained again from scratch at the next rung.</p>")
    pairs = pd.DataFrame(ladder.get("pairs") or [], columns=["rung", "config", "lower", "upper"])
    checks = ladder.get("fidelity") or []
    if len(pairs):
        shown = sorted(pairs["rung"].unique())
        fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4), squeeze=False)
        for ax, k in zip(axes[0], shown):
            grp = pairs[pairs["rung"] == k]
            ax.scatter(grp["lower"] * 100, grp["upper"] * 100, s=30)
            for _, p in grp.iterrows():
                ax.annotate(p["config"], (p["lower"] * 100, p["upper"] * 100), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            rho = next((c["spearman"] for c in checks if c["rung"] == k), None)
            ax.set(title=f"rung {k} → {k + 1}" + (f": Spearman {rho:.2f}, n={len(grp)}" if rho is not None else
                                                 f": n={len(grp)}"),
                   xlabel=f"val acc at rung {k} (%)", ylabel=f"val acc at rung {k + 1} (%)")
        save(fig, out_dir / "fidelity.png")
        out += html.figure("fidelity.png", "Each promoted configuration's score at its rung against the next "
                                           "(labels: the configuration's rung-0 trial)")
    out += "".join(f"<p><b>{html.esc(c['sentence'][0].upper() + c['sentence'][1:])}.</b></p>" for c in checks)
    return out


def study_throughput(trials: list[dict]) -> dict | None:
    """Finished trials (complete or pruned) per hour from the first one's start to the last one's end, every worker
    together, and the share of their time spent outside epochs; None before two trials have finished."""
    import datetime as dt

    done = [t for t in trials if t["state"] in ("complete", "pruned") and t["started"] and t["completed"]]
    if len(done) < 2:
        return None
    span = (max(dt.datetime.fromisoformat(t["completed"]) for t in done)
            - min(dt.datetime.fromisoformat(t["started"]) for t in done)).total_seconds()
    timed = [t for t in done if t["user_attrs"].get("overhead_seconds") is not None and t["seconds"]]
    outside = (sum(t["user_attrs"]["overhead_seconds"] for t in timed) / sum(t["seconds"] for t in timed)
               if timed else float("nan"))
    return {"trials": len(done), "hours": span / 3600, "per_hour": len(done) * 3600 / span if span else float("nan"),
            "outside_epochs": outside}


def throughput_sentence(row: dict) -> str:
    share = "" if row["outside_epochs"] != row["outside_epochs"] else (
        f"; {row['outside_epochs']:.1%} of trial time outside epochs")
    seconds = row["hours"] * 3600
    span = (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else
            f"{row['hours']:.1f} h")
    return f"throughput: {row['trials']} trials finished in {span}, {row['per_hour']:.1f} per hour{share}"


def _overhead(done: pd.DataFrame) -> str:
    """Per rung, what the trials spent in their epochs (training, and of it evaluation) against what they spent
    around them (data subset, whitening basis, model build, storage): the share a worker saves by keeping them."""
    timed = done.dropna(subset=["overhead_seconds", "epochs_seconds"])
    if timed.empty:
        return ""
    table = timed.groupby("rung").agg(trials=("trial", "count"), epochs=("epochs_seconds", "sum"),
                                      evaluation=("eval_seconds", "sum"), overhead=("overhead_seconds", "sum"),
                                      setup=("setup_seconds", "sum"))
    table = table.reset_index()
    table["overhead share"] = (table["overhead"] / (table["overhead"] + table["epochs"])).map("{:.1%}".format)
    seconds = ["epochs", "evaluation", "overhead", "setup"]
    table[seconds] = table[seconds].round(1)
    return ("<h3>Time per rung: training epochs against per-trial overhead</h3>"
            + html.table(table.rename(columns={"epochs": "in epochs (s)", "evaluation": "of them evaluating (s)",
                                               "overhead": "around them (s)", "setup": "of it building the run (s)"})))


def _final_section(final: dict | None) -> str:
    """--final: the best configuration and the seed's, each retrained on every training image over seeds."""
    if not final or "configs" not in final:
        return ""
    rows = [{"configuration": name, "optimizer": c["params"]["optimizer"], "max LR": f"{c['params']['max_lr']:.3g}",
             "batch": c["params"]["batch_size"], "seeds": len(c["runs"]),
             "test accuracy": f"{c['mean']:.2%} ± {c['std']:.2%}"}
            for name, c in (("best", final["configs"]["best"]), ("seed's", final["configs"].get("seed")))
            if c is not None]
    verdict = ""
    if "verdict" in final:  # written by studies._final.compare with the difference
        verdict = (f"<p>The best less the seed's configuration: <b>{final['difference']:+.2%}</b>, "
                   f"{html.esc(final['verdict'])}.</p>")
    return (f"<h2>Final retrains ({final['epochs']} epochs, {final.get('train_images', 0):,} training images)</h2>"
            + html.table(pd.DataFrame(rows)) + verdict)


def study_page(study: dict, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = study_frame(study)
    write_csv(out_dir / "trials.csv", frame)
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    counts = frame["state"].value_counts().to_dict() if len(frame) else {}
    parts = [f'<p class="note">{len(frame)} trials: ' + html.esc(", ".join(f"{v} {k}" for k, v in counts.items()))
             + "</p>"]
    parts.append(_ladder_section(study, frame, out_dir))
    if len(done):
        top = done[done["rung"] == done["rung"].max()]  # the best is the best at the highest rung reached
        best = top.loc[top["val_accuracy"].idxmax()]
        seed = top[top["seed_config"]]
        rows = [("best", best)] + [("seed configuration", r) for _, r in seed.head(1).iterrows()]
        table = pd.DataFrame([{"": name, **{k: r[k] for k in COMPARED}} for name, r in rows])
        table["val_accuracy"] = (table["val_accuracy"] * 100).round(2)
        parts.append(f"<h2>Best against the seed (rung {best['rung']})</h2>"
                     + html.table(table.rename(columns={"val_accuracy": "val acc (%)"}))
                     + ("" if len(seed) else '<p class="note">The seed\'s configuration did not earn a promotion to '
                                             "this rung.</p>"))
        config = next(t for t in study["trials"] if t["number"] == best["trial"])["user_attrs"].get("config")
        if config:
            command = " ".join(["python -m studies.train", *train_argv(config)])
            parts.append(f'<p class="note">The best as one run (<code>--epochs</code> for a longer one): '
                         f"<code>{html.esc(command)}</code></p>")
        parts.append(_final_section(study["user_attrs"].get("final")))
        rate = study_throughput(study["trials"])
        parts.append(_overhead(done) + (f"<p>{html.esc(throughput_sentence(rate))}.</p>" if rate else ""))
        done = done.assign(**{"val acc (%)": done["val_accuracy"] * 100})
        sns.set_theme(style="whitegrid")
        lowest = done[done["rung"] == 0]  # every configuration, at one budget: what the sampler learns from
        parts += ["<h2>Figures</h2>" + _history(frame, lowest, out_dir), _by_parameter(lowest, out_dir),
                  _against_time(done, out_dir), _curves_and_importance(study, top, out_dir)]
    view = frame.copy()
    if len(view):
        view["val_accuracy"] = (view["val_accuracy"] * 100).round(2)
    parts.append("<h2>Trials</h2>"
                 + html.table(view.rename(columns={"val_accuracy": "val acc (%)", "seconds": "seconds (s)"}))
                 + '<p class="note"><a href="trials.csv">trials.csv</a></p>')
    spec = study["user_attrs"].get("spec")
    if spec:
        parts.append("<h2>Study definition</h2><pre>" + html.esc(json.dumps(spec, indent=2)) + "</pre>")
    return html.write_page(out_dir / "index.html", f"study {study['name']}", "\n".join(parts))


def _history(frame: pd.DataFrame, done: pd.DataFrame, out_dir: Path) -> str:
    """Validation accuracy by trial (colour: rung) with the lowest rung's running best; the lowest rung's max LR
    against accuracy."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    shown = frame.assign(**{"val acc (%)": frame["val_accuracy"] * 100, "rung": frame["rung"].astype(str)})
    sns.scatterplot(data=shown, x="trial", y="val acc (%)", hue="rung", style="state", ax=ax)
    ordered = done.sort_values("trial")
    ax.plot(ordered["trial"], ordered["val acc (%)"].cummax(), color="black", drawstyle="steps-post",
            label="running best, rung 0")
    ax.legend(fontsize=8)
    ax.set(title="optimisation history", xlabel="trial number", ylabel="validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save(fig, out_dir / "history.png")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.scatterplot(data=done, x="max_lr", y="val acc (%)", hue="optimizer", size="batch_size", sizes=(30, 200), ax=ax)
    ax.set_xscale("log")
    ax.set(title="max learning rate against validation accuracy (rung 0)", xlabel="max LR (log scale)",
           ylabel="validation accuracy (%)")
    ax.legend(fontsize=7, loc="best")
    save(fig, out_dir / "max_lr.png")
    return (html.figure("history.png", "Validation accuracy by trial, with the running best")
            + html.figure("max_lr.png", "Max LR (log axis) against validation accuracy at rung 0; colour: optimizer, "
                                        "size: batch size"))


def _by_parameter(done: pd.DataFrame, out_dir: Path) -> str:
    """Accuracy by batch size (with the optimizer steps each takes) and by optimizer."""
    steps, images, epochs = steps_by_batch(done)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    order = sorted(done["batch_size"].dropna().unique())
    sns.stripplot(data=done, x="batch_size", y="val acc (%)", order=order, ax=axes[0], size=6)
    axes[0].set_xticks(range(len(order)), [f"{b:.0f}\n{steps[b]} step{'s' if steps[b] != 1 else ''}" if b in steps
                                           else f"{b:.0f}" for b in order])
    axes[0].set(title="by batch size (rung 0)", xlabel="batch size (images), optimizer steps per trial",
                ylabel="validation accuracy (%)")
    sns.stripplot(data=done, x="optimizer", y="val acc (%)", ax=axes[1], size=6)
    axes[1].set(title="by optimizer (rung 0)", xlabel="optimizer", ylabel="validation accuracy (%)")
    save(fig, out_dir / "by_param.png")
    out = html.figure("by_param.png", "Validation accuracy by batch size and by optimizer")
    if steps:
        out += ('<p class="note">Optimizer steps per trial: '
                + html.esc(", ".join(f"batch {b:.0f}: {n}" for b, n in steps.items()))
                + f" ({epochs} epoch{'s' if epochs != 1 else ''} of {images:,} training images at rung 0). At a fixed "
                "number of epochs a larger batch takes fewer steps, so a short budget favours small batches: the "
                "rungs above and the fidelity check show whether the ranking holds as the budget grows.</p>")
    return out


def _against_time(done: pd.DataFrame, out_dir: Path) -> str:
    """Accuracy against each trial's wall time, and the trials that no faster one beats."""
    timed = done.dropna(subset=["seconds"])
    if not len(timed):
        return ""
    front = pareto_front(timed)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.scatterplot(data=timed, x="seconds", y="val acc (%)", hue="batch_size", style="optimizer",
                    palette="viridis", s=60, ax=ax)
    # a step line: the best accuracy reached within each wall time, out to the slowest trial
    ax.plot([*front["seconds"], timed["seconds"].max()], [*front["val acc (%)"], front["val acc (%)"].iloc[-1]],
            color="black", drawstyle="steps-post", linewidth=1, label="no trial faster and better")
    ax.set(title="validation accuracy against trial time", xlabel="trial wall time (s)",
           ylabel="validation accuracy (%)")
    ax.legend(fontsize=7, loc="best")
    save(fig, out_dir / "time.png")
    rows = front[["trial", "optimizer", "max_lr", "batch_size", "seconds", "val acc (%)"]].copy()
    rows["seconds"], rows["val acc (%)"] = rows["seconds"].round(1), rows["val acc (%)"].round(2)
    return (html.figure("time.png", "Validation accuracy against each trial's wall time; the line joins the trials "
                                    "that no other trial beats on both")
            + "<h3>Trade-off between accuracy and time</h3>"
            + '<p class="note">Each of these trials is the most accurate of those that took no longer: the fastest '
              "way found to each accuracy under this study's budget.</p>"
            + html.table(rows.rename(columns={"seconds": "seconds (s)"})))


def _curves_and_importance(study: dict, done: pd.DataFrame, out_dir: Path) -> str:
    """Learning curves of the top five trials of the highest rung; hyperparameter importance where the study record
    has it."""
    top = done.nlargest(5, "val_accuracy")["trial"].tolist()
    curves = [{"trial": str(t["number"]), "epoch": e["epoch"], "val acc (%)": e["val_accuracy"] * 100}
              for t in study["trials"] if t["number"] in top for e in t["user_attrs"].get("epochs", [])]
    out = ""
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        sns.lineplot(data=pd.DataFrame(curves), x="epoch", y="val acc (%)", hue="trial", marker="o", ax=ax)
        ax.set(title="learning curves of the top trials (highest rung)", xlabel="epoch",
               ylabel="validation accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        save(fig, out_dir / "curves.png")
        out += html.figure("curves.png", "Validation accuracy by epoch, top five trials")
    importance = study.get("importance") or {}
    if importance:
        fig, ax = plt.subplots(figsize=(6, 2.8))
        sns.barplot(x=list(importance.values()), y=list(importance), ax=ax)
        ax.set(title="hyperparameter importance (Optuna's PED-ANOVA)", xlabel="importance", ylabel="")
        save(fig, out_dir / "importance.png")
        out += html.figure("importance.png", "Hyperparameter importance")
    return out


def steps_by_batch(done: pd.DataFrame) -> tuple[dict[float, int], int, int]:
    """({batch size: optimizer steps a whole trial takes}, training images, epochs) of a study's complete trials:
    epochs x images // batch, or one step an epoch where the batch holds every image (``fit`` drops the ragged
    last batch). Empty where the trials did not store their training images."""
    known = done.dropna(subset=["train_images", "batch_size"])
    if known.empty:
        return {}, 0, 0
    images, epochs = int(known["train_images"].max()), int(known["epochs_run"].max())
    return {b: epochs * max(1, images // int(b)) for b in sorted(known["batch_size"].unique())}, images, epochs


def pareto_front(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows that no other row beats on both ``seconds`` (fewer) and ``val_accuracy`` (more), fastest first:
    each is the most accurate of the rows that took no longer than it."""
    ordered = frame.sort_values(["seconds", "val_accuracy"], ascending=[True, False], kind="stable")
    best = ordered["val_accuracy"].cummax()
    keep = ordered["val_accuracy"] > best.shift(fill_value=-np.inf)
    return ordered[keep]
