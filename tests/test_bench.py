"""bench.devices and the timing helpers it stands on."""

import csv

import pandas as pd
import pytest
import torch

from bench import devices
from cifarlab.models import create_model
from cifarlab.timing import Timer, training_flops_per_image


def test_timer_synchronises_before_each_clock_read():
    events = []
    ticks = iter([10.0, 12.5])

    def clock():
        events.append("clock")
        return next(ticks)

    def sync(device):
        events.append(f"sync:{device}")

    with Timer(torch.device("cuda:0"), clock=clock, sync=sync) as t:
        events.append("work")
    assert events == ["sync:cuda:0", "clock", "work", "sync:cuda:0", "clock"]
    assert t.seconds == 2.5


@pytest.mark.parametrize(("arch", "gflop"), [("custom_resnet", 0.76), ("resnet18", 1.11)])
def test_flop_counts_per_image(arch, gflop):
    flops = training_flops_per_image(create_model(arch))
    assert flops["forward"] / 1e9 == pytest.approx(gflop, rel=0.01)
    assert flops["backward"] == pytest.approx(2 * flops["forward"], rel=0.01)
    assert flops["train"] == pytest.approx(flops["forward"] + flops["backward"])


def test_a_dtype_the_cpu_only_emulates_is_probed_at_a_size_that_fits(monkeypatch):
    # bf16 on an AVX2-only CPU ran at about 1 GFLOP/s: one 2048 x 2048 product took 19 s, and a probe runs eight.
    from types import SimpleNamespace

    from cifarlab import timing

    now, sizes = [0.0], []

    def mm(a, b):  # a fake device at 1 GFLOP/s, on a fake clock
        sizes.append(a.shape[0])
        now[0] += 2 * a.shape[0] ** 3 / 1e9
        return a

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(torch, "mm", mm)
    rate = timing.matmul_flops_per_second(torch.device("cpu"), torch.bfloat16, n=2048, min_seconds=1)
    assert rate == pytest.approx(1e9)
    assert sizes[:2] == [256, 256] and len(set(sizes[2:])) == 1
    assert 256 < sizes[-1] < 2048 and 2 * sizes[-1] ** 3 / 1e9 <= 0.5  # one product fits half a second
    assert now[0] < 15  # the whole probe, against about 150 s at full size
    sizes.clear()
    timing.matmul_flops_per_second(torch.device("cpu"), torch.float32, n=512, min_seconds=1)
    assert sizes[:2] == [256, 256] and set(sizes[2:]) == {512}  # a product that fits keeps its size


def test_the_matmul_peak_is_the_fastest_sample_not_a_slow_spells_median(monkeypatch):
    # On the shared AMX Xeon one probe's five samples ran from 0.79 to 1.93 TFLOP/s; the median read 1.25, and a
    # share of peak taken against it was flattered. A fake device at 1 GFLOP/s whose last sample runs at 4.
    from types import SimpleNamespace

    from cifarlab import timing

    now, calls, fast_from = [0.0], [0], [None]

    def mm(a, b):
        calls[0] += 1
        fast = fast_from[0] is not None and calls[0] >= fast_from[0]
        now[0] += 2 * a.shape[0] ** 3 / (4e9 if fast else 1e9)
        return a

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(torch, "mm", mm)
    probe = {"device": torch.device("cpu"), "dtype": torch.float32, "n": 256, "repeats": 5, "min_seconds": 1}
    assert timing.matmul_flops_per_second(**probe) == pytest.approx(1e9)
    total = calls[0]
    inner = 8  # products per sample: 2 x 256^3 FLOP at 1 GFLOP/s is 34 ms, and a sample lasts at least 0.2 s
    calls[0], fast_from[0] = 0, total - inner + 1
    assert timing.matmul_flops_per_second(**probe) == pytest.approx(4e9)
    assert calls[0] == total  # the same products: only the last sample ran fast


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


BENCH = ["--data", "synthetic:200:40", "--val-size", "40", "--arch", "custom_resnet", "--images", "64",
         "--batch-size", "32", "--repeats", "2", "--warmup", "1", "--precision", "fp32",
         "--peak-seconds", "0.05"]


