"""The CLIs as a user meets them: exit status, one- or two-line messages, files written."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.data import load_splits
from cifarlab.evaluate import evaluate
from cifarlab.weights import load_weights
from studies import lrfind as lrfind_cli
from studies import train as train_cli

SYNTH = ["--data", "synthetic:200:40", "--val-size", "40"]
NO_DATA = ["--data", "/no/such/folder"]
FAST = ["--batch-size", "32", "--eval-batch-size", "64", "--precision", "auto", "--quiet"]


def run_main(main, argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "vgg"], "invalid choice|unknown architecture 'vgg'; valid: custom_resnet, resnet18"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["--epochs", "ten"], "--epochs: expected a whole number"),
        (["--batch-size", "-4"], "--batch-size: must be at least 1"),
        (["--max-lr", "0"], "--max-lr: must be greater than 0"),
        (["--max-lr", "-0.1"], "--max-lr: must be greater than 0"),
        (["--max-lr", "nan"], "--max-lr: expected a finite number"),
        (["--train-subset", "0"], "--train-subset: a count must be at least 1"),
        (["--train-subset", "1.5"], "--train-subset: a fraction must lie in"),
        (["--data", "/no/such/folder"], "/no/such/folder does not exist"),
        (["--batch-size", "4096"], "--batch-size 4096 is larger than the training set (160 images)"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--compile-mode", "max-autotune"], "compile-mode max-autotune takes effect only with --compile"),
        # Adam and AdamW train every parameter at one LR: the flag was silently ignored with them
        (["--optimizer", "adam", "--bias-lr-scale", "8"], "--bias-lr-scale scales SGD's bias learning rate"),
        # 160 images at batch 40: 4 steps, exactly one to warm the LR up (torch would divide by zero)
        (["--epochs", "1", "--batch-size", "40"], "pct-start 0.25 of 4 steps (1 epoch) is a one-step warm-up"),
    ],
)
def test_train_cli_bad_input(argv, message, capsys):
    base = SYNTH if "--data" not in argv else []
    code, _, err = run_main(train_cli.main, [*base, *argv, "--out", "/tmp/cifarlab-never-written"], capsys)
    assert code == 2
    assert any(m in err for m in message.split("|")), err
    assert len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("module", "argv", "prefix"),
    [
        ("studies.train", ["--no-checkpoint", "--checkpoint-ev", "5m", *NO_DATA], "--checkpoint-ev"),
        ("studies.onecycle", ["--trials", "4", "--workers", "2", "--final", "--final-ep", "5", *NO_DATA], "--final-ep"),
        ("studies.lrfind", ["--step", "10", *NO_DATA], "--step"),
        ("studies.evaluate", ["/no/such/run", "--tt", "flip"], "--tt"),
        ("studies.report", ["--stor", "postgresql://cifar@127.0.0.1:1/none"], "--stor"),
        ("bench.devices", ["--no-break", *NO_DATA], "--no-break"),
    ],
)
def test_flags_are_taken_by_their_full_names_only(module, argv, prefix, capsys):
    # argparse took any unique prefix, which slipped past the checks that read the raw command line: each worker of
    # `studies.onecycle --workers 2 --final --final-ep 5` got --final-ep without --final and refused to run, and
    # `studies.train --no-checkpoint --checkpoint-ev 5m` ran without the refusal that the full flag gets. Each
    # command refuses one (each argv would otherwise fail fast on a missing path, with another message).
    import importlib

    code, _, err = run_main(importlib.import_module(module).main, argv, capsys)
    assert code == 2, err
    assert f"unrecognized arguments: {prefix}" in err and len(err.strip().splitlines()) == 2, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_is_a_user_error(capsys):
    code, _, err = run_main(train_cli.main, [*SYNTH, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in err


def test_data_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "data.txt"
    f.write_text("hello")
    code, _, err = run_main(train_cli.main, ["--data", str(f)], capsys)
    assert code == 2 and f"{f} is a file" in err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    code, _, err = run_main(train_cli.main, [*SYNTH, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot be written" in err


def test_train_cli_writes_a_run_record(tmp_path, capsys):
    # 64 images in steps of 16: four steps an epoch, enough for the one-cycle warm-up over two epochs
    argv = [*SYNTH, *FAST, "--train-subset", "64", "--batch-size", "16", "--epochs", "2", "--out", str(tmp_path)]
    code, out, _ = run_main(train_cli.main, argv, capsys)
    assert code == 0
    assert "test accuracy:" in out and "augmentation and batching:" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["status"] == "completed" and doc["config"]["epochs"] == 2
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2]
    assert doc["data"]["train"] == 64 and doc["data"]["classes"][0] == "class0"
    assert {"torch", "cpu_model", "torch_threads", "device_name"} <= set(doc["environment"])
    test = doc["test"]
    assert 0 <= test["plain"]["accuracy"] <= 1 and 0 <= test["flip_tta"]["accuracy"] <= 1
    assert sum(map(sum, test["plain"]["confusion"])) == 40
    assert (run_dir / "epochs.csv").read_text().startswith("epoch,train_loss")
    # The tested weights beside the record: the model they rebuild scores the test set as the run did.
    assert f"weights: {run_dir / 'model.pt'}" in out
    model, norm, _ = load_weights(run_dir / "model.pt")
    splits = load_splits(SYNTH[1], val_size=int(SYNTH[3]), seed=0)
    precision = doc["resolved"]["precision"]  # bf16 on a CPU with bf16 units: kernels round differently there
    again = evaluate(model, splits.test_images, splits.test_labels, norm, device=torch.device("cpu"),
                     precision=precision)
    agree = sum(a == b for a, b in zip(again.predictions.tolist(), test["plain"]["predictions"], strict=True)) / 40
    assert agree >= (1.0 if precision == "fp32" else 0.9), agree
    # studies.evaluate finds the run's data, recipe and normalisation from the folder alone and scores as it did
    from studies import evaluate as evaluate_cli

    code, out, _ = run_main(evaluate_cli.main, [str(run_dir), "--tta", "none,flip"], capsys)
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines()
                                          if line.startswith("│"))}
    assert code == 0 and set(rows) == {"none", "flip"}
    # fp32 agrees to the digit; bf16 kernels may round a prediction the other way, so there the re-evaluation may
    # differ by at most 2 of the 40 test images and its loss by 2%.
    images, loss_tol = (0, 0.0) if precision == "fp32" else (2, 0.02)
    for views, key in (("none", "plain"), ("flip", "flip_tta")):
        assert rows[views][6] == f"{test[key]['accuracy']:.2%}"  # the run's own figure, shown beside
        assert abs(float(rows[views][2].rstrip("%")) / 100 - test[key]["accuracy"]) <= images / 40 + 1e-9
        assert float(rows[views][3]) == pytest.approx(test[key]["loss"], rel=loss_tol, abs=5e-5)


@pytest.fixture
def ctrl_c_reaches_us():
    """SIGINT handled as in a terminal, whatever pytest inherited: started as a script's background job (``nohup
    ... &``, as a CI runner may start it) it ignores SIGINT, and a run rightly keeps ignoring it."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_stopped_train_run_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch, ctrl_c_reaches_us):
    argv = [*SYNTH, *FAST, "--train-subset", "64", "--batch-size", "16", "--epochs", "2", "--no-test"]
    # A real Ctrl-C (SIGINT to this process) at the end of step 6 of 8, in epoch 2, with no timed save due.
    monkeypatch.setenv("CIFARLAB_FAULT", "step:6:INT")
    code, out, err = run_main(train_cli.main, [*argv, "--out", str(tmp_path / "stopped")], capsys)
    monkeypatch.delenv("CIFARLAB_FAULT")
    (stopped,) = (tmp_path / "stopped" / "runs").iterdir()
    assert f"checkpoint: {stopped / 'checkpoint.pt'} (if the run stops: python -m studies.train --resume" in out
    assert code == 130 and "stopping after this step to save a checkpoint" in err
    assert f"checkpoint of epoch 2, step 2 of 4 kept: python -m studies.train --resume {stopped} continues" in err
    assert sorted(p.name for p in stopped.iterdir()) == ["checkpoint.pt"]  # no record of an unfinished run
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before once it is out
    # the reports list it as unfinished, with where it stands and the command that continues it
    from studies._reports import rebuild

    junk = tmp_path / "stopped" / "runs" / "20260101-000000-custom_resnet"
    junk.mkdir()
    (junk / "checkpoint.pt").write_bytes(b"cut short")  # a file a lost disk left: listed, not fatal
    index = rebuild(tmp_path / "stopped").read_text()
    assert "<h2>Unfinished runs</h2>" in index and "epoch 2 of 2: step 2 of 4" in index
    assert f"<td>{stopped.name}</td><td>stopped</td>" in index
    assert f"<code>python -m studies.train --resume {stopped}</code>" in index
    assert "<td>20260101-000000-custom_resnet</td><td>stopped</td><td>—</td><td>not a readable checkpoint</td>" in index
    (junk / "checkpoint.pt").unlink()
    junk.rmdir()
    # While another process trains it, the reports say so and a second --resume is refused, losing nothing.
    from cifarlab.report.records import holding

    before = (stopped / "checkpoint.pt").read_bytes()
    with holding(stopped):
        assert f"<td>{stopped.name}</td><td>training now</td>" in rebuild(tmp_path / "stopped").read_text()
        code, _, err = run_main(train_cli.main, ["--resume", str(stopped), "--data", SYNTH[1]], capsys)
    assert code == 2 and "is in use: another process is training there now" in err and len(err.splitlines()) == 1
    assert (stopped / "checkpoint.pt").read_bytes() == before

    code, _, err = run_main(train_cli.main, ["--resume", str(stopped), "--epochs", "5"], capsys)
    assert code == 2 and "drop --epochs" in err and len(err.strip().splitlines()) <= 2
    code, out, _ = run_main(train_cli.main, ["--resume", str(stopped), "--data", SYNTH[1], "--quiet"], capsys)
    assert code == 0 and f"resuming {stopped} in epoch 2 of 2, after step 2 of 4" in out
    # the same epochs as a run never stopped: cifarlab.train's resume test shows it figure for figure
    doc = json.loads((stopped / "run.json").read_text())
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2] and doc["resumed_after_epochs"] == [1.5]
    assert len(doc["machines"]) == 2 and doc["machines"][0] == doc["machines"][1]  # each session's, the same here
    assert doc["config"]["batch_size"] == 16 and doc["data"]["train"] == 64
    assert not (stopped / "checkpoint.pt").exists() and (stopped / "model.pt").is_file()  # a finished run removes it
    index = (tmp_path / "stopped" / "index.html").read_text()
    assert "Unfinished runs" not in index and f'href="runs/{stopped.name}/index.html"' in index
    code, _, err = run_main(train_cli.main, ["--resume", str(stopped)], capsys)  # finished: nothing to resume
    assert code == 2 and "is a finished run (its run.json is there): there is nothing to resume" in err


