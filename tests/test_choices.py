"""Per-architecture precision and memory format: measured by bench.devices --choose, used by training."""

import json
import os

import pytest
import torch

from bench import devices
from cifarlab import choices
from cifarlab.choices import pick_fastest, resolve_speed, save_choice
from studies import train as train_cli

CPU = torch.device("cpu")


def combo(precision, cl, ips):
    return {"precision": precision, "channels_last": cl, "images_per_second": ips}


def test_pick_fastest_takes_the_fastest_combination():
    rows = [combo("fp32", False, 70), combo("fp32", True, 80), combo("bf16", False, 140), combo("bf16", True, 170)]
    assert pick_fastest(rows, rule=("fp32", False)) is rows[3]


def test_pick_fastest_keeps_the_rule_on_a_near_tie():
    rows = [combo("bf16", False, 101), combo("bf16", True, 99)]
    assert pick_fastest(rows, rule=("bf16", True)) is rows[1]  # 2% apart: noise, the rule stays
    rows = [combo("bf16", False, 110), combo("bf16", True, 99)]
    assert pick_fastest(rows, rule=("bf16", True)) is rows[0]  # 11% apart: the measurement wins


def test_pick_fastest_keeps_the_rule_within_the_measured_spread():
    # the H200's four combinations: fp32 channels_last 4% ahead of the rule's bf16 channels_last, spreads 8 and 6%
    rows = [{**combo("fp32", True, 41_720), "spread_pct": 8.0}, {**combo("bf16", True, 40_127), "spread_pct": 6.0}]
    assert pick_fastest(rows, rule=("bf16", True)) is rows[1]
    steady = [{**r, "spread_pct": 1.0} for r in rows]  # the same medians, repeated closely: 4% is a real lead
    assert pick_fastest(steady, rule=("bf16", True)) is steady[0]


def test_no_measurement_falls_back_to_the_rule():
    speed = resolve_speed("custom_resnet", CPU, "fp32", "auto")
    assert (speed.precision, speed.channels_last) == ("fp32", True)  # channels_last in fp32 too (an EPYC's 18%)
    assert speed.source.startswith("rule")
    assert resolve_speed("custom_resnet", CPU, "fp32", "off").channels_last is False  # the seed's, by flag


def test_flags_win_over_a_stored_measurement():
    save_choice("custom_resnet", CPU, {"precision": "bf16", "channels_last": False, "batch_size": 512,
                                       "images_per_second": 150.0})
    speed = resolve_speed("custom_resnet", CPU, "fp32", "on")
    assert (speed.precision, speed.channels_last, speed.source) == ("fp32", True, "set by flags")


def test_a_stored_measurement_is_used_per_architecture_and_says_so():
    save_choice("custom_resnet", CPU, {"precision": "fp32", "channels_last": True, "batch_size": 512,
                                       "images_per_second": 123.0})
    speed = resolve_speed("custom_resnet", CPU)
    assert (speed.precision, speed.channels_last) == ("fp32", True)
    assert "measured by bench.devices --choose" in speed.source and "123 img/s" in speed.source
    # another architecture on the same device has no measurement: the rule
    assert resolve_speed("resnet18", CPU).source.startswith("rule")
    # an explicit precision other than the measured one: the measured memory format does not carry over
    explicit = resolve_speed("custom_resnet", CPU, "bf16", "auto")
    assert (explicit.precision, explicit.channels_last) == ("bf16", True) and explicit.source.startswith("rule")


def test_a_choice_from_another_torch_build_or_a_broken_file_does_not_apply(monkeypatch):
    save_choice("custom_resnet", CPU, {"precision": "fp32", "channels_last": True})
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    assert resolve_speed("custom_resnet", CPU, "fp32", "auto").source.startswith("rule")
    with open(os.environ["CIFARLAB_CHOICES"], "w") as fh:
        fh.write("{not json")
    assert resolve_speed("custom_resnet", CPU, "fp32", "auto").source.startswith("rule")


def test_saving_one_choice_keeps_the_others():
    save_choice("custom_resnet", CPU, {"precision": "fp32", "channels_last": True})
    save_choice("resnet18", CPU, {"precision": "fp32", "channels_last": False})
    with open(os.environ["CIFARLAB_CHOICES"]) as fh:
        (entries,) = json.load(fh).values()
    assert set(entries) == {"custom_resnet", "resnet18"} and entries["custom_resnet"]["channels_last"] is True


BENCH = ["--data", "synthetic:200:40", "--val-size", "40", "--arch", "custom_resnet", "--images", "32",
         "--batch-size", "32", "--repeats", "1", "--warmup", "1", "--device", "cpu",
         "--peak-seconds", "0.05"]


