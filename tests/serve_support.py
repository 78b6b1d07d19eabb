"""Shared helpers for the server tests: a tiny random model folder, neuron maps, a real server process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the characters of ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer (256 bytes + 3 specials), saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # Token id = byte value, through GPT-2's byte-to-character table (what ByteLevel pre-tokenizes into).
    # ``ByteLevel.alphabet()`` comes back in a different order in every process, which made the prompts'
    # ids, and so whether the random model loops on them, change from run to run.
    vocab = {ch: b for b, ch in _byte_chars().items()}
    for i, special in enumerate(["<eos>", "<bos>", "<pad>"]):
        vocab[special] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    config = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=16384, eos_token_id=256, bos_token_id=257, pad_token_id=258,
    )
    model = LlamaForCausalLM(config).eval()
    # The weights come from a private generator, not the global seed: a server thread of an earlier test that
    # samples (and seeds torch's global generator) while this runs cannot change the model, and so the texts
    # the tests expect. Norms stay 1; everything else N(0, 0.02), as transformers initialises a Llama.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=g) * config.initializer_range)
        model.lm_head.weight[256:].zero_()  # special-token logits 0 < max of 256 random ones: greedy never ends early
    model.save_pretrained(str(folder))
    return folder


def make_random_map(model, model_name: str, path: Path, seed: int = 0) -> Path:
    """A neuron map with random scores that fits ``model`` (the shape and fingerprint checks pass)."""
    from repguard.hf.introspect import arch_of, fingerprint, shape_of
    from repguard.neuron_map import map_from_scores

    layers, width = shape_of(model)
    fp = fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    stats = {k: torch.rand(layers, width, generator=g) for k in ("mean_before", "std_before", "mean_after", "std_after")}
    spec = arch_of(model)
    meta = dict(model_name=model_name, architecture=spec.family, num_layers=layers, intermediate_size=width,
                hook_point=spec.hook_point, quantity="activation", fingerprint=fp.config, num_selected=0, num_stored=0)
    k = max(4, layers * width // 20)
    nmap = map_from_scores(meta, torch.randn(layers, width, generator=g), stats, k, 4 * k,
                           extra={"fingerprint_weights": fp.weights})
    nmap.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``repguard serve`` in a subprocess on a free loopback port; stopped with SIGTERM on exit."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, startup_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> "ServerProcess":
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "repguard.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT),
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"repguard serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1.0).status_code in (200, 401):
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"repguard serve did not start in {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def tiny_model_and_map(folder: Path) -> tuple[Path, Path]:
    """A saved tiny random model in ``folder``/tiny and a random neuron map that fits it (for fast server tests)."""
    from repguard.hf.models import load_model

    model_dir = make_tiny_model(folder / "tiny")
    model, _, name = load_model(str(model_dir))
    return model_dir, make_random_map(model, name, folder / "tiny.safetensors")
