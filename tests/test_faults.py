"""Faults and load: studies killed at chosen and at random moments resume with nothing lost; worker processes on
one study, on SQLite and on PostgreSQL, lose nothing and never collide; a diverging trial is pruned with its
reason. Split from test_hardening.py so that pytest-xdist can run the two long files on different workers. The
README's "Reliability" section names these tests.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import REPO, STUDY, TINY
from conftest import load_study_at as load
from PIL import Image

from studies import onecycle

# ------------------------------------------------------------------------------------------------- faults


ONECYCLE = [sys.executable, "-m", "studies.onecycle"]


def quiet_env() -> dict[str, str]:
    """The environment a study process gets: this session's (its cache folder included), without warnings."""
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def study_argv(out: Path, trials: int) -> list[str]:
    return [*ONECYCLE, *STUDY, *TINY, "--arch", "custom_resnet", "--trials", str(trials), "--heartbeat", "1",
            "--out", str(out)]


def run_study(out: Path, trials: int, *extra: str, fault: str | None = None, timeout: int = 600):
    env = quiet_env()
    env.pop("CIFARLAB_FAULT", None)
    if fault:
        env["CIFARLAB_FAULT"] = fault
    return subprocess.run([*study_argv(out, trials), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: Ctrl-C must reach the study."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ladder_done(study, trials: int) -> bool:
    """Whether the smoke ladder of ``trials`` configurations is complete: that many finished at rung 0, nothing
    waiting or running, and no promotion due."""
    from studies._ladder import due_promotions
    from studies._study import ladder_runs

    runs = ladder_runs(study)
    lowest = sum(r.rung == 0 and r.state in ("complete", "pruned") for r in runs)
    return (lowest == trials and not any(r.state in ("running", "waiting") for r in runs)
            and not due_promotions(runs, 3, 3))


def finished_trials(study) -> dict[int, tuple]:
    return {t.number: (t.params, t.value, t.state.name) for t in study.get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED")}


def assert_intact(out: Path, trials: int) -> optuna.Study:
    """The ladder of ``trials`` configurations complete, SQLite intact, Optuna's own CLI reads it, every report image
    decodes."""
    db = out / "studies" / "studies.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    study = load(out)
    assert ladder_done(study, trials)
    assert_ladder(study, trials)
    cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(cli), "studies", "--storage", f"sqlite:///{db}", "-f", "json"], capture_output=True,
                          text=True, timeout=120, env=quiet_env())
    assert proc.returncode == 0, proc.stderr
    assert {s["name"]: s["n_trials"] for s in json.loads(proc.stdout)}["onecycle-custom_resnet"] == len(study.trials)
    index = (out / "index.html").read_text()
    assert "onecycle-custom_resnet" in index
    for png in out.rglob("*.png"):
        with Image.open(png) as im:
            im.load()
    return study


# Each fault hits the rerun of the one before, so that four faults cost five study processes rather than eight:
# (fault, exit status, reason stored on the interrupted trial; None where no trial is interrupted).
FAULTS = [("promoted:1", -signal.SIGKILL, "no heartbeat"),  # SIGKILL during the first promoted trial
          ("store:2", -signal.SIGKILL, "no heartbeat"),  # SIGKILL while a trial's result is stored
          ("epoch:2", -signal.SIGKILL, "no heartbeat"),  # SIGKILL during a trial
          ("epoch:2:INT", 130, "Ctrl-C"),  # Ctrl-C during a trial
          ("report:1", -signal.SIGKILL, None)]  # SIGKILL while the reports are written
KILLED_TRIALS = 7  # configurations: 7 at rung 0, 2 promoted to rung 1, none to rung 2


def test_a_killed_study_resumes_with_nothing_lost(tmp_path):
    kept: dict[int, tuple] = {}
    for fault, exit_code, _ in FAULTS:
        # No wait needed: a trial a kill left running goes stale after 3 heartbeats of 1 s, and the next run
        # waits for that before it counts the study as complete.
        # The reports are drawn only where the fault is in them (and by the final run): 5 s a run saved.
        extra = () if fault.startswith("report") else ("--no-report",)
        run = run_study(tmp_path, KILLED_TRIALS, *extra, fault=fault)
        assert run.returncode == exit_code, (fault, run.stderr[-3000:])
        now = finished_trials(load(tmp_path))
        assert {n: now[n] for n in kept} == kept, fault  # no finished trial lost or changed
        # A kill during a trial leaves the study short; the report kill comes while a page is drawn, live (after a
        # trial, at most every 30 s) or at the end.
        assert fault.startswith("report") or not ladder_done(load(tmp_path), KILLED_TRIALS), (fault, len(now))
        kept = now
    final = run_study(tmp_path, KILLED_TRIALS)
    assert final.returncode == 0, final.stderr[-3000:]
    study = assert_intact(tmp_path, KILLED_TRIALS)
    now = finished_trials(study)
    assert {n: now[n] for n in kept} == kept
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    reasons = [t.user_attrs["fail_reason"] for t in interrupted]
    expected = [reason for _, _, reason in FAULTS if reason]
    assert len(reasons) == len(expected), reasons  # one interrupted trial per kill during a trial
    for reason in set(expected):
        assert sum(reason in r for r in reasons) == expected.count(reason), reasons
    for trial in interrupted:
        retried = [t for t in study.trials if t.number > trial.number and t.params == trial.params
                   and t.user_attrs.get("rung") == trial.user_attrs.get("rung")
                   and t.user_attrs.get("promoted_from") == trial.user_attrs.get("promoted_from")
                   and t.state.name in ("COMPLETE", "PRUNED")]
        assert retried, f"the configuration of interrupted trial {trial.number} was not tried again at its rung"
    # the first kill landed in a promoted trial, whose retry completed it at its rung
    assert any(t.user_attrs.get("rung") == 1 for t in interrupted)
    assert_ladder(study, KILLED_TRIALS)


def assert_ladder(study, trials: int) -> None:
    """Exactly ``trials`` configurations finished at rung 0 and a third of each rung's above it (the rule caps a
    rung's promotions at its third), none run twice at a rung, each promoted one in its source's parameters."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
    rungs = [t.user_attrs["rung"] for t in done]
    assert [rungs.count(k) for k in range(3)] == [trials, trials // 3, trials // 9], rungs
    sources = [(t.user_attrs["rung"], t.user_attrs["promoted_from"]) for t in done if t.user_attrs["rung"]]
    assert len(set(sources)) == len(sources), sources
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert all(by_number[s].params == t.params for t in done if (s := t.user_attrs.get("promoted_from")) is not None)


def _finished_count(out: Path) -> int | None:
    """How many trials of the running study have finished, or None while the study does not exist yet.

    Read through a read-only SQLite connection: opening it through Optuna would create the tables, racing the study
    process that is creating them."""
    db = out / "studies" / "studies.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            if not con.execute("SELECT count(*) FROM studies").fetchone()[0]:
                return None
            return con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # the file exists, its tables not yet (or a writer holds the lock)
        return None


def test_sigkill_at_random_moments_then_rerun_completes(tmp_path):
    rng, trials = random.Random(20261125), 8
    env, argv = quiet_env(), study_argv(tmp_path, trials)
    seen: dict[int, tuple] = {}
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        # Wait until the study exists and holds a seeded random number of new trials (torch's import alone takes
        # seconds on a busy machine), then kill it a random moment later, so that every kill lands in a study
        # that is running and not yet finished.
        wanted, deadline = len(seen) + rng.randint(0, 1), time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            done = _finished_count(tmp_path)
            if done is not None and done >= wanted:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        before = _finished_count(tmp_path)
        assert proc.poll() is None, "the study ended before the kill: the kill would test nothing"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert before is not None and not ladder_done(load(tmp_path), trials)  # it landed in a study still running
        with sqlite3.connect(tmp_path / "studies" / "studies.db") as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        now = finished_trials(load(tmp_path))
        assert {n: now[n] for n in seen} == seen
        seen = now
    final = run_study(tmp_path, trials)
    assert final.returncode == 0, final.stderr[-3000:]
    study = assert_intact(tmp_path, trials)
    assert {n: finished_trials(study)[n] for n in seen} == seen


# --------------------------------------------------------------------------------------------------- load


LOAD_TRIALS = 9  # a ladder of 9 -> 3 -> 1: each trial writes its start, heartbeats, epochs and end, so they contend
LOAD = [*STUDY, "--arch", "custom_resnet", "--trials", str(LOAD_TRIALS), "--train-subset", "32", "--val-size", "16"]
BAD_OUTPUT = ("database is locked", "OperationalError", "could not connect", "Traceback")


def _assert_counts(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert_ladder(study, LOAD_TRIALS)
    assert len({t._trial_id for t in trials}) == len(trials) == len({t.number for t in trials})
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost
    assert all(t.state.name != "RUNNING" for t in trials)
    # A FAIL is only ever a stood-down duplicate start, never a lost result.
    assert all("not needed" in t.user_attrs.get("fail_reason", "") for t in trials if t.state.name == "FAIL")
    workers = {t.user_attrs.get("worker") for t in done}
    assert len(workers) >= 2, workers
    # Every configuration sampled tried one of its own: processes with the same --seed must not draw the same
    # sequence (trial 0, the seed configuration, is drawn by no one).
    configs = [tuple(sorted(t.params.items())) for t in done if t.user_attrs["rung"] == 0]
    assert len(set(configs)) == len(configs), sorted(configs)


def _assert_clean_output(text: str, workers: int) -> None:
    assert f"{workers} workers started" in text
    for bad in BAD_OUTPUT:
        assert bad not in text, text[-3000:]


def test_load_four_workers_on_the_embedded_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'load.db'}"
    proc = subprocess.run([*ONECYCLE, *LOAD, "--workers", "4", "--storage", url,
                           "--study-name", "load", "--no-report", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=quiet_env())
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    _assert_clean_output(text, 4)
    _assert_counts(optuna.load_study(study_name="load-custom_resnet", storage=url))


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_load_two_machines_of_two_workers_on_postgresql(tmp_path, postgres_url):
    """The README's recipe for machines: the same command, two workers each, on each of two "machines" at once,
    reports included, so that every file they write can be searched for the password too."""
    url, password = postgres_url
    name = f"load{int(time.time() * 1000) % 10**9}"
    argv = [*ONECYCLE, *LOAD, "--workers", "2", "--storage", url,
            "--study-name", name]
    procs = [subprocess.Popen([*argv, "--out", str(tmp_path / f"machine{k}")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=quiet_env())
             for k in range(2)]
    outputs = [p.communicate(timeout=1200) for p in procs]
    texts = [o + e for o, e in outputs]
    assert [p.returncode for p in procs] == [0, 0], [t[-3000:] for t in texts]
    for text in texts:
        _assert_clean_output(text, 2)
        assert password not in text and "***" in text
    storage = optuna.storages.RDBStorage(url)
    try:
        study = optuna.load_study(study_name=f"{name}-custom_resnet", storage=storage)
        _assert_counts(study)
        attrs = repr(study.user_attrs) + "".join(repr(t.user_attrs) + repr(t.system_attrs) for t in study.trials)
        assert password not in attrs
        written = [path for path in tmp_path.rglob("*") if path.is_file()]
        assert any(path.name == "index.html" for path in written)
        for path in written:
            assert password.encode() not in path.read_bytes(), path
    finally:
        storage.engine.dispose()  # close psycopg connections inside this test, not in a later one
        gc.collect()


# ------------------------------------------------------------------------------------- divergence, secrets


@pytest.mark.filterwarnings("ignore:Fixed parameter")  # the enqueued LR lies far outside the search range
def test_a_trial_configured_to_diverge_is_pruned_with_its_reason(tmp_path):
    # one rung of the smoke budget's 288 images: two steps of the enqueued batch of 128, so that the first update
    # can blow up
    base = [*STUDY, "--arch", "custom_resnet", "--rungs", "1", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main([*base, "--trials", "1"]) == 0
    load(tmp_path).enqueue_trial({"optimizer": "sgd", "max_lr": 1e6, "batch_size": 128})
    # The enqueued trial runs next; that a study goes on after a pruned trial is test_onecycle's (a faked fit).
    assert onecycle.main([*base, "--trials", "2"]) == 0
    study = load(tmp_path)
    (diverged,) = [t for t in study.trials if t.params["max_lr"] == 1e6]
    assert diverged.state.name == "PRUNED" and diverged.number == 1
    assert diverged.user_attrs["pruned_reason"].startswith("diverged: training loss became")
    assert len(finished_trials(study)) == 2

