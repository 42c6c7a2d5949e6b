"""The device benchmark's page: throughput, ablation ladder and share of peak, drawn from ``devices.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cifarlab.report import html
from cifarlab.report.figures import plt, save, sns
from cifarlab.report.records import read_json


def devices_page(run_dir: Path, frame: pd.DataFrame, env: dict, *, ops: pd.DataFrame | None = None,
                 convs: pd.DataFrame | None = None, gaps: pd.DataFrame | None = None) -> Path:
    run_dir = Path(run_dir)
    ok = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.iloc[0:0]
    missing = frame[frame["status"] != "ok"] if "status" in frame else frame.iloc[0:0]
    parts = [f'<p class="note">{html.esc(r["device"])}: {html.esc(r["status"])}</p>' for _, r in missing.iterrows()]
    if len(ok):
        # Rows with a failed status leave NaN in batch_size, which makes the column float: print it as a count.
        ok["label"] = ok["device"] + " · batch " + ok["batch_size"].map(lambda b: f"{b:.0f}")
        sns.set_theme(style="whitegrid")
        default = ok[ok["chosen"].fillna(False).astype(bool)] if "chosen" in ok else ok[ok["step"] == "default"]
        fastest = ok.loc[ok.groupby(["arch", "device", "batch_size"])["images_per_second"].idxmax()]
        shown = default if len(default) else fastest
        fig, ax = plt.subplots(figsize=(9, 3.8))
        sns.barplot(data=shown, x="arch", y="epoch_50k_seconds", hue="label", ax=ax)
        ax.set(title="training time per 50,000-image epoch", xlabel="architecture", ylabel="seconds per epoch")
        _legend_outside(ax)
        save(fig, run_dir / "epoch_time.png")
        parts.append("<h2>Epoch time</h2>" + html.figure("epoch_time.png", "Seconds per 50,000-image epoch"))

        fig, ax = plt.subplots(figsize=(8, 3.8))
        sns.barplot(data=ok, x="arch", y="share_of_peak", hue="step" if len(ok["step"].unique()) > 1 else "label",
                    ax=ax)
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.set(title="achieved training FLOP/s as a share of the measured matmul peak (same precision)",
               xlabel="architecture", ylabel="share of peak")
        _legend_outside(ax)
        save(fig, run_dir / "share_of_peak.png")
        parts.append(html.figure("share_of_peak.png", "Share of the device's measured matmul peak"))

        if "chosen" in ok:
            parts.append(_choice_section(ok, run_dir))

        ladder = ok[ok["step"].str.startswith(("seed", "+"))]
        if len(ladder):
            fig, ax = plt.subplots(figsize=(9, 4))
            sns.barplot(data=ladder, y="step", x="images_per_second", hue="arch", ax=ax)
            ax.set(title="ablation ladder: each speed technique added in turn", xlabel="images per second",
                   ylabel="")
            save(fig, run_dir / "ablation.png")
            parts.append("<h2>Ablation ladder</h2>" + html.figure("ablation.png", "Images per second by step")
                         + "".join(f'<p class="note">{html.esc(line)}</p>' for line in ladder_bounds(ok)))
        cols = [c for c in ["arch", "device", "device_name", "step", "batch_size", "precision", "channels_last",
                            "data_path", "images_per_second", "spread_pct", "epoch_seconds",
                            "epoch_50k_seconds", "epoch_kind", "data_share", "eval_share", "achieved_tflops",
                            "peak_tflops", "share_of_peak", "speedup_vs_baseline", "speedup_vs_cpu", "peak_memory_mb",
                            "compile_seconds"] if c in ok]
        view = ok[cols].rename(columns={"images_per_second": "images/s", "spread_pct": "spread (%)",
                                        "epoch_seconds": "epoch (s)", "epoch_50k_seconds": "50k epoch (s)",
                                        "peak_memory_mb": "peak memory (MB)", "compile_seconds": "compile (s)",
                                        "achieved_tflops": "achieved (TFLOP/s)", "peak_tflops": "peak (TFLOP/s)"})
        parts.append("<h2>All measurements</h2>" + html.table(view) +
                     '<p class="note">Epoch = 45,000 training + 5,000 validation images unless stated; "projected" '
                     'epochs are extrapolated from the images timed. Data share: augmentation and batching, from '
                     'a repetition synchronised around every step. <a href="devices.csv">devices.csv</a></p>')
    if ops is not None and len(ops):
        parts.append(_breakdown_section(ops, convs, run_dir))
    if gaps is not None and len(gaps):
        parts.append(_peak_gap_section(gaps, frame, run_dir))
    parts.append("<h2>Environment</h2>" + html.facts({k: v for k, v in env.items() if v is not None}))
    return html.write_page(run_dir / "index.html", "cifarlab — device benchmark", "\n".join(parts))


def ladder_bounds(frame: pd.DataFrame) -> list[str]:
    """One line per ablation ladder: how far above its seed baseline the device's peaks let a path go (the baseline's
    share of its peak, applied to the top rung's peak, and the whole peak)."""
    need = {"arch", "device", "batch_size", "step", "images_per_second", "achieved_tflops", "peak_tflops",
            "precision"}
    if frame.empty or not need <= set(frame):
        return []
    lines = []
    for (arch, device, bs), grp in frame.groupby(["arch", "device", "batch_size"], sort=False):
        base = grp[grp["step"].str.startswith("seed baseline")]
        rungs = grp[grp["step"].str.startswith("+")]
        if base.empty or rungs.empty:
            continue
        b = base.iloc[0]
        top = rungs.loc[rungs["images_per_second"].idxmax()]
        if not (b["achieved_tflops"] > 0 and b["peak_tflops"] > 0 and top["achieved_tflops"] > 0
                and top["peak_tflops"] > 0):
            continue
        base_share = b["achieved_tflops"] / b["peak_tflops"]
        # Images per second at the top rung's whole peak, for the FLOPs an image costs on that rung.
        at_peak = top["peak_tflops"] / (top["achieved_tflops"] / top["images_per_second"]) / b["images_per_second"]
        lines.append(
            f"{arch} on {device}, batch {bs:.0f}: the seed baseline trains at {b['achieved_tflops']:.2f} TFLOP/s, "
            f"{base_share:.0%} of the {b['precision']} peak ({b['peak_tflops']:.2f}). At that share of the "
            f"{top['precision']} peak ({top['peak_tflops']:.2f}) a path would run {at_peak * base_share:.1f}x the "
            f"baseline, and at the whole peak {at_peak:.1f}x; the fastest rung ({top['step']}) runs "
            f"{top['images_per_second'] / b['images_per_second']:.1f}x, at "
            f"{top['achieved_tflops'] / top['peak_tflops']:.0%} of its peak.")
    return lines


