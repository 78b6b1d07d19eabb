"""Prompt sets of the evidence runs.

* ``tuning`` / ``heldout``: openings of WikiText-2 articles and sections, a fixed-seed split.
* ``paper``: the paper's own setting, BOS then 10 tokens sampled from the model itself (temperature 1,
  the model's top-k/top-p), with ``repguard calibrate``'s sampler but another seed (``PAPER_SEED``), so
  no prompt repeats a calibration text's prefix.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PROMPT_TOKENS = 32
SEED = 0
PAPER_SEED = 20240601  # calibration uses seed 0 for text indexes 0, 1, ...
PAPER_SAMPLED = 10

_HEADING = re.compile(r"^ (=+) (.+?) \1 *$")


def detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (`` @-@ ``, spaces before punctuation) so prompts read naturally."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    text = re.sub(r" ([.,;:!?)'])", r"\1", text)
    text = re.sub(r"\( ", "(", text)
    text = text.replace(" n't", "n't").replace(' " ', ' "')
    return text.strip()


def openings(path: str | Path = DEFAULT_WIKITEXT, min_words: int = 60) -> list[str]:
    """The first paragraph after every article or section heading (long enough for a 32-token prompt)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out, after_heading = [], False
    for line in lines:
        if _HEADING.match(line):
            after_heading = True
            continue
        if after_heading and line.strip():
            after_heading = False
            if len(line.split()) >= min_words:
                out.append(detokenize(line))
    return out


def split(texts: list[str], seed: int = SEED) -> dict[str, list[str]]:
    """Shuffle with a fixed seed; even positions tune, odd positions are held out."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    return {"tuning": order[0::2], "heldout": order[1::2]}


def prompt_ids(tok, text: str, length: int = PROMPT_TOKENS) -> list[int]:
    """Exactly ``length`` text tokens (plus the tokenizer's BOS if it adds one): no padding in a batch."""
    with_special = tok(text).input_ids
    plain = tok(text, add_special_tokens=False).input_ids
    prefix = len(with_special) - len(plain) if with_special[-len(plain):] == plain else 0
    ids = with_special[: prefix + length]
    if len(ids) < prefix + length:
        raise ValueError(f"text too short for a {length}-token prompt: {text[:60]!r}")
    return ids


def build(tok, half: str, n: int, path: str | Path = DEFAULT_WIKITEXT) -> list[list[int]]:
    """The first ``n`` prompts of one half, as token ids."""
    texts = split(openings(path))[half]
    if n > len(texts):
        raise ValueError(f"only {len(texts)} prompts in the {half} half, asked for {n}")
    return [prompt_ids(tok, t) for t in texts[:n]]


def paper_prompts(model, tok, n: int, seed: int = PAPER_SEED, sampled: int = PAPER_SAMPLED) -> list[list[int]]:
    """``n`` prompts of the paper's protocol: BOS + ``sampled`` tokens, each text on its own seeded stream."""
    import torch

    from repguard.hf.calibrate import _sample, _sampling_params, _text_generator

    bos = tok.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    top_k, top_p = _sampling_params(model)
    uniforms = torch.stack([torch.rand(sampled, generator=_text_generator(seed, i), dtype=torch.float64) for i in range(n)])
    ids = torch.full((n, 1), bos, dtype=torch.long)
    with torch.inference_mode():
        for step in range(sampled):
            logits = model(input_ids=ids).logits[:, -1, :]
            ids = torch.cat([ids, _sample(logits, uniforms[:, step], top_k, top_p).unsqueeze(-1)], dim=-1)
    return ids.tolist()
