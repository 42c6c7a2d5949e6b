"""Hardening: bad input to every CLI, secrets, escaping and reproducibility (kills and load are in
test_faults.py). The README's "Reliability" section names these tests.

Every bad input must give one or two lines naming the problem, exit status 2, no traceback, and leave the
results already stored byte for byte as they were.
"""

from __future__ import annotations

import gc
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO, STUDY, TINY, load_study_at, write_image_folder

from bench import devices as devices_cli
from studies import evaluate as evaluate_cli
from studies import lrfind as lrfind_cli
from studies import onecycle
from studies import report as report_cli
from studies import train as train_cli

DATA = ["--data", "synthetic:200:40", "--val-size", "40"]
CLIS = {"train": train_cli.main, "lrfind": lrfind_cli.main, "onecycle": onecycle.main, "report": report_cli.main,
        "devices": devices_cli.main, "evaluate": evaluate_cli.main}
BASE = {"train": DATA, "lrfind": DATA, "onecycle": [*STUDY, *TINY], "report": [], "devices": DATA, "evaluate": []}
WRITERS = [cli for cli in CLIS if cli != "evaluate"]  # evaluate only reads: it takes no --out
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every stored byte under ``root`` (SQLite's shared-memory index aside: it holds no data)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")}


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """An output folder holding a run, an LR range test, a study and the reports, as a user's would."""
    out = tmp_path_factory.mktemp("stored")
    fast = ["--batch-size", "32", "--precision", "fp32", "--train-subset", "32", "--out", str(out)]  # one step
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
    write_image_folder(root / "other-classes", ["cat", "dog"], per_class=2)
    write_image_folder(root / "empty-split", ["cat", "dog"], per_class=2)
    for f in (root / "empty-split" / "test").rglob("*.png"):
        f.unlink()
    return {"missing": root / "no-such-folder", "empty": root / "empty", "file": root / "a-file.txt",
            "no-classes": root / "no-classes",
            "mismatched": root / "mismatched", "corrupt": root / "corrupt", "empty-split": root / "empty-split",
            "other-classes": root / "other-classes"}


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
    ("onecycle", ["--final-seeds", "3", "--no-final-holdout"],
     "--final-holdout, --final-seeds only shape the --final retrains; add --final"),
    ("onecycle", ["--train-subset", "100000"], "--train-subset asks for 100000 images but only 384 are available"),
    # studies.train
    ("train", ["--arch", "vgg"], "unknown architecture 'vgg'; valid: custom_resnet, resnet18"),
    ("train", ["--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("train", ["--no-checkpoint", "--checkpoint-every=5m"], "--checkpoint-every sets how often the checkpoint"),
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
    ("onecycle", ["--workers-per-gpu", "two"], "--workers-per-gpu: expected a whole number or 'auto', got 'two'"),
    ("onecycle", ["--workers-per-gpu", "0"], "--workers-per-gpu: must be at least 1, got 0"),
    ("onecycle", ["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead takes effect only with"),
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
    ("devices", ["--no-compile"], "--no-compile leaves torch.compile out of --ablation or --throughput"),
    ("devices", ["--throughput", "--workers-per-device", "0"], "--workers-per-device: must be at least 1, got 0"),
    ("devices", ["--throughput", "--choose"], "argument --choose: not allowed with argument --throughput"),
    ("devices", ["--trials-each", "3"], "--trials-each only shapes --throughput"),
    ("devices", ["--choose", "--precision", "bf16"], "--choose times fp32 and bf16 itself"),
    ("devices", ["--batch-size", "99999"], "--batch-size 99999 is larger than the training set"),
    ("devices", ["--data", "{corrupt}"], "cannot read image"),
    # studies.evaluate ("{run}" is the stored run's folder)
    ("evaluate", ["{missing}"], "no weights there (studies.train saves model.pt in its run folder"),
    ("evaluate", ["{file}"], "not a torch file that holds only tensors"),
    ("evaluate", ["{run}", "--tta", "mirror"], "unknown view 'mirror'; valid: none, flip, flip-shift"),
    ("evaluate", ["{run}", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    ("evaluate", ["{run}", "--data", "{other-classes}"], "has other classes than the model (cat, dog)"),
]
CUDA_BATTERY = [(cli, ["--device", "cuda"], "no CUDA device") for cli in ("train", "lrfind", "onecycle", "devices")]


def _run_bad(cli: str, argv: list[str], out: Path, paths: dict[str, Path], capsys) -> tuple[int, str, str]:
    run = next(out.glob("runs/*/model.pt")).parent
    argv = [a.format(out=out, run=run, **{k: str(v) for k, v in paths.items()}) for a in argv]
    base = BASE[cli]
    if "--data" in argv:  # the bad data path replaces the synthetic set and its hold-out count
        base = [a for i, a in enumerate(base) if a not in ("--data", "--val-size")
                and (i == 0 or base[i - 1] not in ("--data", "--val-size"))]
    with_out = [] if "--out" in argv or cli not in WRITERS else ["--out", str(out)]
    code = CLIS[cli]([*base, *argv, *with_out])
    gc.collect()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("cli", "argv", "message"), [*BATTERY, *[pytest.param(*c, marks=NO_CUDA)
                                                                 for c in CUDA_BATTERY]],
                         ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_bad_input_is_refused_in_a_line_or_two_and_nothing_stored_changes(cli, argv, message, stored, bad_data,
                                                                          capsys):
    before = snapshot(stored)
    code, out, err = _run_bad(cli, argv, stored, bad_data, capsys)
    assert code == 2, err
    assert message in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert "hunter2secret" not in out + err
    if UNREACHABLE_PG in argv:  # the URL is named, its password masked
        assert "cifar:***@127.0.0.1" in err, err
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
    for cli in WRITERS:
        code = CLIS[cli]([*BASE[cli], "--out", str(target)])
        err = capsys.readouterr().err
        assert (code == 2 and "cannot be written" in err) or "no output folder" in err, (cli, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert snapshot(stored) == before



def test_study_names_with_html_and_shell_metacharacters_are_kept_literally(tmp_path):
    name = "<b>x</b>;$(touch pwned)`id`&'\""
    code = onecycle.main([*STUDY, *TINY, "--arch", "custom_resnet", "--trials", "1", "--study-name", name,
                          "--out", str(tmp_path)])
    assert code == 0
    storage = f"sqlite:///{tmp_path / 'studies' / 'studies.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [f"{name}-custom_resnet"]
    assert not (REPO / "pwned").exists() and not (tmp_path / "pwned").exists()
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
        runs.append([(t.params, t.value) for t in load_study_at(out).trials])
    assert runs[0] == runs[1]
    assert len({tuple(sorted(p.items())) for p, _ in runs[0]}) == 4  # four different configurations
