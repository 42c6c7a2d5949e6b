"""One-cycle training: ``TrainConfig`` -> ``fit()`` -> per-epoch ``EpochRecord`` s.

The data stay on the training device; the host waits for it only at logging points (every ``log_every`` steps,
for the progress callback and the divergence check) and at epoch edges (for timing and evaluation).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cifarlab import cpu, faults
from cifarlab.augment import AugmentConfig, Normalization, TrainingBatches
from cifarlab.checkpoint import Checkpointing, EpochProgress, Start
from cifarlab.choices import resolve_speed
from cifarlab.config import TrainConfig
from cifarlab.data import DataSplits
from cifarlab.evaluate import NO_VALIDATION, EvalResult, EvaluationStopped, evaluate
from cifarlab.keep import keeping, memo
from cifarlab.models.recipe import build_model
from cifarlab.step import TrainStep, seed_everything
from cifarlab.timing import Timer, configure_device, resolve_device


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # the training objective (with label smoothing)
    train_accuracy: float
    val_loss: float  # plain cross-entropy on the validation split
    val_accuracy: float
    lr: float  # learning rate at the end of the epoch
    epoch_seconds: float  # training + evaluation
    train_seconds: float
    data_seconds: float  # of train_seconds: augmentation and batching (host clock; see Timer for CUDA)
    eval_seconds: float
    images_per_second: float  # training images / train_seconds (less compile time in epoch 1)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FitResult:
    config: TrainConfig
    records: list[EpochRecord]
    model: nn.Module
    device: str
    precision: str
    channels_last: bool
    normalization: Normalization
    stopped_early: bool = False
    speed_source: str = ""  # why this precision and memory format: flags, a stored measurement or the rule
    compile_seconds: float | None = None  # the first step of each session that compiled (a resume compiles again)
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0  # statistics, model, batches and step built (less what a worker kept)
    test: EvalResult | None = None
    test_tta: EvalResult | None = None


# Called with (epoch, step, steps_per_epoch, mean train loss so far, train accuracy so far).
StepCallback = Callable[[int, int, int, float, float], None]
# Called after each epoch; returning True stops the run (a pruner uses this).
EpochCallback = Callable[[EpochRecord], "bool | None"]


@keeping()  # a study worker's cache where one is open, else this run's own (it uploads the validation split once)
def fit(config: TrainConfig, splits: DataSplits, *, on_epoch: EpochCallback | None = None,
        on_step: StepCallback | None = None, test: bool = False, test_tta: bool = False,
        checkpoint: Checkpointing | None = None) -> FitResult:
    """Train ``config.arch`` on ``splits.train`` with the one-cycle policy, validating after every epoch; test when
    asked (``test``: plain, ``test_tta``: flip). With ``checkpoint`` the run is saved as it goes and, given one to
    resume, continues with the random numbers of a run never stopped."""
    device = resolve_device(config.device)
    # Flags first, then what bench.devices --choose measured for this architecture on this device, then a rule.
    speed = resolve_speed(config.arch, device, config.precision, config.channels_last)
    configure_device(device)  # CUDA: cuDNN's autotuner (fixed shapes) and TF32
    gen = seed_everything(config.seed)
    wall_start = time.perf_counter()
    norm, batches, step = setup_training(config, splits, device, speed.precision, speed.channels_last, gen)
    result = FitResult(config=config, records=[], model=step.eval_model, device=str(device),
                       precision=speed.precision, channels_last=speed.channels_last, normalization=norm,
                       speed_source=speed.source, setup_seconds=time.perf_counter() - wall_start)
    start = Start() if checkpoint is None else checkpoint.bind(
        config=config, step=step, gen=gen, batches=batches, result=result, steps_per_epoch=batches.steps)

    def wall() -> float:
        return start.wall_seconds + time.perf_counter() - wall_start

    score = functools.partial(evaluate, step.eval_model, norm=norm, device=device, precision=speed.precision,
                              channels_last=speed.channels_last, batch_size=config.eval_batch_size,
                              logit_scale=config.logit_scale)
    with cpu.retained_memory(config.retain_memory and device.type == "cpu"):
        for epoch in range(start.epoch, config.epochs + 1):
            resumed = epoch == start.epoch and start.steps_done > 0
            progress = EpochProgress(gen.get_state(), batches.flip_now, **(start.sums if resumed else {}))
            train_epoch(step, batches, epoch, progress, skip=start.steps_done if resumed else 0, on_step=on_step,
                        checkpoint=checkpoint, wall=wall)
            with Timer(device) as eval_timer:  # no validation split (val_size 0): NaN
                val = score(splits.val_images, splits.val_labels) if len(splits.val_labels) else NO_VALIDATION
            result.records.append(epoch_record(epoch, progress, val, step.lr, eval_timer.seconds))
            if on_epoch is not None and on_epoch(result.records[-1]):
                result.stopped_early = True
                break
            if checkpoint is not None and epoch < config.epochs and checkpoint.due_after_epoch():
                checkpoint.save(epoch, wall())
                if checkpoint.stop_requested:  # asked during the evaluation: the epoch is whole, stop here
                    raise KeyboardInterrupt
        stop = None if checkpoint is None else (lambda: checkpoint.stop_requested)
        try:  # a stop asked after the last step is seen before the first test batch: the training is saved whole
            if test:
                result.test = score(splits.test_images, splits.test_labels, stop=stop)
            if test_tta:
                result.test_tta = score(splits.test_images, splits.test_labels, tta=True, stop=stop)
        except EvaluationStopped:
            checkpoint.save(len(result.records), wall())  # a resumed run only evaluates the test split
            raise KeyboardInterrupt from None
    result.wall_seconds = wall()
    result.compile_seconds = step.compile_seconds if config.compile else None
    return result


def train_epoch(step: TrainStep, batches: TrainingBatches, epoch: int, progress: EpochProgress, *, skip: int,
                on_step: StepCallback | None, checkpoint: Checkpointing | None, wall: Callable[[], float]) -> None:
    """Train one epoch (less the ``skip`` steps done before a resume), adding to ``progress``'s sums."""
    device, log_every = step.device, step.config.log_every
    step.model.train()
    loss_sum = torch.full((), progress.loss_sum, device=device)  # summed on the device, read at logging points
    correct = torch.full((), progress.correct, device=device, dtype=torch.long)
    compiled_before, trained_before = step.compile_seconds, progress.train_seconds
    with Timer(device) as timer:
        data = batches.epoch(skip)
        for n in range(skip + 1, batches.steps + 1):
            t_data = time.perf_counter()
            x, y = next(data)
            progress.data_seconds += time.perf_counter() - t_data
            loss, logits = step(x, y)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            progress.seen += len(y)
            if n % log_every == 0 or n == batches.steps:
                mean_loss = float(loss_sum) / progress.seen  # host sync
                step.check(mean_loss, epoch, n)
                if on_step is not None:
                    on_step(epoch, n, batches.steps, mean_loss, float(correct) / progress.seen)
            faults.point("step")
            if checkpoint is not None and checkpoint.due(n):
                progress.loss_sum, progress.correct = float(loss_sum), int(correct)
                progress.train_seconds = trained_before + timer.elapsed()
                progress.compile_seconds += step.compile_seconds - compiled_before
                compiled_before = step.compile_seconds
                checkpoint.save(epoch - 1, wall(), n, progress)
                if checkpoint.stop_requested:
                    raise KeyboardInterrupt
    progress.loss_sum, progress.correct = float(loss_sum), int(correct)
    progress.train_seconds = trained_before + timer.seconds
    progress.compile_seconds += step.compile_seconds - compiled_before