def redraw_devices_page(run_dir: Path) -> Path:
    """Draw ``run_dir/index.html`` again from the benchmark's stored records alone (``studies.report``)."""
    from cifarlab.report.records import read_json

    doc = read_json(run_dir / "devices.json")
    extra = {key: pd.read_csv(run_dir / name) for key, name in (("ops", "breakdown.csv"), ("convs", "conv_layers.csv"),
                                                                ("gaps", "peak_gap.csv")) if (run_dir / name).is_file()}
    devices_page(run_dir, pd.DataFrame(doc.get("rows", [])), doc.get("environment", {}), **extra)
    return run_dir / "index.html"


def _peak_gap_section(gaps: pd.DataFrame, frame: pd.DataFrame, run_dir: Path) -> str:
    """Each profiled step split against the matmul peak: its FLOPs at the peak, then what adds time beyond them."""
    from cifarlab.breakdown import ceiling_sentence  # imports torch, which drawing a page otherwise does not need

    gaps = gaps.copy()
    gaps["label"] = gaps["arch"] + " · " + gaps["device"]
    wide = gaps.pivot_table(index="label", columns="part", values="share", sort=False)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(wide)))
    wide.plot(kind="barh", stacked=True, ax=ax, colormap="tab20", width=0.6)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set(title="a training step against the matmul peak (first segment: the share of peak)",
           xlabel="share of the step's time", ylabel="")
    _legend_outside(ax)
    save(fig, run_dir / "peak_gap.png")
    table = gaps.pivot_table(index="part", columns="label", values="seconds_per_step", sort=False) * 1e3
    table.columns.name = None
    table = table.reset_index().rename(columns={"part": "part of the step (ms)"})
    profiled = frame[frame["share_if_matmuls_at_peak"].notna()] if "share_if_matmuls_at_peak" in frame \
        else frame.iloc[0:0]
    lines = [f"{html.esc(r['arch'])} on {html.esc(r['device'])}: {html.esc(ceiling_sentence(r))}"
             for _, r in profiled.iterrows()]
    return ("<h2>Against the peak</h2>" + html.figure("peak_gap.png", "A training step against the matmul peak")
            + html.table(table, float_format="{:,.0f}")
            + "".join(f'<p class="note">{line}</p>' for line in lines)
            + '<p class="note">The profiled breakdown above, applied to the unprofiled step time. "Counted FLOPs at '
              'the peak" is the time the flop counter\'s FLOPs would take at the matmul peak (the share of peak); '
              'the convolutions and GEMMs take the next segment beyond that; every other kind of operation adds '
              'its whole time. Each sentence above gives two ceilings: every conv and GEMM at the peak with the '
              'rest as measured (what faster conv kernels alone could win), and the convs and GEMMs as measured '
              'with nothing else in the step (what removing every other operation alone could win). '
              '<a href="peak_gap.csv">peak_gap.csv</a></p>')


