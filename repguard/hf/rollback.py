"""Rollback for transformers: a thin adapter over the core ``repguard.rollback`` policy.

The policy (when to cut, where, what to ban, which settings each pass uses, how reports merge, which
streamed tokens are final) lives in the core and is shared with the vLLM and server paths. This module
runs its passes as batched ``model.generate`` calls under the guard's hooks: a row whose loop is
confirmed stops at once (the guard forces EOS), and is decoded again from the onset in the next pass,
together with the other rows that rolled back.

Rows that never trigger come from the first pass untouched, so they are byte-identical to an unguarded
run; only looping rows are re-decoded (as a smaller batch, after a fresh prefill of prompt + kept text).

Streaming: with ``on_tokens(row, tokens)`` each row's tokens are handed out while they are decoded, held
back by ``holdback`` tokens (default: the watch window plus the n-gram, 210 tokens), so that a
rollback never has to take back text already handed out. Every token handed out is final; together they
are exactly the row's returned sequence. If a rollback would cut into text already handed out (only
possible with a smaller ``holdback``), the row is not rolled back: it ends where its loop was confirmed,
with finish reason "repetition".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GuardConfig
from ..errors import ConfigError
from ..policy import SequenceReport
from ..rollback import RollbackConfig, RollbackPolicy
from ..runtime import host_to_device
from .guard import Guard


@dataclass
class RollbackOutput:
    sequences: list[list[int]]  # generated tokens per row (no prompt, no padding)
    reports: list[SequenceReport]
    rollbacks: list[int]  # rollbacks per row
    form: str = "tokens+neurons"  # "tokens" when run without a neuron map (neuron_map=False)


class _BanFirstToken:
    """Logits processor: at the first step of a pass, ban one token per row (the loop's next token)."""

    def __init__(self, bans: dict[int, int], start_length: int) -> None:
        self.bans, self.start_length = bans, start_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.start_length or not self.bans:
            return scores
        scores = scores.clone()
        for row, token in self.bans.items():
            scores[row, token] = float("-inf")
        return scores


class _Repair:
    """Logits processor: the core's re-decode repair (``RollbackState.repair_penalties``) on the rows of a
    re-decode pass; rows of a first pass are never touched."""

    def __init__(self, states, start_length: int, eos: set[int]) -> None:
        self.states, self.start_length, self.eos = states, start_length, eos
        self.rows = [i for i, s in enumerate(states) if s.attempt > 0 and s.policy.repair is not None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        new = input_ids[self.rows, self.start_length:].tolist()
        rows: list[int] = []
        tokens: list[int] = []
        amounts: list[float] = []
        for i, row_new in zip(self.rows, new):
            if self.eos.intersection(row_new):
                continue  # the row has finished
            for token, amount in self.states[i].repair_penalties(row_new).items():
                rows.append(i)
                tokens.append(token)
                amounts.append(amount)
        if not rows:
            return scores
        rows_, tokens_, amounts_ = host_to_device([rows, tokens, amounts], scores.device)  # one copy
        out = scores.clone()
        out[rows_.long(), tokens_.long()] -= amounts_.to(scores.dtype)
        return out


class _Release:
    """Streamer for one pass: hands out each row's tokens once the core policy says they are final."""

    def __init__(self, states, rows: list[int], eos: set[int], release) -> None:
        self.states, self.rows, self.eos, self.release = states, rows, eos, release
        self.texts: list[list[int]] = [[] for _ in rows]  # this pass's new tokens per row
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            self.texts[i].append(int(token))
            self.done[i] = int(token) in self.eos
            self.release(self.rows[i], self.states[i].releasable(self.texts[i]))

    def end(self) -> None:
        pass


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def generate_with_rollback(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    neuron_map=None,
    config: GuardConfig | dict | None = None,
    max_new_tokens: int = 200,
    max_rollbacks: int = 2,
    precise_trigger: bool = True,
    model_name: str | None = None,
    on_tokens=None,
    holdback: int | None = None,
    repair: dict | None = None,
    rollback: RollbackConfig | dict | None = None,
    **generate_kwargs,
) -> RollbackOutput:
    """Guarded ``model.generate`` with rollback; returns each row's generated tokens and report.
    ``on_tokens(row, tokens)`` streams final tokens, held back by ``holdback`` (module doc). ``repair``:
    ``RollbackConfig``'s ``repair_*`` settings, e.g. ``{"repair_multiplier": 0}`` to ban only the loop's
    next token. ``rollback``: any other ``RollbackConfig`` settings (they win over the arguments above)."""
    from transformers import LogitsProcessorList

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = config if isinstance(config, GuardConfig) else GuardConfig.from_dict(config)
    if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
        raise ConfigError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
    if holdback is not None and (not isinstance(holdback, int) or holdback < 0):
        raise ConfigError(f"holdback must be >= 0, got {holdback}")
    if repair is not None and (not isinstance(repair, dict) or not all(str(k).startswith("repair_") for k in repair)):
        raise ConfigError(f"repair must be a dict of RollbackConfig repair_* settings, got {repair!r}")
    if isinstance(rollback, RollbackConfig):
        rollback = rollback.to_dict()
    if rollback is not None and not isinstance(rollback, dict):
        raise ConfigError(f"rollback must be a RollbackConfig or a dict of its settings, got {type(rollback).__name__}")
    policy = RollbackPolicy(cfg, {"max_rollbacks": max_rollbacks, "precise_trigger": precise_trigger,
                                  "holdback": holdback, **(repair or {}), **(rollback or {})})
    if on_tokens is not None and not callable(on_tokens):
        raise ConfigError(f"on_tokens must be a callable (row, tokens), got {type(on_tokens).__name__}")
    if on_tokens is not None and generate_kwargs.get("streamer") is not None:
        raise ConfigError("pass on_tokens or streamer, not both: rollback streams through on_tokens")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = generate_kwargs.pop("pad_token_id", None)
    if pad is None:
        pad = model.generation_config.pad_token_id
    if pad is None:
        pad = 0
    user_processors = generate_kwargs.pop("logits_processor", None) or []
    min_new = generate_kwargs.pop("min_new_tokens", None)
    device = input_ids.device
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    states = [policy.start(max_new_tokens) for _ in prompts]

    def release(r: int, tokens: list[int]) -> None:
        if on_tokens is not None and tokens:
            on_tokens(r, tokens)

    pending = list(range(len(prompts)))
    first = True
    with Guard(model, neuron_map, policy.first, model_name=model_name) as g:
        eos = set(g.eos)
        while pending:
            rows = [prompts[r] + states[r].kept for r in pending]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=device)
            mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=device)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r, dtype=input_ids.dtype, device=device)
                mask[i, width - len(r):] = 1
            budgets = [states[r].budget for r in pending]
            step_max = max(budgets)
            kwargs = dict(generate_kwargs)
            if min_new is not None:
                kwargs["min_new_tokens"] = min(min_new, step_max) if first else step_max
            processors = LogitsProcessorList(list(user_processors))
            row_bans = {i: states[r].ban for i, r in enumerate(pending) if states[r].ban is not None}
            if row_bans:
                processors.append(_BanFirstToken(row_bans, width))
            if not first:
                processors.append(_Repair([states[r] for r in pending], width, eos))
            g.configure_rows([states[r].pass_config() for r in pending], histories=[states[r].kept for r in pending])
            streamer = None
            if on_tokens is not None:
                streamer = _Release([states[r] for r in pending], list(pending), eos, release)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=step_max, pad_token_id=pad,
                                 logits_processor=processors, streamer=streamer, **kwargs)
            still = []
            for i, r in enumerate(pending):
                new = _trim(out[i, width:].tolist()[: budgets[i]], eos)
                seq = g.runtime.seqs[i]
                if seq is not None and new and new[-1] not in eos and len(seq.history) == len(states[r].kept) + len(new) - 1:
                    # generate() ends without a forward that would show the guard the row's last token.
                    seq.observe(new[-1])
                if states[r].end_pass(new, g.reports[i]):
                    still.append(r)
                else:
                    release(r, states[r].releasable())
            pending = still
            first = False
    return RollbackOutput([s.final or [] for s in states], [s.report or SequenceReport() for s in states],
                          [s.rollbacks for s in states], g.form)
