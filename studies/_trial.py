"""One trial of the study: its configuration at its rung's budget, trained by ``fit`` and scored by its last epoch's
validation accuracy; a duplicate start stands down, an out-of-memory one comes back once at a smaller batch, and a
Ctrl-C queues it again."""

from __future__ import annotations

import os
import socket
import statistics
import time
import warnings

from studies._ladder import Budget, warmup_share
from studies._study import BATCH_SIZES, LR_RANGES, RUNG_ATTRS


def stand_down(trial, rung: int, promoted_from: int | None, target: int | None, eta: float) -> str | None:
    """Why this trial is not needed, or None: two workers can pass the loop's checks at once, and the later trial
    then stands down. At the lowest rung: ``target`` trials are finished there, or running and started before this
    one. Above it: an older live trial runs the same promotion, or older ones hold the rung's share of promotions
    (1/eta of the rung below's complete trials)."""
    from optuna.trial import TrialState

    trials = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
    if promoted_from is not None:
        older = [t for t in trials if t.user_attrs.get("rung") == rung and t.user_attrs.get("promoted_from") is not None
                 and t.number < trial.number and t.state != TrialState.FAIL]
        if any(t.user_attrs["promoted_from"] == promoted_from for t in older):
            return f"not needed: trial {promoted_from}'s promotion to rung {rung} runs in an older trial"
        below = sum(1 for t in trials if t.user_attrs.get("rung", 0) == rung - 1 and t.state == TrialState.COMPLETE)
        if len(older) >= int(below // eta):
            return f"not needed: older trials hold rung {rung}'s {len(older)} promotions"
        return None
    if target is None:
        return None
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    n = sum(1 for t in trials if t.user_attrs.get("rung", 0) == 0 and (
        t.state in finished or (t.state == TrialState.RUNNING and t.number < trial.number)))
    return f"not needed: the study already reached {target} trials at rung 0" if n >= target else None


WORKER = f"{socket.gethostname()}:{os.getpid()}"


def make_objective(arch: str, splits, budget: Budget, args, progress_cb=None, target: int | None = None):
    import optuna

    from cifarlab import faults
    from cifarlab.errors import TrainingDiverged
    from cifarlab.keep import Kept, keeping
    from cifarlab.train import fit

    worker_cache = Kept()  # one per worker process: each trial of a rung reuses its subset, its device copy, its basis

    def objective(trial: optuna.Trial) -> float:
        rung, promoted_from = trial.user_attrs.get("rung", 0), trial.user_attrs.get("promoted_from")
        reason = stand_down(trial, rung, promoted_from, target, budget.eta)
        if reason:
            trial.set_user_attr("fail_reason", reason)
            return float("nan")
        step = budget.rungs[rung]
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("budget", step.budget)
        # Nested: a rung's subset holds the one below's. Kept, with what derives from it, for the worker's next trials.
        data = worker_cache.get("training subset", (splits, step.train_images, args.seed),
                                lambda: splits.with_train_subset(step.train_images, seed=args.seed))
        config = trial_config(trial, arch, step, len(data.train_labels), args)
        batch_size = config.batch_size
        records: list[dict] = []

        def on_epoch(rec) -> bool:
            records.append(rec.to_dict())
            trial.set_user_attr("epochs", records)  # stored every epoch: a pruned or killed trial keeps them
            faults.point("epoch")
            if rung:
                faults.point("promoted")
            trial.report(rec.val_accuracy, rec.epoch)
            if progress_cb:
                progress_cb(trial.number, rung, rec.epoch, step.epochs, rec.val_accuracy)
            # A trial that ran its last epoch has its answer: pruning it then would only throw that away.
            return rec.epoch < step.epochs and trial.should_prune()

        started, oom, built = time.perf_counter(), None, sum(worker_cache.built.values())
        try:
            with keeping(worker_cache):
                result = fit(config, data, on_epoch=on_epoch)
        except TrainingDiverged as exc:
            trial.set_user_attr("pruned_reason", f"diverged: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); rerun the command to resume")
            kept = {k: trial.user_attrs[k] for k in RUNG_ATTRS if k in trial.user_attrs}
            trial.study.enqueue_trial(trial.params, user_attrs={**kept, "retry_of": trial.number})
            raise
        except RuntimeError as exc:  # torch's OutOfMemoryError, or cuDNN's and cuBLAS's as plain RuntimeErrors
            if not out_of_memory(exc):
                raise
            oom = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if oom is not None:  # out of the handler: its traceback, which held the failed frames' tensors, is gone
            worker_cache.entries.clear()  # and what the worker kept for later trials: the retry builds what it needs
            return requeue_after_oom(trial, oom, batch_size)
        _store_timing(trial, records, result, time.perf_counter() - started)
        trial.set_user_attr("kept_built", sum(worker_cache.built.values()) - built)  # 0: the worker had all it needed
        if result.stopped_early:
            trial.set_user_attr("pruned_reason", f"pruned after epoch {len(records)} by the {args.pruner} pruner "
                                                 f"(val accuracy {records[-1]['val_accuracy']:.3f})")
            raise optuna.TrialPruned()
        faults.point("store")
        return records[-1]["val_accuracy"]

    return objective


def trial_config(trial, arch: str, step, train_images: int, args):
    """The trial's configuration: the sampled (or enqueued) optimizer, max LR and batch size at its rung's budget,
    the rest from the command line; stored on the trial."""
    import optuna

    from cifarlab.config import TrainConfig

    optimizer = trial.suggest_categorical("optimizer", list(LR_RANGES))
    lo, hi = LR_RANGES[optimizer]
    max_lr = trial.suggest_float("max_lr", lo, hi, log=True)
    batch_size = trial.suggest_categorical("batch_size", list(BATCH_SIZES))
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    with warnings.catch_warnings():  # heartbeats' retry has been "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_of = optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)
    if trial.number == 0 or retry_of == 0:
        trial.set_user_attr("seed_config", True)
    pct_start = warmup_share(args.pct_start, step.epochs * max(1, train_images // batch_size))
    config = TrainConfig(arch=arch, epochs=step.epochs, batch_size=batch_size, optimizer=optimizer, max_lr=max_lr,
                         weight_decay=args.weight_decay, pct_start=pct_start, label_smoothing=args.label_smoothing,
                         precision=args.precision, device=args.device, seed=args.seed + trial.number,
                         compile=args.compile, compile_mode=args.compile_mode)
    trial.set_user_attr("config", config.to_dict())
    trial.set_user_attr("train_images", train_images)
    trial.set_user_attr("worker", WORKER)  # host:pid, to tell machines and processes apart in a shared study
    return config


OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA_ERROR_OUT_OF_MEMORY")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory, whichever library raised it."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def requeue_after_oom(trial, reason: str, batch_size: int) -> float:
    """Fail an out-of-memory trial with its reason, free what it held, and queue its configuration once more: at the
    next smaller batch at the lowest rung (a new configuration), else (a promotion) as it is, for a later free slot.
    Returns NaN, which Optuna records as a FAIL; the study goes on."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trial.set_user_attr("fail_reason", f"out of memory at batch size {batch_size}: {reason}")
    if trial.user_attrs.get("oom_retry_of") is None:
        kept = {k: trial.user_attrs[k] for k in RUNG_ATTRS if k in trial.user_attrs}
        smaller = [b for b in BATCH_SIZES if b < batch_size]
        params = dict(trial.params)
        if not trial.user_attrs.get("rung") and smaller:
            params["batch_size"] = smaller[-1]
            kept.pop("seed_config", None)  # another batch: no longer the seed's configuration
        trial.study.enqueue_trial(params, user_attrs={**kept, "oom_retry_of": trial.number})
    return float("nan")


def _store_timing(trial, records: list[dict], result, seconds: float) -> None:
    """What a trial's time went to: training and evaluation in its epochs, the first step's compilation, and the
    rest: building the run (statistics, whitening basis, model, device copies: ``setup_seconds``), the data subset,
    storage; a worker pays it per trial unless it keeps what it built."""
    epochs = sum(r["epoch_seconds"] for r in records)
    trial.set_user_attr("epoch_seconds", [r["epoch_seconds"] for r in records])
    trial.set_user_attr("eval_seconds", sum(r["eval_seconds"] for r in records))
    trial.set_user_attr("compile_seconds", result.compile_seconds or 0.0)
    trial.set_user_attr("setup_seconds", result.setup_seconds)
    trial.set_user_attr("overhead_seconds", max(0.0, seconds - epochs))
    trial.set_user_attr("images_per_second", statistics.median(r["images_per_second"] for r in records))
    trial.set_user_attr("device", result.device)
    trial.set_user_attr("precision", result.precision)
