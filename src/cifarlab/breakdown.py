"""Where a training step's time goes: by kind of operation (``op_breakdown``, torch's profiler), convolution by
convolution (``conv_layer_table``: each pass alone with its TFLOP/s), and against the matmul peak (``peak_gap``)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.timing import synchronize

CATEGORIES = ("conv forward", "conv backward", "batch norm", "pooling", "activation", "linear + loss", "optimizer",
              "data + augmentation", "casts + copies", "zero fill", "other")
# Annotations (torch.profiler.record_function) whose operators count as one category whatever they are.
DATA_ANNOTATION = "cifarlab.data"
_ANNOTATED = (("Optimizer.step", "optimizer"), (DATA_ANNOTATION, "data + augmentation"))


def categorize(name: str, annotation: str | None = None) -> str:
    """The category of one profiled operator, by the annotated region it ran in, else by its name."""
    if annotation is not None:
        return annotation
    n = name.removeprefix("aten::").lower()
    if "convolution_backward" in n:
        return "conv backward"
    if "conv" in n:
        return "conv forward"
    if "batch_norm" in n:
        return "batch norm"
    if "pool" in n:
        return "pooling"
    if any(k in n for k in ("relu", "threshold", "clamp_min", "elu")):  # elu: CELU's kernels, elu and elu_backward
        return "activation"
    if any(k in n for k in ("addmm", "linear", "matmul", "softmax", "nll_loss", "cross_entropy")) or n in ("mm",
                                                                                                           "bmm"):
        return "linear + loss"
    if n in ("fill_", "zero_", "zeros", "zeros_like"):
        return "zero fill"
    if n in ("copy_", "_to_copy", "to", "contiguous", "clone"):
        return "casts + copies"
    return "other"


def _annotation(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        for prefix, category in _ANNOTATED:
            if parent.name.startswith(prefix):
                return category
        parent = parent.cpu_parent
    return None


def op_breakdown(step: Callable[[], None], device: torch.device, steps: int = 2) -> list[dict]:
    """Seconds per step by category over ``steps`` profiled calls of ``step`` (warm it up first); wrap the batch's
    production in ``record_function(DATA_ANNOTATION)`` to count it as data.

    The rows add up to an *unprofiled* step timed right after, so the profiler's own cost is no Python. On the CPU
    "python + dispatch" is capped at what the profiled steps left between operators, and the operators are scaled
    to fill the rest; on CUDA the rest is time the device sat idle."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's engine, logs from C++ straight to the terminal when it first starts (USDT and STAGE
    # lines, and "ERROR ... gpuGetDeviceCount failed" on a machine with no GPU driver): noise between the
    # benchmark's own lines. Its level is read once, at that start; a user's own setting is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities, acc_events=True) as prof:  # one cycle; says so, so torch won't warn
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        profiled_wall = (time.perf_counter() - t0) / steps  # the profiler's stop and its events left out
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    wall = (time.perf_counter() - t0) / steps
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for evt in prof.events():
        if not evt.name.startswith("aten::"):
            continue  # annotations (autograd nodes, Optimizer.step#...) have no work of their own
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        totals[categorize(evt.name, _annotation(evt))] += us / 1e6 / steps
    counted = sum(totals.values())
    if device.type == "cpu" and counted > 0:
        # The host runs the ops, so what the unprofiled step leaves after them is Python and dispatch, up to what
        # the profiled steps left between their operators; the operators fill the rest, all scaled alike.
        between = max(profiled_wall - counted, 0.0) * wall / profiled_wall
        rest = min(max(wall - counted, 0.0), between)
        scale = (wall - rest) / counted
    else:  # CUDA: device kernel times, which profiling leaves alone; the rest is time the GPU sat idle
        rest, scale = max(wall - counted, 0.0), 1.0
    parts = [(c, s * scale) for c, s in totals.items()]
    parts.append(("python + dispatch" if device.type == "cpu" else "device idle", rest))
    return [{"category": c, "seconds_per_step": s, "share": s / wall if wall else float("nan"),
             "profiled_step_seconds": profiled_wall, "scale": scale} for c, s in parts]


