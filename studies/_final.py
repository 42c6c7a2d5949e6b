"""``studies.onecycle --final``: retrain each study's best configuration and the seed's on every training image at
the length users train, over seeds, and test both: what the study bought, measured where it will be used. A
stopped retrain resumes from its checkpoint."""

from __future__ import annotations

import statistics
from pathlib import Path

from studies._ladder import Budget
from studies._study import best_trial, load_study, study_spec

# A final run saves a checkpoint at the end of the first step this many seconds after the last save.
FINAL_CHECKPOINT_EVERY = 60.0


def final_retrain(args, archs: list[str], storage, budget: Budget, out: Path, console) -> None:
    """Retrain the best configuration (at the highest rung reached) and the seed's on every training image (the
    study's validation split too, unless ``--final-holdout``) for ``--final-epochs`` and test them, ``--final-seeds``
    seeds each. Each finished seed is stored on the study at once and the seed in training keeps a checkpoint: the
    same command after a stop skips the finished seeds and resumes the interrupted one."""
    from cifarlab.data import load_splits

    splits = load_splits(args.data, val_size=budget.val_size if args.final_holdout else 0, seed=args.seed,
                         cache_dir=args.cache_dir)
    holdout, epochs = len(splits.val_labels), args.final_epochs or budget.top.epochs
    for arch in archs:
        study = load_study(storage, f"{args.study_name}-{arch}", args, study_spec(args, budget, arch), create=False)
        best = best_trial(study)
        seed = next((t for t in study.get_trials(deepcopy=False)
                     if t.user_attrs.get("seed_config") and t.user_attrs.get("rung", 0) == 0 and t.params), None)
        if best is None or seed is None:
            console.print(f"{arch}: no complete trial to retrain")
            continue
        stored = study.user_attrs.get("final") or {}
        final = {"epochs": epochs, "holdout": holdout, "train_images": len(splits.train_labels), "configs": {}}
        for label, params in (("best", best.params), ("seed", seed.params)):
            same = stored.get("epochs") == epochs and stored.get("holdout") == holdout
            before = (stored.get("configs") or {}).get(label) or {}
            done = {r["seed"]: r for r in before.get("runs", [])} if same and before.get("params") == params else {}
            reused = label == "seed" and params == best.params  # the best is the seed's: its runs count for both
            if reused:
                done = {r["seed"]: r for r in final["configs"]["best"]["runs"]}
            runs = []
            for k in range(args.final_seeds):
                tag = f"{arch} final {NAMES[label]}, seed {k + 1}/{args.final_seeds}"
                run = done.get(args.seed + 1000 + k)
                if run is not None:
                    console.print(f"{tag}: {'the best' + chr(39) + 's run' if reused else 'trained before'}, test "
                                  f"{run['test_accuracy']:.2%} ({run['run']})", soft_wrap=True)
                else:
                    run = _final_seed(args, arch, k, study, params, epochs, splits, holdout, out, console, tag)
                runs.append(run)
                final["configs"][label] = _summarise(params, runs)
                study.set_user_attr("final", final)  # a stop in the next seed keeps this one
        compare(final)
        study.set_user_attr("final", final)
        console.print(final_sentence(arch, final), highlight=False, soft_wrap=True)


NAMES = {"best": "best", "seed": "seed's configuration"}


