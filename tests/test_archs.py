"""The architectures added to the table (Qwen3, Phi-3 with its fused gate_up_proj, OLMo-2) on tiny random
models: the guard's hooks fire, read the mapped neurons, switch them off, and come off completely. And
mixture-of-experts models are refused with a message that says what is supported."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_map
from repguard.archs import MOE_MODEL_TYPES, arch_for, supported_model_types
from repguard.config import GuardConfig
from repguard.errors import ModelNotAvailableError, UnsupportedModelError
from repguard.hf import guard
from repguard.hf.introspect import act_modules, arch_of, fingerprint, shape_of

NEW = 24
NEW_ARCHS = ("qwen3", "phi3", "olmo2")


def config_of(arch: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        return tf.Qwen3Config(head_dim=16, **common)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "olmo2":
        return tf.Olmo2Config(**common)
    if arch == "gemma3_vlm":  # Gemma 3 4B-27B loaded whole: the decoder is model.language_model
        text = tf.Gemma3TextConfig(head_dim=16, **common)
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                               image_token_index=255, boi_token_index=253, eoi_token_index=254)
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, **common)
    raise ValueError(arch)


def tiny(arch: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_of(arch)).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch=2, length=6, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=NEW, do_sample=False)


def all_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_table_entry_points_at_one_activation_module_per_layer(arch):
    model = tiny(arch)
    assert arch_of(model).family == arch
    mods = act_modules(model)
    assert len(mods) == 2 and mods[0] is not mods[1]  # a shared module would be hooked twice per layer
    assert shape_of(model) == (2, 128)
    assert fingerprint(model).config  # the final norm the fingerprint reads exists


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_switching_off_a_hooked_neuron_zeroes_exactly_that_column_of_the_down_projection_input(arch):
    """The hooked output is act(gate), [..., d_ff] (for Phi-3: the gate half of the fused gate_up_proj):
    zeroing its neuron j zeroes column j of down_proj's input and leaves every other column as it was."""
    model = tiny(arch)
    mlp, act = model.model.layers[1].mlp, act_modules(model)[1]
    seen = []
    probe = mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))

    def zero_7(_m, _i, out):
        out = out.clone()
        out[..., 7] = 0
        return out

    try:
        with torch.no_grad():
            model(prompts(1))
            handle = act.register_forward_hook(zero_7)
            model(prompts(1))
            handle.remove()
    finally:
        probe.remove()
    base, off = seen
    assert base.shape[-1] == 128 and bool((base[..., 7] != 0).all())
    assert bool((off[..., 7] == 0).all())
    keep = [j for j in range(128) if j != 7]
    assert torch.equal(off[..., keep], base[..., keep])


@pytest.mark.parametrize("arch", [*NEW_ARCHS, "gemma3_vlm"])
def test_hooks_fire_read_switch_off_and_come_off_completely(arch):
    model = tiny(arch)
    ids = prompts()
    plain = gen(model, ids)
    before = all_hooks(model)
    nmap = random_map(model, num_selected=16, num_stored=16)
    with guard(model, nmap, GuardConfig.from_preset("monitor")) as g:
        assert all_hooks(model) > before
        assert torch.equal(gen(model, ids), plain)  # monitor mode writes nothing
        assert g.runtime.acts.abs().sum() > 0  # the hooks read the mapped neurons
        assert g.errors == 0 and len(g.reports) == 2 and all(r.tokens_observed == NEW for r in g.reports)
    assert all_hooks(model) == before

    # the paper preset switches the mapped neurons off at every step: a hook registered after the guard's
    # sees them at 0 at each row's newest position, and the output changes
    layer = int(nmap.layer[0])
    neurons = nmap.neuron[nmap.layer == layer].long()
    newest = []
    with guard(model, nmap, GuardConfig.from_preset("paper")) as g:
        probe = act_modules(model)[layer].register_forward_hook(lambda m, i, o: newest.append(o[:, -1].detach().clone()))
        try:
            out = gen(model, ids)
        finally:
            probe.remove()
        assert g.errors == 0  # the guard did not fail open
    decode_steps = newest[1:]  # the first forward is the prefill, before any token was observed
    assert decode_steps and all(bool((step[:, neurons] == 0).all()) for step in decode_steps)
    assert not torch.equal(out, plain)
    assert all_hooks(model) == before
    assert torch.equal(gen(model, ids), plain)  # nothing of the guard remains after it exits


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_mixture_of_experts_is_refused_naming_the_model_and_what_is_supported(arch):
    model = tiny(arch)
    with pytest.raises(UnsupportedModelError) as err:
        guard(model, None)
    msg = str(err.value)
    assert f"'{arch}'" in msg and "mixture" in msg.lower()
    assert all(t in msg for t in ("llama", "qwen3", "phi3", "olmo2"))


def test_expert_counts_in_a_config_are_refused_whatever_the_model_type():
    class Config:
        num_local_experts = 8

    with pytest.raises(UnsupportedModelError, match="8 experts"):
        arch_for("llama", Config())
    assert arch_for("llama", object()).family == "llama"  # a dense config passes
    assert not MOE_MODEL_TYPES & set(supported_model_types())


def test_a_loaded_model_whose_config_counts_experts_is_refused_by_the_guard():
    # a dense model type with experts in its config (a custom MoE on a known layout): the guard's hooks would
    # address one dense MLP per layer, so it refuses rather than guard the wrong neurons
    model = tiny("qwen3")
    model.config.num_experts = 4
    with pytest.raises(UnsupportedModelError, match="4 experts"):
        guard(model, None)


def test_the_cli_model_check_refuses_a_moe_folder_before_loading_weights(tmp_path):
    from repguard.commands.checks import model_info

    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_of("mixtral").to_dict()))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the check stops at the config
    with pytest.raises(UnsupportedModelError, match="mixtral"):
        model_info("--model", str(folder))
    with pytest.raises(ModelNotAvailableError, match="--model"):
        model_info("--model", str(tmp_path / "missing"))
