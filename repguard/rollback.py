"""Rollback, written once for every path (transformers, vLLM, the servers): the repeated copy never
reaches the output.

A sequence is decoded in *passes*. The first pass only watches, with a precise trigger (by default the
paper's criterion alone: a 10-gram three times, equally spaced, here within ``watch_window`` = 400 tokens
so that loops with copies up to ~195 tokens apart count; any three copies in a row count, so an earlier
copy of the same 10-gram does not hide the loop: ``GuardConfig.paper_spacing``), so a sequence that never
loops is never touched.
When a pass confirms a loop, the sequence is cut back to the loop's onset (the start of its second copy;
with ``cut_back``, to an earlier repeat in the kept text that the re-decode's triggers see) and decoded
again from there, with the repair active from the first new token:

* the token that started the second copy is banned for that first step (the exact token that would
  extend the loop);
* every re-decoded token that would extend a repeat of the text generated so far is penalised, DRY-style
  (``repguard.repair``), so the re-decode does not fall back into a variant of the same loop;
* the mapped neurons are switched off for the whole re-decode, where the path can run them;
* re-decoded text is known to loop, so it is watched with the configured, earlier triggers too (the
  suffix trigger for periods up to ``redecode_max_period``), and a loop there is rolled back again, up
  to ``max_rollbacks`` times;
* the last pass runs the full per-token policy (deactivate -> escalate -> stop).

``RollbackPolicy`` holds these decisions; ``RollbackState`` applies them to one sequence: what to keep,
what to ban, which settings the next pass uses, how the pass reports merge, and which tokens are final
(streaming holds tokens back by ``holdback``, so a rollback never takes back text already handed out).
Framework adapters only run the passes. Nothing here imports a framework.

>>> policy = RollbackPolicy(max_rollbacks=1)
>>> state = policy.start(max_new_tokens=50)
>>> state.pass_config().stop, state.pass_config().suffix_trigger   # first pass: watch, stop on the paper's loop
(True, False)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import GuardConfig, format_validation_error
from .errors import ConfigError
from .policy import Level, LevelChange, SequenceReport, detector_for
from .repair import BAN, RepeatPenalty


class RollbackConfig(BaseModel):
    """How rollback runs. ``holdback`` None: enough to take back any loop a pass's triggers fire on (210 by
    default: half the watch window plus the n-gram). A loop the watch window confirms has its second copy start
    at most (window + n-gram) / 2 tokens before the token that confirms it (with ``paper_spacing="first"``, the
    whole window plus the n-gram); the suffix trigger's onset lies at most (min_copies - 1) x its longest period
    back (the re-decodes': ``redecode_max_period``).

    The defaults were chosen on the tuning half of ``benchmarks.evidence.chat`` (benchmarks/results/notes.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    enabled: bool = Field(True, description="False: the single-pass guard (hooks only, no re-decode).")
    max_rollbacks: int = Field(2, ge=0, le=16, description="Re-decodes per sequence before the last, full-policy pass.")
    precise_trigger: bool = Field(
        True, description="The first pass fires on the paper's criterion only, so text that merely reuses a "
        "phrase is never touched.")
    holdback: int | None = Field(None, ge=0, le=100_000, description="Streaming: tokens held back before release.")
    repair_multiplier: float = Field(
        1.6, ge=0, le=100, description="Re-decodes: DRY-style penalty multiplier on tokens that extend a repeat "
        "(0: off; only the loop's next token is banned).")
    repair_base: float = Field(1.75, ge=1, le=10, description="Re-decodes: the penalty grows by this factor per "
                               "matched token beyond repair_allowed_length.")
    repair_allowed_length: int = Field(2, ge=1, le=100, description="Re-decodes: repeats up to this length are free.")
    repair_window: int = Field(0, ge=0, le=100_000, description="Re-decodes: generated tokens searched for repeats "
                               "(0: all).")
    watch_window: int | None = Field(
        400, ge=2, le=4096, description="The paper criterion's window r in every pass (None: the guard config's "
        "window). A loop whose copies are more than (r - n-gram) / 2 tokens apart never meets the criterion at r.")
    cut_back: bool = Field(
        True, description="On a rollback, cut to the earliest loop the re-decode's triggers see in the text kept "
        "so far (a repeat that began before the confirmed loop), not only to the confirmed loop's onset.")
    redecode_max_period: int | None = Field(
        256, ge=1, le=4096, description="Re-decodes: longest loop period the suffix trigger watches for (None: "
        "the guard config's max_period); re-decoded text is known to loop, so it is watched more widely.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "RollbackConfig")) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "RollbackConfig":
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"invalid RollbackConfig: expected an object, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "RollbackConfig")) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _onset_reach(cfg: GuardConfig) -> int:
    """How far back from the token that fires it a trigger of ``cfg`` can put a loop's onset: the hold-back that
    lets any loop it fires on be taken back. The paper's criterion, three copies in a row within the window: the
    second starts at most (window + n) / 2 tokens back (the paper's first-three rule: almost a whole window). The
    suffix trigger fires once the text ends in ``min_copies`` copies of a period up to ``max_period`` (and
    ``min_repeat`` repeated tokens): its onset lies at most that repeat back."""
    reach = 0
    if cfg.paper_trigger:
        reach = cfg.window // 2 + cfg.ngram if cfg.paper_spacing == "consecutive" else cfg.window + cfg.ngram
    if cfg.suffix_trigger:
        reach = max(reach, cfg.min_repeat, math.ceil((cfg.min_copies - 1) * cfg.max_period) + 1)
    return reach


class RollbackPolicy:
    """The rollback decisions for one guard configuration (shared by every sequence that uses it)."""

    def __init__(self, config: GuardConfig | dict | None = None, settings: RollbackConfig | dict | None = None,
                 *, repairs: bool | None = None, single_pass: bool | None = None, **overrides: Any) -> None:
        self.config = config if isinstance(config, GuardConfig) else GuardConfig.from_dict(config)
        # Whether loops are repaired at all: not for a config that only watches (the monitor). ``repairs``: the
        # decision of the config this policy was derived from (``token_level`` drops the neuron step, not it).
        self.repairs = self.config.repairs if repairs is None else bool(repairs)
        # The paper's method (``always_on``) switches the neurons off from the first token: no pass is left
        # untouched to roll back to, so it runs as its one pass, as configured.
        self.single_pass = self.config.always_on if single_pass is None else bool(single_pass)
        base = settings if isinstance(settings, RollbackConfig) else RollbackConfig.from_dict(settings)
        # Overrides are validated with the rest (an unknown or misspelled key is refused, not dropped).
        self.settings = RollbackConfig.from_dict({**base.model_dump(), **overrides}) if overrides else base
        self._token_level: RollbackPolicy | None = None
        st = self.settings
        self.repair: RepeatPenalty | None = None
        if st.repair_multiplier > 0:
            self.repair = RepeatPenalty(st.repair_multiplier, st.repair_base, st.repair_allowed_length,
                                        st.repair_window)
        cfg = self.config
        if st.watch_window is not None and st.watch_window != cfg.window:
            try:
                cfg = cfg.replace(window=st.watch_window)
            except ConfigError as exc:
                raise ConfigError(f"watch_window ({st.watch_window}) does not fit the guard config (ngram "
                                  f"{cfg.ngram}): {exc}") from None
        # The first pass decides which sequences are touched at all. A config that repairs nothing (the monitor)
        # never rolls back: its one pass watches with its own triggers.
        self.first = (cfg.replace(suffix_trigger=False, paper_trigger=True)
                      if st.precise_trigger and self.repairs and not self.single_pass else cfg)
        redecode = cfg
        if st.redecode_max_period is not None and redecode.suffix_trigger:
            try:
                redecode = redecode.replace(max_period=st.redecode_max_period)
            except ConfigError as exc:
                raise ConfigError(f"redecode_max_period ({st.redecode_max_period}) does not fit the guard config "
                                  f"(min_repeat {cfg.min_repeat}): {exc}") from None
        if self.single_pass:  # one pass, as configured (it may have no trigger to watch with at all)
            self._configs = (self.first,) * 3
            return
        self._configs = (
            # Watch only; end the pass the moment a loop is confirmed.
            self.first.replace(deactivate=False, escalate=False, stop=True, always_on=False),
            # Re-decodes: neurons off throughout, end the pass at the first sign of the loop coming back.
            redecode.replace(always_on=cfg.deactivate, escalate=False, stop=True, stop_after=1),
            # The last pass: the full policy.
            redecode.replace(always_on=cfg.deactivate),
        )

    def token_level(self) -> "RollbackPolicy":
        """The same policy without the neuron step (for engines that cannot run it), made once."""
        cfg = self.config
        if not (cfg.deactivate or cfg.always_on):
            return self
        if self._token_level is None:
            # The paper's method with no trigger leaves nothing to do without the neuron step: the pass is unguarded.
            off = {} if cfg.paper_trigger or cfg.suffix_trigger else {"enabled": False}
            self._token_level = RollbackPolicy(cfg.replace(deactivate=False, always_on=False, **off), self.settings,
                                               repairs=self.repairs, single_pass=self.single_pass)
        return self._token_level

    @property
    def max_rollbacks(self) -> int:
        return self.settings.max_rollbacks if self.settings.enabled and self.repairs and not self.single_pass else 0

    @property
    def holdback(self) -> int:
        if self.max_rollbacks == 0:  # nothing is ever taken back: every token is final as it comes
            return 0
        hb = self.settings.holdback
        if hb is not None:
            return hb
        return max(_onset_reach(cfg) for cfg in self._configs)

    def pass_config(self, attempt: int) -> GuardConfig:
        """Settings of pass ``attempt`` (0 = the first)."""
        if attempt >= self.max_rollbacks:
            return self.first if attempt == 0 else self._configs[2]
        return self._configs[0] if attempt == 0 else self._configs[1]

    def earliest_loop(self, text: list[int]) -> int | None:
        """Onset of the first loop that a re-decode's triggers see in ``text`` (None: none)."""
        det = detector_for(self._configs[1])
        for token in text:
            event = det.update(token)
            if event is not None:
                return event.onset
        return None

    def start(self, max_new_tokens: int) -> "RollbackState":
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        return RollbackState(self, max_new_tokens)


@dataclass
class RollbackState:
    """One sequence under rollback. Adapters run a pass with ``pass_config()`` on ``kept`` (generated tokens
    that the next pass's prompt ends with), banning ``ban`` at its first step, then call ``end_pass``."""

    policy: RollbackPolicy
    max_new_tokens: int
    kept: list[int] = field(default_factory=list)
    attempt: int = 0
    ban: int | None = None
    rollbacks: int = 0
    released: int = 0  # tokens already handed out (final)
    report: SequenceReport | None = None
    final: list[int] | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    @property
    def last(self) -> bool:
        return self.attempt >= self.policy.max_rollbacks

    @property
    def budget(self) -> int:
        """New tokens the next pass may decode."""
        return self.max_new_tokens - len(self.kept)

    def pass_config(self) -> GuardConfig:
        return self.policy.pass_config(self.attempt)

    def repair_penalties(self, pass_tokens: list[int]) -> dict[int, float]:
        """{token: logit penalty} for the token after ``kept + pass_tokens`` (this pass's new tokens). Empty
        in the first pass: a sequence that never rolled back is never written to."""
        repair = self.policy.repair
        if self.attempt == 0 or repair is None:
            return {}
        return repair.penalties_after(self.kept, pass_tokens)

    def end_pass(self, new_tokens: list[int], report: SequenceReport, final: bool = False) -> bool:
        """Record a finished pass (its new tokens, up to and including an EOS, and its report).
        Returns True when the sequence rolls back (run another pass), False when it is final
        (always False with ``final``: the engine ended the sequence)."""
        text = self.kept + list(new_tokens)[: self.budget]
        merged = merge_reports(self.report, report)
        det = report.detections[-1] if report.detections else None
        if det is not None and det.position >= len(text):
            # Seen only in tokens past this sequence's budget (a batch decodes to its longest row's budget).
            det = None
            merged.finish_reason = None
        onset = min(det.onset, len(text) - 1) if det is not None else -1
        rolls = not final and not self.last and report.finish_reason == "repetition" and onset > 0
        if rolls and self.policy.settings.cut_back:
            early = self.policy.earliest_loop(text[:onset])
            if early is not None and 0 < early < onset and early >= self.released:
                onset = early
        if rolls and onset >= self.released:
            self.ban = text[onset]
            self.kept = text[:onset]
            self.rollbacks += 1
            self.attempt += 1
            merged.finish_reason = None
            # The stop that ended this pass was internal: the caller sees the rollback instead.
            while merged.actions and merged.actions[-1].level == "stop":
                merged.actions.pop()
            merged.max_level = max((a.level for a in merged.actions), key=level_rank, default="monitor")
            # Position convention: the action takes effect after this generated token.
            merged.actions.append(LevelChange(onset - 1, "rollback", f"loop seen at {det.position}; re-decoded from {onset}"))
            self.report = merged
            return True
        self.final = text
        self.report = merged
        return False

    def releasable(self, pass_tokens: list[int] | None = None, finished: bool = False) -> list[int]:
        """Tokens that became final since the last call: all of them once the sequence is done, else those
        older than ``holdback`` in ``kept + pass_tokens`` (a rollback is never made into them)."""
        if self.final is not None:
            text, upto = self.final, len(self.final)
        else:
            text = self.kept + list(pass_tokens or [])
            upto = min(len(text) if finished else len(text) - self.policy.holdback, self.max_new_tokens)
        if upto <= self.released:
            return []
        out = text[self.released : upto]
        self.released = upto
        return out


def level_rank(level: str) -> int:
    """Order of the report's level labels; a rollback ranks with monitoring (nothing was written)."""
    if level == "rollback":
        return int(Level.MONITOR)
    try:
        return int(Level[level.upper()])
    except KeyError:
        return int(Level.MONITOR)


def merge_reports(earlier: SequenceReport | None, later: SequenceReport) -> SequenceReport:
    """One report for a sequence decoded in several passes (positions already count from its start)."""
    if earlier is None:
        return later
    return SequenceReport(
        detections=earlier.detections + later.detections,
        actions=earlier.actions + later.actions,
        tokens_observed=earlier.tokens_observed + later.tokens_observed,
        tokens_under_intervention=earlier.tokens_under_intervention + later.tokens_under_intervention,
        max_level=max(earlier.max_level, later.max_level, key=level_rank),
        finish_reason=later.finish_reason,
        max_neuron_score=max((s for s in (earlier.max_neuron_score, later.max_neuron_score) if s is not None),
                             default=None),
        errors=earlier.errors + later.errors,
    )


__all__ = ["BAN", "RollbackConfig", "RollbackPolicy", "RollbackState", "level_rank", "merge_reports"]
