"""Pages drawn from stored records alone: runs, LR range tests, and the index that links them and the studies.

Every page is static HTML with its figures as PNG files beside it and a CSV for pandas users; it opens from
``file://`` with no network. Values that come from users (study names, paths) are escaped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cifarlab import faults
from cifarlab.data import atomic_write_text
from cifarlab.report import html
from cifarlab.report.devices import machines_page, redraw_devices_page, redraw_throughput_page
from cifarlab.report.figures import plt, run_curves_figure, save, sns
from cifarlab.report.records import read_json, write_csv
from cifarlab.report.study import study_frame, study_page, study_slug

# ------------------------------------------------------------------------------------------------ runs


def _percent(value: float | None, missing: str = "—") -> str:
    """A fraction as a percentage; ``missing`` where there is none (NaN is stored as null in JSON)."""
    return missing if value is None or value != value else f"{value:.2%}"


def run_page(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    doc = read_json(run_dir / "run.json")
    cfg, epochs = doc["config"], pd.DataFrame(doc["epochs"])
    test = doc.get("test") or {}
    plain, tta = test.get("plain"), test.get("flip_tta")
    summary = {"status": doc.get("status"), "architecture": cfg["arch"], "epochs run": len(epochs),
               "wall time (min)": f"{doc.get('wall_seconds', 0) / 60:.1f}"}
    if len(epochs):
        summary["final val accuracy"] = _percent(doc["epochs"][-1].get("val_accuracy"), "none held out")
        summary["median images/s"] = f"{epochs['images_per_second'].median():.0f}"
    for key, ev in (("test accuracy", plain), ("test accuracy, flip TTA", tta)):
        if ev:
            summary[key] = f"{ev['accuracy']:.2%}"
    parts = [html.facts(summary)]
    if len(epochs):
        write_csv(run_dir / "epochs.csv", epochs)
        run_curves_figure(epochs, run_dir / "curves.png",
                          f"{cfg['arch']}: {cfg['optimizer']}, max LR {cfg['max_lr']:g}, batch {cfg['batch_size']}")
        view = epochs.dropna(axis=1, how="all").copy()  # no validation split: no empty val columns
        for c in [c for c in ("train_accuracy", "val_accuracy") if c in view]:
            view[c] = (view[c] * 100).round(2)
        view = view.rename(columns={
            "train_accuracy": "train acc (%)", "val_accuracy": "val acc (%)", "epoch_seconds": "epoch (s)",
            "train_seconds": "train (s)", "data_seconds": "augmentation (s)", "eval_seconds": "eval (s)",
            "images_per_second": "images/s", "lr": "LR"})
        parts += ["<h2>Learning curves</h2>" + html.figure("curves.png", "Loss, accuracy and learning rate by epoch"),
                  "<h2>Per epoch</h2>" + html.table(view) + '<p class="note"><a href="epochs.csv">epochs.csv</a></p>']
    if plain:
        parts.append(_test_section(doc, plain, tta, run_dir))
    if (run_dir / "model.pt").is_file():
        parts.append('<p class="note">Weights tested: <a href="model.pt">model.pt</a> (<code>model, norm, _ = '
                     "cifarlab.weights.load_weights(path)</code>).</p>")
    parts += ["<h2>Configuration</h2>" + html.facts(cfg, "setting") + html.facts(doc.get("resolved", {}), "resolved"),
              "<h2>Data</h2>" + html.facts(doc.get("data", {})),
              "<h2>Environment</h2>" + html.facts(doc.get("environment", {}))]
    return html.write_page(run_dir / "index.html", f"run {run_dir.name}: {cfg['arch']}", "\n".join(parts))


def _test_section(doc: dict, plain: dict, tta: dict | None, run_dir: Path) -> str:
    """Accuracy by class, the confusion matrix and a grid of misclassified test images."""
    classes = doc["data"]["classes"]
    per_class = pd.DataFrame({"class": classes,
                              "accuracy (%)": np.round(np.array(plain["per_class_accuracy"]) * 100, 2)})
    if tta:
        per_class["accuracy, flip TTA (%)"] = np.round(np.array(tta["per_class_accuracy"]) * 100, 2)
    write_csv(run_dir / "per_class.csv", per_class)
    sns.set_theme(style="white")
    fig, ax = plt.subplots(figsize=(7, 6))
    sns.heatmap(np.array(plain["confusion"]), annot=True, fmt="d", cmap="Blues", xticklabels=classes,
                yticklabels=classes, ax=ax, cbar_kws={"label": "test images"})
    ax.set(title="confusion matrix (test set)", xlabel="predicted class", ylabel="true class")
    save(fig, run_dir / "confusion.png")
    parts = ["<h2>Test set by class</h2>" + html.table(per_class),
             html.figure("confusion.png", "Confusion matrix on the test set")]
    grid = _misclassified_grid(doc, run_dir / "misclassified.png")
    if grid:
        parts.append("<h2>Misclassified test images</h2>" + html.figure(grid, "Misclassified: true → predicted"))
    return "\n".join(parts)


def _misclassified_grid(doc: dict, path: Path, n: int = 24) -> str | None:
    """A grid of misclassified test images (true → predicted), read back from the run's data source."""
    from cifarlab.data import load_raw
    from cifarlab.errors import CifarlabError

    plain = doc["test"]["plain"]
    try:
        raw = load_raw(doc["data"]["source"], download=False)
    except (CifarlabError, OSError):
        return None
    preds = np.array(plain["predictions"])
    if len(preds) != len(raw.test_labels):
        return None
    wrong = np.flatnonzero(preds != raw.test_labels)
    # A seeded sample across the whole test set: the first errors would all be of its first class.
    wrong = np.sort(np.random.default_rng(0).choice(wrong, size=min(n, len(wrong)), replace=False))
    if not len(wrong):
        return None
    classes = doc["data"]["classes"]
    cols = 8
    rows = int(np.ceil(len(wrong) / cols))
    # One mosaic in one axes, each image under its label: a grid of 24 axes took 3 s to lay out and draw, most of
    # a small run's page.
    size = raw.test_images.shape[1]
    gap, band = size // 8, size // 2  # between images; above each image for its two-line label
    cell_w, cell_h = size + gap, size + band
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(cols * 1.5, rows * 1.75))
    for j, i in enumerate(wrong):
        y, x = (j // cols) * cell_h + band, (j % cols) * cell_w + gap // 2
        mosaic[y:y + size, x:x + size] = raw.test_images[i]
        ax.text(x + size / 2, y - 1, f"{classes[raw.test_labels[i]]}\n→ {classes[preds[i]]}", ha="center",
                va="bottom", fontsize=7)
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    ax.set_title("misclassified test images: true → predicted")
    save(fig, path)
    return path.name


# ------------------------------------------------------------------------------------------------ lrfind


def lrfind_page(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    doc = read_json(run_dir / "lrfind.json")
    sugg = pd.DataFrame({"rule": list(doc["suggestions"]), "max LR": list(doc["suggestions"].values())})
    sugg["LRMIN = max LR / 25"] = sugg["max LR"] / 25
    facts = {"architecture": doc["arch"], "optimizer": doc["optimizer"], "batch size": doc["batch_size"],
             "weight decay": doc["weight_decay"], "steps run": len(doc["lrs"]), "of steps": doc["num_steps"],
             "stopped at divergence": doc["diverged"], "LR range": f"{doc['start_lr']:g} to {doc['end_lr']:g}"}
    body = (html.facts(facts) + "<h2>Suggestions</h2>" + html.table(sugg, float_format="{:.3e}")
            + html.figure("lrfind.png", "Training loss against learning rate (log axis), suggestions marked")
            + '<p class="note"><a href="lrfind.csv">lrfind.csv</a></p>')
    return html.write_page(run_dir / "index.html", f"LR range test {run_dir.name}: {doc['arch']}, {doc['optimizer']}",
                           body)


# ------------------------------------------------------------------------------------------------ index


def build_index(out: Path, studies: list[dict] | None = None, redrawn: list[Path] | None = None) -> Path:
    """``out/index.html``: every study, run, LR range test and device benchmark, newest first.

    ``studies`` are plain study records (``studies`` builds them from the storage). A record's page is drawn again
    when it is missing or older than the record; ``redrawn`` collects their folders.
    """
    out = Path(out)
    parts = []
    if studies:
        rows = sorted((_study_row(out, study, redrawn) for study in studies), reverse=True)
        parts.append("<h2>Studies</h2>" + _rows(["started", "study", "architecture", "best val accuracy", "trials"],
                                                rows))
    run_rows = []
    for path, doc, page in _records(out, "runs", "run.json", run_page, redrawn):
        test = (doc.get("test") or {}).get("plain")
        run_rows.append((*_link(out, path, page), html.esc(doc["config"]["arch"]), str(len(doc["epochs"])),
                         _percent(doc["epochs"][-1].get("val_accuracy")) if doc["epochs"] else "—",
                         f"{test['accuracy']:.2%}" if test else "—"))
    if run_rows:
        parts.append('<h2>Runs</h2><p><a href="machines/index.html#time-to-accuracy">Time to accuracy</a>: the runs '
                     "on the whole training split, by machine, fastest first.</p>"
                     + _rows(["time", "run", "architecture", "epochs", "val accuracy", "test accuracy"], run_rows))
    unfinished = _unfinished_runs(out)
    if unfinished:
        parts.append('<h2>Unfinished runs</h2><p class="note">Runs that keep a checkpoint and no record yet: training '
                     "now (a process on this machine holds the folder) or stopped. The command continues a stopped "
                     "one from its checkpoint.</p>" + _rows(["run", "state", "architecture", "done", "time so far",
                                                             "last saved", "to continue"], unfinished))
    lr_rows = []
    for path, doc, page in _records(out, "lrfind", "lrfind.json", lrfind_page, redrawn):
        sugg = doc.get("suggestions", {})
        lr_rows.append((*_link(out, path, page), html.esc(doc["arch"]), html.esc(doc["optimizer"]),
                        *(f"{sugg[k]:.3g}" if k in sugg else "—" for k in ("steepest", "min_div_10"))))
    if lr_rows:
        parts.append("<h2>LR range tests</h2>"
                     + _rows(["time", "test", "architecture", "optimizer", "steepest", "min / 10"], lr_rows))
    dev_rows = []
    for path, doc, page in _records(out, "devices", "devices.json", redraw_devices_page, redrawn):
        ok = [r for r in doc.get("rows", []) if r.get("status") == "ok"]
        best = max((r["images_per_second"] for r in ok), default=None)
        names = ", ".join(dict.fromkeys(str(r.get("device_name") or r.get("device")) for r in ok))
        dev_rows.append((*_link(out, path, page), html.esc(names or doc.get("environment", {}).get("cpu_model", "")),
                         str(len(ok)), f"{best:.0f}" if best else "—"))
    tp_rows = []
    for path, doc, page in _records(out, "devices", "throughput.json", redraw_throughput_page, redrawn):
        rows = doc.get("rows", [])
        best = max(rows, key=lambda r: r["trials_per_hour"], default=None)
        tp_rows.append((*_link(out, path, page), html.esc(", ".join(dict.fromkeys(r["device_name"] for r in rows))),
                        html.esc(", ".join(dict.fromkeys(r["arch"] for r in rows))),
                        f"{best['trials_per_hour']:.1f} ({best['workers']} workers, {html.esc(best['mode'])})"
                        if best else "—"))
    if tp_rows:
        parts.append("<h2>Study throughput</h2>" + _rows(["time", "benchmark", "devices", "architectures",
                                                          "best trials per hour"], tp_rows))
    if dev_rows or run_rows:
        machines = _draw_if_changed(out / "machines", _machines_key(out), lambda: machines_page(out), redrawn)
    if dev_rows:
        parts.append(f'<h2>Device benchmarks</h2><p><a href="{html.esc(machines.relative_to(out))}">Machines '
                     "compared</a>: the default training path's speed on every machine benchmarked here.</p>"
                     + _rows(["time", "benchmark", "devices", "measurements", "best images/s"], dev_rows))
    if not parts:
        parts.append('<p class="note">Nothing stored yet: run <code>python -m studies.train</code> or '
                     "<code>python -m studies.onecycle</code>.</p>")
    return html.write_page(out / "index.html", "cifarlab reports", "\n".join(parts))


def _link(out: Path, path: Path, page: Path) -> tuple[str, str]:
    """A record's time stamp and a link to its page."""
    return (html.esc(path.parent.name[:15]),
            f'<a href="{html.esc(page.relative_to(out))}">{html.esc(path.parent.name)}</a>')


def _study_row(out: Path, study: dict, redrawn: list[Path] | None) -> tuple:
    """A study's row in the index; its page drawn again when the study changed."""
    folder = out / "studies" / study_slug(study["name"])
    page = _draw_if_changed(folder, _study_key(study), functools.partial(study_page, study, folder), redrawn)
    faults.point("report")
    frame = study_frame(study)
    done = frame[frame["state"] == "complete"] if len(frame) else frame
    started = min((t["started"] for t in study["trials"] if t["started"]), default="")
    states = ", ".join(f"{v} {k}" for k, v in frame["state"].value_counts().items()) if len(frame) else "0"
    return (started[:16].replace("T", " "),
            f'<a href="{html.esc(page.relative_to(out))}">{html.esc(study["name"])}</a>',
            html.esc((study["user_attrs"].get("spec") or {}).get("arch", "")),
            f"{done['val_accuracy'].max():.2%}" if len(done) else "—", html.esc(states))


def _unfinished_runs(out: Path) -> list[tuple]:
    """A row for each run folder that holds a checkpoint and no run.json, newest first."""
    paths = [p for p in sorted((out / "runs").glob("*/checkpoint.pt"), reverse=True)
             if not (p.parent / "run.json").exists()]
    if not paths:
        return []
    import time

    from cifarlab.checkpoint import checkpoint_progress, load_checkpoint  # torch: only when a checkpoint is there
    from cifarlab.errors import ConfigError
    from cifarlab.report.records import in_use

    rows = []
    for path in paths:
        run = path.parent
        saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        state = "training now" if in_use(run) else "stopped"
        try:
            doc = load_checkpoint(path, lazy=True)
        except ConfigError:
            rows.append((html.esc(run.name), state, "—", "not a readable checkpoint", "—", saved, "—"))
            continue
        epochs, (epoch, step, steps) = doc["config"]["epochs"], checkpoint_progress(doc)
        done = f"epoch {epoch + 1} of {epochs}: step {step} of {steps}" if step else f"{epoch} of {epochs} epochs"
        command = (f"python -m studies.train --resume {run}" if "args" in doc["extra"]
                   else "the same python -m studies.onecycle … --final command")
        rows.append((html.esc(run.name), state, html.esc(doc["config"]["arch"]), html.esc(done),
                     f"{doc['wall_seconds'] / 60:.1f} min", saved, f"<code>{html.esc(command)}</code>"))
    return rows


def _records(out: Path, kind: str, name: str, draw, redrawn: list[Path] | None = None):
    """(record path, record, page) for each stored record of ``kind``, newest first; pages redrawn when stale.

    An unreadable record is left out of the index rather than failing the whole report.
    """
    for path in sorted((out / kind).glob(f"*/{name}"), reverse=True):
        page = path.parent / "index.html"
        try:
            doc = read_json(path)
            if _stale(page, path):
                page = draw(path.parent)
                if redrawn is not None:
                    redrawn.append(path.parent)
                faults.point("report")
        except (OSError, ValueError, KeyError):
            continue
        yield path, doc, page


PAGE_KEY = ".page-key"  # beside a study's or the machines page: what it was drawn from, so it is not redrawn unchanged


def _study_key(study: dict) -> str:
    """A digest of everything a study page shows (the record; its importance derives from the trials) and of the
    code that draws it (a new page layout redraws every page once)."""
    blob = json.dumps({k: v for k, v in study.items() if k != "importance"}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode() + _source("study.py", "figures.py", "html.py")).hexdigest()


def _machines_key(out: Path) -> str:
    """A digest of the stored benchmarks and runs (names, sizes, modification times) and the code that compares
    them."""
    records = [(p.parent.parent.name, p.parent.name, p.stat().st_size, p.stat().st_mtime_ns)
               for p in [*sorted((out / "devices").glob("*/devices.json")), *sorted((out / "runs").glob("*/run.json"))]]
    return hashlib.sha256(json.dumps(records).encode() + _source("devices.py", "figures.py", "html.py")).hexdigest()


def _source(*names: str) -> bytes:
    return b"".join(Path(__file__).with_name(name).read_bytes() for name in names)


def _draw_if_changed(out_dir: Path, key: str, draw, redrawn: list[Path] | None) -> Path:
    """``out_dir/index.html``, drawn by ``draw()`` only when ``key`` differs from the one stored beside the page
    when it was last drawn, or a file the page links to is missing."""
    page, key_file = out_dir / "index.html", out_dir / PAGE_KEY
    if _current(out_dir, key):
        return page
    key_file.unlink(missing_ok=True)  # a kill while drawing leaves no key, so the next rebuild draws it again
    page = draw()
    atomic_write_text(key_file, key)
    if redrawn is not None:
        redrawn.append(out_dir)
    return page


def _current(out_dir: Path, key: str) -> bool:
    """Whether ``out_dir``'s page was drawn from ``key`` and every file it links to is there."""
    try:
        return (out_dir / PAGE_KEY).read_text() == key and all(
            (out_dir / src).is_file()
            for src in re.findall(r'(?:src|href)="([^"/:#]+)"', (out_dir / "index.html").read_text()))
    except OSError:
        return False


def study_page_current(out: Path, study: dict) -> bool:
    """Whether the study's page is drawn from the study as it is: its importance need not be computed again."""
    return _current(Path(out) / "studies" / study_slug(study["name"]), _study_key(study))


def _stale(page: Path, record: Path) -> bool:
    """A page is redrawn when it is missing or older than its record."""
    return not page.is_file() or page.stat().st_mtime < record.stat().st_mtime


def _rows(header: list[str], rows: list[tuple]) -> str:
    """A table from cells that are already escaped HTML (links)."""
    head = "".join(f"<th>{html.esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
