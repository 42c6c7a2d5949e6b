import itertools

import numpy as np
import pytest
import torch
from conftest import denormalize

from cifarlab.augment import AugmentConfig, BatchAugmenter, Normalization, seed_pipeline

CPU = torch.device("cpu")


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)


def test_normalization_is_computed_from_the_images(images):
    norm = Normalization.from_images(images)
    flat = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(norm.mean, flat.mean(0), rtol=1e-9)
    np.testing.assert_allclose(norm.std, flat.std(0), rtol=1e-6)


@pytest.mark.parametrize("group_images", [32, 48, 1000])
def test_grouped_augmentation_yields_the_same_batches_as_batch_by_batch(images, group_images):
    # CUDA augments several batches per set of kernels; the batches, and the epoch's order, must not change.
    norm = Normalization.from_images(images)
    labels = np.arange(64) % 10
    cfg = AugmentConfig(alternate_flip=True)  # every random draw in play: crop, flip, hole, order
    one = BatchAugmenter(images, labels, norm, CPU, cfg, group_images=0)
    grouped = BatchAugmenter(images, labels, norm, CPU, cfg, group_images=group_images)
    resumed = BatchAugmenter(images, labels, norm, CPU, cfg, group_images=group_images)
    for _epoch in range(2):
        a = list(one.epoch(10, torch.Generator().manual_seed(5)))
        b = list(grouped.epoch(10, torch.Generator().manual_seed(5)))
        # a run resumed after 5 steps: the same draws, and the batches from the 6th on (within a group but for 0)
        c = list(resumed.epoch(10, torch.Generator().manual_seed(5), skip=5))
        assert len(a) == len(b) == 6 and len(c) == 1  # 64 // 10: the ragged last batch is dropped either way
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xb.shape == (10, 3, 32, 32)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(c[0][0], a[5][0]) and torch.equal(c[0][1], a[5][1])


def test_batched_output_shape_dtype_and_range(images):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.arange(64) % 10, norm, CPU)
    gen = torch.Generator().manual_seed(0)
    batches = list(aug.epoch(16, gen))
    assert len(batches) == 4
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    lo = (0 - np.array(norm.mean)) / np.array(norm.std)
    hi = (1 - np.array(norm.mean)) / np.array(norm.std)
    for c in range(3):
        assert x[:, c].min() >= lo[c] - 1e-5 and x[:, c].max() <= hi[c] + 1e-5
    seen = torch.cat([b[1] for b in batches]).sort().values
    assert torch.equal(seen, torch.from_numpy(np.sort(np.arange(64) % 10)))  # each image once per epoch


@pytest.mark.parametrize("pad", [2, 4])
def test_every_batched_crop_is_a_window_of_the_reflect_padded_image(images, pad):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.zeros(64), norm, CPU, AugmentConfig(pad=pad, cutout=0, flip=False))
    out = denormalize(aug.augment(torch.arange(16), torch.Generator().manual_seed(1)), norm)
    padded = np.pad(images[:16], ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect").transpose(0, 3, 1, 2)
    offsets = set()
    for i in range(16):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i].numpy())]
        assert hits, f"image {i} is no 32x32 window of its {pad}-pixel padded source"
        offsets.add(hits[0])
    assert len(offsets) > 1  # the offsets are random, not fixed


