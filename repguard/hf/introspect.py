"""Where a transformers model keeps its MLP activations, via the architecture table."""

from __future__ import annotations

import torch

from ..archs import ArchSpec, arch_for, resolve
from ..errors import UnsupportedModelError
from ..neuron_map import Fingerprint
from ..runtime import model_fingerprint


def text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config if config.model_type == "gemma3" else config


def arch_of(model) -> ArchSpec:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedModelError(f"{type(model).__name__} has no config.model_type; pass a transformers causal LM")
    text = text_config(model)
    return arch_for(text.model_type, text)  # the config also refuses a mixture-of-experts MLP


def act_modules(model) -> list[torch.nn.Module]:
    """The activation module of every decoder layer, in layer order."""
    spec = arch_of(model)
    try:
        layers = resolve(model, spec.layers)
        return [resolve(layer, spec.act) for layer in layers]
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({spec.family}): expected {spec.layers}[i].{spec.act} ({exc})"
        ) from None


def layer_devices(model, home) -> dict[int, torch.device] | None:
    """Each decoder layer's device when the model is spread over several (``device_map``), else None.

    A layer's device is its accelerate hook's execution device if it has one (offloaded weights wait on
    ``meta`` until then), else its parameters'. None when every layer runs on ``home``.
    """
    layers = resolve(model, arch_of(model).layers)
    home = torch.device(home)
    devices = {}
    for i, layer in enumerate(layers):
        dev = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
        if dev is None:
            param = next(layer.parameters(), None)
            if param is None or param.device.type == "meta":
                continue  # no weights of its own, or offloaded without a hook: runs where its inputs are
            dev = param.device
        devices[i] = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    return None if all(dev == home for dev in devices.values()) else devices


def shape_of(model) -> tuple[int, int]:
    """(num_layers, intermediate_size)."""
    spec = arch_of(model)
    config = text_config(model)
    return spec.num_layers(config), spec.intermediate_size(config)


def fingerprint(model) -> Fingerprint:
    """The model's identity for ``NeuronMap.check_model`` (``repguard.runtime.model_fingerprint``)."""
    return model_fingerprint(arch_of(model), text_config(model), model)
