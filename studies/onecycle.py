"""Optuna study of the one-cycle recipe: ``python -m studies.onecycle --trials 30``.

For each architecture (one study each, ``<study-name>-<arch>``, side by side in one storage) it sweeps the
optimizer (sgd, adam, adamw), the peak learning rate on a log scale over a range that depends on the optimizer,
and the batch size (128 to 1024). The seed's own configuration (Adam, batch 512, max LR from the LR range test)
is the first trial of every study. Each trial trains with ``fit()`` and returns its last epoch's validation
accuracy; the test set is never seen by the sampler or the pruner. Running the same command again tops each
study up to ``--trials`` finished (complete or pruned) trials; it never starts over and never overshoots.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from studies import _cli
from studies._storage import default_url, mark_stale_trials, mask_url, open_storage, scrub

PROG = "python -m studies.onecycle"
ARCHS = ("custom_resnet", "resnet18")
BATCH_SIZES = (128, 256, 512, 1024)
# Peak-LR ranges per optimizer (log-uniform). SGD's brackets the range test's smooth descent (with the 0.125
# logit scale) up to its divergence; Adam's the seed projects' LR finder results.
LR_RANGES = {"sgd": (0.02, 2.0), "adam": (1e-4, 3e-2), "adamw": (1e-4, 3e-2)}
SEED_CONFIG = {"optimizer": "adam", "batch_size": 512}


@dataclass(frozen=True)
class Budget:
    name: str
    epochs: int
    train_subset: int | float | None  # None: the whole training split
    val_size: int | float
    lrfind_steps: int


BUDGETS = {
    # smoke: seconds per trial, for tests and a first look.
    "smoke": Budget("smoke", epochs=1, train_subset=256, val_size=256, lrfind_steps=8),
    # quick: sized for a 2-core CPU: 30 trials per architecture in about an hour for both.
    "quick": Budget("quick", epochs=3, train_subset=2048, val_size=1000, lrfind_steps=30),
    # full: the recipe's real length on the whole training split, for a GPU.
    "full": Budget("full", epochs=10, train_subset=None, val_size=5000, lrfind_steps=100),
}


# What the --final-* flags mean when not given; they parse to None, so that one given without --final is told
FINAL_DEFAULTS = {"final_holdout": False, "final_epochs": 24, "final_seeds": 1}
FINAL_FLAGS = [f"--{k.replace('_', '-')}" for k in FINAL_DEFAULTS]


def build_parser():
    from cifarlab.train import TrainConfig

    d = TrainConfig()
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=_cli.positive_int, default=30,
                   help="finished (complete or pruned) trials per architecture (default: 30)")
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated architectures (default: both)")
    p.add_argument("--budget", default="auto", choices=(*BUDGETS, "auto"),
                   help="trial cost preset; auto: full on CUDA, quick on CPU (default: auto)")
    p.add_argument("--epochs", type=_cli.positive_int, default=None, help="epochs per trial (overrides the budget)")
    p.add_argument("--train-subset", type=_cli.count_or_fraction, default=None,
                   help="training images per trial: a count or a fraction (overrides the budget)")
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
    p.add_argument("--pruner", default="median", choices=("none", "median", "hyperband"),
                   help="prune weak trials once the LR peak has passed (default: median)")
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
    p.add_argument("--final", action="store_true",
                   help="retrain each architecture's best configuration on every training image; test accuracy")
    p.add_argument("--final-holdout", action=_cli.argparse.BooleanOptionalAction, default=None,
                   help="keep the study's validation split out of the --final retrains, so that their per-epoch "
                        "validation accuracy compares with the trials' (default: train on all of it, as published "
                        "test figures do)")
    p.add_argument("--final-epochs", type=_cli.positive_int, default=None,
                   help=f"epochs of --final runs (default: {FINAL_DEFAULTS['final_epochs']})")
    p.add_argument("--final-seeds", type=_cli.positive_int, default=None,
                   help=f"--final runs per architecture (default: {FINAL_DEFAULTS['final_seeds']})")
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


# ------------------------------------------------------------------------------------------------ set-up


def resolve_budget(args, device) -> Budget:
    name = args.budget
    if name == "auto":
        name = "full" if device.type == "cuda" else "quick"
    b = BUDGETS[name]
    return Budget(name, epochs=args.epochs or b.epochs,
                  train_subset=args.train_subset if args.train_subset is not None else b.train_subset,
                  val_size=args.val_size if args.val_size is not None else b.val_size,
                  lrfind_steps=b.lrfind_steps)


def parse_archs(text: str) -> list[str]:
    from cifarlab.errors import ConfigError
    from cifarlab.models import list_models

    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in list_models()]
    if bad or not archs:
        raise ConfigError(f"unknown architecture {', '.join(bad) or repr(text)}; valid: {', '.join(list_models())}")
    return list(dict.fromkeys(archs))


def study_spec(args, budget: Budget, arch: str) -> dict:
    """What defines a study; a stored study with another spec is refused rather than mixed."""
    return {
        "arch": arch,
        "search_space": {"optimizer": list(LR_RANGES), "max_lr": {k: list(v) for k, v in LR_RANGES.items()},
                         "batch_size": list(BATCH_SIZES)},
        "budget": asdict(budget),
        "fixed": {"weight_decay": args.weight_decay, "pct_start": args.pct_start,
                  "label_smoothing": args.label_smoothing, "seed": args.seed, "recipe": recipe_defaults()},
    }


# TrainConfig fields that every trial takes from the defaults: a study stores them, so that a later change of the
# default recipe refuses to top up an older study rather than mixing trials of two recipes in one ranking.
RECIPE_FIELDS = ("momentum", "cycle_momentum", "div_factor", "final_div_factor", "anneal_strategy", "logit_scale",
                 "cutout", "cutout_p", "ema", "whiten", "bn_scale", "bias_lr_scale",
                 "activation", "ghost_batch", "alternate_flip", "crop_pad")
# A study stored before a recipe field became a setting ran with its former value (cifarlab.train.FORMER_DEFAULTS),
# so it still tops up under the same recipe instead of being refused for a field that did not exist yet.


def recipe_defaults() -> dict:
    from cifarlab.train import TrainConfig

    d = TrainConfig()
    return {k: getattr(d, k) for k in RECIPE_FIELDS}


def make_pruner(kind: str, epochs: int, pct_start: float):
    """Pruning starts only once the one-cycle LR peak has passed: before it, every trial is still warming up."""
    import optuna

    peak_epoch = max(1, math.ceil(pct_start * epochs))
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=peak_epoch)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=peak_epoch, max_resource=max(epochs, peak_epoch),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def seed_first_sampler(seed: int, make_base):
    """The study's sampler: trial 0 gets the seed configuration stored on the study, every later trial the
    sampler ``make_base(s)`` seeded for that trial alone.

    Trial numbers come from the storage, so exactly one trial is number 0 however many workers and machines
    start at once: the seed configuration runs once, first, with no enqueue race. Seeding each trial from
    (``seed``, its number) rather than each process from ``seed`` keeps one process's study reproducible and
    gives processes that run the same command, as on several machines, different draws: with one seed per
    process, every machine drew the same configurations in the same order and half of a two-machine study
    repeated the other half.
    """
    import numpy as np
    import optuna

    class SeedFirstSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number: int | None = None
            self._base = make_base(seed)

        def _for(self, trial):
            if trial.number != self._number:
                state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
                self._number, self._base = trial.number, make_base(int(state))
            return self._base

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return {} if trial.number == 0 else self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            first = study.user_attrs.get("seed_trial") if trial.number == 0 else None
            if first is not None and param_name in first:
                return first[param_name]
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._for(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):
            self._base.reseed_rng()

    return SeedFirstSampler()


def _spec_differences(stored: dict, spec: dict) -> list[str]:
    """The settings that differ, one level deep: ``fixed recipe`` rather than just ``fixed``."""
    diff = []
    for key, value in spec.items():
        old = stored.get(key)
        if old == value:
            continue
        if isinstance(value, dict):
            old = old if isinstance(old, dict) else {}
            diff += [f"{key} {sub}" for sub in value if old.get(sub) != value[sub]]
        else:
            diff.append(key)
    return sorted(diff)


def _with_former_recipe(stored: dict) -> dict:
    from cifarlab.train import FORMER_DEFAULTS

    recipe = stored.get("fixed", {}).get("recipe")
    if not isinstance(recipe, dict):
        return stored
    return {**stored, "fixed": {**stored["fixed"], "recipe": {**FORMER_DEFAULTS, **recipe}}}


def load_study(storage, name: str, args, spec: dict, *, create: bool):
    import optuna

    from cifarlab.errors import ConfigError

    sampler = seed_first_sampler(args.seed, lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=8))
    pruner = make_pruner(args.pruner, spec["budget"]["epochs"], args.pct_start)
    if create:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        stored = study.user_attrs.get("spec")
        if stored is None:
            study.set_user_attr("spec", spec)
        elif (stored := _with_former_recipe(stored)) != spec:
            diff = _spec_differences(stored, spec)
            raise ConfigError(f"study {name!r} exists with another {' and '.join(diff)}; "
                              "rerun with its original flags or pick a new --study-name")
        return study
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def seed_max_lr(args, arch: str, splits, budget: Budget, out: Path, console) -> tuple[float, str]:
    """--seed-max-lr, else the newest stored Adam range test for ``arch``, else a short range test now."""
    import json

    if args.seed_max_lr is not None:
        return args.seed_max_lr, "--seed-max-lr"
    records = sorted((out / "lrfind").glob(f"*-{arch}*/lrfind.json"), reverse=True)
    for path in records:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("optimizer") == "adam" and doc.get("suggestions", {}).get("steepest"):
            return float(doc["suggestions"]["steepest"]), f"LR range test {path.parent.name}"
    console.print(f"{arch}: no stored Adam LR range test; running a {budget.lrfind_steps}-step one for the seed trial")
    from studies import lrfind

    argv = ["--arch", arch, "--optimizer", "adam", "--steps", str(budget.lrfind_steps), "--start-lr", "1e-5",
            "--end-lr", "1", "--batch-size", str(min(512, len(splits.train_labels))), "--out", str(out),
            "--val-size", str(budget.val_size), "--device", args.device, "--precision", args.precision]
    if args.data:
        argv += ["--data", args.data]
    if budget.train_subset is not None:
        argv += ["--train-subset", str(budget.train_subset)]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # its tables; progress: stderr
        code = lrfind.main(argv)
    console.print(f"{arch}: LR range test done in {time.perf_counter() - started:.0f} s")
    records = sorted((out / "lrfind").glob(f"*-{arch}*/lrfind.json"), reverse=True)
    if code != 0 or not records:
        raise RuntimeError(f"the LR range test for the seed trial of {arch} failed (exit {code})")
    doc = json.loads(records[0].read_text())
    lr = doc["suggestions"].get("steepest") or doc["suggestions"].get("min_div_10")
    return float(lr), f"LR range test {records[0].parent.name}"


# --------------------------------------------------------------------------------------------- objective


def surplus(trial, target: int) -> bool:
    """Whether the study already has ``target`` trials finished, or running and started before this one.

    Two workers can pass the loop's check at the same moment; the later trial then stands down, so the study
    never overshoots.
    """
    from optuna.trial import TrialState

    n = 0
    for t in trial.study.get_trials(deepcopy=False):
        finished = t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        if finished or (t.state == TrialState.RUNNING and t.number < trial.number):
            n += 1
    return n >= target


WORKER = f"{socket.gethostname()}:{os.getpid()}"


def make_objective(arch: str, splits, budget: Budget, args, progress_cb=None, target: int | None = None):
    import optuna
    import torch

    from cifarlab import faults
    from cifarlab.errors import TrainingDiverged
    from cifarlab.train import TrainConfig, fit

    def objective(trial: optuna.Trial) -> float:
        if target is not None and surplus(trial, target):
            trial.set_user_attr("fail_reason", f"not needed: the study already reached {target} trials")
            return float("nan")
        optimizer = trial.suggest_categorical("optimizer", list(LR_RANGES))
        lo, hi = LR_RANGES[optimizer]
        max_lr = trial.suggest_float("max_lr", lo, hi, log=True)
        batch_size = trial.suggest_categorical("batch_size", list(BATCH_SIZES))
        retry_of = trial.study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        if trial.number == 0 or retry_of == 0:
            trial.set_user_attr("seed_config", True)
        config = TrainConfig(arch=arch, epochs=budget.epochs, batch_size=batch_size, optimizer=optimizer,
                             max_lr=max_lr, weight_decay=args.weight_decay, pct_start=args.pct_start,
                             label_smoothing=args.label_smoothing, precision=args.precision, device=args.device,
                             seed=args.seed + trial.number)
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("train_images", len(splits.train_labels))
        trial.set_user_attr("worker", WORKER)  # host:pid, to tell machines and processes apart in a shared study
        records: list[dict] = []

        def on_epoch(rec) -> bool:
            records.append(rec.to_dict())
            trial.set_user_attr("epochs", records)  # stored every epoch: a pruned or killed trial keeps them
            faults.point("epoch")
            trial.report(rec.val_accuracy, rec.epoch)
            if progress_cb:
                progress_cb(trial.number, rec.epoch, budget.epochs, rec.val_accuracy)
            # A trial that ran its last epoch has its answer: pruning it then would only throw that away.
            return rec.epoch < budget.epochs and trial.should_prune()

        try:
            result = fit(config, splits, on_epoch=on_epoch)
        except TrainingDiverged as exc:
            trial.set_user_attr("pruned_reason", f"diverged: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); rerun the command to resume")
            trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            trial.set_user_attr("fail_reason", f"out of memory at batch size {batch_size}")
            return float("nan")  # Optuna records a FAIL; the study goes on
        epoch_seconds = [r["epoch_seconds"] for r in records]
        trial.set_user_attr("epoch_seconds", epoch_seconds)
        trial.set_user_attr("images_per_second", statistics.median(r["images_per_second"] for r in records))
        trial.set_user_attr("device", result.device)
        trial.set_user_attr("precision", result.precision)
        if result.stopped_early:
            trial.set_user_attr("pruned_reason", f"pruned after epoch {len(records)} by the {args.pruner} pruner "
                                                 f"(val accuracy {records[-1]['val_accuracy']:.3f})")
            raise optuna.TrialPruned()
        faults.point("store")
        return records[-1]["val_accuracy"]

    return objective


def run_worker(study, objective, target: int, *, heartbeat: int, on_trial_done=None,
               deadline: float | None = None) -> bool:
    """Run trials until the study holds ``target`` finished ones; never start one past it, nor after ``deadline``
    (``time.time()``; a running trial finishes). Returns whether the deadline stopped it short of the target.

    Running trials (this machine's other workers, other machines) count towards the target while they run;
    a trial whose worker died goes stale, is failed with a reason and re-enqueued, and the loop goes on.
    """
    while True:
        mark_stale_trials(study)
        c = counts(study)
        if c["finished"] >= target:
            return False
        if deadline is not None and time.time() >= deadline:
            return True
        if c["finished"] + c["running"] >= target:
            time.sleep(min(heartbeat, 5))  # others are finishing the last trials; wait for them or their staleness
            continue

        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True,
                       callbacks=[on_trial_done] if on_trial_done else None)


# ----------------------------------------------------------------------------------------------- running


def _main(args, raw_argv: list[str]) -> int:
    import optuna

    from cifarlab.errors import ConfigError
    from cifarlab.report.records import check_writable
    from cifarlab.timing import resolve_device

    started = time.time()
    console = _cli.console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = parse_archs(args.arch)
    device = resolve_device(args.device)
    if not 0 < args.pct_start < 1:
        raise ConfigError(f"--pct-start must lie in (0, 1), got {args.pct_start}")
    if not 0 <= args.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must lie in [0, 1), got {args.label_smoothing}")
    if args.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not args.study_name.strip():
        raise ConfigError("--study-name must not be empty")
    given = [flag for flag, k in zip(FINAL_FLAGS, FINAL_DEFAULTS) if getattr(args, k) is not None]
    if given and not args.final:
        raise ConfigError(f"{', '.join(given)} only {'shape' if len(given) > 1 else 'shapes'} the --final retrains; "
                          "add --final to run them, or leave the flag out")
    for k, v in FINAL_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    budget = resolve_budget(args, device)
    out = check_writable(args.out)
    url = args.storage or default_url(out)
    try:
        storage = open_storage(url, heartbeat_interval=args.heartbeat)
    except ConfigError as exc:
        raise ConfigError(scrub(str(exc), url)) from None
    is_worker = args.worker_index is not None

    if not is_worker:
        console.print(f"budget: {budget.name}{' (auto: ' + device.type + ')' if args.budget == 'auto' else ''} — "
                      f"{budget.epochs} epoch{'s' if budget.epochs != 1 else ''} on {budget.train_subset or 'all'} "
                      "training images, "
                      f"validation {budget.val_size}; storage {mask_url(url)}")
    splits = _load(args, budget)

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
        if args.workers > 1 and not is_worker:
            _spawn_workers(args, raw_argv, arch, study, console, arch_deadline)
            timed_out = arch_deadline is not None and time.time() >= arch_deadline
        else:
            timed_out = _run_here(study, arch, splits, budget, args, console, quiet=args.quiet or is_worker,
                                  deadline=arch_deadline)
        finished = counts(study)["finished"]
        if timed_out and not is_worker and finished < args.trials:
            setup = f"; setting up the seed trial took {prepared:.0f} s of it" if prepared >= 1 else ""
            console.print(f"{arch}: --timeout: no trial starts after {_clock(arch_deadline)}{setup}; {finished} of "
                          f"{args.trials} trials finished (the same command tops the study up)")
    if is_worker:
        return 0
    for arch in archs:
        study = load_study(storage, f"{args.study_name}-{arch}", args, study_spec(args, budget, arch), create=False)
        _summary(study, arch, console)
    if args.final:
        _final(args, archs, storage, budget, out, console)
    console.print(f"storage: {mask_url(url)} (optuna studies --storage {mask_url(url)})")
    if not args.no_report:
        _cli.rebuild_reports(out, console, url)
    return 0


def share_of_time(deadline: float | None, archs_left: int, now: float | None = None) -> float | None:
    """This architecture's deadline: the time left to the command's, shared evenly among the architectures still
    to run, so that the first cannot take it all; what one leaves unused goes to those after it."""
    if deadline is None:
        return None
    now = time.time() if now is None else now
    return now + max(0.0, deadline - now) / archs_left


def time_left(spent: float, finished_since: int, remaining: int,
              until_deadline: float | None = None) -> tuple[float, bool] | None:
    """Seconds until the study holds its trials, at the rate it finished them since this process began (other
    workers' and machines' trials included), or until the ``--timeout`` deadline if that is sooner; and whether
    the deadline is what it is. None before a trial has finished."""
    if remaining <= 0 or finished_since <= 0 or spent <= 0:
        return None
    seconds = remaining * spent / finished_since
    if until_deadline is not None and until_deadline < seconds:
        return max(0.0, until_deadline), True
    return seconds, False


def left_text(seconds: float, by_deadline: bool = False) -> str:
    if seconds < 90:
        text = f"{seconds:.0f} s"
    elif seconds < 90 * 60:
        text = f"{seconds / 60:.0f} min"
    else:
        text = f"{seconds / 3600:.1f} h"
    return f"~{text} left{' (--timeout)' if by_deadline else ''}"


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def _load(args, budget: Budget):
    from cifarlab.data import load_splits

    splits = load_splits(args.data, val_size=budget.val_size, seed=args.seed, cache_dir=args.cache_dir)
    subset = budget.train_subset
    if args.train_subset is None and isinstance(subset, int) and subset > len(splits.train_labels):
        subset = None  # a preset's subset on a smaller data set: take it all (a user's count is checked)
    return splits.with_train_subset(subset, seed=args.seed)


def _prepare(study, args, arch, splits, budget, out, console) -> None:
    """Store the seed configuration on a new study; its sampler gives it to trial 0."""
    if "seed_trial" in study.user_attrs:
        return
    lr, source = seed_max_lr(args, arch, splits, budget, out, console)
    lo, hi = LR_RANGES["adam"]
    clipped = min(max(lr, lo), hi)
    study.set_user_attr("seed_trial", {**SEED_CONFIG, "max_lr": clipped, "max_lr_found": lr, "source": source})
    console.print(f"{arch}: seed trial (trial 0): adam, batch 512, max LR {clipped:.3g} (from {source})")


def _run_here(study, arch, splits, budget, args, console, *, quiet: bool, deadline: float | None = None) -> bool:
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

    target = args.trials
    progress = Progress(TextColumn(f"{arch}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[best]}  {task.fields[current]}"), TimeElapsedColumn(),
                        TimeLeftColumn(), console=console, disable=quiet)
    started, finished_before = time.monotonic(), counts(study)["finished"]
    task = progress.add_task(arch, total=target, completed=min(finished_before, target),
                             best=_best_text(study), current="", end=None, by_deadline=False)

    def on_epoch(number, epoch, epochs, val):
        progress.update(task, current=f"trial {number}: epoch {epoch}/{epochs}, val {val:.1%}")

    def on_done(study_, trial_):
        finished, now = counts(study_)["finished"], time.monotonic()
        left = time_left(now - started, finished - finished_before, target - finished,
                         None if deadline is None else deadline - time.time())
        progress.update(task, completed=min(finished, target), best=_best_text(study_),
                        end=None if left is None else now + left[0], by_deadline=left is not None and left[1])
        state = trial_.state.name.lower()
        value = f" val {trial_.value:.2%}" if trial_.value is not None else ""
        reason = trial_.user_attrs.get("pruned_reason") or trial_.user_attrs.get("fail_reason") or ""
        p = trial_.params
        progress.console.print(
            f"{arch} trial {trial_.number}: {state}{value} — {p.get('optimizer')}, max LR {p.get('max_lr', 0):.3g}, "
            f"batch {p.get('batch_size')}{' — ' + reason if reason else ''}")

    objective = make_objective(arch, splits, budget, args, progress_cb=on_epoch, target=target)
    with progress:
        return run_worker(study, objective, target, heartbeat=args.heartbeat, on_trial_done=on_done,
                          deadline=deadline)


def _best_text(study) -> str:
    try:
        return f"best {study.best_value:.2%}"
    except ValueError:
        return "best —"


def worker_argv(raw_argv: list[str], arch: str, index: int, deadline: float | None) -> list[str]:
    """A worker's flags: the command's, for one architecture, with the architecture's deadline in place of
    ``--timeout`` (each worker would otherwise start the clock again)."""
    argv = _strip_flags(raw_argv, {"--workers", "--arch", "--final", "--worker-index", "--timeout", "--deadline",
                                   *FINAL_FLAGS, "--no-final-holdout"})
    argv += ["--arch", arch, "--workers", "1", "--worker-index", str(index)]
    return argv + (["--deadline", repr(deadline)] if deadline is not None else [])


def _spawn_workers(args, raw_argv, arch, study, console, deadline: float | None = None) -> None:
    """K processes on this machine, one study; on several GPUs each worker sees only its own."""
    import torch

    from cifarlab.timing import threads_per_worker

    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    threads = threads_per_worker(args.workers)
    procs = []
    for i in range(args.workers):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        cmd = [sys.executable, "-m", "studies.onecycle", *worker_argv(raw_argv, arch, i, deadline)]
        procs.append(subprocess.Popen(cmd, env=env))
    console.print(f"{arch}: {args.workers} workers started ({threads} thread{'s' if threads != 1 else ''} each"
                  f"{', one GPU each' if gpus > 1 else ''})")
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {args.workers} workers failed (exit {bad}); rerun to resume")


def _strip_flags(argv: list[str], names: set[str]) -> list[str]:
    out, skip = [], False
    valueless = {"--final", "--quiet", "--no-report", "--final-holdout", "--no-final-holdout"}
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in names:
            skip = "=" not in tok and name not in valueless
            continue
        out.append(tok)
    return out


def _summary(study, arch, console) -> None:
    from rich.table import Table

    from cifarlab.train import train_argv

    c = counts(study)
    trials = study.get_trials(deepcopy=False)
    seed = next((t for t in trials if t.user_attrs.get("seed_config") and t.value is not None), None)
    # The counts go on a line of their own: as the table's title, rich wrapped them to the table's width.
    console.print(f"{study.study_name}: {c['finished']} finished ({c['complete']} complete, {c['pruned']} pruned), "
                  f"{c['fail']} failed")
    table = Table()
    for col in ("", "optimizer", "max LR", "batch", "val accuracy"):
        table.add_column(col, justify="right")
    best = None
    try:
        best = study.best_trial
        table.add_row("best", best.params["optimizer"], f"{best.params['max_lr']:.3g}",
                      str(best.params["batch_size"]), f"{best.value:.2%}")
    except ValueError:
        table.add_row("best", "—", "—", "—", "no complete trial")
    if seed is not None:
        table.add_row("seed", seed.params["optimizer"], f"{seed.params['max_lr']:.3g}", str(seed.params["batch_size"]),
                      f"{seed.value:.2%}")
    console.print(table)
    if best is not None and best.user_attrs.get("config"):
        console.print("the best as one run (--epochs for a longer one): python -m studies.train "
                      + " ".join(train_argv(best.user_attrs["config"])), highlight=False, soft_wrap=True)


# A final run saves a checkpoint at the end of the first step this many seconds after the last save.
FINAL_CHECKPOINT_EVERY = 60.0


def _final(args, archs, storage, budget, out, console) -> None:
    """Retrain each best configuration on every training image (no subset); test accuracy over seeds.

    The study's validation split joins the training images unless ``--final-holdout`` keeps it out (a tenth of
    the data on the full budget: 0.45 points of plain test accuracy in a pair of 10-epoch default runs). Each
    finished seed is stored on the study at once, with how many images it held out, and the seed in training
    keeps a checkpoint: the same command after a stop skips the finished seeds and resumes the interrupted one
    (hours on a CPU)."""
    from cifarlab.data import load_splits, resolve_count
    from cifarlab.errors import ConfigError
    from cifarlab.report.records import holding, new_record_dir, write_json
    from cifarlab.train import Checkpointing, TrainConfig, fit, load_checkpoint, save_weights
    from studies.train import resume_point, run_record

    # With --final-holdout the study's validation split stays out (same seed, same size); else all of it trains.
    splits = load_splits(args.data, val_size=budget.val_size if args.final_holdout else 0, seed=args.seed,
                         cache_dir=args.cache_dir)
    holdout = len(splits.val_labels)
    # Finals stored before --final-holdout existed held the study's validation split out.
    legacy_holdout = resolve_count(budget.val_size, len(splits.train_labels) + holdout, what="validation size")
    for arch in archs:
        study = load_study(storage, f"{args.study_name}-{arch}", args, study_spec(args, budget, arch), create=False)
        try:
            best = study.best_trial
        except ValueError:
            console.print(f"{arch}: no complete trial to retrain")
            continue
        stored = study.user_attrs.get("final") or {}
        same = (stored.get("params") == best.params and stored.get("epochs") == args.final_epochs
                and stored.get("holdout", legacy_holdout) == holdout)
        done = {r["seed"]: r for r in stored.get("runs", [])} if same else {}
        runs = []
        for k in range(args.final_seeds):
            config = TrainConfig(arch=arch, epochs=args.final_epochs, batch_size=best.params["batch_size"],
                                 optimizer=best.params["optimizer"], max_lr=best.params["max_lr"],
                                 weight_decay=args.weight_decay, pct_start=args.pct_start,
                                 label_smoothing=args.label_smoothing, precision=args.precision,
                                 device=args.device, seed=args.seed + 1000 + k)
            if config.seed in done:
                runs.append(done[config.seed])
                console.print(f"{arch} final seed {k + 1}/{args.final_seeds}: trained before, test "
                              f"{done[config.seed]['test_accuracy']:.2%} ({done[config.seed]['run']})", soft_wrap=True)
                continue
            pending = study.user_attrs.get("final_pending") or {}
            checkpoint = None
            if (pending.get("config") == config.to_dict() and pending.get("params") == best.params
                    and pending.get("holdout", legacy_holdout) == holdout
                    and Path(pending.get("run", ""), "checkpoint.pt").is_file()):
                run_dir = Path(pending["run"])
                try:
                    resume = load_checkpoint(run_dir / "checkpoint.pt")
                except ConfigError as exc:
                    console.print(f"{arch} final seed {k + 1}: not resumed, trained again ({exc})", soft_wrap=True)
                else:
                    checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY, resume=resume)
                    console.print(f"{arch} final seed {k + 1}/{args.final_seeds}: resuming {run_dir} "
                                  f"{resume_point(resume, args.final_epochs)[0]}", soft_wrap=True)
            if checkpoint is None:
                left = Path(pending.get("run", "-"))
                if left.is_dir() and not any(left.iterdir()):
                    left.rmdir()  # a seed stopped before its first checkpoint: nothing in its folder to keep
                run_dir = new_record_dir(out, "runs", f"{arch}-final")
                checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY)
                study.set_user_attr("final_pending", {"config": config.to_dict(), "params": best.params,
                                                      "holdout": holdout, "run": str(run_dir)})

            def on_epoch(rec, arch=arch, k=k) -> None:
                # A final run is hours on a CPU: one line per epoch shows it is alive and where it stands.
                val = f"val acc {rec.val_accuracy:.1%}" if holdout else f"train acc {rec.train_accuracy:.1%}"
                console.print(f"{arch} final seed {k + 1}/{args.final_seeds} epoch {rec.epoch}/{args.final_epochs}: "
                              f"train loss {rec.train_loss:.3f} | {val} | "
                              f"{rec.epoch_seconds:.0f} s, {rec.images_per_second:.0f} img/s")

            with holding(run_dir), _cli.stop_at_a_step(checkpoint):  # a second --final at once is refused
                result = fit(config, splits, on_epoch=on_epoch, test=True, test_tta=True, checkpoint=checkpoint)
            # fit's wall time counts the sessions before a resume too
            doc = run_record(result, splits, status="completed", train_subset=None, wall_seconds=result.wall_seconds)
            doc["study"] = {"name": study.study_name, "trial": best.number}
            write_json(run_dir / "run.json", doc)
            save_weights(result, run_dir / "model.pt", splits.classes)
            checkpoint.path.unlink(missing_ok=True)
            runs.append({"seed": config.seed, "test_accuracy": result.test.accuracy,
                         "test_accuracy_tta": result.test_tta.accuracy, "train_images": len(splits.train_labels),
                         "run": str(run_dir)})
            _store_final(study, args.final_epochs, best.params, runs, holdout)  # a stop in the next seed keeps it
            console.print(f"{arch} final seed {k + 1}/{args.final_seeds} (seed {config.seed}): test "
                          f"{result.test.accuracy:.2%} "
                          f"(flip TTA {result.test_tta.accuracy:.2%})")
        summary = _store_final(study, args.final_epochs, best.params, runs, holdout)
        console.print(f"{arch}: test accuracy {summary['mean']:.2%} ± {summary['std']:.2%} over {len(runs)} seed(s), "
                      f"trained on {len(splits.train_labels):,} images")


def _store_final(study, epochs: int, params: dict, runs: list[dict], holdout: int) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    summary = {"epochs": epochs, "params": params, "holdout": holdout, "runs": runs,
               "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    study.set_user_attr("final", summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())
