"""Hardening: bad input to every CLI, kills at chosen and at random moments, load on both storages, secrets,
escaping and reproducibility. The README's "Reliability" section names these tests.

Every bad input must give one or two lines naming the problem, exit status 2, no traceback, and leave the
results already stored byte for byte as they were.
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
import torch
from conftest import write_image_folder
from PIL import Image

from bench import devices as devices_cli
from studies import lrfind as lrfind_cli
from studies import onecycle
from studies import report as report_cli
from studies import train as train_cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--data", "synthetic:200:40", "--val-size", "40"]
STUDY = ["--data", "synthetic:400:60", "--val-size", "60", "--budget", "smoke", "--seed-max-lr", "0.003",
         "--precision", "auto", "--quiet"]
TINY = ["--train-subset", "32", "--val-size", "16"]  # one step a trial: these tests are about storage
CLIS = {"train": train_cli.main, "lrfind": lrfind_cli.main, "onecycle": onecycle.main, "report": report_cli.main,
        "devices": devices_cli.main}
BASE = {"train": DATA, "lrfind": DATA, "onecycle": [*STUDY, *TINY], "report": [], "devices": DATA}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every stored byte under ``root`` (SQLite's shared-memory index aside: it holds no data)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")}


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """An output folder holding a run, an LR range test, a study and the reports, as a user's would."""
    out = tmp_path_factory.mktemp("stored")
    fast = ["--batch-size", "32", "--precision", "fp32", "--train-subset", "96", "--out", str(out)]
    assert train_cli.main([*DATA, *fast, "--epochs", "1", "--quiet"]) == 0
    assert lrfind_cli.main([*DATA, *fast, "--steps", "5"]) == 0
    assert onecycle.main([*STUDY, *TINY, "--arch", "custom_resnet", "--trials", "1", "--out", str(out)]) == 0
    gc.collect()  # close every SQLite connection before the bytes are taken
    return out


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "a-file.txt").write_text("not a folder")
    for split in ("train", "test"):
        (root / "no-classes" / split).mkdir(parents=True)
    write_image_folder(root / "mismatched", ["cat", "dog"], ["cat", "frog"], per_class=2)
    corrupt = write_image_folder(root / "corrupt", ["cat", "dog"], per_class=2)
    (corrupt / "train" / "dog" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_image_folder(root / "empty-split", ["cat", "dog"], per_class=2)
    for f in (root / "empty-split" / "test").rglob("*.png"):
        f.unlink()
    return {"missing": root / "no-such-folder", "empty": root / "empty", "file": root / "a-file.txt",
            "no-classes": root / "no-classes",
            "mismatched": root / "mismatched", "corrupt": root / "corrupt", "empty-split": root / "empty-split"}


UNREACHABLE_PG = "postgresql://cifar:hunter2secret@127.0.0.1:1/studies"

# (CLI, arguments, what the message must say). "{out}" is the stored output folder, "{<name>}" a bad data path.
BATTERY = [
    # studies.onecycle
    ("onecycle", ["--arch", "vgg16"], "unknown architecture vgg16; valid: custom_resnet, resnet18"),
    ("onecycle", ["--pruner", "sometimes"], "argument --pruner: invalid choice: 'sometimes'"),
    ("onecycle", ["--trials", "0"], "--trials: must be at least 1, got 0"),
    ("onecycle", ["--trials", "-3"], "--trials: must be at least 1, got -3"),
    ("onecycle", ["--trials", "many"], "--trials: expected a whole number, got 'many'"),
    ("onecycle", ["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    ("onecycle", ["--train-subset", "-5"], "--train-subset: a count must be at least 1, got -5"),
    ("onecycle", ["--seed-max-lr", "0"], "--seed-max-lr: must be greater than 0"),
    ("onecycle", ["--storage", "not-a-url"], "is not a storage URL"),
    ("onecycle", ["--storage", UNREACHABLE_PG], "cannot reach the study storage"),
    ("onecycle", ["--weight-decay", "0.01", "--trials", "2"], "exists with another fixed"),
    ("onecycle", ["--data", "{missing}"], "does not exist"),
    ("onecycle", ["--train-subset", "100000"], "--train-subset asks for 100000 images but only 384 are available"),
    # studies.train
    ("train", ["--arch", "vgg"], "unknown architecture 'vgg'; valid: custom_resnet, resnet18"),
    ("train", ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("train", ["--epochs", "ten"], "--epochs: expected a whole number, got 'ten'"),
    ("train", ["--batch-size", "-4"], "--batch-size: must be at least 1, got -4"),
    ("train", ["--batch-size", "4096"], "--batch-size 4096 is larger than the training set (160 images)"),
    ("train", ["--max-lr", "0"], "--max-lr: must be greater than 0"),
    ("train", ["--max-lr", "-0.1"], "--max-lr: must be greater than 0"),
    ("train", ["--data", "{missing}"], "does not exist"),
    ("train", ["--data", "{empty}"], "train is missing; expected an ImageFolder split there"),
    ("onecycle", ["--data", "{no-classes}"], "no class folders"),
    ("train", ["--data", "{file}"], "is a file"),
    ("train", ["--data", "{mismatched}"], "classes differ between"),
    ("train", ["--data", "{corrupt}"], "cannot read image"),
    ("train", ["--data", "{empty-split}"], "no images"),
    # studies.lrfind
    ("lrfind", ["--arch", "lenet"], "argument --arch: invalid choice: 'lenet'"),
    ("lrfind", ["--steps", "0"], "--steps: must be at least"),
    ("lrfind", ["--start-lr", "-1"], "--start-lr: must be greater than 0"),
    ("lrfind", ["--start-lr", "1", "--end-lr", "0.1"], "must be below --end-lr"),
    ("lrfind", ["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
    ("lrfind", ["--batch-size", "1000"], "larger than the training set"),
    # studies.report
    ("report", ["--storage", "not-a-url"], "is not a storage URL"),
    ("report", ["--storage", UNREACHABLE_PG], "cannot reach the study storage"),
    ("report", ["--out", "{missing}"], "no output folder"),
    # bench.devices
    ("devices", ["--arch", "alexnet"], "unknown architecture alexnet"),
    ("devices", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("devices", ["--repeats", "0"], "--repeats: must be at least 1, got 0"),
    ("devices", ["--images", "lots"], "--images must be a positive count, 'all' or 'auto', got 'lots'"),
    ("devices", ["--images", "-5"], "--images must be a positive count, 'all' or 'auto', got -5"),
    ("devices", ["--threads", "0"], "--threads: must be at least 1, got 0"),
    ("devices", ["--batch-size", "99999"], "--batch-size 99999 is larger than the training set"),
    ("devices", ["--data", "{corrupt}"], "cannot read image"),
]
CUDA_BATTERY = [(cli, ["--device", "cuda"], "no CUDA device") for cli in ("train", "lrfind", "onecycle", "devices")]


def _run_bad(cli: str, argv: list[str], out: Path, paths: dict[str, Path], capsys) -> tuple[int, str]:
    argv = [a.format(out=out, **{k: str(v) for k, v in paths.items()}) for a in argv]
    base = BASE[cli]
    if "--data" in argv:  # the bad data path replaces the synthetic set and its hold-out count
        base = [a for i, a in enumerate(base) if a not in ("--data", "--val-size")
                and (i == 0 or base[i - 1] not in ("--data", "--val-size"))]
    with_out = [] if "--out" in argv else ["--out", str(out)]
    code = CLIS[cli]([*base, *argv, *with_out])
    gc.collect()
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(("cli", "argv", "message"), [*BATTERY, *[pytest.param(*c, marks=NO_CUDA)
                                                                 for c in CUDA_BATTERY]],
                         ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_bad_input_is_refused_in_a_line_or_two_and_nothing_stored_changes(cli, argv, message, stored, bad_data,
                                                                          capsys):
    before = snapshot(stored)
    code, err = _run_bad(cli, argv, stored, bad_data, capsys)
    assert code == 2, err
    assert message in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert "hunter2secret" not in err
    after = snapshot(stored)
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
    assert [k for k in before if before[k] != after[k]] == []


def test_the_battery_covers_every_cli_with_enough_cases():
    assert {cli for cli, _, _ in BATTERY} == set(CLIS)
    assert len(BATTERY) >= 25


def test_an_unwritable_output_folder_is_refused_by_every_cli(stored, capsys):
    blocked = stored / "runs"  # a folder of results: a file inside it stands where --out wants a folder
    target = next(blocked.glob("*/run.json")) / "sub"
    before = snapshot(stored)
    for cli in CLIS:
        code = CLIS[cli]([*BASE[cli], "--out", str(target)])
        err = capsys.readouterr().err
        assert (code == 2 and "cannot be written" in err) or "no output folder" in err, (cli, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert snapshot(stored) == before


# ------------------------------------------------------------------------------------------------- faults


def run_study(out: Path, trials: int, *extra: str, fault: str | None = None, timeout: int = 600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("CIFARLAB_FAULT", None)
    if fault:
        env["CIFARLAB_FAULT"] = fault
    argv = [sys.executable, "-m", "studies.onecycle", *STUDY, *TINY, "--arch", "custom_resnet",
            "--trials", str(trials), "--heartbeat", "1", "--out", str(out), *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: Ctrl-C must reach the study."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="onecycle-custom_resnet", storage=f"sqlite:///{out / 'studies' / 'studies.db'}")


def finished_trials(study) -> dict[int, tuple]:
    return {t.number: (t.params, t.value, t.state.name) for t in study.get_trials(deepcopy=False)
            if t.state.name in ("COMPLETE", "PRUNED")}


def assert_intact(out: Path, trials: int) -> optuna.Study:
    """Exactly ``trials`` finished, SQLite intact, Optuna's own CLI reads it, every report image decodes."""
    db = out / "studies" / "studies.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    study = load(out)
    assert len(finished_trials(study)) == trials
    cli = Path(sys.executable).with_name("optuna")
    proc = subprocess.run([str(cli), "studies", "--storage", f"sqlite:///{db}", "-f", "json"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
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
FAULTS = [("epoch:2", -signal.SIGKILL, "no heartbeat"),  # SIGKILL during a trial
          ("store:2", -signal.SIGKILL, "no heartbeat"),  # SIGKILL while a trial's result is stored
          ("epoch:2:INT", 130, "Ctrl-C"),  # Ctrl-C during a trial
          ("report:1", -signal.SIGKILL, None)]  # SIGKILL while the reports are written
KILLED_TRIALS = 5


def test_a_killed_study_resumes_with_nothing_lost(tmp_path):
    kept: dict[int, tuple] = {}
    for fault, exit_code, _ in FAULTS:
        # No wait needed: a trial a kill left running goes stale after 3 heartbeats of 1 s, and the next run
        # waits for that before it counts the study as complete.
        run = run_study(tmp_path, KILLED_TRIALS, fault=fault)
        assert run.returncode == exit_code, (fault, run.stderr[-3000:])
        now = finished_trials(load(tmp_path))
        assert {n: now[n] for n in kept} == kept, fault  # no finished trial lost or changed
        # A kill during a trial leaves the study short; the report kill comes after its last trial is stored.
        assert (len(now) == KILLED_TRIALS) == fault.startswith("report"), (fault, len(now))
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
                   and t.state.name in ("COMPLETE", "PRUNED")]
        assert retried, f"the configuration of interrupted trial {trial.number} was not tried again"


def test_sigkill_at_random_moments_then_rerun_completes(tmp_path):
    rng = random.Random(20261125)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "studies.onecycle", *STUDY, *TINY, "--arch", "custom_resnet", "--trials", "6",
            "--heartbeat", "1", "--out", str(tmp_path)]
    seen: dict[int, tuple] = {}
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(3.0, 9.0))  # torch's import takes about 3 s: the kills land in the study
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        db = tmp_path / "studies" / "studies.db"
        if db.exists():
            with sqlite3.connect(db) as con:
                assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            try:
                now = finished_trials(load(tmp_path))
            except KeyError:  # killed before the study was created
                now = {}
            assert {n: now[n] for n in seen} == seen
            seen = now
    final = run_study(tmp_path, 6)
    assert final.returncode == 0, final.stderr[-3000:]
    study = assert_intact(tmp_path, 6)
    assert {n: finished_trials(study)[n] for n in seen} == seen


# --------------------------------------------------------------------------------------------------- load


LOAD_TRIALS = 8  # two per worker: each trial writes its start, heartbeats, epochs and end, so they contend
LOAD = [*STUDY, "--arch", "custom_resnet", "--trials", str(LOAD_TRIALS), "--train-subset", "32", "--val-size", "16"]
BAD_OUTPUT = ("database is locked", "OperationalError", "could not connect", "Traceback")


def _assert_counts(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == LOAD_TRIALS
    assert len({t._trial_id for t in trials}) == len(trials) == len({t.number for t in trials})
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost
    assert all(t.state.name != "RUNNING" for t in trials)
    # A FAIL is only ever a stood-down duplicate start, never a lost result.
    assert all("not needed" in t.user_attrs.get("fail_reason", "") for t in trials if t.state.name == "FAIL")
    workers = {t.user_attrs.get("worker") for t in done}
    assert len(workers) >= 2, workers
    # Every finished trial tried a configuration of its own: processes with the same --seed must not draw the
    # same sequence (trial 0, the seed configuration, is drawn by no one).
    configs = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(configs)) == len(configs), sorted(configs)


def _assert_clean_output(text: str, workers: int) -> None:
    assert f"{workers} workers started" in text
    for bad in BAD_OUTPUT:
        assert bad not in text, text[-3000:]


def test_load_four_workers_on_the_embedded_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'load.db'}"
    proc = subprocess.run([sys.executable, "-m", "studies.onecycle", *LOAD, "--workers", "4", "--storage", url,
                           "--study-name", "load", "--no-report", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
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
    argv = [sys.executable, "-m", "studies.onecycle", *LOAD, "--workers", "2", "--storage", url,
            "--study-name", name]
    procs = [subprocess.Popen([*argv, "--out", str(tmp_path / f"machine{k}")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
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
    # the smoke budget's 256 images: two steps of the enqueued batch of 128, so that the first update can blow up
    base = [*STUDY, "--arch", "custom_resnet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main([*base, "--trials", "1"]) == 0
    load(tmp_path).enqueue_trial({"optimizer": "sgd", "max_lr": 1e6, "batch_size": 128})
    assert onecycle.main([*base, "--trials", "3"]) == 0
    study = load(tmp_path)
    (diverged,) = [t for t in study.trials if t.params["max_lr"] == 1e6]
    assert diverged.state.name == "PRUNED"
    assert diverged.user_attrs["pruned_reason"].startswith("diverged: training loss became")
    assert len(finished_trials(study)) == 3  # and the study went on


def test_study_names_with_html_and_shell_metacharacters_are_kept_literally(tmp_path):
    name = "<b>x</b>;$(touch pwned)`id`&'\""
    code = onecycle.main([*STUDY, *TINY, "--arch", "custom_resnet", "--trials", "1", "--study-name", name,
                          "--out", str(tmp_path)])
    assert code == 0
    storage = f"sqlite:///{tmp_path / 'studies' / 'studies.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [f"{name}-custom_resnet"]
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()
    index = (tmp_path / "index.html").read_text()
    assert "<b>x</b>" not in index and "&lt;b&gt;x&lt;/b&gt;;$(touch pwned)`id`&amp;" in index
    pages = list((tmp_path / "studies").rglob("index.html"))
    assert len(pages) == 1 and all(c.isalnum() or c in "-_." for c in pages[0].parent.name)


# ------------------------------------------------------------------------------------------ reproducibility


def test_two_studies_with_the_same_seed_pick_and_reach_the_same(tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}"
        assert onecycle.main([*STUDY, *TINY, "--arch", "custom_resnet", "--trials", "4", "--pruner", "none",
                              "--no-report", "--out", str(out)]) == 0
        runs.append([(t.params, t.value) for t in load(out).trials])
    assert runs[0] == runs[1]
    assert len({tuple(sorted(p.items())) for p, _ in runs[0]}) == 4  # four different configurations
