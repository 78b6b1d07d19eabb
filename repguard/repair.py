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
request-level engines apply them by resubmission (``repguard.request_guard``), or, where the engine runs
repguard's logits processor, inside the engine from an ``EngineRepair`` sent with the request; the evidence
harness's DRY baseline uses it too.

>>> rp = RepeatPenalty(multiplier=1.0, base=2.0, allowed_length=2)
>>> rp.penalties([5, 6, 7, 8, 5, 6, 7])   # a next 8 would extend a 3-token repeat
{8: 2.0}
>>> rp.penalties([5, 6, 7, 8])            # nothing repeats
{}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .errors import ConfigError

BAN = float("inf")  # logit penalty of a banned token (frameworks that clamp biases use their maximum)
WIRE_KEY = "repguard_repair"  # the request field (vLLM extra_args / vllm_xargs) that carries an EngineRepair


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

    def penalties_after(self, kept: Sequence[int], new: Sequence[int]) -> dict[int, float]:
        """``penalties(kept + new)``, joining no more than the ``last_n`` tokens searched."""
        n = self.last_n
        if n and len(new) >= n:
            return self.penalties(new[-n:])
        return self.penalties(list(kept[-n:] if n else kept) + list(new))

    def penalty_row(self, ids, vocab_size: int):
        """``penalties(ids)`` as a dense float32 tensor of ``vocab_size`` on ``ids``' device, computed there
        (``ids``: a 1-D integer tensor; no host read, so an engine can call it inside its step). The same
        rule as ``penalties``, matched for every candidate at once; amounts are computed in float64, as
        ``penalties`` computes them, then rounded to float32."""
        import torch

        ids = ids.reshape(-1).long()
        if self.last_n:
            ids = ids[-self.last_n :]
        n = ids.numel()
        out = torch.zeros(vocab_size, dtype=torch.float64, device=ids.device)
        if self.multiplier == 0 or n < 2:
            return out.float()
        k = torch.arange(self.max_match, device=ids.device)
        start = torch.arange(n - 1, device=ids.device)  # candidate i: ids[i] == last, the repeat ends at i
        pos = start[:, None] - k[None, :]
        mine = ids[(n - 1 - k).clamp(min=0)]  # the text's own suffix, read backwards
        eq = (ids[pos.clamp(min=0)] == mine[None, :]) & (pos >= 0)
        nxt = ids[1:]
        if self.breakers:
            brk = torch.tensor(sorted(self.breakers), device=ids.device)
            eq[:, 1:] &= ~torch.isin(mine[1:], brk)[None, :]  # a match never crosses a breaker
            eq &= ~torch.isin(nxt, brk)[:, None]
            eq &= ~torch.isin(ids[-1:], brk)
        length = torch.cumprod(eq.to(torch.int32), dim=1).sum(dim=1)
        longest = torch.zeros(vocab_size, dtype=torch.long, device=ids.device)
        longest.scatter_reduce_(0, nxt, length.long(), reduce="amax")
        excess = (longest - self.allowed_length).to(torch.float64)
        amount = (self.multiplier * torch.pow(float(self.base), excess.clamp(max=61))).clamp(max=self.max_penalty)
        amount = torch.where(excess > 60, torch.full_like(amount, self.max_penalty), amount)
        return torch.where(longest >= self.allowed_length, amount, out).float()

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
                # base ** excess overflows for long matches (or a large base); the cap is reached long before
                try:
                    amount = self.max_penalty if excess > 60 else self.multiplier * self.base**excess
                except OverflowError:
                    amount = self.max_penalty
                out[tok] = min(amount, self.max_penalty)
        return out


_PENALTY_FIELDS = ("multiplier", "base", "allowed_length", "last_n", "max_match", "max_penalty")


