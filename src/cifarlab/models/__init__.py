"""Model registry in the style of timm: ``@register_model`` on a builder, ``create_model`` by name."""

from cifarlab.models.registry import create_model, list_models, model_summary, register_model

# Importing the modules registers their builders.
from cifarlab.models import custom_resnet as _custom_resnet  # noqa: F401  isort: skip
from cifarlab.models import resnet18 as _resnet18  # noqa: F401  isort: skip

__all__ = ["create_model", "list_models", "model_summary", "register_model"]