def test_flip_gives_the_image_or_its_mirror_and_both_occur(images):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.zeros(64), norm, CPU, AugmentConfig(pad=0, cutout=0))
    out = denormalize(aug.augment(torch.arange(64), torch.Generator().manual_seed(2)), norm).numpy()
    src = images.transpose(0, 3, 1, 2)
    same = [np.array_equal(out[i], src[i]) for i in range(64)]
    mirrored = [np.array_equal(out[i], src[i][:, :, ::-1]) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def _flips_by_image(aug, images, norm, batch_size, gen) -> dict[int, bool]:
    """One epoch of ``aug``: which images came out mirrored (crops and holes off)."""
    src = {images[i].tobytes(): i for i in range(len(images))}
    mirror = {np.ascontiguousarray(images[i][:, ::-1]).tobytes(): i for i in range(len(images))}
    seen = {}
    for x, _ in aug.epoch(batch_size, gen):
        for img in denormalize(x, norm).numpy().transpose(0, 2, 3, 1):
            key = np.ascontiguousarray(img).tobytes()
            if key in src:
                seen[src[key]] = False
            else:
                seen[mirror[key]] = True
    return seen


def test_alternate_flip_mirrors_each_image_in_every_other_epoch(images):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.zeros(64), norm, CPU, AugmentConfig(pad=0, cutout=0, alternate_flip=True))
    gen = torch.Generator().manual_seed(3)
    epochs = [_flips_by_image(aug, images, norm, 16, gen) for _ in range(4)]
    assert all(len(e) == 64 for e in epochs)
    assert 10 < sum(epochs[0].values()) < 54  # the first epoch is a coin toss per image
    for prev, now in itertools.pairwise(epochs):
        assert all(now[i] != prev[i] for i in range(64))  # then every image swaps mirror each epoch
    # Without the option, flips are independent across epochs: some images keep their mirror.
    plain = BatchAugmenter(images, np.zeros(64), norm, CPU, AugmentConfig(pad=0, cutout=0))
    a, b = (_flips_by_image(plain, images, norm, 16, gen) for _ in range(2))
    assert 10 < sum(a[i] == b[i] for i in range(64)) < 54


def test_cutout_is_one_square_hole_at_the_mean(images):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.zeros(64), norm, CPU, AugmentConfig(pad=0, flip=False, cutout=8, cutout_p=1.0))
    x = aug.augment(torch.arange(32), torch.Generator().manual_seed(3))
    holes = (x == 0).all(1)  # zero in every channel == the training mean
    for i in range(32):
        rows, cols = torch.nonzero(holes[i], as_tuple=True)
        assert len(rows) == 64
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7