def _legend_outside(ax) -> None:
    """Legends beside the axes: inside, they cover the bars they name."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8, title=None)


def _choice_section(ok: pd.DataFrame, run_dir: Path) -> str:
    """``--choose``: each precision x memory format per architecture, and which one training will use, and why."""
    choice = ok[ok["chosen"].notna()].copy()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(data=choice, x="arch", y="images_per_second", hue="step", ax=ax)
    ax.set(title="precision and memory format per architecture (batched data path)", xlabel="architecture",
           ylabel="images per second")
    _legend_outside(ax)
    save(fig, run_dir / "choice.png")
    table = choice[["arch", "device", "batch_size", "step", "images_per_second", "spread_pct", "vs_chosen",
                    "chosen"]].rename(columns={"step": "precision · memory format", "images_per_second": "images/s",
                                               "spread_pct": "spread (%)", "vs_chosen": "vs chosen"})
    return ("<h2>Per-architecture choice</h2>" + html.figure("choice.png", "Images per second by combination")
            + html.table(table)
            + '<p class="note">The chosen combination is stored per device and torch version; training with '
              '<code>--precision auto --channels-last auto</code> uses it. The rule (bf16 where the matmul peak '
              'favours it, channels_last with bf16) is kept unless another combination is more than 3% faster.</p>')


def _breakdown_section(ops: pd.DataFrame, convs: pd.DataFrame | None, run_dir: Path) -> str:
    """Where the step time goes (profiled, by kind of operation), and each convolution's TFLOP/s by pass."""
    ops = ops.copy()
    ops["label"] = ops["arch"] + " · " + ops["device"]
    shown = ops[ops["seconds_per_step"] > 0]
    fig, ax = plt.subplots(figsize=(9, 4))
    sns.barplot(data=shown, y="category", x="share", hue="label", ax=ax)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set(title="share of a training step by kind of operation (profiled, scaled to an unprofiled step)",
           xlabel="share of step", ylabel="")
    _legend_outside(ax)
    save(fig, run_dir / "breakdown.png")
    wide = ops.pivot_table(index="category", columns="label", values="seconds_per_step", sort=False) * 1e3
    wide.columns.name = None
    wide = wide.reset_index().rename(columns={"category": "operation (ms per step)"})
    out = ("<h2>Where the time goes</h2>" + html.figure("breakdown.png", "Share of step time by kind of operation")
           + html.table(wide, float_format="{:,.0f}"))
    from cifarlab.breakdown import profiling_sentence  # imports torch, which drawing a page otherwise does not need

    notes = [f"{label}: {sentence}" for label, grp in ops.groupby("label", sort=False)
             if (sentence := profiling_sentence(grp.to_dict("records")))]
    if notes:
        out += '<p class="note">' + "<br>".join(html.esc(n) for n in notes) + "</p>"
    if convs is not None and len(convs):
        long = convs.melt(id_vars=["arch", "device", "layer"], value_vars=["forward_tflops", "input_grad_tflops",
                                                                           "weight_grad_tflops"],
                          var_name="pass", value_name="tflops").dropna(subset=["tflops"])
        long["pass"] = long["pass"].map({"forward_tflops": "forward", "input_grad_tflops": "input gradient",
                                         "weight_grad_tflops": "weight gradient"})
        archs = list(dict.fromkeys(long["arch"]))
        fig, axes = plt.subplots(len(archs), 1, figsize=(9, 0.28 * len(long) / 3 + 1.5 * len(archs)),
                                 squeeze=False)
        for ax, arch in zip(axes[:, 0], archs):
            sns.barplot(data=long[long["arch"] == arch], y="layer", x="tflops", hue="pass", ax=ax)
            if "peak_tflops" in convs:
                ax.axvline(convs["peak_tflops"].max(), ls="--", color="0.4", label="matmul peak")
            ax.set(title=f"{arch}: each convolution alone, achieved TFLOP/s by pass", xlabel="TFLOP/s", ylabel="")
            _legend_outside(ax)
        save(fig, run_dir / "conv_layers.png")
        names = {"arch": "arch", "layer": "layer", "in_shape": "in", "out_shape": "out", "kernel": "kernel",
                 "gflop_per_pass": "GFLOP / pass", "forward_ms": "fwd ms", "input_grad_ms": "∂input ms",
                 "weight_grad_ms": "∂weight ms", "forward_tflops": "fwd TFLOP/s", "input_grad_tflops": "∂input TFLOP/s",
                 "weight_grad_tflops": "∂weight TFLOP/s", "share_of_peak": "share of peak"}
        cols = [c for c in names if c in convs]
        out += (html.figure("conv_layers.png", "TFLOP/s of each convolution by pass")
                + html.table(convs[cols].rename(columns=names))
                + '<p class="note">Each convolution timed alone at the training batch size, precision and memory '
                  'format (median of 3 after a warm-up call), by the kernel training uses (oneDNN or cuDNN). The '
                  'first convolution sees the data, which needs no gradient, so it has no input-gradient pass. '
                  '<a href="breakdown.csv">breakdown.csv</a>, '
                  '<a href="conv_layers.csv">conv_layers.csv</a></p>')
    return out


