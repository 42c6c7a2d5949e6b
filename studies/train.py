"""One training run: ``python -m studies.train --arch custom_resnet --epochs 10``.

Prints the model's layer table, trains with a progress bar, prints a per-epoch table and the test accuracy
(plain and with flip test-time augmentation), and writes ``run.json``, ``epochs.csv`` and the tested weights
(``model.pt``, read back with ``cifarlab.train.load_weights``) under ``<out>/runs/<time>-<arch>/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from studies import _cli

PROG = "python -m studies.train"


def build_parser():
    from cifarlab.train import TrainConfig

    parser = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    _cli.add_dataclass_arguments(parser, TrainConfig)
    _cli.add_data_arguments(parser, allow_no_val=True)
    _cli.add_out_argument(parser)
    parser.add_argument("--test", action=_cli.argparse.BooleanOptionalAction, default=True,
                        help="evaluate on the test set after training (plain and flip-TTA)")
    parser.add_argument("--save-model", action=_cli.argparse.BooleanOptionalAction, default=True,
                        help="write the tested weights (the EMA's where kept) to model.pt beside run.json; "
                             "cifarlab.train.load_weights reads them back")
    parser.add_argument("--quiet", action="store_true", help="no model table and no progress bar")
    return parser


def run_record(result, splits, *, status: str, train_subset, wall_seconds: float) -> dict:
    """The JSON document of one run: everything its report page needs."""
    import numpy as np

    from cifarlab.timing import environment, resolve_device

    doc: dict = {
        "kind": "run",
        "status": status,
        "config": result.config.to_dict(),
        "resolved": {"device": result.device, "precision": result.precision,
                     "channels_last": result.channels_last, "speed_choice": result.speed_source,
                     "compile_seconds": result.compile_seconds},
        "environment": environment(resolve_device(result.config.device)),
        "data": {**splits.describe(), "train_subset": train_subset},
        "normalization": {"mean": list(result.normalization.mean), "std": list(result.normalization.std)},
        "epochs": [r.to_dict() for r in result.records],
        "wall_seconds": wall_seconds,
        "test": None,
    }
    if result.test is not None or result.test_tta is not None:
        test: dict = {}
        for key, ev in (("plain", result.test), ("flip_tta", result.test_tta)):
            if ev is None:
                continue
            labels = splits.test_labels
            k = splits.num_classes
            confusion = np.bincount(labels * k + ev.predictions, minlength=k * k).reshape(k, k)
            test[key] = {
                "accuracy": ev.accuracy,
                "loss": ev.loss,
                "per_class_accuracy": (confusion.diagonal() / np.maximum(confusion.sum(1), 1)).tolist(),
                "confusion": confusion.tolist(),
                "predictions": ev.predictions.tolist(),
            }
        doc["test"] = test
    return doc


def main(argv: list[str] | None = None) -> int:
    return _cli.run(build_parser(), _main, argv)


def _main(args) -> int:
    import time

    import pandas as pd
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from cifarlab.errors import ConfigError
    from cifarlab.models import model_summary
    from cifarlab.report.records import check_writable, new_record_dir, write_csv, write_json
    from cifarlab.timing import resolve_device
    from cifarlab.train import TrainConfig, fit, recipe_model, save_weights

    console = _cli.console()
    config = _cli.dataclass_from_args(TrainConfig, args)
    resolve_device(config.device)  # fail on --device cuda without CUDA before loading data
    out = check_writable(args.out)
    t0 = time.perf_counter()
    splits = _cli.load_data(args, seed=config.seed)
    load_seconds = time.perf_counter() - t0
    if len(splits.train_labels) < 2:
        raise ConfigError("the training set has fewer than 2 images; pass a larger --train-subset")
    if config.batch_size > len(splits.train_labels):
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(splits.train_labels)} images)")
    console.print(f"data: {splits.source}: {len(splits.train_labels)} train / {len(splits.val_labels)} val / "
                  f"{len(splits.test_labels)} test, {splits.num_classes} classes "
                  f"({'cache' if splits.from_cache else 'decoded'} in {load_seconds:.1f} s)")
    if splits.resized:
        console.print(f"[yellow]note:[/] {splits.resized} images were not 32x32 and were resized on load")
    if not args.quiet:
        console.print(model_summary(recipe_model(config, splits.num_classes)), highlight=False)

    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]} batch {task.fields[batch]}"), BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}"), TimeRemainingColumn(),
        console=console, disable=args.quiet, transient=True,
    )
    task = progress.add_task("train", total=config.epochs, epoch=1, epochs=config.epochs, batch="-",
                             loss=float("nan"), acc=0.0)

    def on_step(epoch: int, step: int, steps: int, loss: float, acc: float) -> None:
        progress.update(task, completed=(epoch - 1) + step / steps, epoch=epoch, batch=f"{step}/{steps}",
                        loss=loss, acc=acc)

    def on_epoch(rec) -> None:
        val = (f"val loss {rec.val_loss:.3f} acc {rec.val_accuracy:.1%}" if len(splits.val_labels)
               else "no validation split")
        progress.console.print(
            f"epoch {rec.epoch:>3}: train loss {rec.train_loss:.3f} acc {rec.train_accuracy:.1%} | "
            f"{val} | {rec.epoch_seconds:.1f} s, "
            f"{rec.images_per_second:.0f} img/s (augmentation {rec.data_seconds:.2f} s, eval {rec.eval_seconds:.1f} s)")

    with progress:
        result = fit(config, splits, on_step=on_step, on_epoch=on_epoch, test=args.test, test_tta=args.test)
    wall = time.perf_counter() - t0

    epochs = pd.DataFrame([r.to_dict() for r in result.records])
    table = Table(title=f"{config.arch}: {config.optimizer}, max LR {config.max_lr:g}, batch {config.batch_size}, "
                        f"{result.precision}, channels_last {'on' if result.channels_last else 'off'}, {result.device}")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "LR", "epoch s", "img/s", "augment s"):
        table.add_column(col, justify="right")
    for r in result.records:
        has_val = len(splits.val_labels) > 0  # none held out (--val-size 0): a dash, not "nan%"
        table.add_row(str(r.epoch), f"{r.train_loss:.3f}", f"{r.train_accuracy:.2%}",
                      f"{r.val_loss:.3f}" if has_val else "—", f"{r.val_accuracy:.2%}" if has_val else "—",
                      f"{r.lr:.2e}", f"{r.epoch_seconds:.1f}", f"{r.images_per_second:.0f}",
                      f"{r.data_seconds:.2f}")
    console.print(table)
    console.print(f"precision {result.precision}, channels_last {'on' if result.channels_last else 'off'}: "
                  f"{result.speed_source}", highlight=False)
    train_s = epochs["train_seconds"].sum()
    console.print(f"augmentation and batching: {epochs['data_seconds'].mean():.2f} s per epoch "
                  f"({epochs['data_seconds'].sum() / train_s:.1%} of training time, {config.augment} path)")
    if result.test is not None and result.test_tta is not None:
        console.print(f"test accuracy: {result.test.accuracy:.2%} (with flip TTA: {result.test_tta.accuracy:.2%})")
    console.print(f"wall time {wall / 60:.1f} min (training {train_s / 60:.1f} min), "
                  f"{epochs['images_per_second'].median():.0f} img/s median")

    run_dir = new_record_dir(out, "runs", config.arch)
    doc = run_record(result, splits, status="completed", train_subset=args.train_subset, wall_seconds=wall)
    write_json(run_dir / "run.json", doc)
    write_csv(run_dir / "epochs.csv", epochs)
    console.print(f"run record: {Path(run_dir) / 'run.json'}")
    if args.save_model:
        console.print(f"weights: {save_weights(result, run_dir / 'model.pt', splits.classes)}")
    _cli.rebuild_reports(out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