def conv_flops(n: int, c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int],
               groups: int = 1) -> float:
    """Multiply-adds x 2 of one convolution's forward pass (the same count for each of the two gradients)."""
    return 2.0 * n * c_out * (c_in // groups) * kernel[0] * kernel[1] * out_hw[0] * out_hw[1]


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # oneDNN / cuDNN pick and build their kernels on first use
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _time_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, device: torch.device,
               repeats: int) -> tuple[float, float, float]:
    """Median seconds of the forward pass, the input gradient and the weight gradient of ``conv``'s shape."""
    stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)

    def forward() -> torch.Tensor:
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    def backward(mask: list[bool]):
        return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                   conv.groups, mask)

    return (_median_seconds(forward, device, repeats),
            _median_seconds(lambda: backward([True, False, False]), device, repeats),
            _median_seconds(lambda: backward([False, True, False]), device, repeats))


def conv_layer_table(model: nn.Module, batch_size: int, device: torch.device, precision: str,
                     channels_last: bool, *, image_size: int = 32, repeats: int = 3,
                     peak_flops: float | None = None) -> list[dict]:
    """Every ``Conv2d`` of ``model`` timed alone: forward, input gradient and weight gradient.

    The first convolution sees the data, which needs no gradient, so training computes only its weight
    gradient; its input-gradient time is left out (NaN) of what training spends.
    """
    shapes: dict[str, tuple[torch.Size, bool]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(m, inputs, _out, name=name):
                shapes[name] = (inputs[0].shape, inputs[0].requires_grad)
            hooks.append(mod.register_forward_hook(hook))
    probe = torch.zeros(2, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()  # leaves BatchNorm's running statistics alone; autograd stays on to see which inputs need grads
    with torch.enable_grad():
        model(probe)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    timed: dict[tuple, tuple[float, float, float]] = {}  # identical shapes are timed once
    rows = []
    modules = dict(model.named_modules())
    for name, (shape, needs_input_grad) in shapes.items():
        conv: nn.Conv2d = modules[name]
        _, c_in, h, w = shape
        x = torch.randn(batch_size, c_in, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
        weight = conv.weight.detach().to(device=device, dtype=dtype).contiguous(memory_format=fmt)
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        y = F.conv2d(x, weight, None, *args)
        kernel = "cuDNN" if device.type == "cuda" else "oneDNN"
        key = (tuple(x.shape), tuple(weight.shape), args, str(dtype), channels_last, kernel)
        if key not in timed:
            timed[key] = _time_conv(conv, x, weight, torch.randn_like(y).contiguous(memory_format=fmt), device,
                                    repeats)
        fwd, grad_in, grad_w = timed[key]
        flops = conv_flops(batch_size, c_in, conv.out_channels, conv.kernel_size, tuple(y.shape[-2:]), conv.groups)
        grad_in = grad_in if needs_input_grad else float("nan")
        row = {"layer": name, "in_shape": f"{c_in}x{h}x{w}", "out_shape": "x".join(map(str, y.shape[1:])),
               "kernel": kernel,
               "gflop_per_pass": flops / 1e9, "forward_ms": fwd * 1e3, "input_grad_ms": grad_in * 1e3,
               "weight_grad_ms": grad_w * 1e3, "forward_tflops": flops / fwd / 1e12,
               "input_grad_tflops": flops / grad_in / 1e12, "weight_grad_tflops": flops / grad_w / 1e12}
        passes = [fwd, grad_w] + ([grad_in] if needs_input_grad else [])
        row["total_ms"] = sum(passes) * 1e3
        row["total_tflops"] = flops * len(passes) / sum(passes) / 1e12
        if peak_flops:
            row["peak_tflops"] = peak_flops / 1e12
            row["share_of_peak"] = row["total_tflops"] * 1e12 / peak_flops
        rows.append(row)
    return rows


# The categories that do the FLOPs torch's flop counter counts (convolutions and matrix products); the others
# (batch norm, pooling, activations, the optimizer, copies, Python) add time but no counted FLOPs.
MATMUL_CATEGORIES = ("conv forward", "conv backward", "linear + loss")


def peak_gap(ops: list[dict], step_seconds: float, step_flops: float, peak_flops: float) -> dict:
    """Where a step's time goes against the matmul peak: ``ops`` (one step's ``op_breakdown``) applied to
    ``step_seconds``. ``ceiling``: the share of peak with every conv and GEMM at the peak and the rest as measured;
    where the convs beat the probe, the probe is no ceiling (``above_peak``)."""
    profiled = sum(r["seconds_per_step"] for r in ops)
    if profiled <= 0 or step_seconds <= 0 or peak_flops <= 0:
        raise ValueError("peak_gap needs a profiled step, a step time and a peak")
    scale = step_seconds / profiled
    ideal = step_flops / peak_flops
    matmul = sum(r["seconds_per_step"] for r in ops if r["category"] in MATMUL_CATEGORIES) * scale
    at_peak = min(ideal, matmul)
    parts = [{"part": "counted FLOPs at the peak", "seconds_per_step": at_peak},
             {"part": "convs + GEMMs above the peak", "seconds_per_step": matmul - at_peak}]
    parts += [{"part": r["category"], "seconds_per_step": r["seconds_per_step"] * scale} for r in ops
              if r["category"] not in MATMUL_CATEGORIES and r["seconds_per_step"] > 0]
    for p in parts:
        p["share"] = p["seconds_per_step"] / step_seconds
    rest = step_seconds - matmul
    return {"parts": parts, "share": ideal / step_seconds, "matmul_share": matmul / step_seconds,
            "ceiling": ideal / (at_peak + rest), "matmul_tflops": step_flops / matmul / 1e12 if matmul > 0 else 0.0,
            "above_peak": matmul < ideal}


def ceiling_sentence(row: dict) -> str:
    """One line on a profiled ``bench.devices`` row: its share, its convs' share of the step, and two ceilings (every
    conv at the peak and the rest as measured; the convs as measured and nothing else)."""
    share, matmul_share = row["share_of_peak"], row["matmul_share_of_step"]
    if row.get("matmuls_above_peak") in (True, "True"):  # a bool, or its text in a row read back from CSV
        return (f"{share:.0%} of the peak; convs + GEMMs take {matmul_share:.0%} of "
                f"the step and already run above the matmul probe's peak, which is no ceiling on this device.")
    only_matmuls = f"; with the convs and GEMMs as measured and nothing else: {share / matmul_share:.0%}" if (
        matmul_share > 0) else ""
    return (f"{share:.0%} of the peak; convs + GEMMs take {matmul_share:.0%} of the "
            f"step. With every conv and GEMM at the peak and the rest as measured: "
            f"{row['share_if_matmuls_at_peak']:.0%}{only_matmuls}.")


def profiling_sentence(rows: list[dict]) -> str:
    """One line on one step's ``op_breakdown`` rows: how far profiling slowed it, and what the rows add up to."""
    if not rows:
        return ""
    step = sum(r["seconds_per_step"] for r in rows)
    profiled, scale = rows[0]["profiled_step_seconds"], rows[0]["scale"]
    out = (f"profiled, a step took {profiled * 1e3:,.0f} ms against {step * 1e3:,.0f} ms unprofiled; the rows add "
           f"up to the unprofiled step")
    ops = step - next((r["seconds_per_step"] for r in rows if r["category"] == "python + dispatch"), 0.0)
    if abs(scale - 1) > 0.005:
        why = "profiling slowed them" if scale < 1 else "the machine ran slower for the unprofiled steps"
        out += (f". The operators' profiled times came to {ops / scale * 1e3:,.0f} ms and are scaled by "
                f"{scale:.2f}: {why}")
    return out + "."


def busy_share(rows: list[dict]) -> float:
    """The share of a CUDA step's time spent in kernels, from ``op_breakdown``'s rows (less their idle time); NaN
    for a CPU's rows, which have none: the CPU is never idle while it runs the step."""
    idle = [r["share"] for r in rows if r["category"] == "device idle"]
    return 1.0 - idle[0] if idle else float("nan")
