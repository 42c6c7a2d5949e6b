import os
import shutil

import numpy as np
import pytest
from conftest import write_image_folder

from cifarlab.data import load_raw, load_splits, resolve_count, stratified_split
from cifarlab.errors import ConfigError, DataError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.mark.realdata
def test_real_copy_counts_per_split_and_class(real_splits):
    s = real_splits
    assert s.classes == CIFAR_CLASSES
    assert s.train_images.shape == (45_000, 32, 32, 3) and s.train_images.dtype == np.uint8
    assert s.val_images.shape == (5_000, 32, 32, 3)
    assert s.test_images.shape == (10_000, 32, 32, 3)
    assert np.bincount(s.train_labels).tolist() == [4_500] * 10
    assert np.bincount(s.val_labels).tolist() == [500] * 10
    assert np.bincount(s.test_labels).tolist() == [1_000] * 10
    assert s.resized == 0


@pytest.mark.realdata
def test_real_validation_split_is_disjoint_and_seeded(real_splits, real_data_path):
    s = real_splits
    assert len(np.intersect1d(s.train_indices, s.val_indices)) == 0
    assert len(np.union1d(s.train_indices, s.val_indices)) == 50_000
    again = load_splits(real_data_path, val_size=5000, seed=0)
    assert again.from_cache
    np.testing.assert_array_equal(again.val_indices, s.val_indices)
    other = load_splits(real_data_path, val_size=5000, seed=1)
    assert not np.array_equal(other.val_indices, s.val_indices)


def test_loads_that_start_together_on_a_cold_cache_decode_once(image_folder, tmp_path, monkeypatch):
    """As study commands started together do (or machines sharing a cache folder): one decodes, the rest read it."""
    import threading
    import time

    import cifarlab.data as data

    decoded, decode = [], data._decode_all

    def slow_decode(split_dir, files):
        decoded.append(split_dir.name)
        time.sleep(0.3)  # every loader finds the cache empty before the first one has written it
        return decode(split_dir, files)

    monkeypatch.setattr(data, "_decode_all", slow_decode)
    start, results = threading.Barrier(3), {}

    def load(i):
        start.wait()
        results[i] = load_raw(image_folder, cache_dir=tmp_path / "cache")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(decoded) == ["test", "train"]  # one load decoded each split once
    assert sorted(r.from_cache for r in results.values()) == [False, True, True]
    for r in results.values():
        np.testing.assert_array_equal(r.train_images, results[0].train_images)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_take_the_umask_like_any_new_file(image_folder, tmp_path, umask, mode):
    """Records, pages and cache entries are written to a temporary file and renamed; mkstemp's files are 0600
    whatever the umask, which left every page unreadable to a web server or a teammate."""
    from cifarlab.data import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "page.html", "<p>x</p>")
        load_raw(image_folder, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    written = [tmp_path / "page.html", *(tmp_path / "cache").rglob("*.npy"), *(tmp_path / "cache").rglob("*.json")]
    assert len(written) > 3
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: oct(mode) for path in written}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_cache_entry_that_cannot_be_written_leaves_no_partial_file(image_folder, tmp_path, monkeypatch):
    import errno

    import cifarlab.data as data

    def full_disk(fh, arr, allow_pickle):
        fh.write(b"\x93NUMPY half an array")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.np, "save", full_disk)
    raw = load_raw(image_folder, cache_dir=tmp_path / "cache")
    assert not raw.from_cache and len(raw.train_labels) == 18  # the load goes on without its cache entry
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []


def test_image_folder_loads_classes_from_the_tree(image_folder):
    s = load_splits(image_folder, val_size=3, seed=0)
    assert s.classes == ("cat", "dog", "frog")
    assert s.num_classes == 3
    assert len(s.train_labels) == 15 and len(s.val_labels) == 3 and len(s.test_labels) == 18
    assert np.bincount(s.val_labels).tolist() == [1, 1, 1]
    assert s.train_images.dtype == np.uint8 and s.train_images.shape[1:] == (32, 32, 3)


def test_decoded_pixels_match_the_files(image_folder):
    from PIL import Image

    raw = load_raw(image_folder)
    first = np.asarray(Image.open(image_folder / "train" / "cat" / "0000.png"))
    np.testing.assert_array_equal(raw.train_images[0], first)


def test_second_load_comes_from_cache_and_a_changed_file_is_noticed(image_folder):
    first = load_raw(image_folder)
    second = load_raw(image_folder)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.train_images, second.train_images)
    from PIL import Image

    target = image_folder / "train" / "dog" / "0001.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    third = load_raw(image_folder)
    assert not third.from_cache
    assert third.train_images[7].max() == 0  # dog/0001 is the 8th training image in sorted order


def test_images_that_are_not_32x32_are_resized_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "big", ["a", "b"], per_class=3, size=48, ext=".jpg")
    s = load_splits(root, val_size=2)
    assert s.train_images.shape[1:] == (32, 32, 3)
    assert s.resized == 12
    assert s.describe()["resized_images"] == 12


def _file(p):
    (p / "afile").write_text("x")
    return p / "afile"


