"""Shared fixtures: tiny random models for plumbing, the embedded model for behaviour."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("REPGUARD_TEST_THREADS", "1")))


def tiny_config(arch: str):
    """A 2-layer, 256-token random model config of one supported architecture."""
    import transformers as tf

    common = dict(vocab_size=256, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=4, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=4, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=4, **common)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=4, head_dim=16, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=4, head_dim=16, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=4, head_dim=16, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **common)
    raise ValueError(arch)


TINY_ARCHS = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox")


def tiny_model(arch: str = "llama", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(arch)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_folder(path, seed: int = 0, edit=None):
    """A tiny llama (random init ``seed``; ``edit(model)`` may change its weights first) saved as a local
    Hugging Face folder at ``path``, with a word-level tokenizer of its 256 ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama", seed=seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 256)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t3")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="t3")
    tok.save_pretrained(path)
    return path


def left_padded(rows: list[list[int]], pad: int = 0):
    """Token rows as a left-padded batch: (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def padded_batch(lengths, seed: int = 3):
    """(input_ids, attention_mask): random prompts of ``lengths`` tokens, left-padded with 0 to the longest."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, 256, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask

def random_map(model, num_selected: int = 16, num_stored: int = 48, seed: int = 0, name: str = "tiny"):
    """A map with random scores that fits ``model`` (for plumbing tests; calibration makes real ones)."""
    from repguard.hf.introspect import arch_of, fingerprint, shape_of
    from repguard.neuron_map import map_from_scores

    layers, width = shape_of(model)
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(layers, width, generator=g) + 0.1 for k in ("mean_before", "std_before", "mean_after", "std_after")}
    meta = dict(
        model_name=name, architecture=arch_of(model).family, num_layers=layers, intermediate_size=width,
        hook_point=arch_of(model).hook_point, quantity="test", fingerprint=fp.config, num_selected=0, num_stored=0,
    )
    return map_from_scores(meta, torch.rand(layers, width, generator=g) + 0.01, stats, num_selected, num_stored,
                           extra={"fingerprint_weights": fp.weights})


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer, name) of the embedded default model, converted once into the cache."""
    from repguard.hf.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_map():
    from repguard.maps import find_map

    return find_map("smollm2-135m")
