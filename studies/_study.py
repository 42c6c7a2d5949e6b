"""The study logic of ``studies.onecycle``, apart from its command line: search space and ladder of budgets,
sampler, objective and worker loop. Trial 0 of every study is the seed's configuration; a trial returns its last
epoch's validation accuracy at its rung's budget, and the test set is never seen by the sampler or the pruner."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from studies._ladder import Budget, Run, best_run, due_promotions
from studies._storage import mark_stale_trials

ARCHS = ("custom_resnet", "resnet18")
BATCH_SIZES = (128, 256, 512, 1024)
# Peak-LR ranges per optimizer (log-uniform). SGD's brackets the range test's smooth descent (with the 0.125
# logit scale) up to its divergence; Adam's the seed projects' LR finder results.
LR_RANGES = {"sgd": (0.02, 2.0), "adam": (1e-4, 3e-2), "adamw": (1e-4, 3e-2)}
SEED_CONFIG = {"optimizer": "adam", "batch_size": 512}


def study_spec(args, budget: Budget, arch: str) -> dict:
    """What defines a study; a stored study with another spec is refused rather than mixed."""
    spec = {
        "arch": arch,
        "search_space": {"optimizer": list(LR_RANGES), "max_lr": {k: list(v) for k, v in LR_RANGES.items()},
                         "batch_size": list(BATCH_SIZES)},
        "budget": asdict(budget),
        "fixed": {"weight_decay": args.weight_decay, "pct_start": args.pct_start,
                  "label_smoothing": args.label_smoothing, "seed": args.seed, "recipe": recipe_defaults()},
    }
    return json.loads(json.dumps(spec))  # as the storage gives it back: lists, not tuples


# TrainConfig fields that every trial takes from the defaults: a study stores them, so that a later change of the
# default recipe refuses to top up an older study rather than mixing trials of two recipes in one ranking.
RECIPE_FIELDS = ("momentum", "cycle_momentum", "div_factor", "final_div_factor", "anneal_strategy", "logit_scale",
                 "cutout", "cutout_p", "ema", "whiten", "bn_scale", "bias_lr_scale",
                 "activation", "ghost_batch", "alternate_flip", "crop_pad")


def recipe_defaults() -> dict:
    from cifarlab.config import TrainConfig

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
    """The study's sampler: trial 0 gets the seed configuration stored on the study, every later trial the sampler
    ``make_base(s)`` seeded from (``seed``, its number): one process's study is reproducible, and machines running
    the same command draw different configurations (trial numbers come from the storage). It samples for the
    lowest rung only (promotions are enqueued with their parameters) and learns from that rung's trials alone: a
    copy of them in memory stands for the study, so a promoted run's larger score never reads as a sample's."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    class SeedFirstSampler(optuna.samplers.BaseSampler):
        def __init__(self):
            self._number: int | None = None
            self._base = make_base(seed)
            self._view, self._view_key = None, None

        def _lowest_rung(self, study):
            key = tuple(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                   TrialState.PRUNED)))
            if key != self._view_key:  # a new copy only when a trial has finished
                self._view, self._view_key = lowest_rung_copy(study, (TrialState.COMPLETE, TrialState.PRUNED)), key
            return self._view

        def _for(self, trial):
            if trial.number != self._number:
                state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
                self._number, self._base = trial.number, make_base(int(state))
            return self._base

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(self._lowest_rung(study), trial)

        def sample_relative(self, study, trial, search_space):
            if trial.number == 0:
                return {}
            return self._for(trial).sample_relative(self._lowest_rung(study), trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            first = study.user_attrs.get("seed_trial") if trial.number == 0 else None
            if first is not None and param_name in first:
                return first[param_name]
            return self._for(trial).sample_independent(self._lowest_rung(study), trial, param_name,
                                                       param_distribution)

        def before_trial(self, study, trial):
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self._for(trial).after_trial(study, trial, state, values)

        def reseed_rng(self):
            self._base.reseed_rng()

    return SeedFirstSampler()


def lowest_rung_copy(study, states):
    """An in-memory study holding ``study``'s lowest-rung trials in ``states``: every configuration at one budget."""
    import optuna

    copy = optuna.create_study(direction="maximize")
    copy.add_trials([t for t in study.get_trials(deepcopy=False, states=states) if t.user_attrs.get("rung", 0) == 0])
    return copy


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


def load_study(storage, name: str, args, spec: dict, *, create: bool):
    import optuna

    from cifarlab.errors import ConfigError

    # No constant liar: the sampler sees a copy of the lowest rung's finished trials, in which it cannot write its lie
    # into the running trial; the workers' seeds, drawn from their trial numbers, keep their samples apart.
    sampler = seed_first_sampler(args.seed, lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=8,
                                                                                  constant_liar=False))
    pruner = make_pruner(args.pruner, spec["budget"]["rungs"][0]["epochs"], args.pct_start)
    if create:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        stored = study.user_attrs.get("spec")
        if stored is None:
            study.set_user_attr("spec", spec)
        elif stored != spec:
            missing = sorted(set(spec["fixed"]["recipe"]) - set(stored.get("fixed", {}).get("recipe", {})))
            if missing:
                raise ConfigError(f"study {name!r} was stored by an earlier cifarlab, before {', '.join(missing)} "
                                  "existed; pick a new --study-name")
            diff = _spec_differences(stored, spec)
            raise ConfigError(f"study {name!r} exists with another {' and '.join(diff)}; "
                              "rerun with its original flags or pick a new --study-name")
        return study
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def counts(study) -> dict[str, int]:
    """Trials by state, ``finished`` (complete or pruned), and ``rung N`` (finished at rung N)."""
    from optuna.trial import TrialState

    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            key = f"rung {t.user_attrs.get('rung', 0)}"
            out[key] = out.get(key, 0) + 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def ladder_runs(study) -> list[Run]:
    """The study's trials as the ladder sees them."""
    return [Run(t.number, t.user_attrs.get("rung", 0), t.state.name.lower(), t.value, t.user_attrs.get("promoted_from"))
            for t in study.get_trials(deepcopy=False)]