def _summarise(params: dict, runs: list[dict]) -> dict:
    accs = [r["test_accuracy"] for r in runs]
    return {"params": params, "runs": runs, "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}


def compare(final: dict) -> dict:
    """The best's mean test accuracy less the seed's, and whether it exceeds their spread (the larger of the two
    configurations' ranges over seeds; with one seed each there is none, and it exceeds nothing)."""
    best, seed = final["configs"]["best"], final["configs"]["seed"]
    final["difference"] = best["mean"] - seed["mean"]
    final["spread"] = max(max(r["test_accuracy"] for r in c["runs"]) - min(r["test_accuracy"] for r in c["runs"])
                          for c in (best, seed))
    final["exceeds_spread"] = bool(len(best["runs"]) > 1 and abs(final["difference"]) > final["spread"])
    final["verdict"] = ("more than the spread over seeds" if final["exceeds_spread"] else
                        "within the spread over seeds" if len(best["runs"]) > 1 else
                        "one seed each: no spread to judge it by")
    return final


def final_sentence(arch: str, final: dict) -> str:
    best, seed = final["configs"]["best"], final["configs"]["seed"]
    n = len(best["runs"])
    return (f"{arch}: {final['epochs']} epochs on {final['train_images']:,} images, {n} seed(s) each: best "
            f"{best['mean']:.2%} ± {best['std']:.2%}, seed's configuration {seed['mean']:.2%} ± {seed['std']:.2%}; "
            f"difference {final['difference']:+.2%} ({final['verdict']})")


def _final_seed(args, arch: str, k: int, study, params: dict, epochs: int, splits, holdout: int, out: Path, console,
                label: str) -> dict:
    """One seed of the final retrain, resumed from its checkpoint where a stopped one left it."""
    from cifarlab.checkpoint import Checkpointing, load_checkpoint, resume_point
    from cifarlab.config import TrainConfig
    from cifarlab.errors import ConfigError
    from cifarlab.report.records import holding, new_record_dir, run_record, write_json
    from cifarlab.train import fit
    from cifarlab.weights import save_weights
    from studies._cli import stop_at_a_step

    config = TrainConfig(arch=arch, epochs=epochs, batch_size=params["batch_size"],
                         optimizer=params["optimizer"], max_lr=params["max_lr"],
                         weight_decay=args.weight_decay, pct_start=args.pct_start,
                         label_smoothing=args.label_smoothing, precision=args.precision, device=args.device,
                         seed=args.seed + 1000 + k)
    pending, checkpoint = study.user_attrs.get("final_pending") or {}, None
    if (pending.get("config") == config.to_dict() and pending.get("params") == params
            and pending.get("holdout") == holdout and Path(pending.get("run", ""), "checkpoint.pt").is_file()):
        run_dir = Path(pending["run"])
        try:
            resume = load_checkpoint(run_dir / "checkpoint.pt")
        except ConfigError as exc:
            console.print(f"{label}: not resumed, trained again ({exc})", soft_wrap=True)
        else:
            checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY, resume=resume)
            console.print(f"{label}: resuming {run_dir} {resume_point(resume, epochs)[0]}", soft_wrap=True)
    if checkpoint is None:
        left = Path(pending.get("run", "-"))
        if left.is_dir() and not any(left.iterdir()):
            left.rmdir()  # a seed stopped before its first checkpoint: nothing in its folder to keep
        run_dir = new_record_dir(out, "runs", f"{arch}-final")
        checkpoint = Checkpointing(run_dir / "checkpoint.pt", every=FINAL_CHECKPOINT_EVERY)
        study.set_user_attr("final_pending", {"config": config.to_dict(), "params": params,
                                              "holdout": holdout, "run": str(run_dir)})

    def on_epoch(rec) -> None:  # a final run is hours on a CPU: a line per epoch shows where it stands
        val = f"val acc {rec.val_accuracy:.1%}" if holdout else f"train acc {rec.train_accuracy:.1%}"
        console.print(f"{label} epoch {rec.epoch}/{epochs}: train loss {rec.train_loss:.3f} | {val} | "
                      f"{rec.epoch_seconds:.0f} s, {rec.images_per_second:.0f} img/s")

    with holding(run_dir), stop_at_a_step(checkpoint):  # a second --final at once is refused
        result = fit(config, splits, on_epoch=on_epoch, test=True, test_tta=True, checkpoint=checkpoint)
    doc = run_record(result, splits, status="completed", train_subset=None, wall_seconds=result.wall_seconds)
    doc["study"] = {"name": study.study_name, "params": params}
    write_json(run_dir / "run.json", doc)
    save_weights(result, run_dir / "model.pt", splits.classes)
    checkpoint.path.unlink(missing_ok=True)
    console.print(f"{label} (seed {config.seed}): test {result.test.accuracy:.2%} "
                  f"(flip TTA {result.test_tta.accuracy:.2%})")
    return {"seed": config.seed, "test_accuracy": result.test.accuracy,
            "test_accuracy_tta": result.test_tta.accuracy, "train_images": len(splits.train_labels),
            "run": str(run_dir)}
