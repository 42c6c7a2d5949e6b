import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.cpu.gemm_conv import MatmulConv2d, gemm_weight_grad_conv, matmul_conv3x3, use_matmul_convs
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


def test_gemm_weight_grad_conv_matches_conv2d_for_strided_and_1x1_convs():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64, requires_grad=True)
    for stride, padding, k in (((2, 2), (1, 1), 3), ((2, 2), (0, 0), 1), ((1, 1), (1, 1), 3)):
        w = torch.randn(7, 5, k, k, dtype=torch.float64, requires_grad=True)
        assert torch.allclose(gemm_weight_grad_conv(x, w, stride, padding), F.conv2d(x, w, None, stride, padding))
        assert torch.autograd.gradcheck(lambda a, b, s=stride, p=padding: gemm_weight_grad_conv(a, b, s, p), (x, w))


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("custom_resnet", {"layer3.1.res.0.0": "gemm", "layer3.1.res.1.0": "gemm"}),
     ("resnet18", {"layer4.0.conv1": "weight-gemm", "layer4.0.conv2": "gemm", "layer4.0.shortcut.0": "weight-gemm",
                   "layer4.1.conv1": "gemm", "layer4.1.conv2": "gemm"})],
)
def test_swap_keeps_parameters_and_takes_a_gemm_path_only_into_4x4_maps(arch, expected, monkeypatch):
    model = create_model(arch)
    keys = list(model.state_dict())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert use_matmul_convs(model, max_pixels=16) == convs
    assert list(model.state_dict()) == keys
    names = {m: n for n, m in model.named_modules()}
    paths = {}
    original = MatmulConv2d.gemm_path
    monkeypatch.setattr(MatmulConv2d, "gemm_path",
                        lambda self, x: paths.setdefault(names[self], original(self, x)))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(paths) == convs  # every conv asked
    assert {n: p for n, p in paths.items() if p is not None} == expected


def test_bias_is_added_and_larger_maps_fall_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = conv(x)
    use_matmul_convs(conv)
    assert conv.gemm_path(x) == "gemm" and torch.allclose(conv(x), expected)
    strided = MatmulConv2d(4, 6, 3, stride=2, padding=1).double()
    assert strided.gemm_path(x) == "weight-gemm"
    assert strided.gemm_path(torch.randn(2, 4, 10, 10)) is None  # a 5x5 output map: oneDNN
    assert conv.gemm_path(torch.randn(2, 4, 5, 5)) is None
