"""CIFAR-10 as uint8 arrays: torchvision's CIFAR10, any ImageFolder tree, or a synthetic set for tests.

Decoding happens once: the arrays are cached under a key of the files' names, sizes and modification times. The
validation split is a stratified, seeded hold-out of the training set; the test set is read only when asked."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarlab.errors import ConfigError, DataError

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DATA_ENV = "CIFARLAB_DATA"
CACHE_ENV = "CIFARLAB_CACHE"
CACHE_FORMAT = 1  # bump when the cached layout changes


@dataclass(frozen=True)
class RawSplits:
    """Train and test arrays as a source provides them, before the validation hold-out."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    resized: int = 0  # number of images that were not 32x32 and were resized on load
    from_cache: bool = False


@dataclass(frozen=True)
class DataSplits:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    resized: int = 0
    from_cache: bool = False
    train_indices: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))
    val_indices: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, object]:
        """What a run record stores about its data."""
        return {"source": self.source, "classes": list(self.classes), "train": len(self.train_labels),
                "val": len(self.val_labels), "test": len(self.test_labels), "resized_images": self.resized,
                "from_cache": self.from_cache}

    def with_train_subset(self, subset: int | float | None, seed: int = 0) -> DataSplits:
        """A seeded, stratified subset of the training split (a count, or a fraction in (0, 1])."""
        if subset is None:
            return self
        n = resolve_count(subset, len(self.train_labels), what="--train-subset")
        if n == len(self.train_labels):
            return self
        keep, _ = stratified_split(self.train_labels, n, seed=seed + 1)
        return dataclasses.replace(self, train_images=self.train_images[keep], train_labels=self.train_labels[keep],
                                   train_indices=self.train_indices[keep])


def resolve_count(value: int | float, total: int, *, what: str) -> int:
    """A count given as an int, or as a fraction of ``total`` when a float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a count or a fraction, got {value!r}")
    if isinstance(value, float) and 0.0 < value <= 1.0:
        n = max(1, round(value * total))
    elif isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{what} must be a whole count or a fraction in (0, 1], got {value}")
    else:
        n = int(value)
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value}")
    if n > total:
        raise ConfigError(f"{what} asks for {n} images but only {total} are available")
    return n


def stratified_split(labels: np.ndarray, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (take, rest) with ``n_take`` taken in proportion to each class, seeded.

    Per-class shares are rounded by largest remainder so the total is exact.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_take / len(labels))
    share = np.floor(exact).astype(int)
    short = n_take - share.sum()
    order = np.argsort(-(exact - share), kind="stable")
    share[order[:short]] += 1
    take, rest = [], []
    for cls, k in zip(classes, share):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        take.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(take)), np.sort(np.concatenate(rest))


# ----------------------------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifarlab"


def resolve_source(data: str | os.PathLike[str] | None) -> str:
    """The ``--data`` flag, else ``CIFARLAB_DATA``, else torchvision's CIFAR10 in the cache folder."""
    if data is not None and str(data) != "":
        return str(data)
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    return "torchvision"


def load_raw(data: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None,
             download: bool = True) -> RawSplits:
    """Train and test arrays from ``data``: an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``),
    ``torchvision[:ROOT]``, or ``synthetic[:N_TRAIN[:N_TEST]]`` (a small learnable set for tests)."""
    spec = resolve_source(data)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec)
    if spec == "torchvision" or spec.startswith("torchvision:"):
        root = Path(spec.partition(":")[2]) if ":" in spec else cache / "torchvision"
        return _torchvision(root, download=download)
    return _image_folder(Path(spec), cache)


def load_splits(data: str | os.PathLike[str] | None = None, *, val_size: int | float = 5000, seed: int = 0,
                cache_dir: str | os.PathLike[str] | None = None, download: bool = True) -> DataSplits:
    """Train, validation and test splits; validation is a stratified, seeded hold-out of the training set.

    ``val_size=0`` holds nothing out: every training image is trained on and the validation split is empty
    (for final runs whose only measure is the test set).
    """
    raw = load_raw(data, cache_dir=cache_dir, download=download)
    n_train = len(raw.train_labels)
    n_val = 0 if type(val_size) in (int, float) and val_size == 0 else resolve_count(
        val_size, n_train, what="validation size")
    if n_val >= n_train:
        raise ConfigError(f"validation size {n_val} leaves no training images ({n_train} in {raw.source}); "
                          "pass a smaller --val-size")
    val_idx, train_idx = stratified_split(raw.train_labels, n_val, seed=seed)
    return DataSplits(raw.train_images[train_idx], raw.train_labels[train_idx], raw.train_images[val_idx],
                      raw.train_labels[val_idx], raw.test_images, raw.test_labels, raw.classes, raw.source,
                      raw.resized, raw.from_cache, train_indices=train_idx, val_indices=val_idx)


