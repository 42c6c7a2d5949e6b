"""Optuna study of the one-cycle recipe: ``python -m studies.onecycle --trials 30``. The command line; the study
itself is ``studies._study``. The same command again tops each study up to ``--trials``, never overshooting."""

from __future__ import annotations

import sys
import time

from studies import _cli
from studies._final import final_retrain
from studies._ladder import PRESETS, budget_name, expected_trials, resolve_budget, val_size
from studies._storage import default_url, mask_url, open_storage, scrub
from studies._study import (
    ARCHS,
    best_trial,
    counts,
    left_text,
    load_study,
    run_worker,
    seed_max_lr,
    share_of_time,
    study_spec,
    time_left,
)
from studies._study import LR_RANGES as LR_RANGES
from studies._study import SEED_CONFIG as SEED_CONFIG
from studies._trial import make_objective
from studies._workers import spawn_workers, strip_flags

PROG = "python -m studies.onecycle"

# What the --final-* flags mean when not given; they parse to None, so that one given without --final is told
FINAL_DEFAULTS = {"final_holdout": False, "final_epochs": None, "final_seeds": 1}  # epochs None: the top rung's
FINAL_FLAGS = [f"--{k.replace('_', '-')}" for k in FINAL_DEFAULTS]


def build_parser():
    from cifarlab.config import COMPILE_MODES, TrainConfig

    d = TrainConfig()
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=_cli.positive_int, default=30,
                   help="configurations sampled at the lowest rung per architecture, finished (complete or pruned); "
                        "promotions to the rungs above come on top (default: 30)")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated architectures (default: both)")
    p.add_argument("--budget", default="auto", choices=(*PRESETS, "auto"),
                   help="ladder of budgets: smoke, quick (sized for a CPU) or full (the default recipe's 10 epochs on "
                        "the whole training split on top); auto: full on CUDA, quick on CPU (default: auto)")
    p.add_argument("--epochs", type=_cli.positive_int, default=None,
                   help="epochs of the top rung (overrides the budget's)")
    p.add_argument("--train-subset", type=_cli.count_or_fraction, default=None,
                   help="training images of the top rung: a count or a fraction (overrides the budget's)")
    p.add_argument("--rungs", type=_cli.positive_int, default=None,
                   help="rungs of the ladder, the top one included; 1: every trial at the top budget "
                        "(default: the budget's, 3)")
    p.add_argument("--eta", type=_cli.positive_float, default=3.0,
                   help="factor between adjacent rungs' budgets (epochs x images); the top 1/eta of a rung's "
                        "configurations are promoted (default: 3)")
    p.add_argument("--val-size", type=_cli.count_or_fraction, default=None,
                   help="validation hold-out: a count or a fraction (default: from the budget)")
    p.add_argument("--weight-decay", type=_cli.finite_float, default=d.weight_decay,
                   help="weight decay of every trial (default: %(default)s)")
    p.add_argument("--pct-start", type=_cli.finite_float, default=d.pct_start,
                   help="share of each trial's steps spent rising to the max LR (default: %(default)s)")
    p.add_argument("--label-smoothing", type=_cli.finite_float, default=d.label_smoothing,
                   help="label smoothing of every trial (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp32"),
                   help="auto: the stored bench.devices --choose result, else bf16 where the device runs it fast")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler and of every trial (default: 0)")
    p.add_argument("--seed-max-lr", type=_cli.positive_float, default=None,
                   help="max LR of the seed trial (default: the newest stored Adam LR range test, else run one)")
    p.add_argument("--pruner", default="none", choices=("none", "median", "hyperband"),
                   help="also prune weak trials within a rung once the LR peak has passed (default: none: a one-cycle "
                        "run's intermediate epochs are not the results of shorter runs)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user:pw@host/db for several machines "
                        "(default: sqlite file <out>/studies/studies.db)")
    p.add_argument("--study-name", default="onecycle", help="study name prefix; studies are <name>-<arch>")
    p.add_argument("--timeout", type=_cli.duration, default=None,
                   help="stop starting trials after this long (90m, 2h, 1h30m; a number is seconds), shared among "
                        "the architectures still to run; a running trial finishes, and the same command tops up")
    p.add_argument("--deadline", type=float, default=None, help=_cli.argparse.SUPPRESS)  # a worker's, time.time()
    p.add_argument("--workers", type=_cli.positive_int, default=1,
                   help="worker processes on this machine sharing each study (default: 1)")
    p.add_argument("--workers-per-gpu", type=_cli.positive_int_or_auto, default=None, metavar="K|auto",
                   help="K worker processes on each visible GPU instead of --workers: a small trial leaves a GPU "
                        "mostly idle; each worker sees one device of the CUDA_VISIBLE_DEVICES the command was given. "
                        "auto: K from a few profiled steps of the top rung (the GPU's busy share and memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each trial's model: a worker compiles once per batch size and reuses the graph")
    p.add_argument("--compile-mode", default=d.compile_mode, choices=COMPILE_MODES,
                   help="with --compile; reduce-overhead adds CUDA graphs (default: %(default)s)")
    p.add_argument("--final", action="store_true",
                   help="retrain each architecture's best configuration and the seed's on every training image; "
                        "test accuracy of both and their difference")
    p.add_argument("--final-holdout", action=_cli.argparse.BooleanOptionalAction, default=None,
                   help="keep the study's validation split out of the --final retrains, so that their per-epoch "
                        "validation accuracy compares with the trials' (default: train on all of it, as published "
                        "test figures do)")
    p.add_argument("--final-epochs", type=_cli.positive_int, default=None,
                   help="epochs of --final runs (default: the top rung's)")
    p.add_argument("--final-seeds", type=_cli.positive_int, default=None,
                   help=f"--final runs of each of the two configurations (default: {FINAL_DEFAULTS['final_seeds']})")
    p.add_argument("--heartbeat", type=_cli.positive_int, default=15,
                   help="seconds between trial heartbeats; a trial silent for 3x this is failed and retried "
                        "(default: %(default)s)")
    p.add_argument("--worker-index", type=int, default=None, help=_cli.argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--no-report", action="store_true", help="do not redraw the HTML reports at the end")
    _cli.add_out_argument(p)
    p.add_argument("--data", default=None, help="data source, as for studies.train (default: $CIFARLAB_DATA)")
    p.add_argument("--cache-dir", default=None, help="decoded-array cache folder")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    return _cli.run(parser, lambda args: _main(args, raw), argv)


def _main(args, raw_argv: list[str]) -> int:
    import optuna

    from cifarlab.errors import ConfigError
    from cifarlab.report.records import check_writable
    from cifarlab.timing import resolve_device

    started = time.time()
    console = _cli.console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = _cli.parse_archs(args.arch)
    device = resolve_device(args.device)
    _check(args)
    name = budget_name(args, device)
    out = check_writable(args.out)
    url = args.storage or default_url(out)
    try:
        storage = open_storage(url, heartbeat_interval=args.heartbeat)
    except ConfigError as exc:
        raise ConfigError(scrub(str(exc), url)) from None
    is_worker = args.worker_index is not None

    splits = _load(args, name)
    budget, capped = resolve_budget(args, name, len(splits.train_labels), len(splits.val_labels))
    if not is_worker:
        console.print(f"budget: {name}{' (auto: ' + device.type + ')' if args.budget == 'auto' else ''} — rungs "
                      f"{budget.describe()} training images (η {budget.eta:g}), validation {budget.val_size:,}; "
                      f"storage {mask_url(url)}")
        if capped:
            console.print(f"note: {capped}")

    deadline = args.deadline if is_worker else (started + args.timeout if args.timeout else None)
    for i, arch in enumerate(archs):
        name = f"{args.study_name}-{arch}"
        spec = study_spec(args, budget, arch)
        study = load_study(storage, name, args, spec, create=not is_worker)
        arch_deadline = deadline if is_worker else share_of_time(deadline, len(archs) - i)
        prepared = time.time()
        if not is_worker:
            _prepare(study, args, arch, splits, budget, out, console)
        prepared = time.time() - prepared
        if (args.workers > 1 or args.workers_per_gpu) and not is_worker:
            spawn_workers(args, worker_argv, raw_argv, arch, splits, budget, console, arch_deadline)
            timed_out = arch_deadline is not None and time.time() >= arch_deadline
        else:
            timed_out = _run_here(study, storage, arch, splits, budget, args, console, quiet=args.quiet or is_worker,
                                  storage_url=url, deadline=arch_deadline)
        finished = counts(study).get("rung 0", 0)
        if timed_out and not is_worker and finished < args.trials:
            setup = f"; setting up the seed trial took {prepared:.0f} s of it" if prepared >= 1 else ""
            console.print(f"{arch}: --timeout: no trial starts after {_clock(arch_deadline)}{setup}; {finished} of "
                          f"{args.trials} trials finished at rung 0 (the same command tops the study up)")
    if is_worker:
        return 0
    for arch in archs:
        study = load_study(storage, f"{args.study_name}-{arch}", args, study_spec(args, budget, arch), create=False)
        _summary(study, arch, budget, args.trials, console)
    if args.final:
        final_retrain(args, archs, storage, budget, out, console)
    console.print(f"storage: {mask_url(url)} (optuna studies --storage {mask_url(url)}; a live view: "
                  f"optuna-dashboard {mask_url(url)})", soft_wrap=True)
    if not args.no_report:
        _cli.rebuild_reports(out, console, url)
    return 0


def _check(args) -> None:
    """Refuse fixed hyperparameters out of range and --final-* flags without --final; fill in the latter."""
    from cifarlab.errors import ConfigError

    if not 0 < args.pct_start < 1:
        raise ConfigError(f"--pct-start must lie in (0, 1), got {args.pct_start}")
    if not 0 <= args.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must lie in [0, 1), got {args.label_smoothing}")
    if args.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode} takes effect only with --compile; add --compile, or "
                          "leave --compile-mode out")
    if not args.study_name.strip():
        raise ConfigError("--study-name must not be empty")
    _cli.flags_of_a_mode(args, FINAL_DEFAULTS, args.final, "the --final retrains", "--final to run them")


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def _load(args, name: str):
    """The study's splits: its validation split fixed for every rung (a fifth of the training images at most, unless
    --val-size says), the rest the training images the rungs take their subsets from."""
    from cifarlab.data import load_raw, load_splits

    total = len(load_raw(args.data, cache_dir=args.cache_dir).train_labels)
    return load_splits(args.data, val_size=val_size(args, name, total), seed=args.seed, cache_dir=args.cache_dir)


