import numpy as np
import pytest
import torch

from cifarlab.config import TrainConfig
from cifarlab.lr_finder import lr_range_test, suggest
from cifarlab.models import create_model
from cifarlab.step import TrainStep


def _batches(n=32):
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _step(model, lr):
    """The training step as the range test takes it: the LR left to the sweep, no EMA, no schedule."""
    config = TrainConfig(optimizer="sgd", max_lr=lr, ema=0, bias_lr_scale=1, label_smoothing=0, logit_scale=1)
    return TrainStep(config, model, torch.device("cpu"), "fp32", total_steps=100, num_classes=10, schedule=False)


def test_state_is_restored_after_the_sweep():
    torch.manual_seed(0)
    step = _step(create_model("custom_resnet"), 0.123)
    model, optimizer = step.model, step.optimizer
    step(*next(_batches()))  # one real step so the optimizer has momentum buffers to restore
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    result = lr_range_test(step, _batches(), num_steps=8, start_lr=1e-4, end_lr=1.0)
    assert len(result.lrs) >= 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    state = optimizer.state_dict()
    assert state["param_groups"][0]["lr"] == 0.123
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], opt_before[k])


def test_sweep_is_exponential_and_stops_on_divergence():
    step = _step(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), 0.1)
    calls = []
    result = lr_range_test(step, _batches(), num_steps=60, start_lr=1e-5, end_lr=1e4,
                           on_step=lambda *call: calls.append(call))
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, ratios[0])
    assert result.diverged and len(result.lrs) < 60
    # The progress callback saw every step with a finite loss, counted from 1, with its LR and smoothed loss.
    finite = [i for i, s in enumerate(result.smoothed) if np.isfinite(s)]
    assert [c[0] for c in calls] == [i + 1 for i in finite] and len(calls) >= 3
    assert [c[1] for c in calls] == [result.lrs[i] for i in finite]
    assert [c[2] for c in calls] == [result.smoothed[i] for i in finite]


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-5, 0, 50)
    loss = 2.5 - 1.5 / (1 + np.exp(-(np.log10(lrs) + 3) * 3))  # falls fastest at 1e-3
    loss[40:] += np.linspace(0, 5, 10)  # then blows up
    s = suggest(lrs, loss)
    assert s["steepest"] == pytest.approx(1e-3, rel=0.3)
    assert s["min_div_10"] == pytest.approx(lrs[np.argmin(loss)] / 10)