def test_devices_writes_csv_html_and_the_no_cuda_row(tmp_path, capfd, monkeypatch):
    import cifarlab.breakdown
    from cifarlab.cpu import freed_memory_retained

    # Each conv alone is timed with freed memory kept, as the training step it stands for keeps it.
    table, kept = cifarlab.breakdown.conv_layer_table, []

    def conv_layer_table(*a, **kw):
        kept.append(freed_memory_retained())
        return table(*a, **kw)

    monkeypatch.setattr(cifarlab.breakdown, "conv_layer_table", conv_layer_table)
    before = freed_memory_retained()
    assert devices.main([*BENCH, "--out", str(tmp_path)]) == 0
    assert kept[:1] == [True] and freed_memory_retained() == before  # the CPU's table; put back after it
    (run_dir,) = (tmp_path / "devices").iterdir()
    rows = read_rows(run_dir / "devices.csv")
    expected = {"arch", "device", "batch_size", "precision", "images_per_second", "seconds_median", "seconds_min",
                "seconds_max", "epoch_seconds", "epoch_50k_seconds", "epoch_kind", "data_share", "compute_share",
                "eval_seconds_per_epoch", "peak_memory_mb", "achieved_tflops", "peak_tflops", "share_of_peak",
                "speedup_vs_cpu", "status"}
    assert expected <= set(rows[0])
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["epoch_kind"] == "projected" and float(cpu[0]["images_per_second"]) > 0
    assert float(cpu[0]["share_of_peak"]) > 0 and float(cpu[0]["data_share"]) < 1
    if not torch.cuda.is_available():
        assert [r["status"] for r in rows if r["device"] == "cuda"] == ["no CUDA device on this machine"]
    page = (run_dir / "index.html").read_text()
    assert "<img" in page and "Environment" in page and (run_dir / "epoch_time.png").is_file()
    out, err = capfd.readouterr()  # file descriptors, so that the profiler's own C++ logging is seen too
    assert "img/s" in out and "probed again" in out  # the peak is the higher of a probe before and after
    assert "profiler_start" not in out + err and "gpuGetDeviceCount" not in out + err
    assert float(cpu[0]["share_of_peak"]) == pytest.approx(
        float(cpu[0]["achieved_tflops"]) / float(cpu[0]["peak_tflops"]))
    # The breakdown: where the step time goes, and each convolution alone.
    ops = read_rows(run_dir / "breakdown.csv")
    assert {r["category"] for r in ops} >= {"conv forward", "conv backward", "batch norm", "optimizer"}
    assert sum(float(r["seconds_per_step"]) for r in ops if r["category"].startswith("conv")) > 0
    layers = [r for r in read_rows(run_dir / "conv_layers.csv") if r["device"] == "cpu"]  # CUDA adds its own
    assert len(layers) == 8 and layers[0]["layer"] == "prep.0"
    assert "Where the time goes" in page and (run_dir / "breakdown.png").is_file()
    assert (run_dir / "conv_layers.png").is_file() and "conv backward" in out
    # how far profiling slowed the step, in the terminal and on the page; the rows are the unprofiled step
    assert "custom_resnet: profiled, a step took" in out and "custom_resnet · cpu: profiled, a step took" in page
    assert float(ops[0]["profiled_step_seconds"]) > 0 and float(ops[0]["scale"]) > 0
    # The step against the peak: its parts add up to the unprofiled step, the first being the share of peak.
    gaps = [r for r in read_rows(run_dir / "peak_gap.csv") if r["device"] == "cpu"]  # CUDA adds its own
    step_ms = 1e3 * 32 / float(cpu[0]["images_per_second"])
    assert sum(float(r["seconds_per_step"]) for r in gaps) * 1e3 == pytest.approx(step_ms)
    share, ceiling = float(cpu[0]["share_of_peak"]), float(cpu[0]["share_if_matmuls_at_peak"])
    if cpu[0]["matmuls_above_peak"] == "True":  # fp32 convs on an AVX2-only EPYC beat the matmul probe
        assert ceiling == pytest.approx(share) and float(gaps[1]["seconds_per_step"]) == 0
        assert float(gaps[0]["share"]) == pytest.approx(float(cpu[0]["matmul_share_of_step"]))
    else:
        assert float(gaps[0]["share"]) == pytest.approx(share) and share < ceiling <= 1
    assert "Against the peak" in page and (run_dir / "peak_gap.png").is_file()
    # one ceiling sentence per profiled row that has a ceiling (on a CUDA machine its rows print their own)
    below = [r for r in rows if r.get("matmuls_above_peak") == "False"]
    assert out.count("With every conv and GEMM at the peak") == len(below)
    assert " ".join(out.split()).count("with the convs and GEMMs as measured and nothing else") == len(below)
    assert cpu[0]["matmuls_above_peak"] in ("True", "False")


