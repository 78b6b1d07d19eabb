"""Shared helpers of the vLLM tests: a test neuron map for a converted model folder, engine settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from repguard.archs import arch_for
from repguard.neuron_map import FINGERPRINT_WIDTH, NeuronMap, config_fingerprint, map_from_scores

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


LOGITS_PROCESSOR = "repguard.vllm:RepGuardLogitsProcessor"


def engine_kwargs(**extra) -> dict:
    """In-process CPU engine settings. Where the plugin is loaded (``VLLM_PLUGINS=repguard_neurons``), the engine
    is started with repguard's logits processor, which the neuron step needs."""
    kw = dict(dtype="float32", distributed_executor_backend="uni", max_model_len=512, max_num_seqs=8,
              enforce_eager=True, seed=0)
    if os.environ.get("VLLM_PLUGINS") == "repguard_neurons":
        kw["logits_processors"] = [LOGITS_PROCESSOR]
    kw.update(extra)
    return kw


def folder_fingerprint(folder: str | Path) -> tuple[str, torch.Tensor, int, int]:
    """(shape hash, final-norm weights, layers, d_ff) of a converted HF folder, without building the model."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    layers, width = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    key = config_fingerprint(cfg["model_type"], layers, width, int(cfg["hidden_size"]), int(cfg["vocab_size"]))
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if name.endswith("model.norm.weight"):
                    return key, f.get_tensor(name).flatten()[:FINGERPRINT_WIDTH].float(), layers, width
    raise RuntimeError(f"no model.norm.weight in {folder}")


def random_map(folder: str | Path, name: str, selected: int = 230, stored: int = 900, seed: int = 0) -> NeuronMap:
    """A map with random neuron scores (deactivation targets are arbitrary but fixed), fitted to ``folder``."""
    key, weights, layers, width = folder_fingerprint(folder)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, width, generator=g)
    stats = {k: torch.rand(layers, width, generator=g) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(model_name=name, architecture="llama", num_layers=layers, intermediate_size=width, hook_point=arch_for("llama").hook_point,
                quantity="act", fingerprint=key, num_selected=0, num_stored=0)
    return map_from_scores(meta, scores, stats, selected, stored, extra={"fingerprint_weights": weights})


def set_env(tmp: str | Path) -> None:
    os.environ.update(ENGINE_ENV)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
