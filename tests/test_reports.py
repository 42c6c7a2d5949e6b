"""Report pages drawn from records made here: they parse, links resolve, images decode, names are escaped,
and a headless browser loads every image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import devices
from studies import _reports, lrfind, onecycle, report, train

EVIL = 'x<script>alert("pwn")</script>&"'
SYNTH = ["--data", "synthetic:200:40", "--val-size", "40"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    common = ["--out", str(out)]
    # Small subsets: these tests are about the pages, not the figures on them.
    assert train.main([*SYNTH, "--train-subset", "64", "--epochs", "1", "--batch-size", "32", "--precision", "fp32",
                       "--quiet", *common]) == 0
    assert lrfind.main([*SYNTH, "--steps", "8", "--batch-size", "16", "--precision", "fp32", *common]) == 0
    assert onecycle.main([*SYNTH, "--train-subset", "64", "--budget", "smoke", "--trials", "3", "--arch",
                          "custom_resnet", "--seed-max-lr", "0.003", "--precision", "fp32", "--study-name", EVIL,
                          "--quiet", *common]) == 0
    assert devices.main([*SYNTH, "--arch", "custom_resnet", "--images", "32", "--batch-size", "32", "--repeats", "1",
                         "--warmup", "1", "--precision", "fp32", "--peak-seconds", "0.05", *common]) == 0
    return out


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if attrs.get(key):
                self.refs.append((tag, attrs[key]))


def pages(out: Path) -> list[Path]:
    return sorted(out.rglob("index.html"))


def test_index_lists_every_kind_of_record(out):
    text = (out / "index.html").read_text()
    for heading in ("Studies", "Runs", "LR range tests", "Device benchmarks"):
        assert f"<h2>{heading}</h2>" in text
    assert len(pages(out)) == 6  # index, run, LR test, study, benchmark, machines compared
    assert 'href="machines/index.html"' in text


def test_every_page_parses_and_every_link_and_image_resolves(out):
    checked_images = 0
    for page in pages(out):
        parser = Links()
        parser.feed(page.read_text())
        assert parser.scripts == 0, page
        for tag, ref in parser.refs:
            assert not re.match(r"^[a-z]+://", ref), f"{page}: external reference {ref}"
            path, _, fragment = ref.partition("#")
            target = (page.parent / path).resolve()
            assert target.is_file(), f"{page}: broken link {ref}"
            if fragment:  # the anchor is on the page it names
                assert f'id="{fragment}"' in target.read_text(), f"{page}: no {fragment!r} on {path}"
            if tag == "img":
                with Image.open(target) as im:
                    im.verify()
                checked_images += 1
    assert checked_images >= 10


def test_study_name_with_markup_is_inert(out):
    for page in pages(out):
        text = page.read_text()
        assert "<script>" not in text, page
    index = (out / "index.html").read_text()
    assert "x&lt;script&gt;alert(&quot;pwn&quot;)&lt;/script&gt;&amp;&quot;-custom_resnet" in index


def test_study_page_has_the_tables_and_figures(out):
    (study_page,) = [p for p in pages(out) if p.parent.parent.name == "studies"]
    text = study_page.read_text()
    # three configurations at rung 0 and the best of them at rung 1 (2 epochs): the best is rung 1's
    assert "Best against the seed (rung 1)" in text
    assert ("seed configuration" in text) != ("did not earn a promotion to this rung" in text)
    assert re.search(r"<code>python -m studies\.train --epochs 2 [^<]*--max-lr [0-9.e-]+", text), text
    assert "Trade-off between accuracy and time" in text and "Ladder of budgets" in text
    assert "Rung 0 to rung 1: 1 configuration run at both, too few to rank" in text.replace("&#x27;", "'")
    # rung 0 trains 21 of the 64 images for one epoch: every batch size tried holds them all in one step
    assert re.search(r"Optimizer steps per trial: batch \d+: 1[^<]* \(1 epoch of 21 training images at rung 0\)",
                     text), text
    for fig in ("history.png", "max_lr.png", "by_param.png", "curves.png", "time.png", "fidelity.png"):
        assert (study_page.parent / fig).is_file()
    # three complete trials: enough for Optuna's importance, computed for a page that is drawn
    assert "Hyperparameter importance" in text and (study_page.parent / "importance.png").is_file()
    assert (study_page.parent / "trials.csv").read_text().startswith("trial,rung,promoted_from,state,optimizer,max_lr")


def test_steps_per_trial_by_batch_size():
    from cifarlab.report.study import steps_by_batch

    # the quick budget: 3 epochs of 2,048 images; a pruned trial's fewer epochs do not lower the figure
    done = pd.DataFrame({"batch_size": [128, 1024, 512, 256, 128], "train_images": [2048] * 5,
                         "epochs_run": [3, 3, 3, 3, 1]})
    assert steps_by_batch(done) == ({128: 48, 256: 24, 512: 12, 1024: 6}, 2048, 3)
    # a batch larger than the training set takes all of it, one step an epoch
    assert steps_by_batch(done.assign(train_images=100))[0] == {128: 3, 256: 3, 512: 3, 1024: 3}
    assert steps_by_batch(done.assign(train_images=None)) == ({}, 0, 0)  # trials stored before they kept it


def test_the_time_front_keeps_each_trial_no_faster_one_beats():
    from cifarlab.report.study import pareto_front

    frame = pd.DataFrame({"trial": [0, 1, 2, 3, 4, 5], "seconds": [50.0, 20.0, 20.0, 90.0, 60.0, 30.0],
                          "val_accuracy": [0.70, 0.60, 0.65, 0.80, 0.75, 0.65]})
    # 1 ties 2 on time and loses; 5 is slower than 2 and no better; 0, 4 and 3 each beat everything faster
    assert pareto_front(frame)["trial"].tolist() == [2, 0, 4, 3]
    assert pareto_front(frame.iloc[[3]])["trial"].tolist() == [3]


def test_run_page_has_per_class_table_confusion_and_misclassified_grid(out):
    (run_page,) = [p for p in pages(out) if p.parent.parent.name == "runs"]
    text = run_page.read_text()
    assert "Test set by class" in text and "class9" in text
    assert (run_page.parent / "confusion.png").is_file() and (run_page.parent / "misclassified.png").is_file()
    assert (run_page.parent / "per_class.csv").is_file()


def test_report_command_rebuilds_from_stored_records_alone(out, capsys):
    (out / "index.html").unlink()
    (bench_dir,) = [p.parent for p in (out / "devices").glob("*/devices.json")]
    drawn = sorted(p.name for p in bench_dir.iterdir() if p.suffix in (".html", ".png"))
    assert "index.html" in drawn and "peak_gap.png" in drawn  # the figures of each section, the last included
    for name in drawn:
        (bench_dir / name).unlink()
    assert report.main(["--out", str(out)]) == 0
    assert (out / "index.html").is_file()
    printed = capsys.readouterr().out
    assert "1 device benchmark pages redrawn" in printed and "study pages" not in printed  # the study's page kept
    assert sorted(p.name for p in bench_dir.iterdir() if p.suffix in (".html", ".png")) == drawn
    assert f"{bench_dir.name}/index.html" in (out / "index.html").read_text()


def test_machines_compared_keeps_the_newest_default_path_of_each_machine(out, tmp_path, capsys):
    tree = tmp_path / "reports"
    shutil.copytree(out, tree)
    (bench,) = [p.parent for p in (tree / "devices").glob("*/devices.json")]
    doc = json.loads((bench / "devices.json").read_text())
    (here,) = [r for r in doc["rows"] if r["step"] == "default"]
    threads = doc["environment"]["torch_threads"]

    def copy_in(folder: str, **fields) -> None:
        """A benchmark folder as another machine (or this one, earlier) would have written it."""
        other = {**doc, "rows": [{**r, **fields} for r in doc["rows"]]}
        (tree / "devices" / folder).mkdir()
        (tree / "devices" / folder / "devices.json").write_text(json.dumps(other))

    copy_in("20000101-000000-bench", images_per_second=1.0)  # this machine, long ago: replaced by the newer run
    copy_in("20000102-000000-bench", device="cuda", device_name='GPU <b>"9"</b>',
            images_per_second=here["images_per_second"] * 1000)
    # and a run on the whole training split from the GPU (this tree's own run trained on a 64-image subset)
    (run,) = [p.parent for p in (tree / "runs").glob("*/run.json")]
    full = json.loads((run / "run.json").read_text())
    full["data"].update(train=45_000, train_subset=None)
    full["environment"].update(device="cuda", device_name='GPU <b>"9"</b>')
    (tree / "runs" / "20000103-000000-custom_resnet").mkdir()
    (tree / "runs" / "20000103-000000-custom_resnet" / "run.json").write_text(json.dumps(full))
    # and one stopped on this machine and resumed on the GPU: both named, in turn
    resumed = {**full, "machines": [f"{here['device_name']} · {threads} threads", 'GPU <b>"9"</b>'],
               "epochs": full["epochs"] * 2}
    (tree / "runs" / "20000104-000000-custom_resnet").mkdir()
    (tree / "runs" / "20000104-000000-custom_resnet" / "run.json").write_text(json.dumps(resumed))
    assert report.main(["--out", str(tree)]) == 0
    assert "the machines-compared page redrawn" in capsys.readouterr().out
    frame = pd.read_csv(tree / "machines" / "machines.csv")
    assert sorted(frame["machine"]) == sorted([f"{here['device_name']} · {threads} threads", 'GPU <b>"9"</b>'])
    assert frame["images_per_second"].min() == pytest.approx(here["images_per_second"])
    assert frame.set_index("machine").loc['GPU <b>"9"</b>', "vs_slowest"] == pytest.approx(1000)
    page = (tree / "machines" / "index.html").read_text()
    assert 'GPU &lt;b&gt;"9"&lt;/b&gt;' in page and "1,000.0×" in page and "<b>" not in page
    assert f'href="../devices/{bench.name}/index.html"' in page and "20000101-000000-bench" not in page
    assert (tree / "machines" / "machines.png").is_file()
    runs = pd.read_csv(tree / "machines" / "runs.csv")
    assert runs["run"].tolist() == ["20000103-000000-custom_resnet", "20000104-000000-custom_resnet"]  # fastest first
    assert runs["machine"].tolist() == ['GPU <b>"9"</b>', f'{here["device_name"]} · {threads} threads → GPU <b>"9"</b>']
    assert runs["epochs"].tolist() == [len(full["epochs"]), 2 * len(full["epochs"])]
    assert runs["training_seconds"][0] == pytest.approx(sum(e["epoch_seconds"] for e in full["epochs"]))
    section = page[page.index('id="time-to-accuracy"'):]
    assert f"{full['test']['plain']['accuracy']:.2%}" in section and 'GPU &lt;b&gt;"9"&lt;/b&gt;' in section
    assert 'href="../runs/20000103-000000-custom_resnet/index.html"' in section and run.name not in section
    assert report.main(["--out", str(tree)]) == 0  # nothing changed: the page is kept
    assert "machines-compared" not in capsys.readouterr().out


def test_a_study_page_is_redrawn_only_when_its_study_or_a_file_of_it_changed(out, tmp_path):
    import optuna

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (study_dir,) = [p.parent for p in (copy / "studies").glob("*/index.html")]
    figure = study_dir / "history.png"
    drawn_at = figure.stat().st_mtime_ns
    redrawn = []
    _reports.rebuild(copy, redrawn=redrawn)
    assert study_dir not in redrawn and figure.stat().st_mtime_ns == drawn_at  # nothing changed: kept
    figure.unlink()
    _reports.rebuild(copy, redrawn=redrawn)
    assert redrawn == [study_dir] and figure.is_file()  # a file of it gone: drawn again
    study = optuna.load_study(study_name=f"{EVIL}-custom_resnet",
                              storage=f"sqlite:///{copy / 'studies' / 'studies.db'}")
    study.add_trial(optuna.trial.create_trial(
        params={"optimizer": "sgd", "max_lr": 0.01, "batch_size": 128}, distributions=study.trials[0].distributions,
        value=0.5))
    redrawn.clear()
    _reports.rebuild(copy, redrawn=redrawn)
    assert redrawn == [study_dir] and "5 trials" in (study_dir / "index.html").read_text()  # the study changed


def test_the_results_summary_has_a_row_per_machine_with_speed_and_seed_spread(out, tmp_path, capsys):
    # A results folder as docs/results keeps it: this tree's benchmark, and two 10-epoch default-recipe runs of
    # one machine (seed spread), on the whole training split.
    results = tmp_path / "results"
    (bench,) = [p.parent for p in (out / "devices").glob("*/devices.json")]
    shutil.copytree(bench, results / "devices" / bench.name)
    (run,) = [p.parent for p in (out / "runs").glob("*/run.json")]
    doc = json.loads((run / "run.json").read_text())
    doc["data"].update(train=50_000, train_subset=None)
    for k, acc in enumerate((0.9100, 0.9150)):
        full = {**doc, "epochs": [{**doc["epochs"][-1], "epoch": e + 1} for e in range(10)],
                "wall_seconds": 600.0 * (k + 1),
                "test": {**doc["test"], "flip_tta": {**doc["test"]["flip_tta"], "accuracy": acc}}}
        (results / "runs" / f"2000010{k}-000000-custom_resnet").mkdir(parents=True)
        (results / "runs" / f"2000010{k}-000000-custom_resnet" / "run.json").write_text(json.dumps(full))
    assert report.main(["--summary", str(results)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| machine | precision | custom ResNet") and len(lines) == 3  # header, rule, a row
    row = lines[2]
    (speed,) = [r for r in json.loads((bench / "devices.json").read_text())["rows"] if r.get("step") == "default"]
    assert f"| {speed['images_per_second']:,.0f} (" in row  # the benchmark's custom ResNet speed and its share
    assert "| 2: 91.25% (91.00%–91.50%) | 15.0 min (10.0–20.0) |" in row  # two seeds: mean and range of each
    assert report.main(["--summary", str(tmp_path / "empty")]) == 2
    assert "no benchmark or run records under" in capsys.readouterr().err


def test_report_command_bad_out(tmp_path, capsys):
    assert report.main(["--out", str(tmp_path / "missing")]) == 2
    assert "no output folder" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="no chromium here (CI installs it)")
def test_browser_renders_index_and_study_page_with_every_image(out, tmp_path):
    browser = _chromium()
    assert browser, "CI must install Debian's chromium for the browser check"
    study_page = next(p for p in pages(out) if p.parent.parent.name == "studies")
    for page in (out / "index.html", study_page):
        # A copy beside the page (same relative paths) that reports unloaded images in its title once loaded.
        probe = page.with_name("_probe.html")
        probe.write_text(page.read_text().replace(
            "</body>", "<script>window.addEventListener('load', () => { const bad = [...document.images]"
            ".filter(i => !(i.complete && i.naturalWidth > 0)); document.title = 'images:' + "
            "document.images.length + ' broken:' + bad.length; });</script></body>"))
        profile = tmp_path / f"profile-{page.parent.name}"
        dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                              "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
        probe.unlink()
        title = re.search(r"<title>(images:\d+ broken:\d+)</title>", dom.stdout)
        assert title, dom.stdout[-500:] + dom.stderr[-500:]
        n, broken = map(int, re.findall(r"\d+", title.group(1)))
        assert broken == 0
        if page != out / "index.html":
            assert n >= 4
        shot = tmp_path / f"{page.parent.name}.png"
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
        with Image.open(shot) as im:
            assert im.size == (1280, 2400)
            assert len(np.unique(np.asarray(im.convert("L")))) > 8  # not a blank page
        if os.environ.get("CIFARLAB_SCREENSHOTS"):  # keep them for a person to look at
            shutil.copy(shot, Path(os.environ["CIFARLAB_SCREENSHOTS"]) / shot.name)


def test_study_throughput_counts_finished_trials_over_the_span_of_every_worker():
    from cifarlab.report.study import study_throughput, throughput_sentence

    def trial(state, start, end, seconds, overhead):
        return {"state": state, "started": f"2026-12-06T10:{start}", "completed": f"2026-12-06T10:{end}",
                "seconds": seconds, "user_attrs": {"overhead_seconds": overhead}}

    # two workers side by side over 30 minutes; a failed trial counts neither as finished nor in the span
    trials = [trial("complete", "00:00", "20:00", 1200, 60), trial("complete", "05:00", "30:00", 1500, 15),
              trial("pruned", "20:00", "25:00", 300, 25), trial("fail", "25:00", "59:00", 2040, 0)]
    rate = study_throughput(trials)
    assert rate["trials"] == 3 and rate["hours"] == 0.5 and rate["per_hour"] == 6.0
    assert rate["outside_epochs"] == 100 / 3000
    assert throughput_sentence(rate) == ("throughput: 3 trials finished in 30.0 min, 6.0 per hour; 3.3% of trial "
                                         "time outside epochs")
    assert study_throughput(trials[:1]) is None