MACHINE_KEY = ["machine", "arch", "batch_size", "precision", "memory format", "compile"]


def machines_frame(out: Path) -> pd.DataFrame:
    """The newest default-path measurement of each machine (a CPU model with its threads, or a GPU) per architecture,
    batch size, precision, memory format and compile mode, over every benchmark under ``out/devices``."""
    rows = []
    for path, doc in _stored(out, "devices", "devices.json"):
        env = doc.get("environment") or {}
        for r in doc.get("rows") or []:
            if r.get("status") != "ok" or r.get("step") != "default" or not r.get("images_per_second"):
                continue
            machine = _machine(r.get("device_name") or env.get("cpu_model") or r.get("device"), r.get("device"),
                               env.get("torch_threads"))
            mode = r.get("compile_mode") or "default"
            rows.append({
                "machine": machine, "arch": r.get("arch"), "batch_size": r.get("batch_size"),
                "precision": r.get("precision"), "memory format": "channels_last" if r.get("channels_last") else "NCHW",
                "compile": (mode if r.get("compile") else "eager"), "images_per_second": r["images_per_second"],
                "epoch_50k_seconds": r.get("epoch_50k_seconds"),
                "share_of_peak": r.get("share_of_peak"), "peak_tflops": r.get("peak_tflops"),
                "torch": env.get("torch"), "measured": _stamp(path.parent.name), "benchmark": path.parent.name,
            })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = frame.drop_duplicates(MACHINE_KEY, keep="last")  # read oldest first: the newest of each stays
    slowest = frame.groupby(["arch", "batch_size"])["images_per_second"].transform("min")
    frame["vs_slowest"] = frame["images_per_second"] / slowest
    return frame.sort_values(["arch", "images_per_second"], ascending=[True, False]).reset_index(drop=True)


def _stored(out: Path, kind: str, name: str):
    """(path, document) of each ``out/kind/*/name``, oldest folder first; a file that cannot be read is passed
    over (a copy half made, a record from a release that wrote another shape)."""
    from cifarlab.report.records import read_json

    for path in sorted(Path(out, kind).glob(f"*/{name}")):
        try:
            yield path, read_json(path)
        except (OSError, ValueError):
            continue


def _machine(name, device, threads) -> str:
    """A machine as the pages name it: the GPU, or the CPU model with the threads torch used on it."""
    machine = str(name)
    return machine + f" · {threads} threads" if device == "cpu" and threads else machine


def machine_of(env: dict) -> str:
    """The machine a stored ``environment`` (``cifarlab.timing.environment``) describes, as the pages name it."""
    return _machine(env.get("device_name") or env.get("cpu_model") or env.get("device"), env.get("device"),
                    env.get("torch_threads"))


# CIFAR-10's 50,000 training images less at most the default 5,000-image validation split: a run on fewer trained
# on a subset, and its accuracy says nothing of the time to train the recipe.
FULL_TRAIN = 45_000