def _synthetic(spec: str) -> RawSplits:
    """Ten classes of coloured, oriented stripes with noise: learnable in a few steps, never confused with CIFAR."""
    parts = spec.split(":")[1:]
    try:
        n_train = int(parts[0]) if parts else 2000
        n_test = int(parts[1]) if len(parts) > 1 else max(n_train // 5, 10)
    except ValueError:
        raise DataError(f"synthetic data spec {spec!r} must read synthetic[:N_TRAIN[:N_TEST]]") from None
    if n_train < 10 or n_test < 10:
        raise DataError(f"synthetic data spec {spec!r}: need at least 10 images per split")
    num_classes = 10
    palette = np.random.default_rng(1234).integers(40, 216, size=(num_classes, 3))

    def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        angle = labels[:, None, None] * (np.pi / num_classes)
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.6 + phase)
        img = palette[labels][:, None, None, :] * (0.6 + 0.4 * wave[..., None])
        img += rng.normal(0, 20, size=img.shape)
        return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)

    tr_x, tr_y = make(n_train, 0)
    te_x, te_y = make(n_test, 1)
    classes = tuple(f"class{i}" for i in range(num_classes))
    return RawSplits(tr_x, tr_y, te_x, te_y, classes, source=spec)


def _torchvision(root: Path, *, download: bool) -> RawSplits:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"no CIFAR-10 copy in {root} (expected torchvision's cifar-10-batches-py there); "
                f"pass --data PATH to an ImageFolder tree or set {DATA_ENV}"
            ) from None
        try:
            train = CIFAR10(str(root), train=True, download=True)
            test = CIFAR10(str(root), train=False, download=True)
        except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
            raise DataError(
                f"could not download CIFAR-10 to {root} ({type(exc).__name__}) and no local copy is there; "
                f"pass --data PATH to an ImageFolder tree (train/, test/) or set {DATA_ENV}"
            ) from None
    return RawSplits(np.asarray(train.data, dtype=np.uint8), np.asarray(train.targets, dtype=np.int64),
                     np.asarray(test.data, dtype=np.uint8), np.asarray(test.targets, dtype=np.int64),
                     tuple(train.classes), source=f"torchvision:{root}")


def _list_image_folder(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[str, int, int, int]]]:
    """Class names and (relative path, label, size, mtime_ns) of every image, in sorted order."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing; expected an ImageFolder split there ({split_dir.name}/<class>/*.jpg)")
    classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir.name}/<class>/<image files>")
    files: list[tuple[str, int, int, int]] = []
    for label, cls in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        for e in entries:
            st = e.stat()
            files.append((f"{cls}/{e.name}", label, st.st_size, st.st_mtime_ns))
    if not files:
        raise DataError(f"{split_dir} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} in its class folders)")
    return classes, files


def _decode(path: str | Path) -> tuple[np.ndarray, bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            resized = im.size != (IMAGE_SIZE, IMAGE_SIZE)
            if resized:
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8), resized
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc.__class__.__name__}; expected a decodable image file") \
            from None


JPEG_EXTENSIONS = (".jpg", ".jpeg")


def _decode_all(split_dir: Path, files: Sequence[tuple[str, int, int, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Every file of a split as one uint8 (N, 32, 32, 3) array, its labels and how many images were resized. JPEGs go
    to TorchCodec's decoder (a third of Pillow's per-file cost, the same pixels); every other file, one it refuses,
    and any image not 32x32 go through Pillow."""
    import torch

    paths = [os.path.join(split_dir, rel) for rel, *_ in files]  # strings: 60,000 Path objects cost a second
    images = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    resized = 0
    decode_jpeg = _jpeg_decoder()
    for i, path in enumerate(paths):
        if decode_jpeg is not None and path.lower().endswith(JPEG_EXTENSIONS):
            try:
                with open(path, "rb") as fh:  # bytes, not the path: TorchCodec's own file reading costs more
                    img = decode_jpeg(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8), mode="RGB")
            except (RuntimeError, ValueError, OSError):
                img = None
            if img is not None and tuple(img.shape) == (3, IMAGE_SIZE, IMAGE_SIZE):
                images[i] = img.permute(1, 2, 0).numpy()
                continue
        images[i], was_resized = _decode(path)
        resized += was_resized
    labels = np.asarray([label for _, label, *_ in files], dtype=np.int64)
    return images, labels, resized


