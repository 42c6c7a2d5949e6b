"""Device benchmark: ``python -m bench.devices``: the training step of each architecture on the CPU and every CUDA
device against each device's matmul peak, into ``<out>/devices/<time>-bench/``."""

from __future__ import annotations

import sys

from studies import _cli

PROG = "python -m bench.devices"


def build_parser():
    from cifarlab.config import COMPILE_MODES
    from cifarlab.models import list_models
    from studies._ladder import PRESETS

    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=",".join(list_models()), help="comma-separated architectures (default: all)")
    p.add_argument("--device", default="all", choices=("cpu", "cuda", "all"), help="devices to time (default: all)")
    p.add_argument("--batch-size", type=_cli.positive_int, nargs="+", default=[512], help="one or several")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the device runs it fast, measured (default: auto)")
    p.add_argument("--threads", type=_cli.positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--images", default="auto",
                   help="training images timed per repetition, 'all' for a whole epoch, or 'auto': 2048 on the CPU "
                        "and a whole epoch on CUDA, where 4 steps would take milliseconds (default: auto)")
    p.add_argument("--repeats", type=_cli.positive_int, default=3, help="timed repetitions (default: 3)")
    p.add_argument("--warmup", type=_cli.non_negative_int, default=5, help="untimed warm-up steps (default: 5)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ablation", action="store_true",
                   help="time the seed-style baseline and each speed technique added in turn")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the ablation ladder")
    mode.add_argument("--choose", action="store_true",
                   help="time fp32/bf16 x NCHW/channels_last per architecture and store the fastest as the choice "
                        "that training's --precision auto / --channels-last auto use on this device")
    mode.add_argument("--throughput", action="store_true",
                      help="study throughput: trials per hour with K workers sharing each device (whole trials at "
                           "--budget's top rung, each worker keeping its cache), the busy share, and on CUDA what "
                           "compiling with --compile-mode costs and after how many trials it repays")
    p.add_argument("--workers-per-device", type=_cli.positive_int, nargs="+", default=None, metavar="K",
                   help="with --throughput: worker counts to time (default: 1 2 4)")
    p.add_argument("--budget", default=None, choices=tuple(PRESETS),
                   help="with --throughput: the study budget whose top rung each trial runs (default: full)")
    p.add_argument("--trials-each", type=_cli.positive_int, default=None,
                   help="with --throughput: trials per worker; from the second on a worker reuses its cache and "
                        "compiled graph (default: 2)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="with --throughput on CUDA: the compiled round's mode (default: reduce-overhead, CUDA graphs)")
    p.add_argument("--peak-seconds", type=_cli.positive_float, default=1.0,
                   help="seconds of warm-up and of measurement per matmul peak probe (default: 1)")
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the breakdown of the default run: time per kind of operation (profiled) and each "
                        "convolution's forward, input- and weight-gradient TFLOP/s")
    p.add_argument("--data", default=None, help="data source, as for studies.train (default: $CIFARLAB_DATA)")
    p.add_argument("--val-size", type=_cli.count_or_fraction, default=5000,
                   help="validation split timed for evaluation: a count or a fraction (default: 5000)")
    p.add_argument("--cache-dir", default=None)
    _cli.add_out_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run(build_parser(), _main, argv)


CPU_AUTO_IMAGES = 2048
# --throughput's flags parse to None, so that one given without --throughput is told; these are what they mean then.
THROUGHPUT_DEFAULTS = {"workers_per_device": [1, 2, 4], "budget": "full", "trials_each": 2,
                       "compile_mode": "reduce-overhead"}


def _images(text: str, train: int, device_type: str = "cpu") -> int:
    from cifarlab.errors import ConfigError

    if text == "auto":
        text = "all" if device_type == "cuda" else str(CPU_AUTO_IMAGES)
    if text == "all":
        return train
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--images must be a positive count, 'all' or 'auto', got {text!r}") from None
    if n < 1:
        raise ConfigError(f"--images must be a positive count, 'all' or 'auto', got {n}")
    return min(n, train)


