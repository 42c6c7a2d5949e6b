"""One training step per architecture, the augmentation of a batch, an evaluation batch, a checkpoint save."""

import pytest
import torch

from cifarlab.augment import BatchAugmenter, Normalization
from cifarlab.config import TrainConfig
from cifarlab.evaluate import evaluate
from cifarlab.models import create_model
from cifarlab.models.layers import GhostBatchNorm2d, use_activation, use_ghost_batch_norm
from cifarlab.step import TrainStep, autocast
from cifarlab.timing import resolve_precision

BATCH = 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def norm(splits):
    return Normalization.from_images(splits.train_images)


@pytest.mark.parametrize("arch", ["custom_resnet", "resnet18"])
def test_train_step(benchmark, splits, norm, arch):
    """The step fit() trains with (the default recipe's model, optimizer, EMA and schedule)."""
    from cifarlab.models.recipe import build_model

    precision = resolve_precision("auto", CPU)
    config = TrainConfig(arch=arch, batch_size=BATCH)
    model = build_model(config, splits, norm, CPU, True)
    step = TrainStep(config, model, CPU, precision, total_steps=100, num_classes=splits.num_classes)
    aug = BatchAugmenter(splits.train_images, splits.train_labels, norm, CPU, channels_last=True)
    x, y = next(aug.epoch(BATCH, torch.Generator().manual_seed(0)))
    benchmark.pedantic(step, args=(x, y), rounds=5, warmup_rounds=2)
    benchmark.extra_info.update({"images": BATCH, "precision": precision})


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("memory_format", ["channels_last", "nchw"])
@pytest.mark.parametrize("form", ["plain", "chunked", "folded"])
@pytest.mark.parametrize("device", DEVICES)
def test_ghost_batch_norm_step(benchmark, monkeypatch, device, form, memory_format):
    """The custom ResNet's training step (CELU; batch 512 on CUDA, 64 on the CPU) with plain batch norm or ghost
    batches of 32, computed per ghost batch or folded into one call; on an H200 the per-batch calls made the eager
    step launch-bound."""
    device = torch.device(device)
    precision = resolve_precision("auto", device)
    model = create_model("custom_resnet")
    use_activation(model, "celu")
    if form != "plain":
        use_ghost_batch_norm(model, 32)
        monkeypatch.setattr(GhostBatchNorm2d, "form", form)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    batch = 512 if device.type == "cuda" else 64  # 64: still two ghost batches, a CPU step in seconds
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=7 if device.type == "cuda" else 3, iterations=5 if device.type == "cuda" else 1,
                       warmup_rounds=2)
    benchmark.extra_info.update({"images": batch, "precision": precision})


def test_augment_batch(benchmark, splits, norm):
    aug = BatchAugmenter(splits.train_images, splits.train_labels, norm, CPU, channels_last=True)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(BATCH)
    benchmark(aug.augment, idx, gen)


def test_evaluation_batch(benchmark, splits, norm):
    precision = resolve_precision("auto", CPU)
    model = create_model("custom_resnet").to(memory_format=torch.channels_last)
    images, labels = splits.val_images[:1024], splits.val_labels[:1024]
    benchmark.pedantic(evaluate, args=(model, images, labels, norm),
                       kwargs={"device": CPU, "precision": precision, "channels_last": True}, rounds=3,
                       warmup_rounds=1)


def test_checkpoint_save(benchmark, tmp_path, splits, norm):
    """What a run pays for each checkpoint (default: one a minute): the default recipe's model, SGD momentum and
    EMA, written atomically."""
    from cifarlab.augment import AugmentConfig, TrainingBatches
    from cifarlab.checkpoint import Checkpointing
    from cifarlab.models.recipe import recipe_model
    from cifarlab.train import FitResult

    config = TrainConfig()
    model = recipe_model(config, 10)
    step = TrainStep(config, model, CPU, "fp32", total_steps=100, num_classes=10)
    step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))  # the momentum buffers exist from the first step on
    gen = torch.Generator()
    batches = TrainingBatches(splits.train_images[:64], splits.train_labels[:64], norm, CPU, AugmentConfig(), 32,
                              channels_last=False, generator=gen)
    result = FitResult(config=config, records=[], model=model, device="cpu", precision="fp32", channels_last=True,
                       normalization=norm)
    ckpt = Checkpointing(tmp_path / "checkpoint.pt")
    ckpt.bind(config=config, step=step, gen=gen, batches=batches, result=result, steps_per_epoch=2)
    benchmark.pedantic(ckpt.save, args=(1, 0.0), rounds=5, warmup_rounds=1)
    benchmark.extra_info["megabytes"] = ckpt.path.stat().st_size / 1e6
