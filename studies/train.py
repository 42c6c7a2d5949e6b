"""One training run: ``python -m studies.train --arch custom_resnet --epochs 10``.

Trains with a progress bar, prints the per-epoch table and test accuracy, and writes ``run.json``, ``epochs.csv``
and ``model.pt`` under ``<out>/runs/<time>-<arch>/``; ``--resume <folder>`` continues a stopped run from the
``checkpoint.pt`` it keeps while it trains."""

from __future__ import annotations

import sys
from pathlib import Path

from studies import _cli

PROG = "python -m studies.train"
# --val-size with --no-test: the share of the training images held out so that a run that skips the test still
# measures accuracy (5,000 of CIFAR-10's 50,000).
HOLD_OUT = 0.1


def build_parser():
    from cifarlab.config import TrainConfig

    parser = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    _cli.add_dataclass_arguments(parser, TrainConfig)
    _cli.add_data_arguments(parser, allow_no_val=True, val_default=None, val_default_help=(
        "0 when the run ends with the test, so the tested model learns from every training image as published "
        f"CIFAR-10 figures do; {HOLD_OUT:g} (5,000 of CIFAR-10's 50,000) with --no-test, so that the run "
        "measures some accuracy"))
    _cli.add_out_argument(parser)
    parser.add_argument("--test", action=_cli.argparse.BooleanOptionalAction, default=True,
                        help="evaluate on the test set after training (plain and flip-TTA)")
    parser.add_argument("--save-model", action=_cli.argparse.BooleanOptionalAction, default=True,
                        help="write the tested weights (the EMA's where kept) to model.pt beside run.json; "
                             "cifarlab.weights.load_weights reads them back")
    parser.add_argument("--checkpoint-every", type=_cli.duration_or_zero, default=60.0,
                        help="save the state to resume from at the end of the first step after this long since the "
                             "last save, within an epoch or at its end (90s, 10m; 0: at each epoch's end only) "
                             "(default: 1m)")
    parser.add_argument("--no-checkpoint", action="store_true", help="keep no checkpoint")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue a stopped run from its folder's checkpoint.pt, with its own settings "
                             "(only --data, --cache-dir and --quiet may be given with it)")
    parser.add_argument("--quiet", action="store_true", help="no model table and no progress bar")
    return parser


# What --resume takes from the command line; every other setting is the stopped run's own.
RESUME_FLAGS = ("--resume", "--data", "--cache-dir", "--quiet")


def _resume_args(args, raw: list[str]):
    """The stopped run's flags, its checkpoint, and its folder; other flags given with --resume are refused."""
    from cifarlab.checkpoint import load_checkpoint
    from cifarlab.errors import ConfigError

    others = [flag for flag in _cli.flags_given(raw) if flag not in RESUME_FLAGS]
    if others:
        raise ConfigError(f"--resume continues a run with its own settings; drop {', '.join(others)} "
                          f"(only {', '.join(RESUME_FLAGS[1:])} may be given with it)")
    path = Path(args.resume)
    if path.is_dir() and not (path / "checkpoint.pt").exists() and (path / "run.json").exists():
        raise ConfigError(f"{path} is a finished run (its run.json is there): there is nothing to resume")
    path = path / "checkpoint.pt" if path.is_dir() else path
    doc = load_checkpoint(path)
    stored = dict(doc["extra"]["args"])
    stored.update(resume=args.resume, quiet=args.quiet, out=Path(stored["out"]))
    if args.data is not None:
        stored["data"] = args.data
    if args.cache_dir is not None:
        stored["cache_dir"] = args.cache_dir
    return _cli.argparse.Namespace(**stored), doc, path.parent


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    return _cli.run(build_parser(), lambda args: _main(args, raw), argv)


def _main(args, raw: list[str]) -> int:
    import contextlib

    with contextlib.ExitStack() as held:  # the run folder's lock, from the moment it is known to the end
        return _train(args, raw, held)