def best_trial(study):
    """The best trial at the highest rung reached, or None before one completes."""
    best = best_run(ladder_runs(study))
    return None if best is None else next(t for t in study.get_trials(deepcopy=False) if t.number == best.number)


RUNG_ATTRS = ("rung", "budget", "promoted_from", "seed_config")


def promote(study, budget: Budget) -> tuple[int, int] | None:
    """Enqueue the first promotion due (highest rung first): the configuration of a trial in the top 1/eta of its
    rung, to be trained again from scratch at the next rung's budget. Returns (trial, rung) or None."""
    due = due_promotions(ladder_runs(study), len(budget.rungs), budget.eta)
    if not due:
        return None
    number, rung = due[0]
    source = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    study.enqueue_trial(source.params, user_attrs={"rung": rung, "budget": budget.rungs[rung].budget,
                                                   "promoted_from": number,
                                                   "seed_config": bool(source.user_attrs.get("seed_config"))},
                        skip_if_exists=False)
    return number, rung


def seed_max_lr(args, arch: str, splits, budget: Budget, out: Path, console) -> tuple[float, str]:
    """--seed-max-lr, else the newest stored Adam range test for ``arch``, else a short range test now, on the
    study's own training split."""
    import json

    from cifarlab.timing import resolve_device
    from studies._workers import in_child

    if args.seed_max_lr is not None:
        return args.seed_max_lr, "--seed-max-lr"
    for path in sorted((out / "lrfind").glob(f"*-{arch}*/lrfind.json"), reverse=True):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("optimizer") == "adam" and doc.get("suggestions", {}).get("steepest"):
            return float(doc["suggestions"]["steepest"]), f"LR range test {path.parent.name}"
    console.print(f"{arch}: no stored Adam LR range test; running a {budget.lrfind_steps}-step one for the seed trial")
    # On a GPU in a child process: the parent then holds no CUDA context (and its memory) while its workers train.
    on_gpu = resolve_device(args.device).type == "cuda"
    lr, run_name, seconds = (in_child if on_gpu else _here)(seed_range_test, args, arch, splits, budget, out)
    console.print(f"{arch}: LR range test done in {seconds:.0f} s")
    return lr, f"LR range test {run_name}"


def _here(fn, *args):
    return fn(*args)


def seed_range_test(args, arch: str, splits, budget: Budget, out: Path) -> tuple[float, str, float]:
    """A short Adam LR range test on the study's training split, stored under ``out``/lrfind: the max LR it
    suggests, the record's name, and its seconds."""
    from cifarlab.config import TrainConfig
    from cifarlab.errors import ConfigError
    from cifarlab.lr_finder import run_range_test
    from cifarlab.report.records import write_lrfind_record
    from cifarlab.timing import environment, resolve_device

    config = TrainConfig(arch=arch, optimizer="adam", batch_size=min(512, len(splits.train_labels)), ema=0,
                         max_lr=1e-5, label_smoothing=0.0, logit_scale=0.125, precision=args.precision,
                         device=args.device, seed=args.seed)
    started = time.perf_counter()
    try:
        result, precision = run_range_test(config, splits, start_lr=1e-5, end_lr=1.0, steps=budget.lrfind_steps)
    except (RuntimeError, ValueError) as exc:  # torch's own errors run to paragraphs: their first line says it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"the LR range test for the seed trial of {arch} failed ({first}); pass --seed-max-lr") \
            from None
    lr = result.suggestions.get("steepest") or result.suggestions.get("min_div_10")
    if lr is None:
        raise ConfigError(f"the LR range test for the seed trial of {arch} diverged before it could suggest a max LR; "
                          "pass --seed-max-lr")
    doc = {"kind": "lrfind", "arch": arch, "optimizer": "adam", "batch_size": config.batch_size,
           "weight_decay": config.weight_decay, "logit_scale": config.logit_scale, "precision": precision,
           "data": splits.describe(), "environment": environment(resolve_device(args.device))}
    run_dir = write_lrfind_record(out, doc, result)
    return float(lr), run_dir.name, time.perf_counter() - started


def run_worker(study, storage, objective, target: int, budget: Budget, *, heartbeat: int, on_trial_done=None,
               deadline: float | None = None) -> bool:
    """Run trials until the ladder is done: ``target`` finished at the lowest rung and every promotion due run
    (promotions first, then waiting retries, then new configurations; trials running elsewhere count while they
    run). Never start one past the ladder, nor after ``deadline`` (``time.time()``). Returns whether the deadline
    stopped it."""
    from optuna.trial import TrialState

    while True:
        mark_stale_trials(study, storage)
        if deadline is not None and time.time() >= deadline:
            return True
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and promote(study, budget) is None:
            c = counts(study)
            lowest = c.get("rung 0", 0) + sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                              if t.user_attrs.get("rung", 0) == 0)
            if lowest >= target:
                if c["running"] == 0:
                    return False
                time.sleep(min(heartbeat, 5))  # running trials may earn promotions, or go stale and be retried
                continue
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=True,
                       callbacks=[on_trial_done] if on_trial_done else None)


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