def test_a_second_ctrl_c_stops_at_once(ctrl_c_reaches_us):
    from cifarlab.checkpoint import Checkpointing
    from studies import _cli

    ckpt = Checkpointing(Path("unused.pt"))
    with pytest.raises(KeyboardInterrupt), _cli.stop_at_a_step(ckpt):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: asks for a save at the step's end
        assert ckpt.stop_requested
        os.kill(os.getpid(), signal.SIGINT)  # the user will not wait for it
        pytest.fail("a second stop did not interrupt")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    # a script's background job starts with SIGINT ignored, so that the script's Ctrl-C leaves it running
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _cli.stop_at_a_step(ckpt):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_diverging_train_run_says_why_and_leaves_no_folder_behind(tmp_path, capsys):
    argv = [*SYNTH, *FAST, "--train-subset", "64", "--batch-size", "16", "--epochs", "2", "--max-lr", "1e9",
            "--optimizer", "adam", "--no-test", "--out", str(tmp_path)]
    code, _, err = run_main(train_cli.main, argv, capsys)
    assert code == 2 and "training loss became" in err and len(err.strip().splitlines()) <= 2, err
    assert not any((tmp_path / "runs").iterdir())  # its folder, made for the checkpoint, is gone with it


@pytest.mark.parametrize(("recipe", "shown", "absent"), [
    ([], ("CELU", "GhostBatchNorm2d"), ("ReLU", "─BatchNorm2d")),
    (["--activation", "relu", "--ghost-batch", "0"], ("ReLU", "─BatchNorm2d"), ("CELU", "Ghost")),
])
def test_train_cli_prints_the_layer_table_of_the_model_it_trains(tmp_path, capsys, recipe, shown, absent):
    argv = [*SYNTH, "--train-subset", "32", "--batch-size", "32", "--precision", "fp32", "--epochs", "1", "--no-test",
            "--out", str(tmp_path), *recipe]
    code, out, _ = run_main(train_cli.main, argv, capsys)
    assert code == 0 and "Total params: 6,573,120" in out
    assert all(name in out for name in shown) and not any(name in out for name in absent)


