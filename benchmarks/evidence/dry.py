"""DRY ("Don't Repeat Yourself") as a transformers logits processor: the baseline of the benchmark.

For a candidate token that would extend a repeat of the last L tokens (L >= allowed_length), DRY
subtracts ``multiplier * base ** (L - allowed_length)`` from its logit. Matches are searched in the
last ``last_n`` tokens and never cross a sequence breaker. This follows text-generation-webui's
reference implementation with llama.cpp's defaults (base 1.75, allowed length 2, last_n 64).
"""

from __future__ import annotations

from typing import Iterable

import torch

from repguard.repair import RepeatPenalty

DEFAULT_BREAKERS = ("\n", ":", '"', "*")


def breaker_ids(tok, breakers: Iterable[str] = DEFAULT_BREAKERS) -> set[int]:
    """Token ids of the sequence breakers, as text-generation-webui finds them (last token of 'a' + s)."""
    out = set()
    for s in breakers:
        ids = tok(f"a{s}", add_special_tokens=False).input_ids
        if ids:
            out.add(int(ids[-1]))
    return out


class DRYLogitsProcessor:
    """DRY penalty on every row of a batch.

    >>> import torch
    >>> proc = DRYLogitsProcessor(multiplier=1.0, base=2.0, allowed_length=2)
    >>> ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])  # next 8 would extend a 3-token repeat
    >>> out = proc(ids, torch.zeros(1, 10))
    >>> float(out[0, 8]), float(out[0, 9])
    (-2.0, 0.0)
    """

    def __init__(
        self,
        multiplier: float = 0.8,
        base: float = 1.75,
        allowed_length: int = 2,
        last_n: int = 64,
        breakers: Iterable[int] = (),
        max_match: int = 50,
    ) -> None:
        # The one implementation of the rule is the core's (rollback's re-decode repair runs it too).
        self.rule = RepeatPenalty(multiplier, base, allowed_length, last_n, max_match, breakers=frozenset(breakers))

    def penalties(self, ids: list[int]) -> dict[int, float]:
        """{token: penalty} for one row's context."""
        return self.rule.penalties(ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, ids in enumerate(input_ids.tolist()):
            for tok, pen in self.penalties(ids).items():
                if tok < out.shape[-1]:
                    out[row, tok] -= pen
        return out
