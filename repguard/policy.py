"""``SequenceGuard``: the per-sequence state machine MONITOR -> DEACTIVATE -> ESCALATE -> STOP.

Framework adapters call ``observe(token, neuron_score)`` once per generated token and read back
three things for the *next* step: whether the mapped neurons are off (``deactivated``), which token
to penalise and by how much (``penalty``), and whether to end the sequence (``stopped``).
Nothing here imports a framework.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Iterable

from .config import GuardConfig
from .detect import LoopDetector, LoopEvent


class Level(IntEnum):
    MONITOR = 0
    DEACTIVATE = 1
    ESCALATE = 2
    STOP = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class Detection:
    position: int  # generated-token index at which the detector fired
    onset: int  # generated-token index where the second copy starts
    period: int
    trigger: str
    neuron_score: float | None = None


@dataclass
class LevelChange:
    position: int
    level: str
    reason: str


@dataclass
class SequenceReport:
    """What the guard saw and did for one sequence. Positions count generated tokens from 0."""

    detections: list[Detection] = field(default_factory=list)
    actions: list[LevelChange] = field(default_factory=list)
    tokens_observed: int = 0
    tokens_under_intervention: int = 0
    max_level: str = "monitor"
    finish_reason: str | None = None
    max_neuron_score: float | None = None
    errors: int = 0

    @property
    def fired(self) -> bool:
        return bool(self.detections)

    @property
    def first_detection(self) -> int | None:
        return self.detections[0].position if self.detections else None

    @property
    def first_action(self) -> int | None:
        acting = [a.position for a in self.actions if a.level != "monitor"]
        return acting[0] if acting else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fired"] = self.fired
        d["first_detection"] = self.first_detection
        return d



def detector_for(config: GuardConfig) -> LoopDetector:
    """A fresh ``LoopDetector`` with the triggers ``config`` asks for."""
    return LoopDetector(
        config.ngram, config.window, config.min_count,
        use_paper=config.paper_trigger, use_suffix=config.suffix_trigger,
        min_repeat=config.min_repeat, min_copies=config.min_copies, max_period=config.max_period,
        spacing=config.paper_spacing,
    )


class SequenceGuard:
    """Guard state of one sequence. ``observe`` is the per-token hot path: keep it lean."""

    __slots__ = (
        "config", "detector", "history", "level", "report", "period", "persist", "quiet",
        "_penalty", "_score_gate", "_on_change", "_offset",
    )

    def __init__(
        self,
        config: GuardConfig,
        prompt_ids: Iterable[int] | None = None,
        on_change=None,
        history: Iterable[int] | None = None,
    ) -> None:
        """``prompt_ids`` prime the detector when ``config.watch_prompt``; ``history`` holds generated
        tokens kept from an earlier pass (a rollback): they prime the detector and positions continue
        after them. Report positions always count generated tokens."""
        self.config = config
        self.detector = detector_for(config)
        self.history: list[int] = []
        self.report = SequenceReport()
        self.period = 0
        self.persist = 0  # loop-continuing tokens since the current level began
        self.quiet = 0  # tokens since the loop was last seen continuing
        self._penalty: tuple[int, float] | None = None
        self._score_gate = config.monitor_gate
        self._on_change = on_change
        self._offset = 0  # detector stream position minus generated position
        self.level = Level.MONITOR
        if config.watch_prompt and prompt_ids is not None:
            for token in prompt_ids:
                self.detector.update(int(token))
                self._offset += 1
        if history is not None:
            for token in history:
                self.detector.update(int(token))  # a hit inside kept history is not acted on
                self.history.append(int(token))
        if config.enabled and config.always_on and config.deactivate:
            self._set(Level.DEACTIVATE, len(self.history), "always_on")

    # -- what the adapters read ----------------------------------------------------------------------
    @property
    def deactivated(self) -> bool:
        return self.level in (Level.DEACTIVATE, Level.ESCALATE) and self.config.deactivate

    @property
    def penalty(self) -> tuple[int, float] | None:
        """(token id, logit penalty) for the next token, or None."""
        return self._penalty

    @property
    def stopped(self) -> bool:
        return self.level == Level.STOP

    # -- the hot path ---------------------------------------------------------------------------------
    def observe(self, token: int, neuron_score: float | None = None) -> Level:
        cfg = self.config
        if not cfg.enabled or self.level == Level.STOP:
            return self.level
        pos = len(self.history)
        history = self.history
        continuing = self.period > 0 and pos >= self.period and history[pos - self.period] == token
        history.append(token)
        rep = self.report
        rep.tokens_observed += 1
        if neuron_score is not None and (rep.max_neuron_score is None or neuron_score > rep.max_neuron_score):
            rep.max_neuron_score = neuron_score
        event = self.detector.update(token)
        if event is not None and self._score_gate is not None and (neuron_score is None or neuron_score < self._score_gate):
            event = None  # the neuron monitor vetoes a token trigger
        fresh = event is not None and self._detected(event, neuron_score)
        intervening = self.level != Level.MONITOR
        if intervening:
            rep.tokens_under_intervention += 1
        if self.period == 0:  # no loop being tracked
            self._penalty = None
            return self.level
        if not fresh:
            if continuing:
                self.persist += 1
                self.quiet = 0
            else:
                self.quiet += 1
        level = self.level
        if self.quiet > cfg.deactivate_window:
            self.period = 0  # the loop is broken
            if intervening and not cfg.always_on:
                self._set(Level.MONITOR, pos, "loop_broken")
        elif level == Level.DEACTIVATE and cfg.escalate and self.persist >= cfg.escalate_after:
            self._set(Level.ESCALATE, pos, "loop_persists")
        elif intervening and cfg.stop and self.persist >= cfg.stop_after and (level == Level.ESCALATE or not cfg.escalate):
            self._set(Level.STOP, pos, "loop_persists")
            rep.finish_reason = "repetition"
        self._penalty = self._next_penalty() if self.level == Level.ESCALATE and self.quiet == 0 else None
        return self.level

    # -- transitions ---------------------------------------------------------------------------------
    def _detected(self, event: LoopEvent, score: float | None) -> bool:
        """Record a detector hit; True when it starts a new loop (not one already being handled)."""
        cfg = self.config
        rep = self.report
        new_loop = self.period == 0
        self.period = event.period
        self.quiet = 0
        if not new_loop:
            return False  # already intervening: keep the level, follow the (possibly new) period
        off = self._offset
        rep.detections.append(Detection(event.position - off, event.onset - off, event.period, event.trigger, score))
        self.persist = 0
        if cfg.always_on:
            return True
        if self.level != Level.MONITOR:
            return True
        if cfg.deactivate:
            # A loop that comes back right after a repair resumes at the level it had reached.
            self._set(self._resume_level(Level.DEACTIVATE), event.position - off, event.trigger)
        elif cfg.escalate:
            self._set(Level.ESCALATE, event.position - off, event.trigger)
        elif cfg.stop:
            self._set(Level.STOP, event.position - off, event.trigger)
            rep.finish_reason = "repetition"
        return True

    def _resume_level(self, default: Level) -> Level:
        acts = self.report.actions
        if len(acts) >= 2 and acts[-1].level == "monitor" and acts[-1].reason == "loop_broken":
            previous = Level[acts[-2].level.upper()]
            if previous == Level.ESCALATE and self.config.escalate:
                return Level.ESCALATE
        return default

    def _set(self, level: Level, position: int, reason: str) -> None:
        self.level = level
        self.persist = 0
        if level == Level.MONITOR:
            self.period = 0
            self.quiet = 0
        rep = self.report
        rep.actions.append(LevelChange(position, level.label, reason))
        if level > Level[rep.max_level.upper()]:
            rep.max_level = level.label
        if self._on_change is not None:
            self._on_change(level, position)

    def _next_penalty(self) -> tuple[int, float] | None:
        """DRY-style: penalise exactly the token that would extend the loop by one more step."""
        period = self.period
        history = self.history
        if period <= 0 or period > len(history):
            return None
        token = history[len(history) - period]
        cfg = self.config
        length = max(self.detector.repeat_length, period)
        excess = max(0, length - cfg.penalty_allowed_length)
        try:
            amount = cfg.penalty_multiplier * cfg.penalty_base**excess
        except OverflowError:
            amount = cfg.penalty_max
        return token, min(amount, cfg.penalty_max)
