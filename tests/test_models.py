import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.models import create_model, list_models, model_summary

PARAMS = {"custom_resnet": 6_573_120, "resnet18": 11_173_962}


def test_registry_lists_both_seed_architectures():
    assert set(PARAMS) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_seed(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 3])
def test_output_shape_follows_class_count(name, num_classes):
    model = create_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_custom_resnet_stage_shapes():
    model = create_model("custom_resnet").eval()
    shapes = {}
    for stage in ("prep", "layer1", "layer2", "layer3"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: shapes.__setitem__(s, tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes == {"prep": (64, 32, 32), "layer1": (128, 16, 16), "layer2": (256, 8, 8), "layer3": (512, 4, 4)}
    assert model.fc.bias is None and model.fc.in_features == 512


def test_resnet18_uses_projection_shortcuts_only_where_shape_changes():
    model = create_model("resnet18")
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut") and len(list(m.children())) > 0]
    assert projections == ["layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut"]


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet50'; valid: custom_resnet, resnet18"):
        create_model("resnet50")


def test_summary_is_a_layer_table_with_the_seed_total():
    text = model_summary(create_model("custom_resnet"))
    assert "Total params: 6,573,120" in text
    assert "[1, 512, 4, 4]" in text and "Conv2d" in text
