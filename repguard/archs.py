"""The one place that knows where each architecture keeps its MLP activation.

Hook points are templates relative to the causal-LM module, in the spirit of TransformerLens'
``blocks.{L}.mlp.hook_post``. The recorded quantity is the paper's: the activation module's
output, which for gated MLPs is ``act(gate_proj(x))`` *before* the product with ``up_proj(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the decoder-layer list, from the *ForCausalLM module
    act: str  # dotted path of the activation module, from one decoder layer
    gated: bool
    computes: str  # what the act module's output is
    final_norm: str  # dotted path of the final norm (its weights feed the model fingerprint)
    intermediate_attr: str = "intermediate_size"
    layers_attr: str = "num_hidden_layers"
    # vLLM side: the fused act module (``mlp.act_fn``) takes [gate | up] and returns act(gate) * up;
    # ``vllm_gate_act`` is the activation that turns its gate half into this table's quantity.
    # None: no vLLM support for this family yet.
    vllm_layers: str | None = None
    vllm_act: str | None = None
    vllm_gate_act: str | None = None  # "silu" | "gelu_tanh"

    def intermediate_size(self, config) -> int:
        value = getattr(config, self.intermediate_attr, None)
        if value is None and self.family == "gpt2":
            value = 4 * config.n_embd
        return int(value)

    def num_layers(self, config) -> int:
        return int(getattr(config, self.layers_attr))

    @property
    def hook_point(self) -> str:
        return f"{self.layers}.{{L}}.{self.act}:output"


_GATED = "act(gate_proj(x)), before the product with up_proj(x)"
_FUSED = "act(gate), gate the first half of gate_up_proj(x), before the product with its second half"

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        "llama", ("llama",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="silu",
    ),
    ArchSpec(
        "mistral", ("mistral",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="silu",
    ),
    ArchSpec(
        "qwen2", ("qwen2",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="silu",
    ),
    ArchSpec("qwen3", ("qwen3",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm"),
    ArchSpec("phi3", ("phi3",), "model.layers", "mlp.activation_fn", True, _FUSED, "model.norm"),
    ArchSpec("olmo2", ("olmo2",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm"),
    ArchSpec(
        "gemma", ("gemma",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="gelu_tanh",
    ),
    ArchSpec(
        "gemma2", ("gemma2",), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="gelu_tanh",
    ),
    ArchSpec(
        "gemma3", ("gemma3_text", "gemma3"), "model.layers", "mlp.act_fn", True, _GATED, "model.norm",
        vllm_layers="model.layers", vllm_act="mlp.act_fn", vllm_gate_act="gelu_tanh",
    ),
    ArchSpec(
        "gpt2", ("gpt2",), "transformer.h", "mlp.act", False, "GELU(c_fc(x))", "transformer.ln_f",
        intermediate_attr="n_inner", layers_attr="n_layer",
    ),
    ArchSpec(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.act", False, "GELU(dense_h_to_4h(x))",
        "gpt_neox.final_layer_norm",
    ),
)

_BY_TYPE = {t: spec for spec in ARCHITECTURES for t in spec.model_types}

# Mixture-of-experts MLPs: a token's MLP is a routed mix of expert MLPs, so "neuron j of layer L" names
# a different unit for every expert and the paper's per-neuron statistics do not apply as they stand.
MOE_MODEL_TYPES = frozenset({
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "dbrx",
    "jamba", "granitemoe", "granitemoeshared", "granitemoehybrid", "gpt_oss", "llama4", "llama4_text",
    "minimax", "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe", "dots1", "bailing_moe", "switch_transformers",
    "nllb_moe",
})
# Config fields that, when > 0, say a model of any model_type routes tokens to experts.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def _experts(config) -> int:
    for name in _EXPERT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def arch_for(model_type: str, config=None) -> ArchSpec:
    """The table entry for ``model_type``; ``config`` (optional) also refuses a mixture-of-experts MLP."""
    experts = _experts(config) if config is not None else 0
    if model_type in MOE_MODEL_TYPES or experts:
        what = f"{experts} experts per layer" if experts else "its MLPs are mixtures of experts"
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported: {what}, and a neuron map addresses the neurons of one "
            f"dense MLP per layer. Mixture-of-experts models (Mixtral, Qwen3-MoE, ...) are not supported by the "
            f"neuron guard or calibration. Supported dense architectures: {', '.join(supported_model_types())}"
        )
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def resolve(root, dotted: str):
    """Follow a dotted attribute path (integers index into lists)."""
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
