"""LR range test: ``python -m studies.lrfind --arch custom_resnet``.

Sweeps the learning rate exponentially over a set number of training steps, prints the suggestions
(steepest descent, minimum / 10) and the LRMIN/LRMAX the seeds derived from them, and writes
``lrfind.csv``, ``lrfind.json`` and ``lrfind.png`` under ``<out>/lrfind/<time>-<arch>/``.
"""

from __future__ import annotations

import sys

from studies import _cli

PROG = "python -m studies.lrfind"


def build_parser():
    from cifarlab.models import list_models
    from cifarlab.train import OPTIMIZERS

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

    import pandas as pd
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from cifarlab.augment import BatchAugmenter, Normalization
    from cifarlab.choices import resolve_speed
    from cifarlab.errors import ConfigError
    from cifarlab.hostmem import retained_memory
    from cifarlab.lr_finder import lr_range_test
    from cifarlab.report.figures import lrfind_figure
    from cifarlab.report.records import check_writable, new_record_dir, write_csv, write_json
    from cifarlab.timing import configure_device, environment, resolve_device
    from cifarlab.train import TrainConfig, autocast, build_model, build_optimizer

    console = _cli.console()
    if args.start_lr >= args.end_lr:
        raise ConfigError(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
    if args.steps < 3:
        raise ConfigError(f"--steps must be at least 3 for a suggestion, got {args.steps}")
    device = resolve_device(args.device)
    configure_device(device)
    out = check_writable(args.out)
    config = TrainConfig(arch=args.arch, optimizer=args.optimizer, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, max_lr=args.start_lr, precision=args.precision,
                         device=args.device, seed=args.seed, label_smoothing=args.label_smoothing)
    splits = _cli.load_data(args, seed=args.seed)
    if args.batch_size > len(splits.train_labels):
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the training set "
                          f"({len(splits.train_labels)} images)")
    speed = resolve_speed(args.arch, device, args.precision, "auto")
    precision, channels_last = speed.precision, speed.channels_last
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    norm = Normalization.from_images(splits.train_images)
    model = build_model(config, splits, norm, device, channels_last, generator=gen)
    optimizer = build_optimizer(config, model)
    augmenter = BatchAugmenter(splits.train_images, splits.train_labels, norm, device, channels_last=channels_last)

    def batches():
        while True:
            yield from augmenter.epoch(args.batch_size, gen)

    console.print(f"LR range test: {args.arch}, {args.optimizer}, batch {args.batch_size}, "
                  f"{args.start_lr:g} to {args.end_lr:g} over {args.steps} steps, {precision}, {device}")
    # The progress bar goes to stderr, as tqdm's does: `studies.onecycle` runs this with stdout silenced and the
    # sweep takes minutes on a CPU. It is drawn only on a terminal and erased when done, so logs stay clean.
    progress = Progress(TextColumn("LR range test: step"), MofNCompleteColumn(), BarColumn(),
                        TextColumn("LR {task.fields[lr]:.2e}  smoothed loss {task.fields[loss]:.3f}"),
                        TimeRemainingColumn(), console=Console(stderr=True, highlight=False), transient=True)
    task = progress.add_task("sweep", total=args.steps, lr=args.start_lr, loss=float("nan"))
    with progress, retained_memory(device.type == "cpu"):  # as fit() trains: no page faults for each step's memory
        result = lr_range_test(
            model, optimizer, batches(), torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
            start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps,
            autocast=lambda: autocast(device, precision), logit_scale=args.logit_scale,
            on_step=lambda step, lr, loss: progress.update(task, completed=step, lr=lr, loss=loss))
    frame = pd.DataFrame({"step": range(len(result.lrs)), "lr": result.lrs, "loss": result.losses,
                          "smoothed_loss": result.smoothed})
    run_dir = new_record_dir(out, "lrfind", args.arch)
    write_csv(run_dir / "lrfind.csv", frame)
    suggestions = result.suggestions
    doc = {"kind": "lrfind", "arch": args.arch, "optimizer": args.optimizer, "batch_size": args.batch_size,
           "weight_decay": args.weight_decay, "logit_scale": args.logit_scale, "precision": precision,
           "data": splits.describe(),
           "environment": environment(device), **result.to_dict()}
    write_json(run_dir / "lrfind.json", doc)
    lrfind_figure(frame, suggestions, run_dir / "lrfind.png",
                  f"LR range test: {args.arch}, {args.optimizer}, batch {args.batch_size}")

    table = Table(title="LR suggestions")
    table.add_column("rule")
    table.add_column("max LR", justify="right")
    table.add_column("LRMIN = max / 25 (OneCycleLR start)", justify="right")
    for name, lr in suggestions.items():
        table.add_row(name, f"{lr:.3e}", f"{lr / 25:.3e}")
    console.print(table)
    status = "stopped at divergence" if result.diverged else "ran all steps"
    finite = [s for s in result.smoothed if math.isfinite(s)]
    lowest = f"; lowest smoothed loss {min(finite):.3f}" if finite else ""
    console.print(f"{status} after {len(result.lrs)} steps{lowest}")
    if "steepest" in suggestions:
        console.print(f"use it as: python -m studies.train --arch {args.arch} --optimizer {args.optimizer} "
                      f"--max-lr {suggestions['steepest']:.3g}")
    console.print(f"written: {run_dir}")
    _cli.rebuild_reports(out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
