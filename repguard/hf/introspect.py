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


class _LanguageModelView:
    """A vision-language model seen as its causal LM: ``model`` is its language model."""

    def __init__(self, language_model) -> None:
        self.model = language_model


def _root(model):
    """Where the architecture table's paths start: the causal LM itself, or, for a vision-language checkpoint
    loaded whole (Gemma 3 4B-27B: ``Gemma3ForConditionalGeneration``, whose decoder is
    ``model.language_model``), a view of it with that decoder as ``model``."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    if language_model is not None and not hasattr(inner, "layers"):
        return _LanguageModelView(language_model)
    return model


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
        layers = resolve(_root(model), spec.layers)
        return [resolve(layer, spec.act) for layer in layers]
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({spec.family}): expected {spec.layers}[i].{spec.act} ({exc})"
        ) from None


def _hook_device(module) -> torch.device | None:
    """The execution device of the accelerate hook on ``module`` (offloaded weights wait on ``meta`` until it
    brings them there), if it has one."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        return None
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def home_device(model) -> torch.device:
    """The device the guard keeps its row buffers on: the model's (its first parameter's), or, where accelerate
    offloads every weight (``cpu_offload``, weights on ``meta``), the device its hooks run the model on."""
    param = next(model.parameters())
    if param.device.type == "meta":
        for module in model.modules():
            dev = _hook_device(module)
            if dev is not None:
                return dev
    return param.device


def layer_devices(model, home) -> dict[int, torch.device] | None:
    """Each decoder layer's device when the model is spread over several (``device_map``), else None.

    A layer's device is its accelerate hook's execution device if it has one (offloaded weights wait on
    ``meta`` until then), else its parameters'. None when every layer runs on ``home``.
    """
    layers = resolve(_root(model), arch_of(model).layers)
    home = torch.device(home)
    devices = {}
    for i, layer in enumerate(layers):
        dev = _hook_device(layer)
        if dev is None:
            param = next(layer.parameters(), None)
            if param is None or param.device.type == "meta":
                continue  # no weights of its own, or offloaded without a hook: runs where its inputs are
            dev = param.device
        devices[i] = dev
    return None if all(dev == home for dev in devices.values()) else devices


def shape_of(model) -> tuple[int, int]:
    """(num_layers, intermediate_size)."""
    spec = arch_of(model)
    config = text_config(model)
    return spec.num_layers(config), spec.intermediate_size(config)


def fingerprint(model) -> Fingerprint:
    """The model's identity for ``NeuronMap.check_model`` (``repguard.runtime.model_fingerprint``). A final norm
    offloaded by accelerate (``device_map`` with ``disk``/``cpu`` offload: its weight waits on ``meta``) is read
    from its offload hook's weights."""
    spec = arch_of(model)
    try:
        norm = resolve(_root(model), spec.final_norm)
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedModelError(f"{type(model).__name__}: expected its final norm at {spec.final_norm} ({exc})") from None
    weight = norm.weight
    if weight.device.type == "meta":
        offloaded = getattr(getattr(norm, "_hf_hook", None), "weights_map", None)
        try:
            weight = offloaded["weight"] if offloaded is not None else weight
        except (KeyError, TypeError):
            pass
        if weight.device.type == "meta":
            raise UnsupportedModelError(
                f"{type(model).__name__}: its final norm's weight is on the meta device and no offload hook holds "
                "it, so the neuron map cannot be checked against the model; load its weights, or pass "
                "check_model=False to use the map unchecked")
    return model_fingerprint(spec, text_config(model), _root(model), weight)


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
