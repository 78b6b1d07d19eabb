"""Rollback: the repeated copy never reaches the output.

The guard watches each row with a precise trigger (by default the paper's criterion alone). When a row's
loop is confirmed, that row stops at once; its text is cut back to the loop's onset (the start of the
second copy), and it is decoded again from there with the repair active from the first new token: the
mapped neurons off, and the token that started the second copy banned for that first step (the exact
token that would extend the loop, as DRY would penalise it). A row that loops again is rolled back again,
up to ``max_rollbacks`` times (re-decoded rows are watched with the configured, earlier triggers too);
the last pass runs the full policy (deactivate -> escalate -> stop).

Rows that never trigger come from the first pass untouched, so they are byte-identical to an unguarded
run; only looping rows are re-decoded (as a smaller batch, after a fresh prefill of prompt + kept text).

Streaming: with ``on_tokens(row, tokens)`` each row's tokens are handed out while they are decoded, held
back by ``holdback`` tokens (default: the paper criterion's window plus its n-gram, 110 tokens), so that a
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
from ..policy import LevelChange, SequenceReport
from .guard import Guard


@dataclass
class RollbackOutput:
    sequences: list[list[int]]  # generated tokens per row (no prompt, no padding)
    reports: list[SequenceReport]
    rollbacks: list[int]  # rollbacks per row


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


class _Release:
    """Streamer for one pass: hands out each row's tokens once they are ``holdback`` tokens old."""

    def __init__(self, texts: list[list[int]], rows: list[int], eos: set[int], holdback: int, cap: int,
                 release) -> None:
        self.texts, self.rows, self.eos, self.holdback, self.release = texts, rows, eos, holdback, release
        self.cap = cap  # a row never returns more than max_new_tokens tokens
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
            self.release(self.rows[i], self.texts[i], min(len(self.texts[i]) - self.holdback, self.cap))

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
    **generate_kwargs,
) -> RollbackOutput:
    """Guarded ``model.generate`` with rollback; returns each row's generated tokens and report.
    ``on_tokens(row, tokens)`` streams final tokens, held back by ``holdback`` (module doc)."""
    from transformers import LogitsProcessorList

    if max_rollbacks < 0:
        raise ConfigError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = config if isinstance(config, GuardConfig) else GuardConfig.from_dict(config)
    if holdback is None:
        holdback = cfg.window + cfg.ngram
    if holdback < 0:
        raise ConfigError(f"holdback must be >= 0, got {holdback}")
    if on_tokens is not None and not callable(on_tokens):
        raise ConfigError(f"on_tokens must be a callable (row, tokens), got {type(on_tokens).__name__}")
    if on_tokens is not None and generate_kwargs.get("streamer") is not None:
        raise ConfigError("pass on_tokens or streamer, not both: rollback streams through on_tokens")
    # The first pass decides which rows are touched at all: by default only the paper's criterion may
    # fire there, so a row the paper's detector would not call a loop is never changed. Re-decoded rows
    # are known to loop: they get the configured (earlier) triggers too.
    first_cfg = cfg.replace(suffix_trigger=False, paper_trigger=True) if precise_trigger else cfg
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
    n = len(prompts)
    kept: list[list[int]] = [[] for _ in range(n)]
    final: list[list[int] | None] = [None] * n
    reports: list[SequenceReport | None] = [None] * n
    rollbacks = [0] * n
    bans: dict[int, int] = {}
    pending = list(range(n))
    attempt = 0
    released = [0] * n  # tokens of each row already handed to on_tokens

    def release(r: int, text: list[int], upto: int) -> None:
        if on_tokens is not None and upto > released[r]:
            on_tokens(r, text[released[r] : upto])
            released[r] = upto

    with Guard(model, neuron_map, first_cfg, model_name=model_name) as g:
        eos = set(g.eos)
        while pending:
            last = attempt >= max_rollbacks
            if attempt == 0:
                # Watch only; stop a row the moment its loop is confirmed.
                pass_cfg = (first_cfg.replace(deactivate=False, escalate=False, stop=True, always_on=False)
                            if not last else first_cfg)
            elif not last:
                pass_cfg = cfg.replace(always_on=cfg.deactivate, escalate=False, stop=True, stop_after=1)
            else:
                pass_cfg = cfg.replace(always_on=cfg.deactivate)
            rows = [prompts[r] + kept[r] for r in pending]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=device)
            mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype, device=device)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r, dtype=input_ids.dtype, device=device)
                mask[i, width - len(r):] = 1
            budgets = [max_new_tokens - len(kept[r]) for r in pending]
            step_max = max(budgets)
            kwargs = dict(generate_kwargs)
            if min_new is not None:
                kwargs["min_new_tokens"] = min(min_new, step_max) if attempt == 0 else step_max
            processors = LogitsProcessorList(list(user_processors))
            row_bans = {i: bans[r] for i, r in enumerate(pending) if r in bans}
            if row_bans:
                processors.append(_BanFirstToken(row_bans, width))
            g.configure_rows([pass_cfg] * len(pending), histories=[kept[r] for r in pending])
            streamer = None
            if on_tokens is not None:
                streamer = _Release([list(kept[r]) for r in pending], list(pending), eos, holdback, max_new_tokens,
                                    release)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=step_max, pad_token_id=pad,
                                 logits_processor=processors, streamer=streamer, **kwargs)
            still = []
            for i, r in enumerate(pending):
                new = _trim(out[i, width:].tolist()[: budgets[i]], eos)
                rep = g.reports[i]
                merged = _merge(reports[r], rep, rollback_at=None)
                det = rep.detections[-1] if rep.detections else None
                text = kept[r] + new
                if (not last and rep.finish_reason == "repetition" and det is not None and det.onset > 0
                        and min(det.onset, len(text) - 1) >= released[r]):
                    onset = min(det.onset, len(text) - 1)
                    bans[r] = text[onset]
                    kept[r] = text[:onset]
                    rollbacks[r] += 1
                    merged.finish_reason = None
                    # The stop that ended this pass was internal: the caller sees the rollback instead.
                    while merged.actions and merged.actions[-1].level == "stop":
                        merged.actions.pop()
                    merged.max_level = max((a.level for a in merged.actions), key=_level_rank, default="monitor")
                    # Position convention: the action takes effect after this generated token.
                    merged.actions.append(LevelChange(onset - 1, "rollback", f"loop seen at {det.position}; re-decoded from {onset}"))
                    reports[r] = merged
                    still.append(r)
                else:
                    final[r] = kept[r] + new
                    reports[r] = merged
                    release(r, final[r], len(final[r]))
            pending = still
            attempt += 1
    return RollbackOutput([f or [] for f in final], [r or SequenceReport() for r in reports], rollbacks)


def _merge(earlier: SequenceReport | None, later: SequenceReport, rollback_at) -> SequenceReport:
    if earlier is None:
        return later
    merged = SequenceReport(
        detections=earlier.detections + later.detections,
        actions=earlier.actions + later.actions,
        tokens_observed=later.tokens_observed + earlier.tokens_observed,
        tokens_under_intervention=earlier.tokens_under_intervention + later.tokens_under_intervention,
        max_level=max(earlier.max_level, later.max_level, key=_level_rank),
        finish_reason=later.finish_reason,
        max_neuron_score=max((s for s in (earlier.max_neuron_score, later.max_neuron_score) if s is not None), default=None),
        errors=earlier.errors + later.errors,
    )
    return merged


def _level_rank(level: str) -> int:
    return {"monitor": 0, "rollback": 0, "deactivate": 1, "escalate": 2, "stop": 3}.get(level, 0)
