"""Natural prompts: openings of WikiText-2 articles and sections, a fixed-seed tuning/held-out split."""

from __future__ import annotations

import random
import re
from pathlib import Path

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PROMPT_TOKENS = 32
SEED = 0

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
