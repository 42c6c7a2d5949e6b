import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import winograd
from cifarlab.matmul_conv import MatmulConv2d, use_matmul_convs
from cifarlab.models import create_model
from cifarlab.winograd import winograd_conv3x3


@pytest.mark.parametrize("direct_forward", [False, True], ids=["winograd-forward", "direct-forward"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_winograd_matches_conv2d_and_its_gradients_across_chunks(channels_last, direct_forward, monkeypatch):
    # Chunks of 2 images (6 overlapping tiles each) over a batch of 3: a full chunk and a short one, forward and
    # backward (the gradient's overlap-add across tiles, and the weight gradient summed over chunks); the
    # backward is Winograd's whichever way the forward went.
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 0)
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 12)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = winograd_conv3x3(xi, w, direct_forward)
    assert y.shape == (3, 3, 8, 12) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, F.conv2d(x, w, padding=1))
    assert torch.autograd.gradcheck(lambda a, b: winograd_conv3x3(a, b, direct_forward), (xi, w), fast_mode=True)


@pytest.mark.parametrize("direct_forward", [False, True], ids=["winograd-forward", "direct-forward"])
def test_fp32_winograd_agrees_with_onednn_far_inside_bf16_rounding(direct_forward):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(32, 64, 3, 3) * 0.05).requires_grad_()
    g = torch.randn(8, 32, 16, 16)
    outs = []
    for conv in (lambda a, b: F.conv2d(a, b, padding=1), lambda a, b: winograd_conv3x3(a, b, direct_forward)):
        y = conv(x, w)
        outs.append((y, *torch.autograd.grad(y, (x, w), g)))
    for ref, got in zip(outs[0], outs[1], strict=True):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("direct_forward", [False, True], ids=["winograd-forward", "direct-forward"])
def test_one_gradient_alone(direct_forward):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    ref_x, ref_w = torch.autograd.grad(F.conv2d(xg, wg, padding=1), (xg, wg), g)
    (only_x,) = torch.autograd.grad(winograd_conv3x3(xg, w, direct_forward), xg, g)
    (only_w,) = torch.autograd.grad(winograd_conv3x3(x, wg, direct_forward), wg, g)
    assert torch.allclose(only_x, ref_x) and torch.allclose(only_w, ref_w)


@pytest.mark.parametrize("direct_forward", [False, True], ids=["winograd-forward", "direct-forward"])
def test_what_the_backward_keeps_is_the_input_itself(direct_forward):
    # Each chunk is padded in cache when the backward needs it: the graph holds the input the layer was given
    # (which the ReLU before it keeps anyway), not a padded copy of the whole batch alongside it.
    x = torch.randn(4, 128, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(128, 128, 3, 3, requires_grad=True)
    saved = winograd_conv3x3(x, w, direct_forward).grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape
    assert saved[1].shape == ((128, 128, 3, 3) if direct_forward else (36, 128, 128))  # the weight or its tiles


def _forward_ops(x: torch.Tensor, w: torch.Tensor) -> set[str]:
    with torch.no_grad(), torch.profiler.profile() as prof:
        winograd_conv3x3(x, w)
    return {e.key for e in prof.key_averages()}


def test_the_forward_is_direct_below_the_forward_channel_rule():
    w = torch.randn(128, 64, 3, 3)
    narrow = _forward_ops(torch.randn(2, 64, 8, 8), w)  # 64 input channels: oneDNN's forward was faster
    assert "aten::convolution" in narrow and "aten::bmm" not in narrow
    wide = _forward_ops(torch.randn(2, 128, 8, 8), torch.randn(128, 128, 3, 3))
    assert "aten::bmm" in wide and "aten::convolution" not in wide
    assert 64 < winograd.FORWARD_MIN_CHANNELS <= 128  # the two cases above straddle the rule


def test_what_it_refuses_and_why():
    w = torch.randn(4, 3, 3, 3)
    assert not winograd.supports(torch.randn(1, 3, 6, 6), w)  # 6 is no multiple of the 4x4 output tile
    assert not winograd.supports(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16), w.bfloat16())
    assert not winograd.supports(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.supports(torch.randn(1, 3, 8, 8), w)
    with pytest.raises(ValueError, match=r"needs fp32 or fp64 without autocast.*\(1, 3, 6, 6\)"):
        winograd_conv3x3(torch.randn(1, 3, 6, 6), w)


def test_the_conv_takes_winograd_only_in_fp32_on_wide_enough_inputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, padding=1, bias=True)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    expected = conv(x)
    use_matmul_convs(conv, winograd_min_channels=64)
    assert conv.gemm_path(x) == "winograd"
    assert torch.allclose(conv(x), expected, atol=1e-4)  # the bias too (outputs of about 1: fp32 Winograd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.gemm_path(x) is None  # bf16: oneDNN (an 8x8 map is over the GEMM path's 4x4)
        assert conv.gemm_path(x[:, :, :4, :4]) == "gemm"
    assert conv.gemm_path(torch.randn(2, 64, 6, 6)) is None
    use_matmul_convs(conv, winograd_min_channels=128)
    assert conv.gemm_path(x) is None
    narrow = nn.Conv2d(64, 64, 3, padding=1, bias=False)  # ResNet-18's first stage: a loss there, measured
    use_matmul_convs(narrow, winograd_min_channels=64)
    assert narrow.gemm_path(x) is None
    use_matmul_convs(conv, winograd_min_channels=0)
    assert conv.gemm_path(x) is None


def _paths(arch: str) -> dict[str, str | None]:
    model = create_model(arch)
    use_matmul_convs(model, winograd_min_channels=winograd.DEFAULT_MIN_CHANNELS)
    names = {m: n for n, m in model.named_modules()}
    paths = {}
    for mod in model.modules():
        if isinstance(mod, MatmulConv2d):
            mod.register_forward_pre_hook(lambda m, inp: paths.__setitem__(names[m], m.gemm_path(inp[0])))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    return paths


def test_which_convs_take_it_in_each_architecture():
    paths = _paths("custom_resnet")
    assert paths.pop("prep.0") is None  # 3 input channels: the transforms would outweigh the products
    assert len(paths) == 7 and set(paths.values()) == {"winograd"}
    taken = {n for n, p in _paths("resnet18").items() if p == "winograd"}
    # the 3x3 stride-1 convs of 128 or more channels; not the 64-channel first stage, the stride-2 or 1x1 convs
    assert taken == {"layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer3.0.conv2", "layer3.1.conv1",
                     "layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"}