def _main(args) -> int:
    import pandas as pd
    import torch

    from cifarlab.data import load_splits
    from cifarlab.errors import ConfigError
    from cifarlab.models import create_model
    from cifarlab.report.records import check_writable
    from cifarlab.timing import environment, training_flops_per_image

    console = _cli.console()
    archs = _cli.parse_archs(args.arch)
    if args.no_compile and not (args.ablation or args.throughput):
        raise ConfigError("--no-compile leaves torch.compile out of --ablation or --throughput, the only runs that "
                          "compile; add one of them, or leave --no-compile out")
    _cli.flags_of_a_mode(args, THROUGHPUT_DEFAULTS, args.throughput, "--throughput", "--throughput")
    if args.choose and args.precision != "auto":
        raise ConfigError(f"--choose times fp32 and bf16 itself and stores the faster; leave --precision "
                          f"{args.precision} out, or drop --choose to time {args.precision} alone")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but this machine has no CUDA device; use --device cpu or all")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = check_writable(args.out)
    splits = load_splits(args.data, val_size=args.val_size, cache_dir=args.cache_dir)
    _images(args.images, len(splits.train_labels))  # a bad --images fails before anything is timed
    bad = [b for b in args.batch_size if b > len(splits.train_labels)]
    if bad:
        raise ConfigError(f"--batch-size {bad[0]} is larger than the training set ({len(splits.train_labels)})")
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if args.throughput:
        from bench.throughput import measure

        measure(args, devices, splits, out, console)
        _cli.rebuild_reports(out, console)
        return 0
    tables = {"rows": [], "ops": [], "convs": [], "gaps": []}  # per measurement, op kind, conv and peak-gap part
    if args.device == "all" and not torch.cuda.is_available():
        tables["rows"].append({"arch": "all", "device": "cuda", "status": "no CUDA device on this machine"})
    env = environment()
    console.print(f"{env['cpu_model']}, {env['cpu_count']} cores, {torch.get_num_threads()} threads, "
                  f"torch {env['torch']}; data {splits.source}; --images {args.images} x {args.repeats} repeats")
    flops = {arch: training_flops_per_image(create_model(arch, splits.num_classes)) for arch in archs}
    for dev in devices:
        _time_device(dev, archs, splits, flops, env, tables, args, console)
    frame = _add_ratios(pd.DataFrame(tables["rows"]))
    _write(out, frame, env, tables, args, console)
    return 0


def _time_device(dev: str, archs, splits, flops, env, tables, args, console) -> None:
    """Probe ``dev``'s matmul peak, time every case on it (a ladder, the choices, or the default path with its
    breakdown), probe again, and give each row its share of the best peak."""
    import torch

    from cifarlab.bench import choice_precisions
    from cifarlab.choices import best_peaks
    from cifarlab.timing import configure_device

    device = torch.device(dev)
    images = _images(args.images, len(splits.train_labels), device.type)
    # Before the first probe: on CUDA training lets fp32 matmuls use TF32, so both probes measure TF32.
    configure_device(device)
    peaks = _matmul_peaks(device, args.peak_seconds)
    console.print(f"{dev}: matmul peak fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f}")
    rows, first_row, first_conv = tables["rows"], len(tables["rows"]), len(tables["convs"])
    precisions = None
    if args.choose:
        precisions, left_out = choice_precisions(dev, peaks)
        if left_out:
            console.print(f"{dev}: {left_out}", highlight=False)
    for arch in archs:
        for bs in args.batch_size:
            _time_cases(dev, device, arch, bs, images, splits, flops, peaks, env, tables, precisions, args, console)
    # Probed again after the timings, the better probe counts: one can land in a slow spell of a shared machine.
    again = _matmul_peaks(device, args.peak_seconds)
    peaks = {key: max(peaks[key], again[key]) for key in peaks}
    console.print(f"{dev}: matmul peak probed again: fp32 {again['fp32'] / 1e12:.2f} TFLOP/s, bf16 "
                  f"{again['bf16'] / 1e12:.2f}")
    peaks, peak_source = best_peaks(device, peaks)  # both probes may be slow: the best stored probe then counts
    console.print(f"{dev}: shares are of fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s ({peak_source['fp32']}), "
                  f"bf16 {peaks['bf16'] / 1e12:.2f} ({peak_source['bf16']})", highlight=False)
    for row in rows[first_row:]:
        if "achieved_tflops" in row:
            row["peak_tflops"] = peaks[row["precision"]] / 1e12
            row["peak_source"] = peak_source[row["precision"]]
            row["share_of_peak"] = row["achieved_tflops"] / row["peak_tflops"]
    for row in tables["convs"][first_conv:]:
        row["peak_tflops"] = peaks[row["precision"]] / 1e12
        row["share_of_peak"] = row["total_tflops"] / row["peak_tflops"]
    if tables["ops"]:
        tables["gaps"] += _peak_gaps(rows[first_row:], tables["ops"], flops)