def runs_frame(out: Path) -> pd.DataFrame:
    """Time to accuracy: every completed, tested run under ``out/runs`` that trained on the whole training split
    (no subset, at least ``FULL_TRAIN`` images), with the machine it ran on, fastest first per architecture.
    Run folders copied in from other machines' ``reports/runs/`` count like this machine's own."""
    rows = []
    for path, doc in _stored(out, "runs", "run.json"):
        data, env, test = doc.get("data") or {}, doc.get("environment") or {}, doc.get("test") or {}
        if (doc.get("status") != "completed" or not test.get("plain") or data.get("train_subset")
                or (data.get("train") or 0) < FULL_TRAIN):
            continue
        config, resolved, epochs = doc.get("config") or {}, doc.get("resolved") or {}, doc.get("epochs") or []
        machines = list(dict.fromkeys(doc.get("machines") or []))  # a run resumed elsewhere: each machine, in turn
        rows.append({
            "machine": " → ".join(machines) if len(machines) > 1 else machine_of(env),
            "arch": config.get("arch"), "epochs": len(epochs), "batch_size": config.get("batch_size"),
            "precision": resolved.get("precision"), "train_images": data.get("train"),
            "test_accuracy": test["plain"].get("accuracy"),
            "test_accuracy_tta": (test.get("flip_tta") or {}).get("accuracy"),
            "training_seconds": sum(e.get("epoch_seconds") or 0.0 for e in epochs),
            "wall_seconds": doc.get("wall_seconds"), "torch": env.get("torch"), "measured": _stamp(path.parent.name),
            "run": path.parent.name,
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["arch", "training_seconds"]).reset_index(drop=True)


def _stamp(folder: str) -> str:
    """``20261127-101035-bench`` → ``2026-11-27 10:10``; a folder named otherwise is shown as it is."""
    try:
        return pd.to_datetime(folder[:15], format="%Y%m%d-%H%M%S").strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return folder


def machines_page(out: Path) -> Path:
    """``out/machines/index.html``: every machine benchmarked, side by side (``machines.csv`` and a figure beside
    it). A folder of its own: ``out/devices`` holds only the benchmarks' folders."""
    from cifarlab.report.records import write_csv

    folder = Path(out, "machines")
    folder.mkdir(parents=True, exist_ok=True)
    frame = machines_frame(out)
    write_csv(folder / "machines.csv", frame)
    runs = runs_frame(out)
    write_csv(folder / "runs.csv", runs)
    parts = []
    if len(frame):
        frame["label"] = frame["arch"] + " · batch " + frame["batch_size"].map(lambda b: f"{b:.0f}")
        sns.set_theme(style="whitegrid")
        fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(frame)))
        sns.barplot(data=frame, y="machine", x="images_per_second", hue="label", ax=ax)
        ax.set_xscale("log")  # a GPU trains a thousand times faster than two CPU cores: both must stay readable
        ax.set(title="training images per second, the default path (log scale)", xlabel="images per second",
               ylabel="")
        _legend_outside(ax)
        save(fig, folder / "machines.png")
        view = pd.DataFrame({
            "machine": frame["machine"], "architecture": frame["arch"],
            "batch": frame["batch_size"].map(lambda b: f"{b:.0f}"), "precision": frame["precision"],
            "memory format": frame["memory format"], "compile": frame["compile"],
            "images/s": frame["images_per_second"].map(lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.1f}"),
            "50k-image epoch": frame["epoch_50k_seconds"].map(_duration),
            "× slowest": frame["vs_slowest"].map(lambda v: f"{v:,.1f}×"),
            "share of peak": frame["share_of_peak"].map(lambda v: "—" if pd.isna(v) else f"{v:.0%}"),
            "peak (TFLOP/s)": frame["peak_tflops"].map(lambda v: "—" if pd.isna(v) else f"{v:,.3g}"),
            "torch": frame["torch"], "measured": frame["measured"],
        })
        links = "".join(f'<li><a href="../devices/{html.esc(b)}/index.html">{html.esc(b)}</a></li>'
                        for b in sorted(frame["benchmark"].unique(), reverse=True))
        parts.append(html.figure("machines.png", "Training images per second by machine")
                     + html.table(view)
                     + '<p class="note">The newest measurement of the default training path (what <code>'
                       'studies.train</code> and the studies use) per machine, architecture, batch size, precision, '
                       'memory format and compile mode. "× slowest": images per second over the slowest machine\'s '
                       'for the same architecture and batch size. Share of peak: of the matmul peak probed on that '
                       'machine, so machines compare by how close each comes to its own limit. To add a machine, run '
                       '<code>python -m bench.devices --out DIR</code> there with DIR shared, or copy its '
                       '<code>reports/devices/&lt;time&gt;-bench/</code> folder into this tree\'s '
                       '<code>devices/</code>, then run <code>python -m studies.report</code>. '
                       '<a href="machines.csv">machines.csv</a></p>'
                     + f"<h2>Benchmarks</h2><ul>{links}</ul>")
    else:
        parts.append('<p class="note">No benchmark of the default path is stored yet: run <code>python -m '
                     "bench.devices</code>.</p>")
    parts.append(_runs_section(runs))
    parts.append('<p class="note"><a href="../index.html">All reports</a></p>')
    return html.write_page(folder / "index.html", "cifarlab — machines compared", "\n".join(parts))