@dataclass(frozen=True)
class EngineRepair:
    """The repair of one engine request, for an engine that applies it itself at every step (vLLM with
    repguard's logits processor): ``penalty``'s penalties over the request's *generated* tokens, i.e. its
    prompt past the caller's ``skip`` prompt tokens (the kept text a resubmission carries) followed by its
    own output, and a ban of ``ban`` on its first new token. The same penalties as the resubmission path's,
    from the same function.

    >>> spec = EngineRepair(skip=3, penalty=RepeatPenalty(1.0, 2.0, 2), ban=9)
    >>> EngineRepair.from_json(spec.to_json()) == spec
    True
    >>> spec.penalties([1, 2, 3, 5, 6, 7, 8], [])      # the caller's prompt 1 2 3, kept text 5 6 7 8
    {9: inf}
    >>> spec.penalties([1, 2, 3, 5, 6, 7, 8], [5, 6, 7])  # a next 8 would extend a 3-token repeat
    {8: 2.0}
    """

    skip: int
    penalty: RepeatPenalty | None = None
    ban: int | None = None

    def penalties(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[int, float]:
        """{token: logit penalty} for the next token of a request with this prompt and output so far."""
        out: dict[int, float] = {}
        if self.penalty is not None:
            out = self.penalty.penalties_after(prompt_ids[self.skip :], output_ids)
        if not output_ids and self.ban is not None:
            out[self.ban] = BAN
        return out

    def to_json(self) -> str:
        data: dict[str, Any] = {"skip": self.skip, "ban": self.ban}
        if self.penalty is not None:
            data["penalty"] = {name: getattr(self.penalty, name) for name in _PENALTY_FIELDS}
            data["penalty"]["breakers"] = sorted(self.penalty.breakers)
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: Any) -> "EngineRepair":
        """Parse what ``to_json`` wrote (a string or the decoded object); ``ConfigError`` names what is wrong."""
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep for the parser
            raise ConfigError(f"repguard_repair: not JSON ({exc if isinstance(exc, ValueError) else 'nested too deep'})") from None
        if not isinstance(data, dict) or not set(data) <= {"skip", "ban", "penalty"}:
            raise ConfigError(f"repguard_repair: expected an object with skip, ban and penalty, got {raw!r}")

        def count(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _WIRE_MAX_INT:
                raise ConfigError(f"repguard_repair: {name} must be a token count or id from 0 to "
                                  f"{_WIRE_MAX_INT - 1}, got {str(value)[:40]}")
            return value

        skip = count("skip", data.get("skip"))
        ban = None if data.get("ban") is None else count("ban", data["ban"])
        penalty = None
        if data.get("penalty") is not None:
            fields = data["penalty"]
            if not isinstance(fields, dict) or not set(fields) <= set(_PENALTY_FIELDS) | {"breakers"}:
                raise ConfigError(f"repguard_repair: penalty must be an object of {', '.join(_PENALTY_FIELDS)}, "
                                  f"breakers; got {fields!r}")
            for name, value in fields.items():
                if name != "breakers" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not math.isfinite(value)):
                    raise ConfigError(f"repguard_repair: penalty.{name} must be a finite number, got {value!r}")
            breakers = fields.get("breakers", [])
            if not isinstance(breakers, list):
                raise ConfigError(f"repguard_repair: penalty.breakers must be a list of token ids, got {breakers!r}")
            kw = {k: v for k, v in fields.items() if k != "breakers"}
            for name in ("allowed_length", "last_n", "max_match"):
                if name in kw:
                    kw[name] = count(f"penalty.{name}", kw[name])
                    if kw[name] > _WIRE_LIMITS[name]:  # the cost of every engine step grows with these
                        raise ConfigError(f"repguard_repair: penalty.{name} must be <= {_WIRE_LIMITS[name]}, "
                                          f"got {kw[name]}")
            penalty = RepeatPenalty(**kw, breakers=frozenset(count("penalty.breakers", b) for b in breakers))
        return cls(skip, penalty, ban)


# Upper bounds on a repair sent over the wire: one request's repair is computed in the engine's step, which every
# request in the batch waits for (RollbackConfig's repair_window has the same bound; repguard sends max_match 50).
_WIRE_LIMITS = {"allowed_length": 100, "last_n": 100_000, "max_match": 64}
_WIRE_MAX_INT = 2**31  # token ids and counts: an int32 on the device

__all__ = ["BAN", "EngineRepair", "RepeatPenalty", "WIRE_KEY"]