def _jpeg_decoder():
    """TorchCodec's ``decode_jpeg``, or None where it cannot load (its wheels follow torch's releases): Pillow
    then decodes everything, only slower."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):
        return None
    return decode_jpeg


def _image_folder(root: Path, cache: Path) -> RawSplits:
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; expected a folder with train/ and test/ ImageFolder splits")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; expected a folder with train/ and test/ inside")
    root = root.resolve()
    train_classes, train_files = _list_image_folder(root / "train")
    test_classes, test_files = _list_image_folder(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"classes differ between {root / 'train'} and {root / 'test'}: only in train {only_train}, "
                        f"only in test {only_test}; both must hold the same class folders")
    key = hashlib.sha256()
    key.update(f"format={CACHE_FORMAT};size={IMAGE_SIZE};root={root}\n".encode())
    for split, files in (("train", train_files), ("test", test_files)):
        for rel, label, size, mtime in files:
            key.update(f"{split}/{rel}\t{label}\t{size}\t{mtime}\n".encode())
    entry = cache / "imagefolder" / key.hexdigest()[:24]
    cached = _read_cache(entry)
    if cached is None:
        with _decode_lock(entry):
            # Study commands started together (machines sharing a cache folder, the tests' xdist workers): the first
            # decodes, the others wait here and then read what it wrote instead of decoding it all again.
            cached = _read_cache(entry)
            if cached is None:
                tr_x, tr_y, r1 = _decode_all(root / "train", train_files)
                te_x, te_y, r2 = _decode_all(root / "test", test_files)
                meta = {"source": str(root), "resized": r1 + r2, "classes": train_classes}
                _write_cache(entry, tr_x, tr_y, te_x, te_y, meta)
                return RawSplits(tr_x, tr_y, te_x, te_y, train_classes, str(root), r1 + r2)
    tr_x, tr_y, te_x, te_y, meta = cached
    return RawSplits(tr_x, tr_y, te_x, te_y, train_classes, str(root), meta.get("resized", 0), from_cache=True)


@contextlib.contextmanager
def _decode_lock(entry: Path):
    """An exclusive lock on ``entry``'s lock file while one load decodes into it (POSIX ``flock``; closing the
    file releases it). Where no lock can be had (no ``fcntl``, an unwritable cache) loads go on unlocked: each
    then decodes for itself, which costs time and nothing else, since cache entries are written atomically."""
    with contextlib.ExitStack() as stack:
        try:
            import fcntl

            entry.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open(entry.parent / f"{entry.name}.lock", "a"))
            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(entry: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict] | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = [np.load(entry / f"{name}.npy", allow_pickle=False) for name in _CACHE_ARRAYS]
    except (OSError, ValueError):
        return None  # a damaged cache entry is rebuilt, never trusted
    return (*arrays, meta)


def _write_cache(entry: Path, *arrays_and_meta: object) -> None:
    """Write arrays then meta.json, each atomically; meta last so a partial entry is never read."""
    *arrays, meta = arrays_and_meta
    try:
        for name, arr in zip(_CACHE_ARRAYS, arrays):
            with atomic_file(entry / f"{name}.npy", "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
        atomic_write_text(entry / "meta.json", json.dumps(meta, default=list))
    except OSError:
        pass  # an unwritable cache costs time on the next load, nothing else


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new hidden file beside ``path``, open for writing, created 0666 so the umask applies as to any new file
    (``mkstemp``'s 0600 left pages and cache entries unreadable to anyone else)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a name another writer drew: draw again
            continue


@contextlib.contextmanager
def atomic_file(path: Path, mode: str, **open_kw):
    """A file object for ``path`` that is written to a temporary file beside it and renamed into place when the
    block ends: readers see the old or the new file, whole. A block that raises (a full disk) leaves no
    temporary file behind (a cache array is 150 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, **open_kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)