def test_seed_albumentations_pipeline_shapes_and_hole(images):
    norm = Normalization.from_images(images)
    pipe = seed_pipeline(norm, AugmentConfig(cutout_p=1.0))
    out = pipe(image=images[0])["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 5  # normalised, not 0..255
    near_mean = (out.abs() < 0.02).all(0).sum().item()  # the hole is filled with the mean: ~0 after normalising
    assert near_mean >= 64


def test_channels_last_output(images):
    norm = Normalization.from_images(images)
    aug = BatchAugmenter(images, np.zeros(64), norm, CPU, channels_last=True)
    x = aug.augment(torch.arange(4), torch.Generator().manual_seed(0))
    assert x.is_contiguous(memory_format=torch.channels_last)


def _seed_loader_batches(seed: int, n_batches: int = 4) -> list[torch.Tensor]:
    """Batches of the seed-style DataLoader path (2 workers) over 64 copies of one image."""
    from cifarlab.config import TrainConfig
    from cifarlab.data import DataSplits
    from cifarlab.train import training_batches

    r = np.arange(32, dtype=np.uint8)
    img = np.stack([np.broadcast_to(r[:, None] * 7, (32, 32)), np.broadcast_to(r[None, :] * 7, (32, 32)),
                    np.full((32, 32), 200, np.uint8)], axis=-1)
    imgs = np.repeat(img[None], 64, 0)
    labels = np.arange(64) % 10
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    splits = DataSplits(imgs, labels, empty, np.zeros(0, np.int64), imgs[:2], labels[:2], tuple("abcdefghij"), "x")
    cfg = TrainConfig(augment="dataloader", batch_size=16, loader_workers=2, precision="fp32", channels_last="off")
    batches = training_batches(cfg, splits, Normalization.from_images(imgs), torch.device("cpu"), False,
                               torch.Generator().manual_seed(seed))
    return [x for x, _ in batches.epoch()][:n_batches]


def test_dataloader_workers_draw_independent_augmentations():
    # The image is the same everywhere, so two batches are equal only when their augmentation draws are:
    # albumentations' own random state, forked unchanged into both workers, made batch 2k and 2k+1 twins.
    batches = _seed_loader_batches(seed=0)
    assert not torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[2], batches[3])
    # ... and the streams still come from the run's seed: the same seed gives the same batches
    again = _seed_loader_batches(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(batches[0], _seed_loader_batches(seed=1)[0])


def _coordinate_image() -> np.ndarray:
    """Red = 7 x row, green = 7 x column: every pixel of an augmented copy says where it came from."""
    r = np.arange(32, dtype=np.uint8) * 7
    return np.stack([np.broadcast_to(r[:, None], (32, 32)), np.broadcast_to(r[None, :], (32, 32)),
                     np.full((32, 32), 200, np.uint8)], axis=-1)


def _decode(x: torch.Tensor, norm: Normalization) -> tuple[int, int, bool, tuple[int, int] | None]:
    """(crop row offset, crop column offset, flipped, hole's top-left or None) of one augmented image."""
    pix = (x.permute(1, 2, 0).numpy() * np.array(norm.std) * 255 + np.array(norm.mean) * 255).round().astype(int)
    red, green = pix[..., 0], pix[..., 1]
    hole = red % 7 != 0  # the fill is the mean, 108.5 on the red scale: no multiple of 7
    corner = tuple(int(v) for v in np.argwhere(hole).min(0)) if hole.any() else None
    for i in range(8, 24):  # inside the reflect padding's reach, whatever the offsets
        for j in range(8, 23):
            if not (hole[i, j] or hole[i, j + 1]):
                flipped = green[i, j + 1] < green[i, j]
                dx = green[i, j] // 7 - (31 - j if flipped else j) + 4
                return int(red[i, j] // 7 - i + 4), int(dx), bool(flipped), corner
    raise AssertionError("no pixel pair outside the hole")


def test_batched_path_draws_the_same_augmentations_as_the_seed_pipeline():
    # The fast path replaces albumentations; it must sample crops, flips and holes from the same distribution.
    img = _coordinate_image()
    imgs = np.repeat(img[None], 3000, 0)
    norm = Normalization.from_images(imgs)
    cfg = AugmentConfig(cutout_p=0.5)
    fast = BatchAugmenter(imgs, np.zeros(3000), norm, CPU, cfg).augment(torch.arange(3000),
                                                                        torch.Generator().manual_seed(0))
    pipe = seed_pipeline(norm, cfg)
    pipe.set_random_seed(0)
    seed = [pipe(image=img)["image"] for _ in range(3000)]
    draws = {name: np.array([_decode(x, norm)[:3] for x in xs], dtype=float)
             for name, xs in (("fast", list(fast)), ("seed", seed))}
    holes = {name: [_decode(x, norm)[3] for x in xs] for name, xs in (("fast", list(fast)), ("seed", seed))}
    for name in ("fast", "seed"):
        dy, dx, flipped = draws[name].T
        for offsets in (dy, dx):  # uniform over the 9 offsets of a pad-4 crop: 1/9 each, sd 0.006 at n=3000
            assert set(offsets) == set(range(9)), name
            assert np.allclose(np.bincount(offsets.astype(int), minlength=9) / 3000, 1 / 9, atol=0.025), name
        assert abs(flipped.mean() - 0.5) < 0.04, name
        corners = np.array([c for c in holes[name] if c is not None])
        assert abs(len(corners) / 3000 - 0.5) < 0.04, name  # cutout_p
        assert corners.min() == 0 and corners.max() == 24, name  # the 8x8 hole lies wholly inside the image
        assert np.allclose(corners.mean(0), 12, atol=0.6), name  # uniform over 0..24: mean 12, sd 0.2 here
