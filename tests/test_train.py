
import dataclasses
import time

import numpy as np
import pytest
import torch
from conftest import denormalize

from cifarlab import train
from cifarlab.checkpoint import Checkpointing, load_checkpoint
from cifarlab.config import TrainConfig
from cifarlab.data import load_splits
from cifarlab.errors import ConfigError, TrainingDiverged
from cifarlab.evaluate import evaluate
from cifarlab.step import build_optimizer
from cifarlab.timing import resolve_precision
from cifarlab.train import fit
from cifarlab.weights import load_weights, save_weights


@pytest.fixture(scope="module")
def tiny():
    return load_splits("synthetic:256:64", val_size=64, seed=0)


@pytest.fixture(scope="module")
def small(tiny):
    """96 of tiny's 192 training images: 3 steps of 32 an epoch, at half the cost on a CPU without bf16 units."""
    return tiny.with_train_subset(96, seed=0)


def quick(**kw):
    base = {"epochs": 2, "batch_size": 32, "max_lr": 0.05, "eval_batch_size": 64, "precision": "auto", "log_every": 1}
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.realdata
@pytest.mark.slow
def test_short_training_on_real_subset_learns(real_data_path):
    # One epoch of 32 steps of 32 on 1,024 real images: over seeds 0-2 (subsets drawn with the seed) on an fp32
    # CPU, the last 8 steps' mean loss was 0.82-0.85x the first 8's and val accuracy 0.29-0.36 (52 s on one
    # thread; two epochs took twice that for 0.36-0.40; peak LR 0.05 or 0.3 gave 0.22-0.28, 1.0 gave 0.14-0.22).
    splits = load_splits(real_data_path, val_size=400, seed=0).with_train_subset(1024, seed=0)
    means = []  # the epoch's running mean loss after each step

    def on_step(epoch, step, steps, mean_loss, accuracy):
        means.append(mean_loss)

    result = fit(TrainConfig(epochs=1, batch_size=32, max_lr=0.1, label_smoothing=0.0, log_every=1), splits,
                 on_step=on_step)
    n, k = len(means), len(means) // 4
    assert n == 32
    first = means[k - 1]
    last = (n * means[-1] - (n - k) * means[n - k - 1]) / k  # every step has 32 images
    assert last < 0.9 * first, (first, last)
    assert result.records[-1].val_accuracy > 0.2  # chance is 0.10 (s.d. 0.015) on 400 held-out real images
    assert result.records[-1].images_per_second > 0 and result.records[-1].epoch_seconds > 0


def _metrics(result):
    return [(r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy, r.lr) for r in result.records]


def test_same_seed_same_metrics_on_cpu(small):
    small = small.with_train_subset(64, seed=0)  # one epoch: 2 steps, a validation and the records
    a = fit(quick(seed=7, epochs=1), small)
    b = fit(quick(seed=7, epochs=1), small)
    assert _metrics(a) == _metrics(b)
    c = fit(quick(seed=8, epochs=1), small)
    assert _metrics(c) != _metrics(a)


def test_a_run_resumed_from_its_checkpoint_ends_as_one_never_stopped(small, tmp_path):
    small = small.with_train_subset(48, seed=0)  # 3 steps of 16 an epoch: half the images, the same schedule
    config = quick(batch_size=16, alternate_flip=True, ema=0.9)  # mirrors and EMA: state a checkpoint keeps too
    whole = fit(config, small)
    path = tmp_path / "checkpoint.pt"

    def stop_request(record):  # the CLI's Ctrl-C handler calls request_stop; here it comes during an evaluation
        ckpt.request_stop()

    # A stop asked for while epoch 1 is evaluated: the epoch is whole, it is saved, and fit raises KeyboardInterrupt.
    ckpt = Checkpointing(path, every=0, extra={"out": "x"})
    with pytest.raises(KeyboardInterrupt):
        fit(config, small, on_epoch=stop_request, checkpoint=ckpt)
    doc = load_checkpoint(path)
    assert (doc["epoch"], doc["step"], doc["steps_per_epoch"]) == (1, 0, 3) and ckpt.describe() == "epoch 1"
    assert doc["extra"] == {"out": "x"} and len(doc["records"]) == 1

    def killed(epoch, step, steps, loss, acc):  # a stop that saves nothing: the last timed save is what is left
        if (epoch, step) == (2, 2):
            raise KeyboardInterrupt

    # Resumed after epoch 1 and saving at the end of every step (every > 0): it holds epoch 2's first step.
    ckpt = Checkpointing(path, every=1e-9, resume=doc)
    with pytest.raises(KeyboardInterrupt):
        fit(config, small, on_step=killed, checkpoint=ckpt)
    doc = load_checkpoint(path)
    assert (doc["epoch"], doc["step"], doc["within"]["seen"]) == (1, 1, 16)
    assert ckpt.describe() == "epoch 2, step 1 of 3"
    # resumed within epoch 2: its batches drawn again from the epoch's start, the first skipped, its sums carried on
    resumed = fit(config, small, checkpoint=Checkpointing(path, resume=doc))
    assert _metrics(resumed) == _metrics(whole)  # the same batches, mirrors, steps and averages: the same run
    with pytest.raises(ConfigError, match=r"written with other settings \(max_lr\)"):
        fit(quick(batch_size=16, alternate_flip=True, ema=0.9, max_lr=0.1), small,
            checkpoint=Checkpointing(path, resume=doc))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt is not a cifarlab checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    # a checkpoint of an earlier format is refused in a line that says so, not read wrongly
    torch.save({**doc, "format": doc["format"] - 1}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"old\.pt was written by an earlier cifarlab \(format 1, this one reads 2\)"):
        load_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("when", ["during the last validation", "during the test evaluation"])
def test_a_stop_after_the_last_step_saves_the_whole_run_and_its_resume_only_tests(small, tmp_path, when,
                                                                                   monkeypatch):
    from cifarlab import train as train_module

    small = small.with_train_subset(32, seed=0)
    config = quick(eval_batch_size=16)  # 4 test batches: a stop asked during the first is seen before the second
    whole = fit(config, small, test=True, test_tta=True)
    ckpt = Checkpointing(tmp_path / "checkpoint.pt", every=0)
    trained = []

    def on_epoch(record):
        if record.epoch == config.epochs:
            trained.append(True)
            if when == "during the last validation":
                ckpt.request_stop()  # the CLI's Ctrl-C handler calls this

    build = train_module.build_model

    def build_with_a_stop_in_the_test(*args, **kw):
        model = build(*args, **kw)
        def hook(module, inputs) -> None:  # the CLI's Ctrl-C handler, while the test split is being evaluated
            if trained:
                ckpt.request_stop()

        if when == "during the test evaluation":
            model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build_with_a_stop_in_the_test)
    with pytest.raises(KeyboardInterrupt):
        fit(config, small, test=True, test_tta=True, on_epoch=on_epoch, checkpoint=ckpt)
    monkeypatch.undo()
    doc = load_checkpoint(ckpt.path)
    assert (doc["epoch"], doc["step"], len(doc["records"])) == (2, 0, 2) and ckpt.describe() == "epoch 2"
    resumed = fit(config, small, test=True, test_tta=True, checkpoint=Checkpointing(ckpt.path, resume=doc))
    assert _metrics(resumed) == _metrics(whole)  # nothing trained again
    assert (resumed.test.accuracy, resumed.test_tta.accuracy) == (whole.test.accuracy, whole.test_tta.accuracy)


def test_a_setting_that_changes_no_result_may_differ_on_resume(small, tmp_path):
    small = small.with_train_subset(32, seed=0)
    ckpt = Checkpointing(tmp_path / "checkpoint.pt", every=0)
    with pytest.raises(KeyboardInterrupt):
        fit(quick(), small, on_epoch=lambda rec: ckpt.request_stop(), checkpoint=ckpt)
    doc = load_checkpoint(ckpt.path)
    resumed = fit(quick(retain_memory=False), small, checkpoint=Checkpointing(ckpt.path, resume=doc))
    assert [r.epoch for r in resumed.records] == [1, 2]


def _slow_first_call_compile(seconds):
    """A stand-in for torch.compile whose first call in each session takes ``seconds`` more, as compiling does."""
    def compile_(model, mode=None, dynamic=None):
        calls = []

        def run(x):
            if not calls:
                calls.append(1)
                time.sleep(seconds)
            return model(x)
        return run
    return compile_