def epoch_record(epoch: int, progress: EpochProgress, val: EvalResult, lr: float, eval_seconds: float) -> EpochRecord:
    # A session's first step of a compiled model is mostly compilation: reported apart, not as speed.
    compute_seconds = progress.train_seconds - progress.compile_seconds
    return EpochRecord(
        epoch=epoch, train_loss=progress.loss_sum / max(progress.seen, 1),
        train_accuracy=progress.correct / max(progress.seen, 1), val_loss=val.loss, val_accuracy=val.accuracy,
        lr=lr, epoch_seconds=progress.train_seconds + eval_seconds, train_seconds=progress.train_seconds,
        data_seconds=progress.data_seconds, eval_seconds=eval_seconds,
        images_per_second=progress.seen / compute_seconds if compute_seconds > 0 else float("nan"))


def setup_training(config: TrainConfig, splits: DataSplits, device: torch.device, precision: str,
                   channels_last: bool, gen: torch.Generator, *, total_steps: int | None = None,
                   fused: bool | None = None,
                   schedule: bool = True) -> tuple[Normalization, TrainingBatches, TrainStep]:
    """The input normalisation, the batches and the training step of ``config`` as ``fit()`` builds them;
    ``bench.devices`` times and the LR range test sweeps exactly these. ``total_steps``: the schedule's length
    (default: the run's)."""
    norm = memo("normalization", (splits.train_images,), lambda: Normalization.from_images(splits.train_images))
    model = build_model(config, splits, norm, device, channels_last)
    batches = training_batches(config, splits, norm, device, channels_last, gen)
    step = TrainStep(config, model, device, precision, total_steps=total_steps or config.epochs * batches.steps,
                     num_classes=splits.num_classes, fused=fused, schedule=schedule)
    return norm, batches, step


def training_batches(config: TrainConfig, splits: DataSplits, norm: Normalization, device: torch.device,
                     channels_last: bool, gen: torch.Generator) -> TrainingBatches:
    aug = AugmentConfig(pad=config.crop_pad, cutout=config.cutout, cutout_p=config.cutout_p,
                        alternate_flip=config.alternate_flip)
    return TrainingBatches(splits.train_images, splits.train_labels, norm, device, aug, config.batch_size,
                           channels_last=channels_last, generator=gen, path=config.augment,
                           loader_workers=config.loader_workers)