def test_lrfind_cli_writes_csv_plot_and_suggestions(tmp_path, capsys, monkeypatch):
    from cifarlab import cpu, lr_finder

    retained = []
    sweep = lr_finder.lr_range_test

    def recorded(*args, **kw):
        retained.append(cpu.freed_memory_retained())
        return sweep(*args, **kw)

    monkeypatch.setattr(lr_finder, "lr_range_test", recorded)
    argv = [*SYNTH, "--batch-size", "16", "--steps", "8", "--precision", "fp32", "--device", "cpu",
            "--out", str(tmp_path)]
    code, out, _ = run_main(lrfind_cli.main, argv, capsys)
    assert code == 0 and "steepest" in out and "min_div_10" in out
    # the sweep trains as fit() does on the CPU, keeping freed memory (glibc), and lets it go after
    assert retained == [cpu.memory._glibc() is not None] and not cpu.freed_memory_retained()
    (run_dir,) = (tmp_path / "lrfind").iterdir()
    csv = (run_dir / "lrfind.csv").read_text().splitlines()
    assert csv[0] == "step,lr,loss,smoothed_loss" and len(csv) >= 4
    assert (run_dir / "lrfind.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((run_dir / "lrfind.json").read_text())
    assert set(doc["suggestions"]) == {"steepest", "min_div_10"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--start-lr", "1", "--end-lr", "0.1"], "must be below --end-lr"),
     (["--steps", "2"], "at least 3"), (["--optimizer", "rmsprop"], "invalid choice"),
     (["--start-lr", "-1"], "must be greater than 0")],
)
def test_lrfind_cli_bad_input(argv, message, capsys):
    code, _, err = run_main(lrfind_cli.main, [*SYNTH, *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_modules_run_from_the_repository_root():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for module in ("studies.train", "studies.lrfind"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0 and "--data" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "studies.train", "--epochs", "x"], cwd=root, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "expected a whole number" in proc.stderr


def test_a_tested_run_trains_on_every_training_image_by_default(tmp_path, capsys):
    argv = ["--data", "synthetic:200:40", *FAST, "--epochs", "1", "--out", str(tmp_path)]  # --val-size 0: the default
    code, out, _ = run_main(train_cli.main, argv, capsys)
    assert code == 0 and "200 train / 0 val / 40 test" in out and "test accuracy" in out
    assert "no validation split" in out and "nan%" not in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["data"]["train"] == 200 and doc["epochs"][0]["val_accuracy"] is None
    assert "none held out" in (run_dir / "index.html").read_text()
    code, _, err = run_main(train_cli.main, ["--data", "synthetic:200:40", "--val-size", "-1"], capsys)
    assert code == 2 and "a count must be at least 0" in err


def test_an_untested_run_holds_a_tenth_out_and_resumes_with_it(tmp_path, capsys, monkeypatch, ctrl_c_reaches_us):
    from cifarlab.checkpoint import load_checkpoint

    argv = ["--data", "synthetic:200:40", *FAST, "--epochs", "1", "--no-test", "--out", str(tmp_path)]
    monkeypatch.setenv("CIFARLAB_FAULT", "step:2:INT")  # stopped after step 2 of 6
    code, out, _ = run_main(train_cli.main, argv, capsys)
    monkeypatch.delenv("CIFARLAB_FAULT")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert code == 130 and "180 train / 20 val" in out
    assert load_checkpoint(run_dir / "checkpoint.pt")["extra"]["args"]["val_size"] == 0.1  # resolved, not None
    code, out, _ = run_main(train_cli.main, ["--resume", str(run_dir)], capsys)
    assert code == 0 and "180 train / 20 val" in out
    assert json.loads((run_dir / "run.json").read_text())["data"]["val"] == 20


def test_a_stored_config_becomes_the_train_command_that_rebuilds_it():
    from cifarlab.config import TrainConfig, train_argv
    from studies._cli import dataclass_from_args

    config = TrainConfig(epochs=3, optimizer="adam", max_lr=0.00123456, batch_size=128, whiten=False, seed=7,
                         cycle_momentum=True, anneal_strategy="cos").to_dict()
    argv = train_argv(config)
    assert argv[:2] == ["--epochs", "3"] and "--no-whiten" in argv and "--cycle-momentum" in argv
    assert "--seed" not in argv and "--arch" not in argv  # the default architecture needs no flag
    rebuilt = dataclass_from_args(TrainConfig, train_cli.build_parser().parse_args(argv))
    assert rebuilt.to_dict() == {**config, "seed": 0}
    # An Adam config stored with another bias LR scale (it has no effect there) gives a command train accepts.
    assert "--bias-lr-scale" not in train_argv({**config, "bias_lr_scale": 1.0})
    assert "--bias-lr-scale" in train_argv({**config, "optimizer": "sgd", "bias_lr_scale": 1.0})
