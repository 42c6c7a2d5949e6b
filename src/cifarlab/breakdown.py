"""Where a training step's time goes: by kind of operation, and convolution by convolution.

``bench.devices`` reports a single share of the matmul peak per architecture; when that share is low, these two
views say why:

* ``op_breakdown`` profiles whole training steps (torch.profiler) and sums each operator's own time into a few
  categories: convolution forward, convolution backward, batch norm, pooling, activations, optimizer, casts and
  copies, other. On CUDA it sums device (kernel) time, on the CPU the host time of each operator.
* ``conv_layer_table`` times every ``Conv2d`` of the model alone at the training batch size, precision and
  memory format: forward, input gradient and weight gradient separately, each with its achieved TFLOP/s. On a
  CPU this is what shows, for instance, that oneDNN's weight gradient of the 512-channel 4x4 layers runs far
  below the matmul peak while the 16x16 layers come close to it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import winograd
from cifarlab.matmul_conv import MatmulConv2d
from cifarlab.timing import CONV_BACKWARD_ANNOTATION, CONV_FORWARD_ANNOTATION, synchronize

CATEGORIES = ("conv forward", "conv backward", "batch norm", "pooling", "activation", "linear + loss", "optimizer",
              "data + augmentation", "casts + copies", "zero fill", "other")
# Annotations (torch.profiler.record_function) whose operators count as one category whatever they are.
DATA_ANNOTATION = "cifarlab.data"
WINOGRAD_KERNEL = "Winograd F(4x4,3x3)"
WINOGRAD_BACKWARD_KERNEL = "oneDNN forward, Winograd ∂"  # below winograd.FORWARD_MIN_CHANNELS input channels
_ANNOTATED = (("Optimizer.step", "optimizer"), (DATA_ANNOTATION, "data + augmentation"),
              (CONV_FORWARD_ANNOTATION, "conv forward"), (CONV_BACKWARD_ANNOTATION, "conv backward"))


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
    """Seconds per step by category over ``steps`` profiled calls of ``step`` (warm it up first).

    Wrap the batch's production in ``torch.profiler.record_function(DATA_ANNOTATION)`` to count it as data.

    Each operator's *self* time is counted once. The rows add up to an *unprofiled* step, timed over as many
    steps right after the profiled ones, because profiling slows a step: it records every operator, at a cost
    per operator on the host, and the Winograd path's ~30,000 small operators per step took 11.0 s profiled
    against 6.65 s unprofiled (EPYC, 2026-11-28). Most of that cost falls between operators, so the
    old rest (profiled wall minus the operators' time) read as 38% "python + dispatch" and was mostly the
    profiler's. On the CPU, "python + dispatch" is therefore the unprofiled step less the operators' time, but
    never more than the profiled steps themselves left between their operators (profiling adds time there, it
    takes none away), in proportion to the unprofiled step. The cap matters on a machine whose pace moves from
    step to step: on the 2-core AMX Xeon (2026-12-06) ResNet-18's steps ran at 2.2-2.9 s one after another,
    with 37-44 ms between operators in each profiled one, and an unprofiled pair 0.6 s slower than the profiled
    pair's operators read as 19% "python + dispatch". The operators' times are then scaled, all by one factor,
    to fill the unprofiled step: down where profiling inflated them, up where the machine slowed. On CUDA
    the kernel times are the device's own, which profiling leaves alone, but the profiler slows the host that
    launches them (on an H200 machine, 2026-11-27, a profiled step took 580 ms against 18 ms unprofiled), and
    the rest is time the device sat idle. Every row carries ``profiled_step_seconds`` (timed inside the
    profiler, its stop and the reading of its events left out) and ``scale`` (the factor applied to the
    operators' times, 1 on CUDA), so the report can say how far profiling slowed the step.
    """
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


def _time_gemm_conv(conv: MatmulConv2d, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor,
                    device: torch.device, repeats: int) -> tuple[float, float, float]:
    """The three passes of a ``MatmulConv2d``'s GEMM path, each alone: a graph kept per gradient, replayed."""
    run = conv.gemm_conv
    x, weight = x.detach(), weight.detach()
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y_x, y_w = run(xg, weight), run(x, wg)  # needs_input_grad: x only, weight only
    return (_median_seconds(lambda: run(x, weight), device, repeats),
            _median_seconds(lambda: torch.autograd.grad(y_x, xg, grad, retain_graph=True), device, repeats),
            _median_seconds(lambda: torch.autograd.grad(y_w, wg, grad, retain_graph=True), device, repeats))


def _time_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, device: torch.device,
               repeats: int) -> tuple[float, float, float]:
    """Median seconds of the forward pass, the input gradient and the weight gradient of ``conv``'s shape."""
    if isinstance(conv, MatmulConv2d) and conv.gemm_path(x) is not None:
        return _time_gemm_conv(conv, x, weight, grad, device, repeats)
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
        path = conv.gemm_path(x) if isinstance(conv, MatmulConv2d) else None
        kernel = {"winograd": WINOGRAD_KERNEL, "gemm": "GEMM", "weight-gemm": "oneDNN, ∂weight GEMM"}.get(
            path or "", "cuDNN" if device.type == "cuda" else "oneDNN")
        if path == "winograd" and winograd.forward_is_direct(c_in):
            kernel = WINOGRAD_BACKWARD_KERNEL
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
    """Where a step's time goes against the matmul peak: the rest of the peak that a share of peak leaves out.

    ``ops`` are one step's ``op_breakdown`` rows; their shares (of the few steps timed beside the profile) are
    applied to ``step_seconds``, the step as the benchmark timed it over all its repetitions. ``parts``: the
    step's counted FLOPs at ``peak_flops`` (their share of the step is ``share``, the share of peak), the time
    the convolutions and GEMMs take beyond that, and each other kind of operation's whole time. ``ceiling`` is
    the share of peak the step would reach with every convolution and GEMM at the peak and everything else as
    measured: what kernel work alone can win.

    Convolutions can beat the matmul probe (fp32 on an AVX2-only EPYC: a whole step's counted FLOPs ran at 0.89
    of a 2048 x 2048 product's rate at batch 32, the convs doing them in part of the step): then the probe is no
    ceiling, the convs' part is their measured time, nothing is "above the peak", ``ceiling`` equals ``share``
    and ``above_peak`` is True.
    """
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
    """One line on a ``bench.devices`` row with a peak gap: its share, its convs' share of the step, its ceilings.

    Two ceilings, one for each kind of work left: every conv and GEMM at the peak with the rest of the step as
    measured (what faster conv kernels alone can win), and the convs and GEMMs as measured with nothing else in
    the step (what removing batch norm, pooling, activations and the rest alone can win: the share divided by
    the convs' share of the step). A target above both needs both.
    """
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
    """One line on one step's ``op_breakdown`` rows: how far profiling slowed it, and what the rows add up to.

    Rows read back from a ``breakdown.csv`` written before the unprofiled step was timed lack the two columns;
    they get an empty line.
    """
    if not rows or "profiled_step_seconds" not in rows[0] or rows[0]["profiled_step_seconds"] != rows[0][
            "profiled_step_seconds"]:  # missing, or NaN in a table that mixes old and new rows
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