def _time_cases(dev, device, arch, bs, images, splits, flops, peaks, env, tables, precisions, args, console) -> None:
    """The cases of one architecture and batch size, timed in turns, as rows (and breakdown rows)."""
    import torch

    from cifarlab.bench import Case, ablation_ladder, choice_cases, time_cases
    from cifarlab.choices import resolve_speed

    breakdown = not (args.ablation or args.choose or args.no_breakdown)
    # What training would use (flags, else a stored measurement, else the rule); a ladder climbs to it.
    speed = None if args.choose else resolve_speed(arch, device, args.precision, "auto")
    if args.ablation:
        console.print(f"  {arch}: the default path on {dev} is {speed.precision}, "
                      f"{'channels_last' if speed.channels_last else 'NCHW'} ({speed.source})", highlight=False)
        cases = ablation_ladder(arch, dev, bs, precision=speed.precision, channels_last=speed.channels_last,
                                with_compile=not args.no_compile)
    elif args.choose:
        cases = choice_cases(arch, dev, bs, precisions)
    else:
        cases = [Case(arch, dev, bs, speed.precision, speed.channels_last, step="default")]
    results = time_cases(cases, splits, images=images, repeats=args.repeats, warmup_steps=args.warmup,
                         profile_steps=2 if breakdown else 0)
    timed = []
    for case, result in zip(cases, results):
        row = result.row(train_images=len(splits.train_labels), val_images=len(splits.val_labels),
                         flops=flops[arch], peak_flops=peaks[case.precision])
        row["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else env["cpu_model"]
        if speed is not None:  # why the default path (and the ladder's top) is what it is
            row["choice_source"] = speed.source
        tables["rows"].append(row)
        timed.append(row)
        if breakdown:
            _break_down(case, result, arch, dev, device, bs, peaks, tables)
        console.print(f"  {arch} {case.step or ''} batch {bs}: {row['images_per_second']:.0f} img/s, "
                      f"{row['achieved_tflops']:.2f} TFLOP/s {case.precision}, "
                      f"{row['epoch_50k_seconds'] / 60:.1f} min per 50k ({row['epoch_kind']})")
    if args.choose:
        _store_choice(console, arch, device, bs, timed, args)


def _break_down(case, result, arch, dev, device, bs, peaks, tables) -> None:
    from cifarlab import cpu
    from cifarlab.breakdown import conv_layer_table

    ids = {"arch": arch, "device": dev, "batch_size": bs, "precision": case.precision}
    tables["ops"] += [{**ids, **r} for r in result.breakdown]
    # Each conv alone with freed memory kept as the step keeps it, not in whatever state the cases left malloc.
    with cpu.retained_memory(case.retain_memory and device.type == "cpu"):
        tables["convs"] += [{**ids, **r} for r in conv_layer_table(
            result.model, bs, device, case.precision, case.channels_last, peak_flops=peaks[case.precision])]


def _write(out, frame, env, tables, args, console) -> None:
    """devices.csv and devices.json, the breakdown's tables, the terminal tables and the page."""
    import pandas as pd

    from cifarlab.report.devices import devices_page, ladder_bounds
    from cifarlab.report.records import new_record_dir, write_csv, write_json

    run_dir = new_record_dir(out, "devices", "bench")
    write_csv(run_dir / "devices.csv", frame)
    write_json(run_dir / "devices.json", {"kind": "devices", "environment": env, "rows": frame.to_dict("records"),
                                          "args": {k: v for k, v in vars(args).items() if k != "out"}})
    _print_table(console, frame)
    if args.ablation and "status" in frame:
        for line in ladder_bounds(frame[frame["status"] == "ok"]):
            console.print(f"  {line}", highlight=False)
    ops, convs, gaps = (pd.DataFrame(tables[k]) for k in ("ops", "convs", "gaps"))
    if len(ops):
        write_csv(run_dir / "breakdown.csv", ops)
        write_csv(run_dir / "conv_layers.csv", convs)
        write_csv(run_dir / "peak_gap.csv", gaps)
        _print_breakdown(console, ops, convs)
        _print_peak_gaps(console, frame, gaps)
    devices_page(run_dir, frame, env, ops=ops, convs=convs, gaps=gaps)
    console.print(f"written: {run_dir / 'index.html'}")
    _cli.rebuild_reports(out, console)
    if (out / "machines" / "index.html").is_file():
        console.print(f"machines compared: {out / 'machines' / 'index.html'}")


def _ms(ms: float) -> str:
    """Milliseconds to three significant figures: a CUDA step's parts are fractions of a millisecond, a CPU's
    hundreds of milliseconds."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _matmul_peaks(device, seconds: float) -> dict[str, float]:
    """Dense-matmul FLOP/s per precision, ``seconds`` of products each after as long a warm-up."""
    import torch

    from cifarlab.timing import matmul_flops_per_second

    n = 2048 if device.type == "cpu" else 8192
    return {"fp32": matmul_flops_per_second(device, torch.float32, n=n, min_seconds=seconds),
            "bf16": matmul_flops_per_second(device, torch.bfloat16, n=n, min_seconds=seconds)}


def _store_choice(console, arch, device, batch_size, timed, args) -> None:
    """Mark the fastest combination (the rule's own on a near-tie) and store it for training to use."""
    from cifarlab.choices import pick_fastest, rule_choice, save_choice

    rule = rule_choice(device)
    best = pick_fastest(timed, rule)
    for row in timed:
        row["chosen"] = row is best
        row["vs_chosen"] = row["images_per_second"] / best["images_per_second"]
    alternatives = {r["step"]: round(r["images_per_second"], 1) for r in timed}
    path = save_choice(arch, device, {
        "precision": best["precision"], "channels_last": bool(best["channels_last"]), "batch_size": batch_size,
        "images_per_second": best["images_per_second"], "spread_pct": best["spread_pct"],
        "alternatives": alternatives, "warmup_steps": args.warmup, "images_timed": best["images_timed"],
        "rule": {"precision": rule[0], "channels_last": rule[1]},
    })
    console.print(f"  {arch}: chose {best['step']} ({best['images_per_second']:.0f} img/s); stored in {path}",
                  highlight=False)


def _peak_gaps(rows: list[dict], op_rows: list[dict], flops: dict) -> list[dict]:
    """Each profiled row's step against the matmul peak (``breakdown.peak_gap``); adds its ceiling to the row."""
    from cifarlab.breakdown import peak_gap

    out = []
    for row in rows:
        ids = {k: row.get(k) for k in ("arch", "device", "batch_size", "precision")}
        ops = [r for r in op_rows if all(r[k] == v for k, v in ids.items())]
        if not ops or "share_of_peak" not in row:
            continue
        bs = row["batch_size"]
        gap = peak_gap(ops, bs / row["images_per_second"], flops[row["arch"]]["train"] * bs,
                       row["peak_tflops"] * 1e12)
        row["share_if_matmuls_at_peak"] = gap["ceiling"]
        row["matmul_share_of_step"] = gap["matmul_share"]
        row["matmuls_above_peak"] = gap["above_peak"]
        out += [{**ids, **part} for part in gap["parts"]]
    return out


def _add_ratios(frame):
    """CUDA against CPU, and each ablation step against its baseline, as speed-up ratios."""
    import numpy as np

    if frame.empty or "images_per_second" not in frame:
        return frame
    ok = frame["status"] == "ok"
    frame["speedup_vs_cpu"] = np.nan
    frame["speedup_vs_baseline"] = np.nan
    for (_arch, _bs, _step), grp in frame[ok].groupby(["arch", "batch_size", "step"]):
        cpu = grp[grp["device"] == "cpu"]["images_per_second"]
        if len(cpu):
            frame.loc[grp.index, "speedup_vs_cpu"] = grp["images_per_second"] / cpu.iloc[0]
    for (_arch, _dev, _bs), grp in frame[ok].groupby(["arch", "device", "batch_size"]):
        base = grp[grp["step"].str.startswith("seed baseline")]["images_per_second"]
        if len(base):
            frame.loc[grp.index, "speedup_vs_baseline"] = grp["images_per_second"] / base.iloc[0]
    return frame


def _table(console, title: str, header: list[str], rows) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _fmt(value, spec: str) -> str:
    return "—" if value != value else format(value, spec)  # NaN: not measured


def _print_table(console, frame) -> None:
    rows = []
    for _, r in frame.iterrows():
        if r.get("status") != "ok":
            rows.append((str(r["arch"]), str(r["device"]), str(r["status"]), *[""] * 9))
            continue
        rows.append((r["arch"], r["device"], r["step"], str(int(r["batch_size"])), f"{r['images_per_second']:.0f}",
                     f"{r['spread_pct']:.0f}%", f"{r['epoch_50k_seconds']:.0f} ({r['epoch_kind'][0]})",
                     f"{r['data_share']:.1%}", f"{r['share_of_peak']:.0%}", _fmt(r["speedup_vs_baseline"], ".1f"),
                     _fmt(r["speedup_vs_cpu"], ".1f"), f"{r['peak_memory_mb']:.0f}"))
    _table(console, "training throughput", ["arch", "device", "step", "batch", "img/s", "spread", "s / 50k epoch",
                                            "data", "share of peak", "vs baseline", "vs CPU", "peak MB"], rows)


def _print_breakdown(console, ops, convs) -> None:
    """Where each architecture's step time goes, then each convolution's achieved TFLOP/s by pass."""
    from cifarlab.breakdown import profiling_sentence

    for (arch, dev, bs), grp in ops.groupby(["arch", "device", "batch_size"], sort=False):
        _table(console, f"{arch} on {dev}, batch {bs}: time per training step by kind of operation",
               ["operation", "ms / step", "share"], [(r["category"], _ms(r["seconds_per_step"] * 1e3),
                                                      f"{r['share']:.1%}") for _, r in grp.iterrows()
                                                     if r["seconds_per_step"] > 0])
        if sentence := profiling_sentence(grp.to_dict("records")):
            console.print(f"  {arch}: {sentence}", highlight=False)
        layers = convs[(convs["arch"] == arch) & (convs["device"] == dev) & (convs["batch_size"] == bs)]
        rows = [(r["layer"], f"{r['in_shape']} → {r['out_shape']}", str(r.get("kernel", "")),
                 *(("—" if r[k] != r[k] else _ms(r[k])) for k in ("forward_ms", "input_grad_ms", "weight_grad_ms")),
                 *(_fmt(r[k], ".2f") for k in ("forward_tflops", "input_grad_tflops", "weight_grad_tflops")),
                 _fmt(r.get("share_of_peak", float("nan")), ".0%")) for _, r in layers.iterrows()]
        _table(console, f"{arch}: each convolution alone, batch {bs} (TFLOP/s by pass)",
               ["layer", "in → out", "kernel", "fwd ms", "∂input ms", "∂weight ms", "fwd TF/s", "∂input TF/s",
                "∂weight TF/s", "share of peak"], rows)


def _print_peak_gaps(console, frame, gaps) -> None:
    """Per architecture: the step's time against the matmul peak, and the share kernel work alone could reach."""
    from cifarlab.breakdown import ceiling_sentence

    for (arch, dev, bs), grp in gaps.groupby(["arch", "device", "batch_size"], sort=False):
        (row,) = frame[(frame["arch"] == arch) & (frame["device"] == dev) & (frame["batch_size"] == bs)
                       & (frame["status"] == "ok")].to_dict("records")
        _table(console, f"{arch} on {dev}, batch {bs}: the step against the {row['precision']} matmul peak",
               ["part of the step", "ms / step", "share"],
               [(r["part"], _ms(r["seconds_per_step"] * 1e3), f"{r['share']:.1%}") for _, r in grp.iterrows()])
        console.print(f"  {arch}: {ceiling_sentence(row)}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
