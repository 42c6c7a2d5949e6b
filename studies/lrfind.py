"""LR range test: ``python -m studies.lrfind --arch custom_resnet``. Prints the suggestions and the LRMIN/LRMAX
the seeds derived from them, and writes ``<out>/lrfind/<time>-<arch>/``."""

from __future__ import annotations

import sys

from studies import _cli

PROG = "python -m studies.lrfind"


def build_parser():
    from cifarlab.config import OPTIMIZERS
    from cifarlab.models import list_models

    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="custom_resnet", choices=list_models(), help="architecture")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="optimizer (default: adam, the seed's)")
    p.add_argument("--batch-size", type=_cli.positive_int, default=512, help="images per step (default: 512)")
    p.add_argument("--weight-decay", type=_cli.finite_float, default=5e-4, help="weight decay (default: 5e-4)")
    p.add_argument("--start-lr", type=_cli.positive_float, default=1e-7, help="first LR (default: 1e-7)")
    p.add_argument("--end-lr", type=_cli.positive_float, default=10.0, help="last LR (default: 10)")
    p.add_argument("--steps", type=_cli.positive_int, default=100, help="steps of the sweep (default: 100)")
    p.add_argument("--label-smoothing", type=_cli.finite_float, default=0.0, help="(default: 0, as the seed)")
    p.add_argument("--logit-scale", type=_cli.positive_float, default=0.125,
                   help="logits are multiplied by this before the loss, as in training (default: 0.125)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    _cli.add_data_arguments(p)
    _cli.add_out_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.run(build_parser(), _main, argv)


def _main(args) -> int:
    import math

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from cifarlab.config import TrainConfig
    from cifarlab.errors import ConfigError
    from cifarlab.lr_finder import run_range_test
    from cifarlab.report.records import check_writable, write_lrfind_record
    from cifarlab.timing import environment, resolve_device

    console = _cli.console()
    if args.start_lr >= args.end_lr:
        raise ConfigError(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
    if args.steps < 3:
        raise ConfigError(f"--steps must be at least 3 for a suggestion, got {args.steps}")
    device = resolve_device(args.device)
    out = check_writable(args.out)
    config = TrainConfig(arch=args.arch, optimizer=args.optimizer, batch_size=args.batch_size, ema=0,
                         weight_decay=args.weight_decay, max_lr=args.start_lr, precision=args.precision,
                         device=args.device, seed=args.seed, label_smoothing=args.label_smoothing,
                         logit_scale=args.logit_scale)
    splits = _cli.load_data(args, seed=args.seed)
    console.print(f"LR range test: {args.arch}, {args.optimizer}, batch {args.batch_size}, "
                  f"{args.start_lr:g} to {args.end_lr:g} over {args.steps} steps, {device}")
    # The progress bar goes to stderr, as tqdm's does, drawn only on a terminal and erased when done: the sweep
    # takes minutes on a CPU, and logs stay clean.
    progress = Progress(TextColumn("LR range test: step"), MofNCompleteColumn(), BarColumn(),
                        TextColumn("LR {task.fields[lr]:.2e}  smoothed loss {task.fields[loss]:.3f}"),
                        TimeRemainingColumn(), console=Console(stderr=True, highlight=False), transient=True)
    task = progress.add_task("sweep", total=args.steps, lr=args.start_lr, loss=float("nan"))
    with progress:
        result, precision = run_range_test(
            config, splits, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps,
            on_step=lambda step, lr, loss: progress.update(task, completed=step, lr=lr, loss=loss))
    doc = {"kind": "lrfind", "arch": args.arch, "optimizer": args.optimizer, "batch_size": args.batch_size,
           "weight_decay": args.weight_decay, "logit_scale": args.logit_scale, "precision": precision,
           "data": splits.describe(), "environment": environment(device)}
    run_dir = write_lrfind_record(out, doc, result)
    table = Table(title="LR suggestions")
    for col, justify in (("rule", "left"), ("max LR", "right"), ("LRMIN = max / 25 (OneCycleLR start)", "right")):
        table.add_column(col, justify=justify)
    for name, lr in result.suggestions.items():
        table.add_row(name, f"{lr:.3e}", f"{lr / 25:.3e}")
    console.print(table)
    finite = [s for s in result.smoothed if math.isfinite(s)]
    lowest = f"; lowest smoothed loss {min(finite):.3f}" if finite else ""
    console.print(f"{'stopped at divergence' if result.diverged else 'ran all steps'} after {len(result.lrs)} steps"
                  f"{lowest}")
    if "steepest" in result.suggestions:
        console.print(f"use it as: python -m studies.train --arch {args.arch} --optimizer {args.optimizer} "
                      f"--max-lr {result.suggestions['steepest']:.3g}")
    console.print(f"written: {run_dir}")
    _cli.rebuild_reports(out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
