"""The study's ladder of budgets: rungs, ASHA's promotion rule, the best at the highest rung, standard errors and the
fidelity check, on hand-made scores; and a study on a data set smaller than its budget."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from conftest import load_study_at as load
from conftest import write_image_folder

from studies import onecycle
from studies._ladder import (
    PRESETS,
    Budget,
    Run,
    best_run,
    due_promotions,
    expected_trials,
    fidelity,
    make_ladder,
    rung_pairs,
    standard_error,
    tied_with_best,
    warmup_share,
)


def test_presets_rise_by_eta_to_their_top_rung():
    full = make_ladder(PRESETS["full"].epochs, 45_000, PRESETS["full"].rungs, 3)
    assert [(r.epochs, r.train_images) for r in full] == [(3, 16_667), (6, 25_000), (10, 45_000)]
    quick = make_ladder(PRESETS["quick"].epochs, PRESETS["quick"].train_images, PRESETS["quick"].rungs, 3)
    assert [(r.epochs, r.train_images) for r in quick] == [(2, 1365), (3, 2731), (6, 4096)]
    seen = [r.epochs * r.train_images for r in quick]
    assert seen[-1] >= 8 * seen[0] and seen == [2730, 8193, 24576]  # about 3x a rung
    assert [(r.epochs, r.train_images) for r in make_ladder(10, 100, 1, 3)] == [(10, 100)]
    # a ladder on few images never asks for more than the top rung has
    assert all(r.train_images <= 50 and r.epochs >= 1 for r in make_ladder(2, 50, 4, 3))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_rung_of_every_preset_schedules_every_batch_size(preset):
    import torch

    from cifarlab.config import TrainConfig
    from cifarlab.step import build_scheduler

    p = PRESETS[preset]
    assert [warmup_share(0.25, n) for n in (2, 4, 6, 8, 20)] == [0.25, 0.5, 2 / 6, 0.25, 0.25]
    for rung in make_ladder(p.epochs, p.train_images or 45_000, p.rungs, 3):
        for batch in (128, 256, 512, 1024):
            steps = rung.epochs * max(1, rung.train_images // batch)
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            # the quick ladder's bottom rung gives batch 512 exactly 4 steps: a one-step warm-up at 0.25
            config = TrainConfig(epochs=rung.epochs, pct_start=warmup_share(0.25, steps))
            scheduler = build_scheduler(config, optimizer, steps)
            for _ in range(steps):
                optimizer.step()
                scheduler.step()


def runs(*rows) -> list[Run]:
    return [Run(*r) for r in rows]


def test_promotion_takes_the_top_third_of_each_rung_once_highest_rung_first():
    # rung 0: nine complete, whose top three (1, 4, 2) went up; one running, one failed. Rung 1: those three.
    scores = [0.50, 0.70, 0.60, 0.20, 0.65, 0.10, 0.30, 0.40, 0.45]
    ladder = runs(*[(n, 0, "complete", v) for n, v in enumerate(scores)],
                  (9, 1, "complete", 0.80, 1), (10, 1, "complete", 0.75, 4), (11, 1, "complete", 0.85, 2),
                  (12, 0, "running"), (13, 0, "fail"))
    assert due_promotions(ladder, 3, 3) == [(11, 2)]  # rung 1's one slot, to its best
    ladder.append(Run(14, 2, "waiting", None, 11))
    assert due_promotions(ladder, 3, 3) == []  # a waiting promotion holds its slot
    # A tenth at rung 0, the best of all: in the top third, but the rung has sent up its third (10 // 3 == 3)
    # already. The twelfth opens a fourth slot, and the best not yet promoted takes it.
    ladder.append(Run(15, 0, "complete", 0.90))
    assert due_promotions(ladder, 3, 3) == []
    ladder.append(Run(16, 0, "complete", 0.05))
    assert due_promotions(ladder, 3, 3) == []
    assert due_promotions([*ladder, Run(17, 0, "complete", 0.06)], 3, 3) == [(15, 1)]
    # a promotion whose runs all failed (its workers killed) is made again, up to five times
    three = [(0, 0, "complete", 0.5), (1, 0, "complete", 0.4), (2, 0, "complete", 0.3)]
    failed = [(3 + k, 1, "fail", None, 0) for k in range(5)]
    assert due_promotions(runs(*three, *failed[:4]), 2, 3) == [(0, 1)]
    assert due_promotions(runs(*three, *failed[:4], (7, 1, "waiting", None, 0)), 2, 3) == []  # a retry waits
    assert due_promotions(runs(*three, *failed), 2, 3) == []
    # the top rung promotes nowhere
    assert due_promotions(runs((0, 0, "complete", 0.5), (1, 0, "complete", 0.4), (2, 0, "complete", 0.3)), 1, 3) == []


def test_the_best_is_the_best_of_the_highest_rung_reached():
    ladder = runs((0, 0, "complete", 0.9), (1, 0, "complete", 0.5), (2, 1, "complete", 0.6, 1),
                  (3, 1, "complete", 0.7, 0), (4, 2, "running", None, 3))
    assert best_run(ladder).number == 3  # rung 1's best, although rung 0 holds a higher score
    assert best_run(runs((0, 0, "pruned", None))) is None


def test_standard_errors_and_ties_on_the_validation_split():
    assert standard_error(0.45, 1000) == pytest.approx(0.01573, abs=1e-5)  # about ±1.6 points, as the issue says
    scores = pd.Series([0.80, 0.79, 0.77, 0.70])
    # the best's standard error on 1,000 images is 1.26 points: two of them reach down to 77.47%
    assert tied_with_best(scores, 1000).tolist() == [True, True, False, False]
    assert tied_with_best(scores, 100).tolist() == [True, True, True, False]  # 8 points on 100 images


def test_fidelity_on_hand_made_scores_gives_the_hand_computed_correlation():
    pairs = pd.DataFrame({"rung": [0] * 4 + [1] * 2, "config": ["#0", "#1", "#2", "#3", "#0", "#3"],
                          "lower": [0.10, 0.20, 0.30, 0.40, 0.5, 0.6], "upper": [0.15, 0.35, 0.25, 0.45, 0.7, 0.6]})
    first, second = fidelity(pairs)
    # ranks 1 2 3 4 against 1 3 2 4: Spearman 1 - 6 * 2 / (4 * 15) = 0.8; Kendall (5 - 1) / 6 = 0.667
    assert first["spearman"] == pytest.approx(0.8) and first["kendall"] == pytest.approx(4 / 6)
    assert first["configurations"] == 4 and first["same_best"]
    assert first["sentence"] == ("the ranking held from rung 0 to rung 1: Spearman 0.80 over 4 configurations "
                                 "(the same best)")
    assert second["spearman"] is None and not second["same_best"]
    assert second["sentence"] == "rung 1 to rung 2: 2 configurations run at both, too few to rank"
    reversed_ = pairs[pairs["rung"] == 0].assign(upper=[0.4, 0.3, 0.2, 0.1])
    (row,) = fidelity(reversed_)
    assert row["spearman"] == pytest.approx(-1.0) and row["sentence"].startswith("the ranking changed from rung 0")
    assert row["sentence"].endswith("the lower budget's ranking is not a guide here")
    (flat,) = fidelity(reversed_.assign(lower=0.1))  # 4 equal scores rank nothing
    assert flat["sentence"] == ("rung 0 to rung 1: the 4 configurations score alike at one of the two, so neither "
                                "ranks them")


def test_rung_pairs_follow_each_promotion_to_its_lowest_rung_trial():
    trials = [{"number": 0, "state": "complete", "value": 0.3, "user_attrs": {"rung": 0}},
              {"number": 1, "state": "complete", "value": 0.4, "user_attrs": {"rung": 0}},
              {"number": 2, "state": "complete", "value": 0.6, "user_attrs": {"rung": 1, "promoted_from": 1}},
              {"number": 3, "state": "complete", "value": 0.8, "user_attrs": {"rung": 2, "promoted_from": 2}},
              {"number": 4, "state": "running", "value": None, "user_attrs": {"rung": 1, "promoted_from": 0}}]
    assert rung_pairs(trials).to_dict("records") == [{"rung": 0, "config": "#1", "lower": 0.4, "upper": 0.6},
                                                     {"rung": 1, "config": "#1", "lower": 0.6, "upper": 0.8}]


def test_a_study_on_fewer_images_than_its_budget_caps_its_rungs_and_completes(tmp_path, capsys):
    # 5 classes of 30 images: fewer than the quick budget's 4,096; the seed trial's LR range test runs on them
    data = write_image_folder(tmp_path / "small", [f"c{i}" for i in range(5)], per_class=30)
    argv = ["--data", str(data), "--budget", "quick", "--trials", "3", "--arch", "custom_resnet", "--quiet",
            "--no-report", "--out", str(tmp_path / "out")]
    assert onecycle.main(argv) == 0
    out = capsys.readouterr().out
    assert "validation 30;" in out  # a fifth of the 150 training images, not the budget's 1,000
    assert ("note: the training split holds 120 images, fewer than the quick budget's 4,096: the rungs are capped "
            "at what is there") in out
    assert re.search(r"rungs 2 ep × 40 → 3 ep × 80 → 6 ep × 120 training images", out), out
    assert re.search(r"LR range test done in \d+ s", out), out
    study = load(tmp_path / "out")
    assert [t.user_attrs["rung"] for t in study.trials] == [0, 0, 0, 1]
    assert study.trials[3].user_attrs["train_images"] == 80


def test_a_failing_lr_range_test_is_a_short_error(tmp_path, capsys, monkeypatch):
    import cifarlab.lr_finder

    def broken(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines\nof trace")

    monkeypatch.setattr(cifarlab.lr_finder, "run_range_test", broken)
    argv = ["--data", "synthetic:200:20", "--budget", "smoke", "--trials", "1", "--arch", "custom_resnet",
            "--quiet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 2, err
    assert "the LR range test for the seed trial of custom_resnet failed (CUDA error: an illegal memory access" in err
    assert "pass --seed-max-lr" in err


def test_expected_trials_of_a_whole_ladder():
    budget = Budget("smoke", tuple(make_ladder(3, 288, 3, 3)), 3.0, 80, 8)
    assert [expected_trials(n, budget) for n in (1, 3, 9, 30)] == [1, 4, 13, 43]


def test_the_pages_are_redrawn_while_the_study_runs(tmp_path, monkeypatch, capsys):
    from studies import _cli

    redraws = []

    def recording(out, console, url=None):
        if console is None:  # a live redraw, not the one at the end
            redraws.append(sorted(p.name for p in (out / "studies").glob("*/index.html")))
        return real(out, console, url)

    real = _cli.rebuild_reports
    monkeypatch.setattr(_cli, "rebuild_reports", recording)
    monkeypatch.setattr(onecycle, "LIVE_PAGE_EVERY", 0.0)  # every trial: the throttle is 30 s
    monkeypatch.setattr(onecycle, "LIVE_PAGE_SHARE", 1.0)  # and a twentieth of the time
    argv = ["--data", "synthetic:200:40", "--budget", "smoke", "--trials", "3", "--arch", "custom_resnet",
            "--seed-max-lr", "0.003", "--quiet", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 0
    assert len(redraws) == 4  # after each of the 3 configurations and the promotion
    assert redraws[0] == [] and redraws[1] == ["index.html"]  # the study's page exists from the first redraw on
    assert "a live view: optuna-dashboard sqlite:///" in capsys.readouterr().out
