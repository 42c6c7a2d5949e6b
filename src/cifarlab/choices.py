"""Per-architecture speed choices (precision and memory format), from measurement where there is one.

``python -m bench.devices --choose`` times fp32/bf16 x NCHW/channels_last and stores the fastest per
architecture, device, thread count and torch version; ``--precision auto`` / ``--channels-last auto`` use it,
else a rule (``rule_choice``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cifarlab.timing import cpu_model, resolve_precision

CHOICES_ENV = "CIFARLAB_CHOICES"
# The rule's own combination stays unless another beats it by more than this: closer than that is run-to-run
# noise on a shared CPU, and a choice that flips with noise is worse than a stable one.
TIE_MARGIN = 0.03


@dataclass(frozen=True)
class SpeedChoice:
    precision: str  # bf16 or fp32
    channels_last: bool
    source: str  # where the choice came from, for the run record and the console


def choices_path() -> Path:
    """``$CIFARLAB_CHOICES``, else ``choices.json`` in the cache folder (beside the decoded data)."""
    env = os.environ.get(CHOICES_ENV)
    if env:
        return Path(env)
    from cifarlab.data import default_cache_dir

    return default_cache_dir() / "choices.json"


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # the model name alone ("AMD EPYC") can hide generations with and without bf16 units: add those
        name = f"{cpu_model()} [{' '.join(cpu_matmul_features()) or 'no bf16/avx512'}], " \
               f"{torch.get_num_threads()} threads"
    return f"{device.type}: {name}; torch {torch.__version__}"


def cpu_matmul_features() -> list[str]:
    """The CPU flags that decide bf16 and fp32 matmul speed (Linux /proc/cpuinfo; empty elsewhere)."""
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def rule_choice(device: torch.device, precision: str = "auto") -> tuple[str, bool]:
    """The fallback: bf16 where the device runs it fast (measured matmul), and channels_last, the layout oneDNN's
    and cuDNN's convolutions run natively (NCHW costs layout changes around them)."""
    return resolve_precision(precision, device), True


def load_choices(path: Path | None = None) -> dict:
    path = path or choices_path()
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # an unreadable or half-written file is no measurement; the rule applies
    return doc if isinstance(doc, dict) else {}


def lookup(arch: str, device: torch.device, path: Path | None = None) -> dict | None:
    entry = load_choices(path).get(device_key(device), {}).get(arch)
    if not isinstance(entry, dict) or entry.get("precision") not in ("bf16", "fp32"):
        return None
    return entry


def save_choice(arch: str, device: torch.device, entry: dict, path: Path | None = None) -> Path:
    """Store one measured choice, keeping every other device's and architecture's (atomic replace)."""
    path = path or choices_path()
    doc = load_choices(path)
    doc.setdefault(device_key(device), {})[arch] = {**entry, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return _write(path, doc)


def _write(path: Path, doc: dict) -> Path:
    """Replace the whole file atomically: a reader never sees half of it."""
    from cifarlab.report.records import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


PEAK_KEY = "_matmul_peak"  # beside the architectures' entries of a device: not an architecture name


def best_peaks(device: torch.device, measured: dict[str, float],
               path: Path | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The higher of this run's probe and the best stored for ``device`` per precision, storing a new best; and where
    each came from. A shared machine's slow spells lower a probe far more than training, which would flatter shares."""
    path = path or choices_path()
    doc = load_choices(path)
    stored = doc.get(device_key(device), {}).get(PEAK_KEY, {})
    peaks, source, changed = {}, {}, False
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for precision, value in measured.items():
        best = stored.get(precision)
        if best is not None and best["flops"] > value:
            peaks[precision], source[precision] = best["flops"], f"best stored probe, {best['measured_at']}"
        else:
            peaks[precision], source[precision] = value, "this run's probe"
            stored[precision] = {"flops": value, "measured_at": now}
            changed = True
    if changed:
        doc.setdefault(device_key(device), {})[PEAK_KEY] = stored
        _write(path, doc)
    return peaks, source


def pick_fastest(rows: list[dict], rule: tuple[str, bool], tie_margin: float = TIE_MARGIN) -> dict:
    """The fastest of the timed rows, except that the rule's own combination is kept unless another is more than 3%
    faster, so that noise does not flip the choice."""
    if not rows:
        raise ValueError("no timed combinations to choose from")
    fastest = max(rows, key=lambda r: r["images_per_second"])
    for r in rows:
        if (r["precision"], bool(r["channels_last"])) == rule:
            noise = (r.get("spread_pct", 0.0) + fastest.get("spread_pct", 0.0)) / 200
            if r["images_per_second"] * (1 + max(tie_margin, noise)) >= fastest["images_per_second"]:
                return r
    return fastest


def resolve_speed(arch: str, device: torch.device, precision: str = "auto", channels_last: str = "auto",
                  path: Path | None = None) -> SpeedChoice:
    """Precision and memory format for training ``arch`` on ``device``: flags first, then measurement, then rule."""
    measured = lookup(arch, device, path) if "auto" in (precision, channels_last) else None
    if precision == "auto":
        chosen_precision = measured["precision"] if measured else rule_choice(device)[0]
    else:
        chosen_precision = resolve_precision(precision, device)
    if channels_last == "auto":
        if measured and measured["precision"] == chosen_precision:
            chosen_cl = bool(measured["channels_last"])
        else:
            chosen_cl = rule_choice(device, chosen_precision)[1]
    else:
        chosen_cl = channels_last == "on"
    if precision != "auto" and channels_last != "auto":
        source = "set by flags"
    elif measured and measured["precision"] == chosen_precision:
        source = (f"measured by bench.devices --choose on {measured.get('measured_at', '?')}: "
                  f"{measured.get('images_per_second', float('nan')):.0f} img/s at batch {measured.get('batch_size')}")
    else:
        source = "rule (no measurement for this device; run python -m bench.devices --choose)"
    return SpeedChoice(chosen_precision, chosen_cl, source)
