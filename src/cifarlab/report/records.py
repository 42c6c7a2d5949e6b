"""Run and LR-finder records: JSON documents written atomically under the output tree."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from cifarlab.data import atomic_write_text


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_record_dir(out: Path, kind: str, name: str) -> Path:
    """A fresh folder ``out/kind/<time>-<name>[-N]`` for one run's files."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "run"
    base = Path(out) / kind / f"{timestamp()}-{safe}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Hold an advisory lock on a record folder while a process works in it; another holder is refused in one line.

    The operating system releases it when the process ends, killed or not, so a stopped run is never left locked.
    Where there is no ``fcntl`` (not POSIX) nothing is locked.
    """
    from cifarlab.errors import ConfigError

    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder} is in use: another process is training there now (stop it first, or "
                              "let it finish)") from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def in_use(folder: Path) -> bool:
    """Whether a process holds ``holding``'s lock on ``folder`` now."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # gone, or not ours to open: nobody we can see trains there
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while another holds it exclusively
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _clean(value: object) -> object:
    """JSON has no NaN or Infinity: store them as null so every JSON reader accepts the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(Path(path), json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(Path(path), frame.to_csv(index=False))


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check_writable(out: Path) -> Path:
    """Create ``out`` if needed and prove it writable, before any long work starts."""
    from cifarlab.errors import ConfigError

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"output folder {out} cannot be written ({reason}); pass a writable --out") from None
    return out


def write_lrfind_record(out: Path, doc: dict, result) -> Path:
    """``<out>/lrfind/<time>-<arch>/``: the sweep (``lrfind.csv``), its record with the suggestions
    (``lrfind.json``) and the loss curve (``lrfind.png``)."""
    from cifarlab.report.figures import lrfind_figure

    frame = pd.DataFrame({"step": range(len(result.lrs)), "lr": result.lrs, "loss": result.losses,
                          "smoothed_loss": result.smoothed})
    run_dir = new_record_dir(out, "lrfind", doc["arch"])
    write_csv(run_dir / "lrfind.csv", frame)
    write_json(run_dir / "lrfind.json", {**doc, **result.to_dict()})
    lrfind_figure(frame, result.suggestions, run_dir / "lrfind.png",
                  f"LR range test: {doc['arch']}, {doc['optimizer']}, batch {doc['batch_size']}")
    return run_dir


def run_record(result, splits, *, status: str, train_subset, wall_seconds: float) -> dict:
    """The JSON document of one run (``run.json``): everything its report page needs."""
    import numpy as np

    from cifarlab.timing import environment, resolve_device

    doc: dict = {
        "kind": "run", "status": status, "config": result.config.to_dict(),
        "resolved": {"device": result.device, "precision": result.precision,
                     "channels_last": result.channels_last, "speed_choice": result.speed_source,
                     "compile_seconds": result.compile_seconds},
        "environment": environment(resolve_device(result.config.device)),
        "data": {**splits.describe(), "train_subset": train_subset},
        "normalization": {"mean": list(result.normalization.mean), "std": list(result.normalization.std)},
        "epochs": [r.to_dict() for r in result.records], "wall_seconds": wall_seconds, "test": None,
    }
    test: dict = {}
    k = splits.num_classes
    for key, ev in (("plain", result.test), ("flip_tta", result.test_tta)):
        if ev is not None:
            confusion = np.bincount(splits.test_labels * k + ev.predictions, minlength=k * k).reshape(k, k)
            test[key] = {"accuracy": ev.accuracy, "loss": ev.loss,
                         "per_class_accuracy": (confusion.diagonal() / np.maximum(confusion.sum(1), 1)).tolist(),
                         "confusion": confusion.tolist(), "predictions": ev.predictions.tolist()}
    doc["test"] = test or None
    return doc


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` validation images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n) if n else float("nan")


def tied_with_best(scores: pd.Series, n: int) -> pd.Series:
    """Whether each score lies within two standard errors (on ``n`` images, at the best's accuracy) of the best."""
    best = scores.max()
    return scores >= best - 2 * standard_error(best, n)
