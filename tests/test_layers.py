import pytest
import torch
from torch import nn

from cifarlab.models import create_model, list_models
from cifarlab.models.layers import GhostBatchNorm2d, use_activation, use_ghost_batch_norm


def test_ghost_batch_norm_normalises_each_ghost_batch_on_its_own():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    assert use_ghost_batch_norm(bn, 4) == 1 and isinstance(bn, GhostBatchNorm2d)
    # Two ghost batches with very different means: each comes out centred on its own.
    x = torch.cat([torch.randn(4, 3, 5, 5) + 10, torch.randn(4, 3, 5, 5) - 10])
    y = bn(x)
    for half in (y[:4], y[4:]):
        assert half.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert half.var(dim=(0, 2, 3), unbiased=False).sub(1).abs().max() < 1e-3
    # Whole-batch BN would have centred the halves at +1 and -1.
    plain = nn.functional.batch_norm(x, None, None, training=True)
    assert plain[:4].mean() > 0.9
    # The running mean moved by momentum x the mean of the ghost batches' means (about 0), as one step would.
    assert bn.running_mean.abs().max() < 0.1 and int(bn.num_batches_tracked) == 1
    bn.eval()
    assert torch.allclose(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_ghost_batch_norm_splits_uneven_batches_into_near_equal_ghost_batches_and_keeps_channels_last():
    bn = nn.BatchNorm2d(8)
    use_ghost_batch_norm(bn, 32)
    x = torch.randn(40, 8, 4, 4)  # under two ghost batches of 32: normalised whole
    assert torch.allclose(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True),
                          atol=1e-5)
    # 100 images are no multiple of 32, but hold three ghost batches of at least 32: 34 + 33 + 33, not one batch
    # (ghost batch norm was then silently off) and not 32 + 32 + 32 + a noisy 4
    x = torch.randn(100, 8, 4, 4) + torch.arange(100.0).view(100, 1, 1, 1)
    for form in ("chunked", "folded"):  # CUDA's fold needs equal ghost batches: an uneven split is chunked there
        bn.form = form
        y = bn(x)
        for lo, hi in ((0, 34), (34, 67), (67, 100)):
            assert y[lo:hi].mean(dim=(0, 2, 3)).abs().max() < 1e-4
        assert y[30:34].mean() > 1 and y[34:38].mean() < -1  # the first ghost batch ends at 34, not 32
    cl = torch.randn(64, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert bn(cl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [512, 100])
def test_ghost_batches_are_one_split_of_the_batch_in_the_graph(n):
    # One split node feeds every ghost batch's batch norm, so the backward gathers their gradients with one cat.
    # A slice per ghost batch (tensor_split) gave the same numbers, but each slice's backward zero-filled a
    # gradient of the whole batch: 16 per layer, 28% of a ResNet-18 step on the CPU in bench.devices' breakdown.
    bn = nn.BatchNorm2d(4)
    use_ghost_batch_norm(bn, 32)
    y = bn(torch.randn(n, 4, 2, 2, requires_grad=True))
    per_ghost_batch = [fn for fn, _ in y.grad_fn.next_functions]
    assert len(per_ghost_batch) == n // 32
    inputs = {fn for node in per_ghost_batch for fn, _ in node.next_functions
              if fn is not None and type(fn).__name__ != "AccumulateGrad"}
    assert len(inputs) == 1, inputs


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_ghost_batch_norm_is_the_per_ghost_batch_one(channels_last):
    # CUDA takes the folded form (one batch_norm call, not one per ghost batch); it is run here on the CPU and
    # must give the chunked form's output, gradients and, to first order in the momentum, running statistics.
    torch.manual_seed(0)
    x = torch.randn(96, 4, 6, 6) * torch.arange(1, 97).view(96, 1, 1, 1) ** 0.5 + torch.arange(96).view(96, 1, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    chunked, folded = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    for bn in (chunked, folded):
        use_ghost_batch_norm(bn, 32)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
            bn.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.2]))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = chunked(xa)
    folded.form = "folded"  # what CUDA takes, asked for on the CPU
    yb = folded(xb)
    assert yb.shape == x.shape and yb.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(ya, yb, atol=1e-5)
    # each run of 32 images comes out centred on its own (the three have means near 15, 47 and 79)
    assert yb[32:64].mean(dim=(0, 2, 3)).sub(folded.bias).abs().max() < 1e-4
    grad = torch.randn_like(x)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(chunked.weight.grad, folded.weight.grad, atol=1e-4)
    assert torch.allclose(chunked.bias.grad, folded.bias.grad, atol=1e-4)
    # one step moves the running statistics by the momentum x the mean of the ghost batches' statistics ...
    groups = x.detach().view(3, 32, 4, 6, 6)
    assert torch.allclose(folded.running_mean, 0.1 * groups.mean(dim=(1, 3, 4)).mean(0), rtol=1e-4)
    assert torch.allclose(folded.running_var, 0.9 + 0.1 * groups.var(dim=(1, 3, 4)).mean(0), rtol=1e-4)
    # ... where the chunked form moves them in three steps of a third: the same to first order in the momentum
    assert torch.allclose(chunked.running_mean, folded.running_mean, rtol=0.03)
    assert torch.allclose(chunked.running_var, folded.running_var, rtol=0.03)


@pytest.mark.parametrize("arch", list_models())
def test_swaps_keep_parameters_and_change_the_function(arch):
    torch.manual_seed(0)
    model = create_model(arch)
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    x = torch.randn(64, 3, 32, 32)
    model.eval()
    before = model(x)
    relus = use_activation(model, "celu")
    assert relus == sum(isinstance(m, nn.CELU) for m in model.modules()) > 0
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert use_ghost_batch_norm(model, 32) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == count
    assert not torch.allclose(model(x), before)  # CELU differs from ReLU on negative inputs
    model.train()
    model(x).sum().backward()


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        use_activation(nn.Sequential(nn.ReLU()), "gelu")
