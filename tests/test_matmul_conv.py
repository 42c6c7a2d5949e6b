import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.matmul_conv import MatmulConv2d, matmul_conv3x3, use_matmul_convs
from cifarlab.models import create_model


@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_conv_matches_conv2d_and_its_gradients(channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    assert torch.allclose(matmul_conv3x3(xi, w), F.conv2d(x, w, padding=1))
    assert torch.autograd.gradcheck(matmul_conv3x3, (xi, w))


def test_under_bf16_autocast_it_agrees_with_onednn_to_bf16_rounding():
    torch.manual_seed(0)
    x = torch.randn(32, 64, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref, fast = nn.Conv2d(64, 32, 3, padding=1, bias=False), nn.Conv2d(64, 32, 3, padding=1, bias=False)
    fast.load_state_dict(ref.state_dict())
    use_matmul_convs(fast)
    grads = []
    for conv in (ref, fast):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().square().sum().backward()
        grads.append((y.float(), x.grad.clone(), conv.weight.grad.clone()))
    assert grads[1][0].is_contiguous(memory_format=torch.channels_last)
    assert fast.weight.grad.dtype == torch.float32  # the fp32 master weight gets an fp32 gradient
    for a, b in zip(grads[0], grads[1], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_swap_keeps_parameters_and_takes_the_matmul_path_only_on_small_maps(monkeypatch):
    model = create_model("custom_resnet")
    keys = list(model.state_dict())
    assert use_matmul_convs(model, max_pixels=16) == 8
    assert list(model.state_dict()) == keys
    taken = []
    original = MatmulConv2d._takes_matmul_path
    monkeypatch.setattr(MatmulConv2d, "_takes_matmul_path",
                        lambda self, x: taken.append(tuple(x.shape[2:])) or original(self, x))
    calls = []
    monkeypatch.setattr("cifarlab.matmul_conv._MatmulConv3x3.apply",
                        lambda x, w: calls.append(tuple(x.shape[2:])) or F.conv2d(x, w, padding=1))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(taken) == 8  # every conv asked
    assert calls == [(4, 4), (4, 4)]  # only layer3's residual pair runs on 4x4 maps


def test_bias_and_non_3x3_convs_fall_back_or_add_the_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = conv(x)
    use_matmul_convs(conv)
    assert torch.allclose(conv(x), expected)
    strided = MatmulConv2d(4, 6, 3, stride=2, padding=1).double()
    assert not strided._takes_matmul_path(x)
