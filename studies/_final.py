"""``studies.onecycle --final``: retrain each study's best configuration on every training image and test it,
over seeds, resuming a stopped retrain from its checkpoint."""

from __future__ import annotations

import statistics
from pathlib import Path

from studies._study import Budget, load_study, study_spec

# A final run saves a checkpoint at the end of the first step this many seconds after the last save.
FINAL_CHECKPOINT_EVERY = 60.0


def final_retrain(args, archs: list[str], storage, budget: Budget, out: Path, console) -> None:
    """Retrain each best configuration on every training image (the study's validation split too, unless
    ``--final-holdout``) and test it, over ``--final-seeds`` seeds. Each finished seed is stored on the study at
    once and the seed in training keeps a checkpoint: the same command after a stop skips the finished seeds and
    resumes the interrupted one."""
    from cifarlab.data import load_splits

    splits = load_splits(args.data, val_size=budget.val_size if args.final_holdout else 0, seed=args.seed,
                         cache_dir=args.cache_dir)
    holdout = len(splits.val_labels)
    for arch in archs:
        study = load_study(storage, f"{args.study_name}-{arch}", args, study_spec(args, budget, arch), create=False)
        try:
            best = study.best_trial
        except ValueError:
            console.print(f"{arch}: no complete trial to retrain")
            continue
        stored = study.user_attrs.get("final") or {}
        same = (stored.get("params") == best.params and stored.get("epochs") == args.final_epochs
                and stored.get("holdout") == holdout)
        done = {r["seed"]: r for r in stored.get("runs", [])} if same else {}
        runs = []
        for k in range(args.final_seeds):
            run = done.get(args.seed + 1000 + k)
            if run is not None:
                console.print(f"{arch} final seed {k + 1}/{args.final_seeds}: trained before, test "
                              f"{run['test_accuracy']:.2%} ({run['run']})", soft_wrap=True)
            else:
                run = _final_seed(args, arch, k, study, best, splits, holdout, out, console)
            runs.append(run)
            _store_final(study, args.final_epochs, best.params, runs, holdout)  # a stop in the next seed keeps it
        summary = _store_final(study, args.final_epochs, best.params, runs, holdout)
        console.print(f"{arch}: test accuracy {summary['mean']:.2%} ± {summary['std']:.2%} over {len(runs)} seed(s), "
                      f"trained on {len(splits.train_labels):,} images")


def _final_seed(args, arch: str, k: int, study, best, splits, holdout: int, out: Path, console) -> dict:
    """One seed of the final retrain, resumed from its checkpoint where a stopped one left it."""
    from cifarlab.checkpoint import Checkpointing, load_checkpoint, resume_point
    from cifarlab.config import TrainConfig
    from cifarlab.errors import ConfigError
    from cifarlab.report.records import holding, new_record_dir, run_record, write_json
    from cifarlab.train import fit
    from cifarlab.weights import save_weights
    from studies._cli import stop_at_a_step

    config = TrainConfig(arch=arch, epochs=args.final_epochs, batch_size=best.params["batch_size"],
                         optimizer=best.params["optimizer"], max_lr=best.params["max_lr"],
                         weight_decay=args.weight_decay, pct_start=args.pct_start,
                         label_smoothing=args.label_smoothing, precision=args.precision, device=args.device,
                         seed=args.seed + 1000 + k)
    label = f"{arch} final seed {k + 1}/{args.final_seeds}"
    pending, checkpoint = study.user_attrs.get("final_pending") or {}, None
    if (pending.get("config") == config.to_dict() and pending.get("params") == best.params
            and pending.get("holdout") == holdout and Path(pending.get("run", ""), "checkpoint.pt").is_file()):
        run_dir = Path(pending["run"])
        try:
            resume = load_checkpoint(run_dir / "checkpoint.pt")
        except ConfigError as exc:
            console.print(f"{label}: not resumed, trained again ({exc})", soft_wrap=True)
        else:
            checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY, resume=resume)
            console.print(f"{label}: resuming {run_dir} {resume_point(resume, args.final_epochs)[0]}", soft_wrap=True)
    if checkpoint is None:
        left = Path(pending.get("run", "-"))
        if left.is_dir() and not any(left.iterdir()):
            left.rmdir()  # a seed stopped before its first checkpoint: nothing in its folder to keep
        run_dir = new_record_dir(out, "runs", f"{arch}-final")
        checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY)
        study.set_user_attr("final_pending", {"config": config.to_dict(), "params": best.params,
                                              "holdout": holdout, "run": str(run_dir)})

    def on_epoch(rec) -> None:  # a final run is hours on a CPU: a line per epoch shows where it stands
        val = f"val acc {rec.val_accuracy:.1%}" if holdout else f"train acc {rec.train_accuracy:.1%}"
        console.print(f"{label} epoch {rec.epoch}/{args.final_epochs}: train loss {rec.train_loss:.3f} | {val} | "
                      f"{rec.epoch_seconds:.0f} s, {rec.images_per_second:.0f} img/s")

    with holding(run_dir), stop_at_a_step(checkpoint):  # a second --final at once is refused
        result = fit(config, splits, on_epoch=on_epoch, test=True, test_tta=True, checkpoint=checkpoint)
    doc = run_record(result, splits, status="completed", train_subset=None, wall_seconds=result.wall_seconds)
    doc["study"] = {"name": study.study_name, "trial": best.number}
    write_json(run_dir / "run.json", doc)
    save_weights(result, run_dir / "model.pt", splits.classes)
    checkpoint.path.unlink(missing_ok=True)
    console.print(f"{label} (seed {config.seed}): test {result.test.accuracy:.2%} "
                  f"(flip TTA {result.test_tta.accuracy:.2%})")
    return {"seed": config.seed, "test_accuracy": result.test.accuracy,
            "test_accuracy_tta": result.test_tta.accuracy, "train_images": len(splits.train_labels),
            "run": str(run_dir)}


def _store_final(study, epochs: int, params: dict, runs: list[dict], holdout: int) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    summary = {"epochs": epochs, "params": params, "holdout": holdout, "runs": runs,
               "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    study.set_user_attr("final", summary)
    return summary