def _dirs(p, *names):
    for name in names:
        (p / name).mkdir(parents=True)
    return p / names[0].split("/")[0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "does not exist"),
        (_file, "is a file"),
        (lambda p: _dirs(p, "t/train", "t/test"), "has no class folders"),
        (lambda p: write_image_folder(p / "m", ["cat", "dog"], ["cat", "emu"]), "classes differ"),
        (lambda p: _dirs(p, "e/train/a", "e/test/a"), "holds no images"),
        (lambda p: (write_image_folder(p / "o", ["a"]) and shutil.rmtree(p / "o" / "test")) or p / "o",
         "test is missing"),
    ],
    ids=["missing", "file", "no-classes", "mismatched-classes", "empty-split", "missing-test"],
)
def test_bad_image_folders_are_named_in_the_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        load_raw(path)
    assert str(path.name) in str(info.value)


def test_an_unreadable_image_is_named(image_folder):
    bad = image_folder / "test" / "dog" / "0003.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*dog/0003\.png"):
        load_raw(image_folder)


@pytest.mark.parametrize("decoder", ["torchcodec", "pillow"])
def test_jpeg_folders_decode_to_pillows_pixels_by_either_decoder(tmp_path, monkeypatch, decoder):
    # TorchCodec decodes JPEGs, Pillow everything else and anything TorchCodec refuses or cannot load: the pixels
    # must not depend on which one ran (a cached array is reused whichever wrote it).
    from PIL import Image

    import cifarlab.data as data

    if decoder == "pillow":
        monkeypatch.setattr(data, "_jpeg_decoder", lambda: None)  # as where TorchCodec cannot load
    else:
        assert data._jpeg_decoder() is not None
    root = write_image_folder(tmp_path / "jpeg", ["cat", "dog"], per_class=3, ext=".jpg")
    gray = root / "train" / "dog" / "0001.jpg"
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(gray)  # one-channel JPEG
    png_named_jpg = root / "test" / "cat" / "0002.jpg"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(png_named_jpg, format="PNG")
    raw = load_raw(root, cache_dir=tmp_path / "cache")
    files = sorted((root / "train").rglob("*.jpg")) + sorted((root / "test").rglob("*.jpg"))
    expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_array_equal(np.concatenate([raw.train_images, raw.test_images]), expected)
    assert raw.train_images[4].std(axis=2).max() == 0  # the gray image came out as three equal channels
    assert raw.test_images[2].min() == 200 and raw.resized == 0


def test_a_damaged_jpeg_is_named(tmp_path):
    root = write_image_folder(tmp_path / "jpeg", ["cat", "dog"], per_class=2, ext=".jpg")
    bad = root / "train" / "cat" / "0001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) * 6 // 10])  # cut off mid-scan, as an interrupted copy leaves it
    with pytest.raises(DataError, match=r"cannot read image .*cat/0001\.jpg"):
        load_raw(root, cache_dir=tmp_path / "cache")


def test_torchvision_without_network_or_local_copy_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, download=False, **kwargs):
        if download:
            raise OSError("network is unreachable")
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"could not download CIFAR-10 to .*empty.* no local copy"):
        load_raw(f"torchvision:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="no CIFAR-10 copy in"):
        load_raw(f"torchvision:{tmp_path / 'empty'}", download=False)


def test_data_flag_falls_back_to_environment(monkeypatch, image_folder):
    monkeypatch.setenv("CIFARLAB_DATA", str(image_folder))
    assert load_raw(None).classes == ("cat", "dog", "frog")


def test_synthetic_set_is_explicit_and_sized():
    raw = load_raw("synthetic:200:50")
    assert raw.train_images.shape == (200, 32, 32, 3) and raw.test_images.shape == (50, 32, 32, 3)
    assert np.bincount(raw.train_labels).tolist() == [20] * 10


def test_stratified_split_is_exact_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    take, rest = stratified_split(labels, 40, seed=3)
    assert len(take) == 40 and len(rest) == 160 and not set(take) & set(rest)
    assert np.bincount(labels[take]).tolist() == [20, 10, 6, 4]
    np.testing.assert_array_equal(take, stratified_split(labels, 40, seed=3)[0])
    assert not np.array_equal(take, stratified_split(labels, 40, seed=4)[0])


def test_train_subset_counts_and_fractions():
    s = load_splits("synthetic:1000:100", val_size=100)
    assert len(s.with_train_subset(300).train_labels) == 300
    assert len(s.with_train_subset(0.5).train_labels) == 450
    sub = s.with_train_subset(300)
    assert np.isin(sub.train_indices, s.train_indices).all()
    with pytest.raises(ConfigError, match="asks for 5000 images but only 900"):
        s.with_train_subset(5000)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ConfigError):
        resolve_count(bad, 100, what="--train-subset")


def test_validation_larger_than_training_set_is_refused(image_folder):
    with pytest.raises(ConfigError, match="validation size 18 leaves no training images"):
        load_splits(image_folder, val_size=18)


def test_cache_survives_a_removed_source_only_until_listing(image_folder):
    load_raw(image_folder)
    shutil.rmtree(image_folder / "test")
    with pytest.raises(DataError, match="test is missing"):
        load_raw(image_folder)
