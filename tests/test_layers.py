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


def test_ghost_batch_norm_falls_back_on_uneven_batches_and_keeps_channels_last():
    bn = nn.BatchNorm2d(8)
    use_ghost_batch_norm(bn, 32)
    x = torch.randn(40, 8, 4, 4)  # 40 is no multiple of 32: one batch
    assert torch.allclose(bn(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True),
                          atol=1e-5)
    cl = torch.randn(64, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert bn(cl).is_contiguous(memory_format=torch.channels_last)


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
