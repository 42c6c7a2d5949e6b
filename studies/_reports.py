"""Optuna studies as the plain records the report pages draw (``cifarlab.report`` never sees Optuna), and the
rebuild of every page under ``<out>/`` that the commands run after they store results."""

from __future__ import annotations

import warnings
from pathlib import Path


def study_record(study, importance: bool = True) -> dict:
    """A study as a plain record: its name and attributes, every trial, and (``importance``) the hyperparameter
    importance."""
    trials = [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
               "user_attrs": t.user_attrs, "intermediate_values": t.intermediate_values,
               "seconds": t.duration.total_seconds() if t.duration else None,
               "started": t.datetime_start.isoformat() if t.datetime_start else "",
               "completed": t.datetime_complete.isoformat() if t.datetime_complete else ""}
              for t in study.get_trials(deepcopy=False)]
    return {"name": study.study_name, "user_attrs": study.user_attrs, "trials": trials,
            "importance": _importance(study) if importance else {}, "ladder": ladder_record(study.user_attrs, trials)}


def ladder_record(attrs: dict, trials: list[dict]) -> dict:
    """The study's rungs, its validation size, every completed promotion's pair of scores and the fidelity check."""
    from studies._ladder import fidelity, rung_pairs

    budget = (attrs.get("spec") or {}).get("budget") or {}
    pairs = rung_pairs(trials)
    return {"rungs": budget.get("rungs", []), "val_size": budget.get("val_size"),
            "pairs": pairs.to_dict("records"), "fidelity": fidelity(pairs)}


def _importance(study) -> dict[str, float]:
    """Optuna's importance over the lowest rung's complete trials (every configuration at one budget), on a copy of
    them in memory: a promoted run's larger score would otherwise read as its parameters' doing."""
    import optuna

    from studies._study import lowest_rung_copy

    view = lowest_rung_copy(study, (optuna.trial.TrialState.COMPLETE,))
    if len(view.trials) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(view))  # PED-ANOVA, Optuna's default
    except (RuntimeError, ValueError):  # e.g. a parameter that never varied
        return {}


def rebuild(out: Path, storage_url: str | None = None, redrawn: list[Path] | None = None) -> Path:
    """Write ``out/index.html`` and every page it links (pages missing or older than their records are drawn
    again; ``redrawn`` collects their folders). Studies come from ``storage_url``, else the default SQLite file."""
    from cifarlab.report.pages import build_index, study_page_current

    url = storage_url
    default_db = Path(out) / "studies" / "studies.db"
    if url is None and default_db.is_file():
        url = f"sqlite:///{default_db.resolve()}"
    studies = []
    if url is not None:
        import optuna

        from studies._storage import open_storage

        storage = open_storage(url)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            record = study_record(study, importance=False)
            if not study_page_current(out, record):  # importance only for a page that will be drawn again
                record["importance"] = _importance(study)
            studies.append(record)
    return build_index(Path(out), studies, redrawn)
