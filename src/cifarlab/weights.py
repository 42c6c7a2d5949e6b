"""The saved-weights format: a run's tested model as a plain dict that ``torch.load(weights_only=True)`` reads."""

from __future__ import annotations

import pickle
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from cifarlab.augment import Normalization
from cifarlab.config import TrainConfig
from cifarlab.data import atomic_file
from cifarlab.errors import ConfigError
from cifarlab.models.recipe import recipe_model

WEIGHTS_FORMAT = 1  # bumped when what save_weights stores changes shape


def save_weights(result, path: Path, classes: list[str] | tuple[str, ...]) -> Path:
    """Write the model a run tested (the EMA's where kept) as a plain dict: the fp32 state dict with the whitening
    folded into the first conv, the config, the class names and the input normalisation."""
    # Folded from the state dict, not by removing the parametrisation from a deep copy: the copy shares its
    # module's generated class, and removing it there deletes that class's ``weight`` property from under the
    # caller's model, which then fails on its next forward pass.
    state = result.model.state_dict()
    for prefix, module in result.model.named_modules():
        if parametrize.is_parametrized(module):
            dot = f"{prefix}." if prefix else ""
            for name in module.parametrizations:
                state = {k: v for k, v in state.items() if not k.startswith(f"{dot}parametrizations.{name}.")}
                with torch.no_grad():
                    state[f"{dot}{name}"] = getattr(module, name)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
             for k, v in state.items()}
    doc = {"format": WEIGHTS_FORMAT, "state_dict": state, "config": result.config.to_dict(), "classes": list(classes),
           "normalization": {"mean": list(result.normalization.mean), "std": list(result.normalization.std)}}
    with atomic_file(Path(path), "wb") as fh:
        torch.save(doc, fh)
    return Path(path)


def load_weights(path: Path) -> tuple[nn.Module, Normalization, dict]:
    """(model in eval mode on the CPU, with the CPU kernels its run trained with; its input normalisation; the stored
    document) from ``save_weights``' file. Feed it uint8 images as ``evaluate`` does."""
    try:
        doc = torch.load(Path(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ConfigError(f"cannot read weights from {path}: {exc.strerror or exc}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError):  # torch's messages run to paragraphs
        raise ConfigError(f"cannot read weights from {path}: not a torch file that holds only tensors") from None
    if not isinstance(doc, dict) or doc.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} is not a cifarlab weights file (format {WEIGHTS_FORMAT})")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in doc["config"].items() if k in known})
    model = recipe_model(config, len(doc["classes"]))
    model.load_state_dict(doc["state_dict"])
    norm = Normalization(tuple(doc["normalization"]["mean"]), tuple(doc["normalization"]["std"]))
    return model.eval(), norm, doc