def _runs_section(runs: pd.DataFrame) -> str:
    head = '<h2 id="time-to-accuracy">Time to accuracy</h2>'
    if runs.empty:
        return (head + '<p class="note">No run on the whole training split is stored yet: <code>python -m '
                "studies.train --arch custom_resnet</code> trains the default recipe and tests it.</p>")

    def percent(v) -> str:
        return "—" if v is None or pd.isna(v) else f"{v:.2%}"

    view = pd.DataFrame({
        "machine": runs["machine"], "architecture": runs["arch"], "epochs": runs["epochs"],
        "batch": runs["batch_size"].map(lambda b: "—" if pd.isna(b) else f"{b:.0f}"), "precision": runs["precision"],
        "test accuracy": runs["test_accuracy"].map(percent),
        "with flip TTA": runs["test_accuracy_tta"].map(percent),
        "training time": runs["training_seconds"].map(_duration), "wall time": runs["wall_seconds"].map(_duration),
        "torch": runs["torch"], "run": runs["run"],
    })
    return (head + html.table(view)
            + '<p class="note">Every completed run stored here that trained on the whole training split (no '
              f"<code>--train-subset</code>, at least {FULL_TRAIN:,} images) and was tested, fastest first: the "
              "time each machine took to the accuracy it reached. Training time: the epochs' training and "
              "validation; wall time adds loading, whitening, compiling and testing. A run stopped and resumed on "
              "another machine names both (A → B): its times add theirs. Copy other machines' "
              "<code>reports/runs/&lt;time&gt;-&lt;arch&gt;/</code> folders into this tree's <code>runs/</code> to "
              'add them, then run <code>python -m studies.report</code>. <a href="runs.csv">runs.csv</a></p><ul>'
            + "".join(f'<li><a href="../runs/{html.esc(r)}/index.html">{html.esc(r)}</a></li>' for r in runs["run"])
            + "</ul>")


def _duration(seconds: float | None) -> str:
    if seconds is None or pd.isna(seconds):
        return "—"
    minutes = seconds / 60
    return f"{minutes:,.0f} min" if minutes >= 10 else f"{minutes:.1f} min" if minutes >= 1 else f"{seconds:.1f} s"


def throughput_page(run_dir: Path, frame: pd.DataFrame, sentences: list[str]) -> Path:
    """``bench.devices --throughput``'s page: trials per hour by workers per device, the compile sentences, the
    table."""
    sns.set_theme(style="whitegrid")
    shown = frame.assign(label=frame["arch"] + " · " + frame["mode"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(data=shown, x="workers", y="trials_per_hour", hue="label", ax=ax)
    ax.set(title="trials per hour at the top rung, by workers sharing the device", xlabel="workers per device",
           ylabel="trials per hour")
    save(fig, run_dir / "throughput.png")
    columns = ["arch", "device", "device_name", "workers", "mode", "trials", "trials_per_hour", "trial_seconds",
               "first_overhead_seconds", "later_overhead_seconds", "compile_seconds", "busy_share", "epochs",
               "train_images", "batch_size", "precision"]
    body = (html.figure("throughput.png", "Trials per hour by workers per device")
            + "".join(f"<p>{html.esc(s)}</p>" for s in sentences)
            + html.table(frame[[c for c in columns if c in frame]]))
    return html.write_page(run_dir / "index.html", "Study throughput", body)


def redraw_throughput_page(run_dir: Path) -> Path:
    doc = read_json(Path(run_dir) / "throughput.json")
    return throughput_page(Path(run_dir), pd.DataFrame(doc["rows"]), doc.get("compile", []))