def test_no_breakdown_skips_it(tmp_path):
    assert devices.main([*BENCH, "--no-breakdown", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (run_dir,) = (tmp_path / "devices").iterdir()
    assert not (run_dir / "breakdown.csv").exists()
    assert "Where the time goes" not in (run_dir / "index.html").read_text()


def test_ablation_ladder_has_each_step_and_its_speedup(tmp_path, capsys):
    # --precision fp32 (BENCH's): the ladder a CPU without bf16 units climbs; the bf16 one's rungs are below.
    # One repetition a rung: this test is about the rungs, not their spread.
    assert devices.main([*BENCH, "--ablation", "--no-compile", "--images", "16", "--batch-size", "16", "--repeats", "1",
                         "--out", str(tmp_path)]) == 0
    (run_dir,) = (tmp_path / "devices").iterdir()
    rows = [r for r in read_rows(run_dir / "devices.csv") if r["device"] == "cpu"]
    assert [r["step"] for r in rows] == ["seed baseline (fp32, NCHW, DataLoader + albumentations)",
                                         "+ channels_last", "+ batched in-memory data", "+ fused optimizer",
                                         "+ freed memory kept", "+ the recipe's layers"]
    assert [r["fused_optimizer"] for r in rows] == ["False"] * 3 + ["True"] * 3
    assert [r["retain_memory"] for r in rows] == ["False"] * 4 + ["True"] * 2
    # Every rung but the last trains the seed's recipe; the last adds the default recipe's (whitening, frozen BN
    # scales, CELU, ghost batches, EMA, its crop), so the ladder shows their cost apart from the speed techniques.
    assert [r["seed_layers"] for r in rows] == ["True"] * 5 + ["False"]
    assert {r["precision"] for r in rows} == {"fp32"} and [r["channels_last"] for r in rows] == ["False"] + ["True"] * 5
    assert rows[-1]["choice_source"].startswith("rule")  # no --choose measurement stored
    assert float(rows[0]["speedup_vs_baseline"]) == 1.0
    assert rows[0]["data_path"] == "dataloader" and rows[-1]["data_path"] == "batched"
    assert (run_dir / "ablation.png").is_file()
    page = (run_dir / "index.html").read_text()
    # How far the device's peaks let a path go above the baseline: in the terminal and on the page.
    assert "custom_resnet on cpu, batch 16: the seed baseline trains at" in page
    assert "custom_resnet on cpu, batch 16: the seed baseline trains at" in capsys.readouterr().out


def test_ladder_bounds_say_what_the_peaks_allow_over_the_baseline():
    from cifarlab.report.devices import ladder_bounds

    # The baseline: 100 img/s at 0.2 TFLOP/s, half its fp32 peak of 0.4. A bf16 rung: 500 img/s at 1.0 TFLOP/s
    # of a 2.0 peak. At half the bf16 peak a path runs 5x the baseline, at the whole peak 10x.
    frame = pd.DataFrame([
        {"arch": "custom_resnet", "device": "cpu", "batch_size": 512, "step": "seed baseline (fp32)",
         "images_per_second": 100.0, "achieved_tflops": 0.2, "peak_tflops": 0.4, "precision": "fp32"},
        {"arch": "custom_resnet", "device": "cpu", "batch_size": 512, "step": "+ bf16 autocast",
         "images_per_second": 300.0, "achieved_tflops": 0.6, "peak_tflops": 2.0, "precision": "bf16"},
        {"arch": "custom_resnet", "device": "cpu", "batch_size": 512, "step": "+ channels_last",
         "images_per_second": 500.0, "achieved_tflops": 1.0, "peak_tflops": 2.0, "precision": "bf16"},
        {"arch": "resnet18", "device": "cpu", "batch_size": 512, "step": "default",  # no ladder: no line
         "images_per_second": 200.0, "achieved_tflops": 0.7, "peak_tflops": 2.0, "precision": "bf16"}])
    assert ladder_bounds(frame) == [
        "custom_resnet on cpu, batch 512: the seed baseline trains at 0.20 TFLOP/s, 50% of the fp32 peak (0.40). "
        "At that share of the bf16 peak (2.00) a path would run 5.0x the baseline, and at the whole peak 10.0x; "
        "the fastest rung (+ channels_last) runs 5.0x, at 50% of its peak."]
    assert ladder_bounds(frame[frame["arch"] == "resnet18"]) == []
    assert ladder_bounds(frame.drop(columns="peak_tflops")) == []  # a table from before peaks were stored


def test_a_ladder_has_only_the_rungs_of_the_path_training_takes():
    # A CPU without bf16 units (AVX2 only: the bf16 matmul emulated at 1-2 GFLOP/s against fp32's 120) trains
    # fp32; the ladder's top must be that path, not a bf16 one that training never takes there (NCHW by flag).
    from cifarlab.bench import ablation_ladder

    rungs = ablation_ladder("custom_resnet", "cpu", 32, precision="fp32", channels_last=False, with_compile=True)
    assert [r.step for r in rungs] == ["seed baseline (fp32, NCHW, DataLoader + albumentations)",
                                       "+ batched in-memory data", "+ fused optimizer", "+ freed memory kept",
                                       "+ the recipe's layers", "+ torch.compile"]
    assert {(r.precision, r.channels_last) for r in rungs} == {("fp32", False)}
    bf16 = ablation_ladder("custom_resnet", "cpu", 32, precision="bf16", channels_last=True, with_compile=False)
    assert [r.step for r in bf16] == ["seed baseline (fp32, NCHW, DataLoader + albumentations)", "+ bf16 autocast",
                                      "+ channels_last", "+ batched in-memory data", "+ fused optimizer",
                                      "+ freed memory kept", "+ the recipe's layers"]
    assert [(r.precision, r.channels_last) for r in bf16[1:3]] == [("bf16", False), ("bf16", True)]
    assert (bf16[-1].precision, bf16[-1].channels_last, bf16[-1].seed_layers) == ("bf16", True, False)
    no_cl = ablation_ladder("custom_resnet", "cpu", 32, precision="bf16", channels_last=False, with_compile=False)
    assert "+ channels_last" not in [r.step for r in no_cl] and not no_cl[-1].channels_last


def test_compared_cases_take_turns_one_repetition_each(monkeypatch):
    # A slow spell of minutes fell on a ladder's last rungs three runs in a row when each case ran its
    # repetitions back to back; taking turns spreads every spell over all the cases.
    from cifarlab import bench
    from cifarlab.data import load_splits

    order = []
    repeat = bench.CaseRun.repeat

    def logged(self):
        order.append(self.case.step)
        return repeat(self)

    monkeypatch.setattr(bench.CaseRun, "repeat", logged)
    splits = load_splits("synthetic:96:32", val_size=16)
    cases = [bench.Case("custom_resnet", "cpu", 16, "fp32", False, step=name) for name in "ab"]
    results = bench.time_cases(cases, splits, images=16, repeats=3, warmup_steps=1)
    assert order == ["a", "b"] * 3
    assert [r.case.step for r in results] == ["a", "b"] and all(len(r.seconds) == 3 for r in results)


def test_settle_waits_until_every_prefetched_batch_is_ready():
    # The seed path's workers refill their prefetch queue after the last step of a repetition; that work is the
    # repetition's, and done inside it it cannot run while another case is being timed.
    from types import SimpleNamespace

    from cifarlab import bench

    ready = iter([0, 1, 3, 4, 4])
    polls = []

    def qsize():
        polls.append(1)
        return next(ready)

    source = SimpleNamespace(loader_iter=SimpleNamespace(_num_workers=2, _tasks_outstanding=4,
                                                         _data_queue=SimpleNamespace(qsize=qsize)))
    batches = bench._Batches(source)
    batches.settle()
    assert len(polls) == 4  # returned at the first poll that found all four batches ready
    source.loader_iter = SimpleNamespace(_num_workers=2, _tasks_outstanding=4,
                                         _data_queue=SimpleNamespace(qsize=lambda: 0))
    batches.settle(timeout=0.05)  # a worker that never delivers does not hang the benchmark


def test_a_dataloader_repetition_ends_with_its_workers_prefetch_done():
    # settle() reads DataLoader internals; this fails if a torch release renames them (settle would then do
    # nothing, silently).
    from cifarlab import bench
    from cifarlab.data import load_splits

    splits = load_splits("synthetic:256:32", val_size=16)
    case = bench.Case("custom_resnet", "cpu", 16, "fp32", False, data_path="dataloader", fused_optimizer=False,
                      seed_layers=True)
    from cifarlab import cpu as hostmem

    retained = hostmem.freed_memory_retained()
    run = bench.CaseRun(case, splits, images=32, warmup_steps=1)
    try:
        run.repeat()
        it = run.batches.source.loader_iter
        # Every batch asked of the workers and not yet received is ready in their result queue: none is in work.
        assert it._num_workers == 2 and it._tasks_outstanding > 0
        assert it._data_queue.qsize() >= it._tasks_outstanding
    finally:
        run.close()
    assert hostmem.freed_memory_retained() == retained  # the case's malloc setting does not outlive it


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--arch", "vgg"], "unknown architecture vgg"), (["--device", "tpu"], "invalid choice"),
     (["--batch-size", "0"], "must be at least 1"), (["--images", "-5"], "--images must be a positive count"),
     (["--images", "lots"], "--images must be a positive count"), (["--repeats", "x"], "expected a whole number"),
     (["--precision", "fp16"], "invalid choice"), (["--threads", "0"], "must be at least 1"),
     (["--batch-size", "100000"], "larger than the training set"),
     (["--peak-seconds", "0"], "must be greater than 0")],
)
def test_bad_flags(argv, message, tmp_path, capsys):
    code = devices.main([*BENCH, *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_only_without_cuda_is_a_user_error(tmp_path, capsys):
    assert devices.main([*BENCH, "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_images_auto_times_a_whole_epoch_on_cuda_and_2048_images_on_the_cpu():
    assert devices._images("auto", 45_000, "cpu") == devices.CPU_AUTO_IMAGES == 2048
    assert devices._images("auto", 45_000, "cuda") == 45_000
    assert devices._images("auto", 1_000, "cpu") == 1_000  # never more than the split holds
    assert devices._images("512", 45_000, "cuda") == 512


def test_breakdown_milliseconds_keep_three_figures():
    # A CUDA step's parts are fractions of a millisecond: rounded to whole milliseconds they all printed as 0.
    assert [devices._ms(v) for v in (0.0123, 1.234, 12.34, 573.2, 1234.5)] == ["0.0123", "1.23", "12.3", "573", "1234"]


def test_throughput_times_whole_trials_with_k_workers_sharing_the_device(tmp_path, capsys):
    argv = ["--throughput", "--device", "cpu", "--arch", "custom_resnet", "--budget", "smoke", "--batch-size", "64",
            "--workers-per-device", "1", "2", "--trials-each", "2", "--data", "synthetic:400:40", "--val-size", "64",
            "--out", str(tmp_path)]
    assert devices.main(argv) == 0
    out = capsys.readouterr().out
    [run] = (tmp_path / "devices").glob("*-throughput")
    frame = pd.read_csv(run / "throughput.csv")
    assert list(frame["workers"]) == [1, 2] and list(frame["trials"]) == [2, 4]
    assert list(frame["train_images"]) == [288, 288] and list(frame["epochs"]) == [3, 3]  # smoke's top rung
    assert frame["trials_per_hour"].to_numpy() == pytest.approx(frame["trials"] * 3600 / frame["wall_seconds"])
    assert (frame["overhead_seconds"] < frame["trial_seconds"]).all() and (frame["overhead_seconds"] > 0).all()
    assert (frame["later_overhead_seconds"] < frame["first_overhead_seconds"]).all()  # the kept cache is reused
    assert frame["busy_share"].isna().all()  # a CPU is never idle while it trains: no busy share to report
    assert "2 workers (eager)" in out and "trials/h" in out
    assert "Study throughput" in (tmp_path / "index.html").read_text()
    page = (run / "index.html").read_text()
    assert "throughput.png" in page and "trials_per_hour" in page and (run / "throughput.png").stat().st_size > 0


@pytest.mark.parametrize(("eager", "compiled", "compile_s", "expected"), [
    (20.0, 14.0, 18.0, "saves 6.0 s a trial (20.0 → 14.0 s): repaid after 3 trials"),
    (20.0, 15.0, 18.0, "repaid after 4 trials"),  # 3.6 trials: the fourth repays it
    (10.0, 10.5, 18.0, "0.5 s longer than an eager one: it never repays"),
])
def test_compilation_repays_after_the_trials_its_saving_takes(eager, compiled, compile_s, expected):
    from bench.throughput import repay_sentence

    sentence = repay_sentence(eager, compiled, compile_s, "reduce-overhead")
    assert sentence.startswith("torch.compile (reduce-overhead) took 18.0 s once per worker and batch size")
    assert expected in sentence


def test_the_repay_sentence_compares_one_eager_worker_with_the_compiled_round():
    from bench.throughput import _repay

    def row(workers, mode, later, trial=30.0, compile_s=0.0):
        return {"workers": workers, "mode": mode, "later_trial_seconds": later, "trial_seconds": trial,
                "compile_seconds": compile_s}

    rows = [row(1, "eager", 20.0), row(2, "eager", 35.0), row(1, "reduce-overhead", 15.0, compile_s=18.0)]
    assert "saves 5.0 s a trial (20.0 → 15.0 s): repaid after 4 trials" in _repay(rows)
    # one trial per worker: a compiled trial's own time, less its compilation, is the steady one
    once = [row(1, "eager", float("nan"), 20.0), row(1, "reduce-overhead", float("nan"), 34.0, 18.0)]
    assert "(20.0 → 16.0 s): repaid after 5 trials" in _repay(once)
    assert _repay(rows[:2]) is None  # no compiled round (the CPU, --no-compile)
