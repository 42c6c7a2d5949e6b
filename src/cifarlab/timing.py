"""Devices, synchronised timing, matmul peak and FLOP counts.

Every clock read that measures device work is preceded by a synchronisation of that device: CUDA kernels
run asynchronously, and an unsynchronised ``perf_counter`` measures only the launch.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from cifarlab.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for, but this machine has no CUDA device; use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")


def configure_device(device: torch.device) -> None:
    """Library settings for fast training on ``device``: on CUDA, cuDNN picks the fastest kernel for each
    (fixed) shape once, and fp32 matmuls and convolutions may use TF32. Nothing changes on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device``; a no-op on the CPU, whose ops run synchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of device work: synchronises ``device`` before each clock read."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[torch.device], None] = synchronize) -> None:
        self.device, self.clock, self.sync = device, clock, sync
        self.seconds = 0.0
        self._start: float | None = None

    def __enter__(self) -> Timer:
        self.sync(self.device)
        self._start = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self.elapsed()

    def elapsed(self) -> float:
        """Seconds since the timer was entered, read while it runs (synchronises, like its edges)."""
        self.sync(self.device)
        assert self._start is not None
        return self.clock() - self._start


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` processes on this machine gets its share of the cores (at least one): torch's default
    of a thread per core in every process makes them fight over the cores and all run slower."""
    return max(1, (os.cpu_count() or 1) // workers)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict[str, object]:
    """What a run record stores about the machine it ran on."""
    env: dict[str, object] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(), "device": str(device) if device is not None else None,
        "device_name": cpu_model()}
    if torch.cuda.is_available():
        env["cuda_version"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device is not None and device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    return env


PROBE_SIZE = 256  # the small product that sizes the probe where one full-size product would be too slow


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5,
                            min_seconds: float = 0.2, max_product_seconds: float | None = None) -> float:
    """Peak dense-matmul throughput (FLOP/s) of an ``n x n`` product: the fastest of ``repeats`` samples after
    ``min_seconds`` of warm-up (kernels are built and matrix units and clocks come up to speed on first use).

    The fastest sample, not the median: it is the denominator of every share of peak, and a shared machine's slow
    spells would otherwise flatter every share. A dtype the device only emulates (one product would take seconds)
    is measured at the largest size that fits ``max_product_seconds``."""
    if max_product_seconds is None:
        max_product_seconds = min_seconds / 2
    if n > PROBE_SIZE:
        small = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device).to(dtype)
        torch.mm(small, small)
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(small, small)
        synchronize(device)
        small_seconds = time.perf_counter() - t0
        if small_seconds * (n / PROBE_SIZE) ** 3 > max_product_seconds:  # time grows with the cube of the side
            fits = PROBE_SIZE * (max_product_seconds / small_seconds) ** (1 / 3)
            n = max(PROBE_SIZE, int(fits) // 64 * 64)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))

    def products(count: int) -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b)
        synchronize(device)
        return time.perf_counter() - t0

    warm_until = time.perf_counter() + min_seconds
    products(1)
    while time.perf_counter() < warm_until:
        products(1)
    inner = 1
    while products(inner) < min_seconds / repeats and inner < 1024:  # samples long enough for the clock
        inner *= 2
    return 2.0 * n**3 / min(products(inner) / inner for _ in range(repeats))


@functools.cache
def cpu_prefers_bf16() -> bool:
    """Whether bf16 matmul beats fp32 on this CPU by a clear margin, measured (not every CPU has bf16 units)."""
    cpu = torch.device("cpu")
    fp32 = matmul_flops_per_second(cpu, torch.float32, n=1024, repeats=3, min_seconds=0.05, max_product_seconds=0.05)
    bf16 = matmul_flops_per_second(cpu, torch.bfloat16, n=1024, repeats=3, min_seconds=0.05, max_product_seconds=0.05)
    return bf16 > 1.5 * fp32


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` picks bf16 where the device runs it fast (CUDA with bf16, CPUs with bf16 units), else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r}; valid: auto, bf16, fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_prefers_bf16() else "fp32"


def training_flops_per_image(model: nn.Module, image_size: int = 32, device: torch.device | None = None) -> dict:
    """Forward and forward+backward FLOPs per image, counted by torch's flop counter on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    device = device or torch.device("cpu")
    was_training = model.training
    model.train()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    with FlopCounterMode(display=False) as bwd:
        out.sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    forward, backward = fwd.get_total_flops() / 2, bwd.get_total_flops() / 2
    return {"forward": forward, "backward": backward, "train": forward + backward}