def _train(args, raw: list[str], held) -> int:
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cifarlab.checkpoint import resume_point
    from cifarlab.config import TrainConfig
    from cifarlab.errors import CifarlabError, ConfigError
    from cifarlab.models import model_summary
    from cifarlab.models.recipe import recipe_model
    from cifarlab.report.records import check_writable
    from cifarlab.timing import resolve_device
    from cifarlab.train import fit

    console = _cli.console()
    given = _cli.flags_given(raw)
    if args.no_checkpoint and "--checkpoint-every" in given:
        raise ConfigError("--checkpoint-every sets how often the checkpoint is saved, and --no-checkpoint keeps none; "
                          "give one of them")
    if args.optimizer != "sgd" and "--bias-lr-scale" in given:
        raise ConfigError(f"--bias-lr-scale scales SGD's bias learning rate; --optimizer {args.optimizer} trains every "
                          "parameter at one LR: drop --bias-lr-scale, or train with --optimizer sgd")
    resume, run_dir = None, None
    if args.resume is not None:
        args, resume, run_dir = _resume_args(args, raw)
        held.enter_context(_holding(run_dir))  # not while another process trains it
    if args.val_size is None:  # resolved here, so that a checkpoint stores the hold-out it trained with
        args.val_size = 0 if args.test else HOLD_OUT
    config = _cli.dataclass_from_args(TrainConfig, args)
    resolve_device(config.device)  # fail on --device cuda without CUDA before loading data
    out = check_writable(args.out)
    t0 = time.perf_counter()
    splits = _load(args, config, console, resume)
    if not args.quiet:
        console.print(model_summary(recipe_model(config, splits.num_classes)), highlight=False)
    checkpoint, run_dir = _checkpointing(args, config, splits, out, resume, run_dir, held, console)
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]} batch {task.fields[batch]}"), BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1%}"), TimeRemainingColumn(),
        console=console, disable=args.quiet, transient=True,
    )
    # A resumed run's bar starts where the checkpoint left it: a jump at the first step would read as speed.
    done = resume_point(resume, config.epochs)[1] if resume is not None else 0
    task = progress.add_task("train", total=config.epochs, completed=done, epoch=int(done) + 1, epochs=config.epochs,
                             batch="-", loss=float("nan"), acc=0.0)

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

    try:
        with progress, _cli.stop_at_a_step(checkpoint):
            result = fit(config, splits, on_step=on_step, on_epoch=on_epoch, test=args.test, test_tta=args.test,
                         checkpoint=checkpoint)
    except BaseException as exc:
        if isinstance(exc, CifarlabError) and checkpoint is not None:
            checkpoint.path.unlink(missing_ok=True)  # diverged, or a bad setting: resuming would meet it again
        if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run stopped before its first checkpoint leaves no empty folder behind
        elif checkpoint is not None and checkpoint.path.is_file():
            print(f"checkpoint of {checkpoint.describe()} kept: {PROG} --resume {run_dir} continues the run",
                  file=sys.stderr)
        raise
    # On --resume, the wall time of the sessions before this one (fit's, less their data loading) is added.
    wall = time.perf_counter() - t0 + (float(resume["wall_seconds"]) if resume is not None else 0.0)
    _report(console, result, splits, wall)
    _store(args, result, splits, wall, out, run_dir, checkpoint, console)
    return 0


def _holding(run_dir):
    from cifarlab.report.records import holding

    return holding(run_dir)


def _load(args, config, console, resume):
    """The run's data, checked against the flags and, on --resume, against the data the run trained on."""
    import time

    from cifarlab.errors import ConfigError

    t0 = time.perf_counter()
    splits = _cli.load_data(args, seed=config.seed)
    if len(splits.train_labels) < 2:
        raise ConfigError("the training set has fewer than 2 images; pass a larger --train-subset")
    if config.batch_size > len(splits.train_labels):
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the training set ({len(splits.train_labels)} images)")
    console.print(f"data: {splits.source}: {len(splits.train_labels)} train / {len(splits.val_labels)} val / "
                  f"{len(splits.test_labels)} test, {splits.num_classes} classes "
                  f"({'cache' if splits.from_cache else 'decoded'} in {time.perf_counter() - t0:.1f} s)")
    if splits.resized:
        console.print(f"[yellow]note:[/] {splits.resized} images were not 32x32 and were resized on load")
    if resume is not None and resume["extra"]["data"] != _data_key(splits):
        raise ConfigError(f"the data differ from those the run trained on ({splits.source}); pass --data with the "
                          "run's data")
    return splits


def _data_key(splits) -> dict:
    return {k: v for k, v in splits.describe().items() if k in ("classes", "train", "val", "test")}