def _prepare(study, args, arch, splits, budget, out, console) -> None:
    """Store the seed configuration on a new study; its sampler gives it to trial 0."""
    if "seed_trial" in study.user_attrs:
        return
    lr, source = seed_max_lr(args, arch, splits, budget, out, console)
    lo, hi = LR_RANGES["adam"]
    clipped = min(max(lr, lo), hi)
    study.set_user_attr("seed_trial", {**SEED_CONFIG, "max_lr": clipped, "max_lr_found": lr, "source": source})
    console.print(f"{arch}: seed trial (trial 0): adam, batch 512, max LR {clipped:.3g} (from {source})")


def _run_here(study, storage, arch, splits, budget, args, console, *, quiet: bool, storage_url: str,
              deadline: float | None = None) -> bool:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class TimeLeftColumn(ProgressColumn):
        """Counts down to the estimate made when the last trial finished."""

        def render(self, task) -> Text:
            end = task.fields.get("end")
            if end is None:
                return Text("")
            return Text(left_text(max(0.0, end - time.monotonic()), task.fields["by_deadline"]),
                        style="progress.remaining")

    target, total = args.trials, expected_trials(args.trials, budget)
    progress = Progress(TextColumn(f"{arch}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[best]}  {task.fields[current]}"), TimeElapsedColumn(),
                        TimeLeftColumn(), console=console, disable=quiet)
    started, finished_before = time.monotonic(), counts(study)["finished"]
    task = progress.add_task(arch, total=total, completed=min(finished_before, total),
                             best=_best_text(study), current="", end=None, by_deadline=False)
    redrawn = [time.monotonic() + LIVE_PAGE_EVERY]  # when the pages may be drawn next

    def on_epoch(number, rung, epoch, epochs, val):
        progress.update(task, current=f"trial {number} (rung {rung}): epoch {epoch}/{epochs}, val {val:.1%}")

    def on_done(study_, trial_):
        c, now = counts(study_), time.monotonic()
        finished = c["finished"]
        # ASHA promotes every trial that enters its rung's top third: the ladder may grow past its expected size
        expected = max(total, finished + c["running"] + c["waiting"])
        left = time_left(now - started, finished - finished_before, expected - finished,
                         None if deadline is None else deadline - time.time())
        progress.update(task, total=expected, completed=min(finished, expected), best=_best_text(study_),
                        end=None if left is None else now + left[0], by_deadline=left is not None and left[1])
        if not args.no_report and now >= redrawn[0]:  # a live page for a user browsing reports/
            _cli.rebuild_reports(args.out, None, storage_url)
            # at most every 30 s, and drawing for no more than a twentieth of the time: on 2 cores a page's
            # figures take seconds that the trials would otherwise have
            drawing = time.monotonic() - now
            redrawn[0] = time.monotonic() + max(LIVE_PAGE_EVERY, (1 / LIVE_PAGE_SHARE - 1) * drawing)
        state = trial_.state.name.lower()
        value = f" val {trial_.value:.2%}" if trial_.value is not None else ""
        reason = trial_.user_attrs.get("pruned_reason") or trial_.user_attrs.get("fail_reason") or ""
        p = trial_.params
        rung = trial_.user_attrs.get("rung", 0)
        origin = f", promoted from trial {trial_.user_attrs['promoted_from']}" if rung else ""
        progress.console.print(
            f"{arch} trial {trial_.number} (rung {rung}{origin}): {state}{value} — {p.get('optimizer')}, "
            f"max LR {p.get('max_lr', 0):.3g}, batch {p.get('batch_size')}{' — ' + reason if reason else ''}")

    objective = make_objective(arch, splits, budget, args, progress_cb=on_epoch, target=target)
    with progress:
        return run_worker(study, storage, objective, target, budget, heartbeat=args.heartbeat, on_trial_done=on_done,
                          deadline=deadline)