def test_compile_time_of_each_session_is_reported_apart_from_the_epochs_speed(small, tmp_path, monkeypatch):
    # Every session compiles on its first step, a resumed one too; that time goes to compile_seconds and out of
    # the speed of the epoch it fell in, whether the session began at epoch 1, within it, or at a later epoch.
    monkeypatch.setattr(train.torch, "compile", _slow_first_call_compile(0.3))
    small = small.with_train_subset(16, seed=0)
    config = quick(batch_size=8, compile=True, pct_start=0.5)  # 2 steps of 8 an epoch, 2 of the 4 warming up
    path = tmp_path / "checkpoint.pt"

    def compiling(rec):  # the epoch's training seconds that are not counted in its images per second
        rec = rec if isinstance(rec, train.EpochRecord) else train.EpochRecord(**rec)
        return rec.train_seconds - 16 / rec.images_per_second

    # a session from the start, stopped after epoch 1, then resumed: the second compilation falls in epoch 2
    ckpt = Checkpointing(path, every=0)
    with pytest.raises(KeyboardInterrupt):
        fit(config, small, on_epoch=lambda rec: ckpt.request_stop(), checkpoint=ckpt)
    doc = load_checkpoint(path)
    first = doc["compile_seconds"]
    assert first >= 0.3 and compiling(doc["records"][0]) == pytest.approx(first)
    later = fit(config, small, checkpoint=Checkpointing(path, every=0, resume=doc))
    assert later.compile_seconds >= first + 0.3
    assert compiling(later.records[1]) == pytest.approx(later.compile_seconds - first)

    # stopped in epoch 1 after its first step (saved at every step), resumed there: both compilations in epoch 1
    def stop_at_step_2(epoch, step, steps, loss, acc):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, small, on_step=stop_at_step_2, checkpoint=Checkpointing(path, every=1e-9))
    doc = load_checkpoint(path)
    assert (doc["epoch"], doc["step"]) == (0, 1) and doc["within"]["compile_seconds"] == doc["compile_seconds"]
    within = fit(config, small, checkpoint=Checkpointing(path, every=0, resume=doc))
    assert within.compile_seconds >= doc["compile_seconds"] + 0.3
    assert compiling(within.records[0]) == pytest.approx(within.compile_seconds)
    assert compiling(within.records[1]) == pytest.approx(0, abs=1e-9)



def test_record_fields_and_one_cycle_shape(small):
    steps = []
    small = small.with_train_subset(48, seed=0)  # half the images in steps of 16: the same schedule at half the cost
    result = fit(quick(epochs=3, batch_size=16), small, on_step=lambda e, s, n, loss, acc: steps.append((e, s, n)))
    assert [r.epoch for r in result.records] == [1, 2, 3]
    assert steps[-1] == (3, 3, 3)  # 48 training images / batch 16
    lrs = [r.lr for r in result.records]
    assert lrs[0] > lrs[-1] and lrs[-1] == pytest.approx(0.05 / 25 / 1e4)  # annealed to its final value
    rec = result.records[0]
    assert rec.epoch_seconds == pytest.approx(rec.train_seconds + rec.eval_seconds)
    assert 0 <= rec.data_seconds <= rec.train_seconds
    assert rec.images_per_second == pytest.approx(48 / rec.train_seconds)


def test_callback_can_stop_the_run(small):
    result = fit(quick(epochs=5), small.with_train_subset(32, seed=0), on_epoch=lambda rec: rec.epoch >= 1)
    assert len(result.records) == 1 and result.stopped_early


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_training_keeps_freed_memory_while_it_runs_unless_told_not_to(small, retain):
    from cifarlab import cpu

    seen = []
    fit(quick(epochs=1, device="cpu", retain_memory=retain), small.with_train_subset(32, seed=0),
        on_step=lambda *_: seen.append(cpu.freed_memory_retained()))
    assert seen and set(seen) == {retain and cpu.memory._glibc() is not None}
    assert not cpu.freed_memory_retained()  # as before the run