def _checkpointing(args, config, splits, out, resume, run_dir, held, console):
    """The run's checkpoint (continued on --resume, else new unless --no-checkpoint) and its folder."""
    from cifarlab.checkpoint import Checkpointing, resume_point
    from cifarlab.report.devices import machine_of
    from cifarlab.report.records import new_record_dir
    from cifarlab.timing import environment, resolve_device

    machine = machine_of(environment(resolve_device(config.device)))  # a resumed run may go on elsewhere
    if resume is not None:
        console.print(f"resuming {run_dir} {resume_point(resume, config.epochs)[0]}", soft_wrap=True)
        extra = {**resume["extra"], "resumed_after": [*resume["extra"]["resumed_after"],
                                                      resume_point(resume, config.epochs)[1]],
                 "machines": [*resume["extra"]["machines"], machine]}
        return Checkpointing(run_dir / "checkpoint.pt", every=args.checkpoint_every, resume=resume,
                             extra=extra), run_dir
    if args.no_checkpoint:
        return None, None
    run_dir = new_record_dir(out, "runs", config.arch)
    held.enter_context(_holding(run_dir))
    stored = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=args.checkpoint_every,
                               extra={"args": stored, "data": _data_key(splits), "resumed_after": [],
                                      "machines": [machine]})
    console.print(f"checkpoint: {checkpoint.path} (if the run stops: {PROG} --resume {run_dir})", soft_wrap=True)
    return checkpoint, run_dir


def _report(console, result, splits, wall: float) -> None:
    """The per-epoch table and the run's summary lines."""
    import statistics

    from rich.table import Table

    config, records = result.config, result.records
    table = Table(title=f"{config.arch}: {config.optimizer}, max LR {config.max_lr:g}, batch {config.batch_size}, "
                        f"{result.precision}, channels_last {'on' if result.channels_last else 'off'}, {result.device}")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "LR", "epoch s", "img/s", "augment s"):
        table.add_column(col, justify="right")
    has_val = len(splits.val_labels) > 0  # none held out (--val-size 0): a dash, not "nan%"
    for r in records:
        table.add_row(str(r.epoch), f"{r.train_loss:.3f}", f"{r.train_accuracy:.2%}",
                      f"{r.val_loss:.3f}" if has_val else "—", f"{r.val_accuracy:.2%}" if has_val else "—",
                      f"{r.lr:.2e}", f"{r.epoch_seconds:.1f}", f"{r.images_per_second:.0f}", f"{r.data_seconds:.2f}")
    console.print(table)
    console.print(f"precision {result.precision}, channels_last {'on' if result.channels_last else 'off'}: "
                  f"{result.speed_source}", highlight=False)
    train_s = sum(r.train_seconds for r in records)
    console.print(f"augmentation and batching: {sum(r.data_seconds for r in records) / len(records):.2f} s per epoch "
                  f"({sum(r.data_seconds for r in records) / train_s:.1%} of training time, {config.augment} path)")
    if result.test is not None and result.test_tta is not None:
        console.print(f"test accuracy: {result.test.accuracy:.2%} (with flip TTA: {result.test_tta.accuracy:.2%})")
    median = statistics.median(r.images_per_second for r in records)
    console.print(f"wall time {wall / 60:.1f} min (training {train_s / 60:.1f} min), {median:.0f} img/s median")


def _store(args, result, splits, wall: float, out, run_dir, checkpoint, console) -> None:
    """``run.json``, ``epochs.csv`` and ``model.pt`` in the run's folder; the checkpoint goes."""
    import pandas as pd

    from cifarlab.report.records import new_record_dir, run_record, write_csv, write_json
    from cifarlab.weights import save_weights

    run_dir = run_dir or new_record_dir(out, "runs", result.config.arch)
    doc = run_record(result, splits, status="completed", train_subset=args.train_subset, wall_seconds=wall)
    if checkpoint is not None and checkpoint.extra["resumed_after"]:
        doc["resumed_after_epochs"] = checkpoint.extra["resumed_after"]
        doc["machines"] = checkpoint.extra["machines"]  # the machine of each session, in turn
    write_json(run_dir / "run.json", doc)
    write_csv(run_dir / "epochs.csv", pd.DataFrame([r.to_dict() for r in result.records]))
    console.print(f"run record: {Path(run_dir) / 'run.json'}")
    if args.save_model:
        console.print(f"weights: {save_weights(result, run_dir / 'model.pt', splits.classes)}")
    if checkpoint is not None:
        checkpoint.path.unlink(missing_ok=True)  # the run is done: run.json and model.pt hold what it gives
    _cli.rebuild_reports(out, console)


if __name__ == "__main__":
    sys.exit(main())