LIVE_PAGE_EVERY = 30.0  # seconds between redraws of the study's page while it runs, at least
LIVE_PAGE_SHARE = 0.05  # of the study's time, at most


def _best_text(study) -> str:
    best = best_trial(study)
    return "best —" if best is None else f"best {best.value:.2%} (rung {best.user_attrs.get('rung', 0)})"


def worker_argv(raw_argv: list[str], arch: str, index: int, deadline: float | None) -> list[str]:
    """A worker's flags: the command's, for one architecture, with the architecture's deadline in place of
    ``--timeout`` (each worker would otherwise start the clock again)."""
    argv = strip_flags(raw_argv, {"--workers", "--workers-per-gpu", "--arch", "--final", "--worker-index",
                                  "--timeout", "--deadline", *FINAL_FLAGS, "--no-final-holdout"})
    argv += ["--arch", arch, "--workers", "1", "--worker-index", str(index)]
    return argv + (["--deadline", repr(deadline)] if deadline is not None else [])


def _summary(study, arch, budget, target: int, console) -> None:
    """Trials per rung, the best at the highest rung reached against the seed's configuration there, and how far
    each rung's ranking held at the next; every score with its standard error on the validation split."""
    import pandas as pd
    from rich.table import Table

    from cifarlab.config import train_argv
    from cifarlab.report.study import study_throughput, throughput_sentence
    from studies._ladder import fidelity, rung_pairs, standard_error, tied_with_best
    from studies._reports import study_record

    c = counts(study)
    record = study_record(study, importance=False)
    trials, n_val = record["trials"], budget.val_size
    promoted = sum(c.get(f"rung {k}", 0) for k in range(1, len(budget.rungs)))
    # The counts go on a line of their own: as the table's title, rich wrapped them to the table's width.
    console.print(f"{study.study_name}: {c['finished']} finished ({c['complete']} complete, {c['pruned']} pruned), "
                  f"{c['fail']} failed; {c.get('rung 0', 0)} of {target} configurations at rung 0, "
                  f"{promoted} promotions above it")
    table = Table()
    for col in ("rung", "budget", "finished", "best", "optimizer", "max LR", "batch", "val accuracy ± SE",
                "tied with it"):
        table.add_column(col, justify="right")
    for rung in budget.rungs:
        done = [t for t in trials if t["state"] == "complete" and t["user_attrs"].get("rung", 0) == rung.index]
        best = max(done, key=lambda t: t["value"], default=None)
        # within two standard errors of the rung's best: the validation split cannot rank them apart
        tied = None if best is None else int(tied_with_best(pd.Series([t["value"] for t in done]), n_val).sum()) - 1
        cells = ["—"] * 6 if best is None else [
            f"#{best['number']}", best["params"]["optimizer"], f"{best['params']['max_lr']:.3g}",
            str(best["params"]["batch_size"]), f"{best['value']:.2%} ± {standard_error(best['value'], n_val):.2%}",
            str(tied)]
        table.add_row(str(rung.index), f"{rung.epochs} ep × {rung.train_images:,}",
                      str(c.get(f"rung {rung.index}", 0)), *cells)
    console.print(table)
    rate = study_throughput(trials)
    if rate:
        console.print(throughput_sentence(rate), highlight=False)
    best = best_trial(study)
    if best is not None:
        rung = best.user_attrs.get("rung", 0)
        seed = next((t for t in trials if t["user_attrs"].get("seed_config") and t["state"] == "complete"
                     and t["user_attrs"].get("rung", 0) == rung), None)
        versus = (f"; the seed's configuration there: {seed['value']:.2%} (trial {seed['number']})" if seed
                  else "; the seed's configuration was not promoted to it")
        console.print(f"best at the highest rung reached (rung {rung}): trial {best.number}, {best.value:.2%} ± "
                      f"{standard_error(best.value, n_val):.2%}{versus}", highlight=False)
    for row in fidelity(rung_pairs(trials)):
        console.print(row["sentence"], highlight=False)
    if best is not None and best.user_attrs.get("config"):
        console.print("the best as one run (--epochs for a longer one): python -m studies.train "
                      + " ".join(train_argv(best.user_attrs["config"])), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
