"""Where a transformers model keeps its MLP activations, via the architecture table."""

from __future__ import annotations

import hashlib
from typing import Iterator

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


@torch.inference_mode()
def weight_digest(model, samples: int = 32) -> str:
    """A digest of the model's weights that tells two checkpoints of one shape apart (a LoRA merge, another
    fine-tune, another random init), read cheaply on any device: for every parameter, in the model's order,
    its shape and ``samples`` values at an even stride over it (first and last included), gathered where the
    parameter lives and read to the host once per device. Gathers are exact, so a model gives the same
    digest on every device in one dtype. Names are left out (a wrapper's prefix changes them, not the
    weights). Offloaded (meta) parameters count by shape only."""
    sampled: list[tuple[str, tuple[int, ...], torch.Tensor | None]] = []
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        n = flat.numel()
        if n == 0 or flat.device.type == "meta":
            sampled.append((name, tuple(param.shape), None))
            continue
        k = min(samples, n)
        idx = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)
        sampled.append((name, tuple(param.shape), flat[idx].float()))
    on_host: dict[torch.device, Iterator[torch.Tensor]] = {}
    for device in {t.device for _, _, t in sampled if t is not None}:
        parts = [t for _, _, t in sampled if t is not None and t.device == device]
        on_host[device] = iter(torch.cat(parts).cpu().split([t.numel() for t in parts]))
    digest = hashlib.sha256()
    for name, shape, t in sampled:
        digest.update(f"{list(shape)}".encode())
        if t is not None:
            digest.update(next(on_host[t.device]).numpy().tobytes())
    return digest.hexdigest()[:32]
