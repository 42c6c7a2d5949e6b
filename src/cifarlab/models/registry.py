from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cifarlab.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder ``fn(num_classes=10) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; valid: {', '.join(list_models())}") from None
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return builder(num_classes=num_classes)


def model_summary(model: nn.Module, image_size: int = 32, depth: int = 3) -> str:
    """A layer table (names, output shapes, parameters) as the seeds print it, via torchinfo."""
    from torchinfo import summary

    return str(summary(model, input_size=(1, 3, image_size, image_size), col_names=("output_size", "num_params"),
                       depth=depth, device="cpu", verbose=0, row_settings=("var_names",)))