def test_choose_times_each_combination_stores_the_fastest_and_training_uses_it(tmp_path, capsys, monkeypatch):
    # Probes as an AVX2-only CPU reads them (bf16 emulated, 1/80 of fp32): --choose leaves bf16 out there rather
    # than time a step 12x slower. Where bf16 is fast, its two layouts join (test below); the timing is the same.
    monkeypatch.setattr(devices, "_matmul_peaks", lambda device, seconds: {"fp32": 1.2e11, "bf16": 1.5e9})
    assert devices.main([*BENCH, "--choose", "--out", str(tmp_path)]) == 0
    assert "bf16 left out: its matmul ran at 1.5 GFLOP/s here, 1/80 of fp32's" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "devices").iterdir()
    doc = json.loads((run_dir / "devices.json").read_text())
    rows = doc["rows"]
    assert sorted((r["precision"], r["channels_last"]) for r in rows) == [("fp32", False), ("fp32", True)]
    (chosen,) = [r for r in rows if r["chosen"]]
    page = (run_dir / "index.html").read_text()
    assert "Per-architecture choice" in page and (run_dir / "choice.png").is_file()
    stored = choices.lookup("custom_resnet", CPU)
    assert (stored["precision"], stored["channels_last"]) == (chosen["precision"], chosen["channels_last"])
    assert len(stored["alternatives"]) == 2
    capsys.readouterr()

    # the default benchmark and a training run with --precision auto now use the stored choice
    assert devices.main([*BENCH, "--no-breakdown", "--out", str(tmp_path)]) == 0
    default_dir = max((tmp_path / "devices").iterdir())
    (row,) = json.loads((default_dir / "devices.json").read_text())["rows"]
    assert (row["precision"], row["channels_last"]) == (chosen["precision"], chosen["channels_last"])
    assert row["choice_source"].startswith("measured")
    assert train_cli.main(["--data", "synthetic:64:20", "--val-size", "20", "--epochs", "1", "--batch-size", "32",
                           "--quiet", "--no-test", "--out", str(tmp_path)]) == 0
    assert "measured by bench.devices --choose" in capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    resolved = json.loads((run / "run.json").read_text())["resolved"]
    assert (resolved["precision"], resolved["channels_last"]) == (chosen["precision"], chosen["channels_last"])
    assert resolved["speed_choice"].startswith("measured")


def test_choose_times_bf16_only_where_its_matmul_is_not_emulated():
    from cifarlab.bench import choice_cases, choice_precisions

    assert choice_precisions("cpu", {"fp32": 0.3e12, "bf16": 2.0e12}) == (["fp32", "bf16"], "")
    precisions, note = choice_precisions("cpu", {"fp32": 1.2e11, "bf16": 1.5e9})
    assert precisions == ["fp32"] and note.startswith("bf16 left out")
    four = choice_cases("custom_resnet", "cpu", 32, ["fp32", "bf16"])
    assert [c.step for c in four] == ["fp32 · NCHW", "fp32 · channels_last", "bf16 · NCHW", "bf16 · channels_last"]
    assert all(c.data_path == "batched" and not c.seed_layers for c in four)


def test_choose_and_ablation_together_is_a_user_error(tmp_path, capsys):
    assert devices.main([*BENCH, "--choose", "--ablation", "--out", str(tmp_path)]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_choice_is_keyed_by_the_gpu():
    assert choices.device_key(torch.device("cuda:0")).startswith("cuda: " + torch.cuda.get_device_name(0))


def test_the_cpu_key_names_model_matmul_features_and_threads(monkeypatch):
    key = choices.device_key(CPU)
    assert key.startswith("cpu: ") and f"torch {torch.__version__}" in key
    monkeypatch.setattr(choices, "cpu_matmul_features", lambda: ["amx_bf16", "avx512_bf16"])
    assert "[amx_bf16 avx512_bf16]" in choices.device_key(CPU) and choices.device_key(CPU) != key
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert "64 threads" in choices.device_key(CPU)


def test_a_slow_spell_probe_does_not_lower_the_peak_and_a_better_one_raises_it(tmp_path):
    path = tmp_path / "choices.json"
    cpu = torch.device("cpu")
    peaks, source = choices.best_peaks(cpu, {"fp32": 0.3e12, "bf16": 2.0e12}, path)
    assert peaks == {"fp32": 0.3e12, "bf16": 2.0e12} and source["bf16"] == "this run's probe"
    # A slow spell: the stored best stays the denominator, and says where it came from.
    peaks, source = choices.best_peaks(cpu, {"fp32": 0.35e12, "bf16": 0.8e12}, path)
    assert peaks == {"fp32": 0.35e12, "bf16": 2.0e12}
    assert source["bf16"].startswith("best stored probe") and source["fp32"] == "this run's probe"
    # A better probe replaces it; the speed choices stored in the same file are kept.
    save_choice("custom_resnet", cpu, {"precision": "bf16", "channels_last": True}, path)
    peaks, _ = choices.best_peaks(cpu, {"fp32": 0.1e12, "bf16": 2.2e12}, path)
    assert peaks == {"fp32": 0.35e12, "bf16": 2.2e12}
    assert choices.lookup("custom_resnet", cpu, path)["precision"] == "bf16"
    assert choices.best_peaks(cpu, {"bf16": 1.0e12}, path)[0]["bf16"] == 2.2e12
