"""Augmentation: pad + random crop, horizontal flip, optional cutout, then normalisation with the training set's
mean and std. ``BatchAugmenter`` (the default) keeps the padded training set on the device as one uint8 tensor
and augments whole batches with tensor ops, airbench's way; ``seed_pipeline`` is the seeds' albumentations
pipeline per sample behind a DataLoader, kept for comparison (``--augment dataloader``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cifarlab.keep import memo

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would otherwise ask the network


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the training images, on the 0..1 scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_images(cls, images: np.ndarray) -> Normalization:
        """Computed from uint8 ``(N, H, W, 3)`` images in float64 chunks: exact and memory-bounded."""
        if len(images) == 0:
            raise ValueError("cannot compute normalisation statistics of an empty training set")
        total = np.zeros(3)
        total_sq = np.zeros(3)
        for start in range(0, len(images), 4096):
            chunk = images[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
            total += chunk.sum(0)
            total_sq += (chunk**2).sum(0)
        count = images.shape[0] * images.shape[1] * images.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))  # type: ignore[arg-type]


@dataclass(frozen=True)
class AugmentConfig:
    pad: int = 4  # pixels of reflect padding before the random 32x32 crop
    flip: bool = True  # random horizontal flip, p=0.5
    # Alternating flip (Jordan's airbench): each image is flipped at random in the first epoch and then in
    # every other epoch, so that consecutive epochs see both mirrors of every image instead of a coin toss.
    # Same marginal distribution per epoch; the batched path only.
    alternate_flip: bool = False
    cutout: int = 8  # side of the square cutout hole in pixels; 0 turns it off
    cutout_p: float = 0.5  # probability of a hole per image (albumentations' CoarseDropout default)


def seed_pipeline(norm: Normalization, cfg: AugmentConfig = AugmentConfig(), size: int = 32):
    """The seed projects' albumentations Compose: returns a CHW float tensor from an HWC uint8 image."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    steps = []
    if cfg.pad:
        steps += [A.PadIfNeeded(size + 2 * cfg.pad, size + 2 * cfg.pad, border_mode=cv2.BORDER_REFLECT_101),
                  A.RandomCrop(size, size)]
    if cfg.flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if cfg.cutout:
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cfg.cutout, cfg.cutout),
                                     hole_width_range=(cfg.cutout, cfg.cutout),
                                     fill=tuple(m * 255.0 for m in norm.mean), p=cfg.cutout_p))
    steps += [A.Normalize(mean=norm.mean, std=norm.std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


class AlbumentationsDataset(torch.utils.data.Dataset):
    """Per-sample albumentations over uint8 HWC arrays, the seed projects' DataLoader path."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[i])["image"], int(self.labels[i])


def reseed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed albumentations' private random state from torch's per-worker seed, so
    that forked workers do not draw the same crops, flips and holes in lock-step."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "transform"):
        info.dataset.transform.set_random_seed(info.seed % 2**32)


def _pixel_scale(norm: Normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/std on the 0..255 pixel scale, shaped to broadcast over NCHW batches."""
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255.0)
    return mean, inv_std


def _padded_on(images: np.ndarray, pad: int, device: torch.device) -> torch.Tensor:
    """uint8 NHWC images as one NCHW tensor on ``device``, reflect-padded by ``pad`` (pinned first on CUDA, so that
    the copy runs at the link's speed)."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else images
    host = torch.from_numpy(np.ascontiguousarray(padded.transpose(0, 3, 1, 2)))
    return host.pin_memory().to(device) if device.type == "cuda" else host.to(device)


def _labels_on(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


GROUP_IMAGES_CUDA = 8192  # images augmented per set of kernels on CUDA


class BatchAugmenter:
    """Batched augmentation of an in-memory uint8 dataset on ``device``: reflect-padded once, each batch gathered at
    random offsets, flipped per image, normalised, and cut out by zeroing (zero is exactly the training mean)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, norm: Normalization, device: torch.device,
                 cfg: AugmentConfig = AugmentConfig(), channels_last: bool = False,
                 group_images: int | None = None) -> None:
        self.cfg, self.device, self.channels_last = cfg, device, channels_last
        # On CUDA several batches are augmented by one set of kernels (about 8k images, a few hundred MB), so
        # the host launches augmentation kernels once per group rather than once per step; the CPU gains
        # nothing from it and keeps each batch in cache.
        if group_images is None:
            group_images = GROUP_IMAGES_CUDA if device.type == "cuda" else 0
        self.group_images = group_images
        self.images = memo("padded training images", (images, cfg.pad, str(device)),
                           lambda: _padded_on(images, cfg.pad, device))
        self.labels = memo("labels", (labels, str(device)), lambda: _labels_on(labels, device))
        self.size = images.shape[1]
        self.mean, self.inv_std = _pixel_scale(norm, device)
        self._flip_now: torch.Tensor | None = None  # this epoch's flip per image, for alternate_flip

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int) -> int:
        # Drop the ragged last batch (BatchNorm dislikes tiny batches), unless it is the only one.
        return max(1, len(self) // batch_size)

    def epoch(self, batch_size: int, generator: torch.Generator,
              skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield one shuffled epoch of augmented batches, less the first ``skip``. Its random numbers are drawn at its
        start on the CPU (the same on every device) and cross in one copy; skipped batches are drawn, not augmented."""
        n = len(self)
        perm = torch.randperm(n, generator=generator)
        if self.cfg.flip and self.cfg.alternate_flip:
            self._flip_now = ((torch.rand(n, generator=generator) < 0.5).to(self.device, non_blocking=True)
                              if self._flip_now is None else ~self._flip_now)
        draws = torch.cat([perm[None], self._draw(n, generator)])  # (1 + 6, n): one transfer
        if self.device.type == "cuda":
            draws = draws.pin_memory()
        draws = draws.to(self.device, non_blocking=True)
        batches = self.num_batches(batch_size)  # 1 when n < batch_size: the slices below then take all n
        per_group = max(1, self.group_images // batch_size)
        for first in range(0, batches, per_group):
            count = min(per_group, batches - first)
            if first + count <= skip:
                continue
            part = draws[:, first * batch_size : (first + count) * batch_size]
            x, y = self._apply(part[0], part[1:]), self.labels[part[0]]
            for b in range(max(0, skip - first), count):
                yield x[b * batch_size : (b + 1) * batch_size], y[b * batch_size : (b + 1) * batch_size]

    @property
    def flip_now(self) -> torch.Tensor | None:
        """The mirrors ``alternate_flip`` last drew or toggled (the next epoch mirrors the others), on the device;
        ``epoch`` replaces the tensor, never edits it. A checkpoint keeps it, besides the generator, to go on with
        the same augmentation."""
        return self._flip_now

    def load_flip_state(self, state: torch.Tensor | None) -> None:
        self._flip_now = None if state is None else state.to(self.device)

    def augment(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment the images at ``idx`` with fresh random draws from ``generator``."""
        return self._apply(idx.to(self.device), self._draw(len(idx), generator).to(self.device))

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Random numbers for ``n`` images as rows of a (6, n) int64 CPU tensor: dy, dx, flip, cy, cx, hole."""
        cfg, s = self.cfg, self.size
        out = torch.zeros(6, n, dtype=torch.long)
        if cfg.pad:
            out[0] = torch.randint(0, 2 * cfg.pad + 1, (n,), generator=generator)
            out[1] = torch.randint(0, 2 * cfg.pad + 1, (n,), generator=generator)
        if cfg.flip and self._flip_now is None:
            out[2] = torch.rand(n, generator=generator) < 0.5
        if cfg.cutout:
            out[3] = torch.randint(0, s - cfg.cutout + 1, (n,), generator=generator)
            out[4] = torch.randint(0, s - cfg.cutout + 1, (n,), generator=generator)
            out[5] = torch.rand(n, generator=generator) < cfg.cutout_p
        return out

    def _apply(self, idx: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Crop, flip, normalise and cut out the images at ``idx``; ``draws`` is ``_draw``'s, on the device."""
        cfg, s, dev = self.cfg, self.size, self.device
        batch = self.images[idx]  # (B, 3, S+2p, S+2p) uint8
        bsz, side = batch.shape[0], batch.shape[-1]
        if cfg.pad:
            dy, dx = draws[0], draws[1]
            ar = torch.arange(s, device=dev)
            flat = ((dy[:, None, None] + ar[None, :, None]) * side + (dx[:, None, None] + ar[None, None, :]))
            flat = flat.view(bsz, 1, s * s)
            batch = torch.gather(batch.view(bsz, 3, side * side), 2, flat.expand(bsz, 3, s * s)).view(bsz, 3, s, s)
        if cfg.flip:
            flip = self._flip_now[idx] if self._flip_now is not None else draws[2].bool()
            batch = torch.where(flip.view(bsz, 1, 1, 1), batch.flip(3), batch)
        x = (batch.float() - self.mean) * self.inv_std
        if cfg.cutout:
            c = cfg.cutout
            cy, cx, on = draws[3], draws[4], draws[5].bool()
            ar = torch.arange(s, device=dev)
            rows = (ar[None, :] >= cy[:, None]) & (ar[None, :] < cy[:, None] + c)
            cols = (ar[None, :] >= cx[:, None]) & (ar[None, :] < cx[:, None] + c)
            hole = rows[:, :, None] & cols[:, None, :] & on[:, None, None]
            x = x.masked_fill(hole[:, None], 0.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class EvalBatches:
    """Normalised, un-augmented batches of a fixed image set, on ``device``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, norm: Normalization, device: torch.device,
                 channels_last: bool = False) -> None:
        self.images = memo("evaluation images", (images, str(device)), lambda: _padded_on(images, 0, device))
        self.labels = memo("labels", (labels, str(device)), lambda: _labels_on(labels, device))
        self.mean, self.inv_std = _pixel_scale(norm, device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            x = (self.images[start : start + batch_size].float() - self.mean) * self.inv_std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[start : start + batch_size]


class TrainingBatches:
    """Training batches an epoch at a time, by the run's data path: ``batched`` (``BatchAugmenter``, in memory on
    the device) or ``dataloader`` (the seed's albumentations per sample behind a DataLoader)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, norm: Normalization, device: torch.device,
                 cfg: AugmentConfig, batch_size: int, *, channels_last: bool, generator: torch.Generator,
                 path: str = "batched", loader_workers: int = 2) -> None:
        self.device, self.batch_size, self.channels_last, self.generator = device, batch_size, channels_last, generator
        self.augmenter = self.loader = self.loader_iter = None
        if path == "batched":
            self.augmenter = BatchAugmenter(images, labels, norm, device, cfg, channels_last)
            self.steps = self.augmenter.num_batches(batch_size)
            return
        dataset = AlbumentationsDataset(images, labels, seed_pipeline(norm, cfg))
        self._sampler = _SkippingSampler(torch.utils.data.RandomSampler(dataset, generator=generator))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self._sampler, drop_last=len(labels) >= batch_size,
            num_workers=loader_workers, generator=generator, pin_memory=device.type == "cuda",
            persistent_workers=loader_workers > 0, worker_init_fn=reseed_worker)
        self.steps = len(self.loader)

    def epoch(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches less the first ``skip``, drawn from the same random numbers as a whole epoch."""
        if self.augmenter is not None:
            yield from self.augmenter.epoch(self.batch_size, self.generator, skip=skip)
            return
        self._sampler.skip = skip * self.batch_size
        self.loader_iter = iter(self.loader)  # a benchmark waits on its workers' prefetch between repetitions
        try:
            for x, y in self.loader_iter:
                x = x.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        finally:
            self._sampler.skip = 0

    @property
    def flip_now(self) -> torch.Tensor | None:
        return None if self.augmenter is None else self.augmenter.flip_now

    def load_flip_state(self, state: torch.Tensor | None) -> None:
        if self.augmenter is not None:
            self.augmenter.load_flip_state(state)


class _SkippingSampler(torch.utils.data.Sampler[int]):
    """``inner``'s order less its first ``skip`` indices: a run resumed within an epoch draws the epoch's shuffle
    as before and loads only the batches it has not trained on."""

    def __init__(self, inner: torch.utils.data.Sampler[int]) -> None:
        self.inner, self.skip = inner, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip
