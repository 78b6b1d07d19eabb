"""The re-decode repair: a DRY-style penalty on every token that would extend a repeat.

After a rollback, the cut text is decoded again. Banning only the loop's next token is not enough: the
model often falls back into a variant of the same loop a few tokens later. During every re-decode pass
(never in the first pass, so a sequence that never loops is untouched) each candidate token that would
extend a repeat of the last ``L`` generated tokens (``L >= allowed_length``) is penalised by
``multiplier * base ** (L - allowed_length)``, capped at ``max_penalty``: the "Don't Repeat Yourself"
sampler's rule (text-generation-webui; llama.cpp's defaults for base and allowed length), applied only
to text already known to loop.

The context is the sequence's generated tokens (the prompt is not searched), the last ``last_n`` of
them (0: all). Matches never cross a sequence breaker (token ids the adapter may pass, e.g. newlines).

This module is the one implementation: the transformers adapter subtracts the penalties from the logits;
request-level engines apply them by resubmission (``repguard.request_guard``); the evidence harness's
DRY baseline uses it too.

>>> rp = RepeatPenalty(multiplier=1.0, base=2.0, allowed_length=2)
>>> rp.penalties([5, 6, 7, 8, 5, 6, 7])   # a next 8 would extend a 3-token repeat
{8: 2.0}
>>> rp.penalties([5, 6, 7, 8])            # nothing repeats
{}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class RepeatPenalty:
    """DRY-style penalties for one sequence's next token (module doc)."""

    multiplier: float = 0.8
    base: float = 1.75
    allowed_length: int = 2
    last_n: int = 64
    max_match: int = 50
    max_penalty: float = 1e4
    breakers: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        checks = (("multiplier", self.multiplier >= 0, ">= 0"), ("base", self.base >= 1, ">= 1"),
                  ("allowed_length", self.allowed_length >= 1, ">= 1"), ("last_n", self.last_n >= 0, ">= 0"),
                  ("max_match", self.max_match >= 1, ">= 1"), ("max_penalty", self.max_penalty > 0, "> 0"))
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"RepeatPenalty.{name} must be {rule}, got {getattr(self, name)}")
        object.__setattr__(self, "breakers", frozenset(int(b) for b in self.breakers))

    def with_breakers(self, breakers: Iterable[int]) -> "RepeatPenalty":
        return RepeatPenalty(self.multiplier, self.base, self.allowed_length, self.last_n, self.max_match,
                             self.max_penalty, frozenset(breakers))

    def penalties(self, ids: Sequence[int]) -> dict[int, float]:
        """{token id: logit penalty} for the token after ``ids``."""
        if self.multiplier == 0 or not ids:
            return {}
        if self.last_n:
            ids = ids[-self.last_n :]
        ids = list(ids)
        last, brk = ids[-1], self.breakers
        if last in brk:
            return {}
        n = len(ids)
        lengths: dict[int, int] = {}
        for i in range(n - 1):
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
                prev = ids[n - 1 - length]
                if ids[j] != prev or prev in brk:
                    break
                length += 1
            if length > lengths.get(nxt, 0):
                lengths[nxt] = length
        out = {}
        for tok, length in lengths.items():
            if length >= self.allowed_length:
                excess = length - self.allowed_length
                # base ** excess overflows for long matches; the cap is reached long before
                amount = self.max_penalty if excess > 60 else self.multiplier * self.base**excess
                out[tok] = min(amount, self.max_penalty)
        return out


__all__ = ["RepeatPenalty"]