def test_test_set_only_when_asked(small):
    one_step = small.with_train_subset(32, seed=0)  # the test set's evaluation is what is tested, not training
    assert fit(quick(epochs=1), one_step).test is None
    result = fit(quick(epochs=1), one_step, test=True, test_tta=True)
    assert 0 <= result.test.accuracy <= 1 and result.test_tta.tta
    assert len(result.test.predictions) == 64


def test_tta_weighs_its_views_as_airbench_does():
    from cifarlab.augment import Normalization
    from cifarlab.evaluate import _shifted

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    down, up = _shifted(x, 1, 1, False), _shifted(x, -1, -1, True)
    assert torch.equal(down[..., 1:, 1:], x[..., :-1, :-1]) and torch.equal(up[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(down[..., 0, 1:], x[..., 1, :-1]) and torch.equal(up[..., -1, :-1], x[..., -2, 1:])  # reflected
    assert up.is_contiguous(memory_format=torch.channels_last)
    # A linear model's logits of a weighted sum of views are the weighted sum of its logits of each view.
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6) % 10
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    xs = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    padded = np.pad(xs.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [xs, torch.from_numpy(padded[..., :32, :32].copy()), torch.from_numpy(padded[..., 2:, 2:].copy())]
    mixes = {"none": xs, "flip": 0.5 * (xs + xs.flip(3)),
             "flip-shift": sum(w * 0.5 * (v + v.flip(3)) for w, v in zip((0.5, 0.25, 0.25), views, strict=True))}
    for tta, mixed in mixes.items():
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(model(mixed) * 0.5, torch.from_numpy(labels)).item()
        got = evaluate(model, images, labels, norm, device=torch.device("cpu"), tta=tta, logit_scale=0.5)
        assert got.loss == pytest.approx(want, rel=1e-5) and got.views == tta and got.tta == (tta != "none")
    assert evaluate(model, images, labels, norm, device=torch.device("cpu"), tta=True).views == "flip"
    with pytest.raises(ConfigError, match="unknown test-time augmentation 'mirror'; valid: none, flip, flip-shift"):
        evaluate(model, images, labels, norm, device=torch.device("cpu"), tta="mirror")


def test_diverging_loss_raises_with_its_reason(small):
    with pytest.raises(TrainingDiverged, match="training loss became"):
        fit(quick(max_lr=1e6, optimizer="sgd", pct_start=0.1), small)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_optimizer_trains(small, optimizer):
    one_step = small.with_train_subset(32, seed=0)  # the optimizer's step is what is tested
    config = quick(epochs=1, optimizer=optimizer, max_lr=0.01 if optimizer != "sgd" else 0.05)
    built = build_optimizer(config, torch.nn.Linear(4, 2))
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    assert type(built) is expected and built.defaults["fused"]
    assert built.defaults.get("nesterov", optimizer == "sgd") == (optimizer == "sgd")
    result = fit(config, one_step)
    assert result.precision == resolve_precision("auto", torch.device("cpu"))
    assert np.isfinite(result.records[0].train_loss)


def test_bf16_training_keeps_fp32_weights_and_evaluates_in_bf16():
    # One step on 16 images and 16 to validate: a CPU without bf16 units emulates it at 1/12 of fp32's speed
    # (30 s a step of 32; validating tiny's 64 took more than the step).
    one_batch = load_splits("synthetic:64:16", val_size=16, seed=0).with_train_subset(16, seed=0)
    result = fit(quick(epochs=1, batch_size=16, eval_batch_size=64, optimizer="adamw", max_lr=0.01,
                       precision="bf16", ema=0), one_batch)
    assert result.records[0].images_per_second > 0 and len(one_batch.val_labels) == 16
    assert result.precision == "bf16" and result.channels_last
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert np.isfinite(result.records[0].train_loss) and np.isfinite(result.records[0].val_loss)


def test_seed_style_dataloader_path_trains(small):
    result = fit(quick(epochs=1, augment="dataloader", loader_workers=0), small)
    assert result.records[0].train_accuracy > 0


def test_a_dataloader_run_resumed_within_an_epoch_loads_only_the_batches_it_has_not_trained(small, tmp_path,
                                                                                              monkeypatch):
    from cifarlab.augment import AlbumentationsDataset

    loaded: list[int] = []
    getitem = AlbumentationsDataset.__getitem__
    monkeypatch.setattr(AlbumentationsDataset, "__getitem__", lambda self, i: (loaded.append(i), getitem(self, i))[1])
    config = quick(epochs=1, augment="dataloader", loader_workers=0)  # 3 steps of 32
    fit(config, small)
    whole, loaded[:] = list(loaded), []

    def killed(epoch, step, steps, loss, acc):
        if step == 2:
            raise KeyboardInterrupt

    ckpt = Checkpointing(tmp_path / "checkpoint.pt", every=1e-9)  # saves after every step: step 1 is kept
    with pytest.raises(KeyboardInterrupt):
        fit(config, small, on_step=killed, checkpoint=ckpt)
    assert ckpt.describe() == "epoch 1, step 1 of 3"
    loaded.clear()
    fit(config, small, checkpoint=Checkpointing(ckpt.path, resume=load_checkpoint(ckpt.path)))
    assert loaded == whole[32:]  # the same shuffle, less the first batch, which is not loaded again


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"arch": "vgg"}, "unknown architecture 'vgg'"), ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
     ({"max_lr": 0.0}, "max-lr must be a positive"), ({"epochs": 0}, "epochs must be at least 1"),
     ({"pct_start": 1.0}, "pct-start"), ({"precision": "fp8"}, "unknown precision"),
     ({"alternate_flip": True, "augment": "dataloader"}, "alternate-flip needs --augment batched"),
     ({"compile_mode": "fast"}, "unknown compile mode 'fast'; valid: default, reduce-overhead"),
     ({"compile_mode": "reduce-overhead"}, "compile-mode reduce-overhead takes effect only with --compile"),
     ({"crop_pad": 9}, r"crop-pad must lie in \[0, 8\] pixels, got 9")],
)
def test_bad_config_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_keeps_data_on_device(tiny):
    from cifarlab.augment import BatchAugmenter, Normalization

    norm = Normalization.from_images(tiny.train_images)
    aug = BatchAugmenter(tiny.train_images, tiny.train_labels, norm, torch.device("cuda"))
    x, y = next(aug.epoch(32, torch.Generator().manual_seed(0)))
    assert x.is_cuda and y.is_cuda
    result = fit(quick(epochs=1, device="cuda", precision="bf16"), tiny)
    assert result.device.startswith("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_augmented_epoch_needs_no_host_synchronisation(tiny):
    from cifarlab.augment import AugmentConfig, BatchAugmenter, Normalization

    norm = Normalization.from_images(tiny.train_images)
    aug = BatchAugmenter(tiny.train_images, tiny.train_labels, norm, torch.device("cuda"),
                         AugmentConfig(alternate_flip=True), channels_last=True)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        batches = [b for _ in range(2) for b in aug.epoch(32, torch.Generator().manual_seed(0))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 2 * (192 // 32)
    assert all(x.is_cuda and x.shape == (32, 3, 32, 32) and y.is_cuda for x, y in batches)


def _host_syncs_in_one_epoch(splits, steps):
    import warnings

    config = quick(epochs=1, device="cuda", batch_size=8, log_every=10_000)
    part = splits.with_train_subset(8 * steps, seed=0)
    fit(config, part)  # warm-up: cuDNN's autotuning and first-use allocations sync in the first run only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.set_sync_debug_mode("warn")
            fit(config, part)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_steps_do_not_wait_on_the_host(tiny):
    # Host synchronisations happen per epoch (logging, evaluation, the timers), never per step: an epoch of
    # 24 steps makes no more of them than one of 8 (4 would be a one-step warm-up, which OneCycleLR refuses).
    few, many = _host_syncs_in_one_epoch(tiny, 8), _host_syncs_in_one_epoch(tiny, 24)
    assert few > 0  # the detector works: the epoch-end log and the evaluation do synchronise
    assert many == few, (few, many)


def test_ema_weights_are_validated_in_place_of_the_last_steps(small):
    small = small.with_train_subset(64, seed=0)  # two steps: the average already trails the weights
    plain = fit(quick(seed=3, epochs=1, ema=0.0), small)
    ema = fit(quick(seed=3, epochs=1, ema=0.9), small)
    almost_none = fit(quick(seed=3, epochs=1, ema=1e-12), small)
    # the average trails the trained weights (same trajectory: EMA does not change training) ...
    assert [r.train_loss for r in ema.records] == [r.train_loss for r in plain.records]
    pairs = list(zip(plain.model.state_dict().values(), ema.model.state_dict().values(), strict=True))
    assert any(not torch.allclose(a.float(), b.float()) for a, b in pairs)
    assert ema.records[-1].val_loss != plain.records[-1].val_loss
    # ... and with no memory it is the trained model, buffers (BN statistics) included
    for a, b in zip(plain.model.state_dict().values(), almost_none.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert almost_none.records[-1].val_accuracy == plain.records[-1].val_accuracy


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_ema_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"ema must be in \[0, 1\)"):
        quick(ema=value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weight_ema_updates_without_a_host_synchronisation():
    from cifarlab.models import create_model
    from cifarlab.step import WeightEMA

    model = create_model("custom_resnet").cuda()
    ema = WeightEMA(model, 0.9)
    torch.cuda.synchronize()
    try:  # set inside: should setting it raise, the mode must still be reset for the tests after this one
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert next(ema.module.parameters()).is_cuda


def test_weight_ema_follows_the_model_by_its_decay():
    from torch import nn

    from cifarlab.step import WeightEMA

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.75)
    # the decay ramps up, (1 + n) / (10 + n), so a short run's average does not cling to the initial weights
    assert [round(ema.current_decay(), 4) for ema.updates in (0, 10, 100)] == [0.1, 0.55, 0.75]
    ema.updates = 1000
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(4.0)
    model(torch.randn(8, 2))  # BN statistics and its batch counter move
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, start + 1.0)  # a quarter of the way to the model
    assert torch.allclose(ema.module[1].running_mean, 0.25 * model[1].running_mean)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_frozen_bn_scales_stay_at_one_and_the_parameter_count_stays(small):
    result = fit(quick(epochs=1, bn_scale="frozen"), small)
    bns = [m for m in result.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 8
    assert all(not m.weight.requires_grad and torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert any(not torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)  # the shifts still learn
    assert sum(p.numel() for p in result.model.parameters()) == 6_573_120


def test_bias_lr_scale_gives_biases_their_own_lr_and_weight_decay():
    from cifarlab.models import create_model
    from cifarlab.step import build_optimizer, build_scheduler

    model = create_model("custom_resnet")
    config = TrainConfig(max_lr=0.4, weight_decay=5e-4, bias_lr_scale=64.0)
    opt = build_optimizer(config, model)
    weights, biases = opt.param_groups
    assert len(biases["params"]) == 8 and all(p.dim() == 1 for p in biases["params"])  # the BN shifts
    assert biases["weight_decay"] == pytest.approx(5e-4 / 64) and weights["weight_decay"] == 5e-4
    sched = build_scheduler(config, opt, total_steps=100)
    for _ in range(24):  # to the peak of the one-cycle schedule (pct_start 0.25)
        opt.step()
        sched.step()
    assert weights["lr"] == pytest.approx(0.4) and biases["lr"] == pytest.approx(0.4 * 64)
    with pytest.raises(ConfigError, match="bias-lr-scale"):
        TrainConfig(bias_lr_scale=0)
    # Adam normalises each parameter's step: a 64x bias LR would move the shifts 64x faster in absolute terms.
    adam = build_optimizer(TrainConfig(optimizer="adam", max_lr=1e-3, bias_lr_scale=64.0), model)
    assert len(adam.param_groups) == 1 and adam.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("pad", [0, 2])
def test_crop_pad_bounds_each_training_image_shift(tiny, pad):
    # --crop-pad reaches the augmenter: every training image is a window of its source padded by `pad` (with
    # 0, the image or its mirror), and with a pad some images do move.
    from cifarlab.augment import Normalization
    from cifarlab.train import training_batches

    norm = Normalization.from_images(tiny.train_images)
    config = quick(crop_pad=pad, batch_size=256)
    batches = training_batches(config, tiny, norm, torch.device("cpu"), False, torch.Generator().manual_seed(0))
    (x, y), = list(batches.epoch())
    out = denormalize(x, norm).numpy().astype(np.int64)
    src = np.pad(tiny.train_images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect").transpose(0, 3, 1, 2)
    moved = 0
    for img, label in zip(out[:32], y[:32].tolist(), strict=True):
        same_class = np.flatnonzero(tiny.train_labels == label)
        windows = [(i, dy, dx) for i in same_class for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for view in (src[i], src[i, :, :, ::-1])
                   if np.abs(view[:, dy:dy + 32, dx:dx + 32] - img).max() <= 2]
        assert windows, "a training image is no window of its padded source"
        moved += all((dy, dx) != (pad, pad) for _, dy, dx in windows)
    assert (moved > 0) == (pad > 0)


def test_saved_weights_give_back_the_model_that_was_tested(small, tmp_path):
    # Whitening (a parametrisation) and an EMA: the file must hold the averaged weights, folded to plain convs.
    result = fit(quick(seed=1, epochs=1, precision="fp32", whiten=True, ema=0.9), small, test=True)
    path = save_weights(result, tmp_path / "model.pt", small.classes)
    model, norm, doc = load_weights(path)
    assert not any("parametrizations" in key for key in doc["state_dict"]) and doc["classes"] == list(small.classes)
    assert norm == result.normalization and not model.training
    again = evaluate(model, small.test_images, small.test_labels, norm, device=torch.device("cpu"),
                     logit_scale=result.config.logit_scale)
    assert again.loss == pytest.approx(result.test.loss, rel=1e-4)
    assert np.array_equal(again.predictions, result.test.predictions)
    # Saving left the run's own model whole: it still runs (its whitened conv once lost its weight to the save).
    with torch.no_grad():
        assert torch.allclose(result.model.eval()(torch.zeros(2, 3, 32, 32)), model(torch.zeros(2, 3, 32, 32)),
                              atol=1e-4)
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(ConfigError, match=r"cannot read weights from .*notes\.pt: not a torch file"):
        load_weights(tmp_path / "notes.pt")


def test_a_worker_cache_changes_no_result_of_the_runs_that_share_it(tiny, monkeypatch):
    # A study worker keeps subsets' statistics, whitening bases and device copies, and with --compile one model per
    # shape whose weights each run reloads: every run must end as it would alone, whatever ran before it.
    from cifarlab.keep import Kept, keeping

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    a, b = tiny.with_train_subset(64, seed=0), tiny.with_train_subset(96, seed=1)
    runs = [(a, quick(epochs=1, compile=True, seed=1)), (b, quick(epochs=1, compile=True, seed=2)),
            (a, quick(epochs=1, compile=True, seed=3))]
    alone = [fit(config, data).records[-1] for data, config in runs]
    assert len(compiled) == 3  # each lone run compiles for itself
    compiled.clear()
    cache = Kept()
    with keeping(cache):
        shared = [fit(config, data).records[-1] for data, config in runs]
    assert len(compiled) == 1 and cache.reused["model of a compiled shape"] == 2  # one shape (batch 32): once
    assert cache.built["whitening basis"] == 2 and cache.reused["whitening basis"] == 1  # one per subset
    for lone, kept in zip(alone, shared):
        assert (kept.train_loss, kept.val_loss, kept.val_accuracy) == (lone.train_loss, lone.val_loss,
                                                                       lone.val_accuracy)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_worker_compiles_once_per_shape_and_its_graphs_serve_later_runs(tiny):
    # CUDA graphs hold their inputs' addresses: a later run must train through the same graphs, not record anew,
    # and end as a lone run of its seed does.
    from cifarlab.keep import Kept, keeping

    data = tiny.with_train_subset(128, seed=0)
    config = quick(epochs=1, device="cuda", precision="bf16", compile=True, compile_mode="reduce-overhead")
    cache = Kept()
    with keeping(cache):
        first = fit(dataclasses.replace(config, seed=1), data)
        later = fit(dataclasses.replace(config, seed=2), data)
    alone = fit(dataclasses.replace(config, seed=2), data)
    assert cache.built["compiled forward"] == 1 and cache.reused["compiled forward"] == 1
    assert later.compile_seconds < first.compile_seconds / 5, (first.compile_seconds, later.compile_seconds)
    assert later.records[-1].train_loss == pytest.approx(alone.records[-1].train_loss, rel=1e-3)
