"""Optuna storages for studies: an embedded SQLite file (WAL mode) by default, any Optuna RDB URL with ``--storage``.

Trials send heartbeats; a trial whose worker died is failed with a reason and its configuration enqueued again.
Three things here reach below Optuna's public API, and nothing else in cifarlab does: a waiting (enqueued) trial is
taken by one conditional UPDATE, the stale-trial query is extended to write each trial's reason (both in
``_storage_class``), and the heartbeat table is read to find trials that never sent one
(``_trial_ids_with_heartbeat``)."""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
import time
import warnings
from pathlib import Path

from cifarlab.errors import ConfigError

DEFAULT_DB = "studies.db"
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every message, log line and record)."""
    return _PASSWORD_IN_URL.sub(lambda m: m["head"] + "***" + m["tail"], url)


def url_password(url: str) -> str | None:
    m = _PASSWORD_IN_URL.search(url)
    return m["pw"] if m and m["pw"] else None


def scrub(text: str, url: str | None) -> str:
    """Remove the password of ``url`` from ``text`` wherever it appears (driver errors may quote it)."""
    text = _PASSWORD_IN_URL.sub(lambda m: m["head"] + "***" + m["tail"], text)
    pw = url_password(url) if url else None
    if pw:
        from urllib.parse import unquote

        for form in {pw, unquote(pw)}:
            text = text.replace(form, "***")
    return text


def default_url(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'studies' / DEFAULT_DB).resolve()}"


STALE_REASON = "its worker stopped (no heartbeat for over {grace:g} s); the configuration is tried again"


@functools.cache
def _storage_class():
    """Optuna's RDBStorage, writing why a stale trial fails, whoever fails it: the reason is written where the
    stale-trial query finds it, while it is still RUNNING and so writable (Optuna's ``fail_stale_trials`` runs in
    every worker before each trial)."""
    import datetime

    import optuna
    from optuna.trial import TrialState

    class StudyStorage(optuna.storages.RDBStorage):
        def set_trial_state_values(self, trial_id, state, values=None) -> bool:
            """A waiting trial is taken by one worker only: Optuna reads it, then writes RUNNING, and on SQLite (no
            row locks) two workers could both read WAITING and run one enqueued trial twice. Here the write is one
            conditional UPDATE, which only the first worker's changes."""
            if state != TrialState.RUNNING or values is not None:
                return super().set_trial_state_values(trial_id, state, values)
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session

            with _create_scoped_session(self.scoped_session) as session:
                taken = (session.query(models.TrialModel)
                         .filter(models.TrialModel.trial_id == trial_id,
                                 models.TrialModel.state == TrialState.WAITING)
                         .update({models.TrialModel.state: TrialState.RUNNING}, synchronize_session=False))
                if taken == 1:  # the write lock is this transaction's now
                    models.TrialModel.find_or_raise_by_id(trial_id, session).datetime_start = datetime.datetime.now()
            return taken == 1

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = super()._get_stale_trial_ids(study_id)
            grace = grace_period(self)
            for trial_id in stale:
                with contextlib.suppress(Exception):  # another worker may have failed it first
                    self.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON.format(grace=grace))
            return stale

    return StudyStorage


def grace_period(storage) -> float:
    """Seconds without a heartbeat after which a RUNNING trial is stale, as Optuna's stale-trial query reckons it
    (twice the heartbeat interval when no grace period was set)."""
    return storage.grace_period or 2 * storage.get_heartbeat_interval()


def open_storage(url: str, *, heartbeat_interval: int = 15, retries: int = 2):
    """An Optuna RDBStorage with heartbeats and retry of trials left running by a dead worker."""
    import optuna
    from sqlalchemy import exc as sa

    if "://" not in url:
        raise ConfigError(f"--storage {mask_url(url)!r} is not a storage URL; expected e.g. "
                          "sqlite:///path/studies.db or postgresql://user:password@host/db")
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(path, timeout=120) as con:  # WAL persists in the file: readers never block writers
                con.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the study storage {path}: {exc}") from None
        engine_kwargs = {"connect_args": {"timeout": 120}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        for attempt in range(4):
            try:
                with warnings.catch_warnings():  # heartbeats have been "experimental" since Optuna 2.9
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)
                    return _storage_class()(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                            grace_period=heartbeat_interval * 3, heartbeat_stale_trial_callback=retry)
            except (sa.IntegrityError, sa.ProgrammingError):
                # Workers on several machines starting at once on a new database race to create its tables;
                # the losers find them a moment later.
                if attempt == 3:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")
    except (sa.ArgumentError, sa.NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"--storage {mask_url(url)!r} is not a usable storage URL ({type(exc).__name__})") from None
    except (sa.OperationalError, sa.SQLAlchemyError) as exc:
        first = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, url)
        raise ConfigError(f"cannot reach the study storage {mask_url(url)}: {first}") from None
    except ImportError as exc:
        raise ConfigError(f"the driver for {mask_url(url)} is not installed ({exc.name}); "
                          "pip install 'cifarlab[postgres]' for PostgreSQL") from None


def mark_stale_trials(study, storage, now: float | None = None) -> list[int]:
    """Fail the trials of ``study`` whose worker stopped sending heartbeats, saying why, and enqueue their
    configurations again; returns their trial ids. A RUNNING trial that never sent a heartbeat (Optuna skips those)
    is failed once older than twice the grace period on ``now``'s clock (``time.time()`` by default)."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    stale = storage._get_stale_trial_ids(study_id)  # the query fail_stale_trials runs; writes the reasons
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return stale + _fail_trials_without_heartbeat(study, storage, study_id, now)


def _fail_trials_without_heartbeat(study, storage, study_id: int, now: float | None) -> list[int]:
    import datetime

    import optuna
    from optuna.trial import TrialState

    older_than = 2 * grace_period(storage)
    beating = _trial_ids_with_heartbeat(storage, study_id)
    now = datetime.datetime.fromtimestamp(time.time() if now is None else now)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if trial_id in beating or trial.datetime_start is None:
            continue
        if (now - trial.datetime_start).total_seconds() <= older_than:
            continue
        with contextlib.suppress(Exception):  # another worker may have failed it first
            storage.set_trial_user_attr(
                trial_id, "fail_reason", f"its worker stopped before its first heartbeat (started over "
                                         f"{older_than:g} s ago); the configuration is tried again")
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
                callback = storage.get_heartbeat_stale_trial_callback()
                if callback is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        callback(study, storage.get_trial(trial_id))
    return failed


def _trial_ids_with_heartbeat(storage, study_id: int) -> set[int]:
    """The RUNNING trials of ``study_id`` that have recorded a heartbeat (RDB storage internals)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    with _create_scoped_session(storage.scoped_session) as session:
        rows = (session.query(models.TrialHeartbeatModel.trial_id)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study_id)
                .filter(models.TrialModel.state == TrialState.RUNNING).all())
    return {r[0] for r in rows}
