"""DRY ("Don't Repeat Yourself") as a transformers logits processor: the baseline of the benchmark.

For a candidate token that would extend a repeat of the last L tokens (L >= allowed_length), DRY
subtracts ``multiplier * base ** (L - allowed_length)`` from its logit. Matches are searched in the
last ``last_n`` tokens and never cross a sequence breaker. This follows text-generation-webui's
reference implementation with llama.cpp's defaults (base 1.75, allowed length 2, last_n 64).
"""

from __future__ import annotations

from typing import Iterable

import torch

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
        if multiplier < 0:
            raise ValueError(f"multiplier must be >= 0, got {multiplier}")
        if base < 1:
            raise ValueError(f"base must be >= 1, got {base}")
        if allowed_length < 1:
            raise ValueError(f"allowed_length must be >= 1, got {allowed_length}")
        if last_n < 0:
            raise ValueError(f"last_n must be >= 0 (0: whole context), got {last_n}")
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.last_n, self.max_match = last_n, max_match
        self.breakers = frozenset(int(b) for b in breakers)

    def penalties(self, ids: list[int]) -> dict[int, float]:
        """{token: penalty} for one row's context."""
        if self.last_n:
            ids = ids[-self.last_n :]
        if not ids or self.multiplier == 0:
            return {}
        last = ids[-1]
        brk = self.breakers
        if last in brk:
            return {}
        lengths: dict[int, int] = {}
        for i in range(len(ids) - 1):
            if ids[i] != last:
                continue
            nxt = ids[i + 1]
            if nxt in brk:
                continue
            length = 1
            while length < self.max_match:
                j = i - length
                if j < 0:
                    break
                prev = ids[-(length + 1)]
                if ids[j] != prev or prev in brk:
                    break
                length += 1
            if length > lengths.get(nxt, 0):
                lengths[nxt] = length
        return {
            tok: self.multiplier * self.base ** (length - self.allowed_length)
            for tok, length in lengths.items()
            if length >= self.allowed_length
        }

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, ids in enumerate(input_ids.tolist()):
            for tok, pen in self.penalties(ids).items():
                if tok < out.shape[-1]:
                    out[row, tok] -= pen
        return out
