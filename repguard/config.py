"""``GuardConfig``: every knob of the runtime guard, validated, serialisable, with presets."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .detect import suffix_span
from .errors import ConfigError

PRESETS = ("default", "monitor", "paper", "off")
_STRICT: ContextVar[bool] = ContextVar("repguard_config_strict", default=False)  # set by _validate only
_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "default": {},
    "monitor": {"deactivate": False, "escalate": False, "stop": False},
    "paper": {"always_on": True, "escalate": False, "stop": False},
    "off": {"enabled": False},
}


MAX_LAYER = 100_000  # far past any model's depth; a layer index is a tensor element on the device

class GuardConfig(BaseModel):
    """Settings of the runtime guard. Levels: MONITOR -> DEACTIVATE -> ESCALATE -> STOP.

    >>> GuardConfig.from_preset("monitor").deactivate
    False
    >>> GuardConfig(k=64).to_dict()["k"]
    64
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    preset: Literal["default", "monitor", "paper", "off", "custom"] = "default"
    enabled: bool = Field(True, description="False leaves generation untouched and reports nothing.")

    # -- detection ---------------------------------------------------------------------------------
    paper_trigger: bool = Field(True, description="Fire on the paper's criterion (n-gram seen k times, equally spaced).")
    ngram: int = Field(10, ge=2, le=64, description="Paper criterion: n-gram length n.")
    window: int = Field(100, ge=4, le=4096, description="Paper criterion: window r in tokens.")
    min_count: int = Field(3, ge=3, le=16, description="Paper criterion: occurrences k.")
    paper_spacing: Literal["consecutive", "first"] = Field(
        "consecutive",
        description="Paper criterion: which three occurrences in the window must be equally spaced. 'first': "
        "the first three (the paper's offline rule; an earlier, unequally spaced occurrence in the window hides "
        "a loop, so a wider window can miss a loop a narrower one catches). 'consecutive': any three in a row "
        "(the criterion at every window up to r); with min_count 3, fires wherever 'first' does, never later "
        "(with more, the newest three must be equally spaced, which 'first' does not ask).",
    )
    suffix_trigger: bool = Field(True, description="Fire early on back-to-back copies (longest repeated suffix).")
    min_repeat: int = Field(12, ge=2, le=4096, description="Suffix trigger: repeated tokens needed.")
    min_copies: float = Field(
        1.5, ge=1.5, le=16.0,
        description="Suffix trigger: back-to-back copies needed. 1.5 fires half a copy before the third copy "
        "starts, early enough for the penalty to stop it (benchmarks/RESULTS.md).",
    )
    max_period: int = Field(64, ge=1, le=4096, description="Suffix trigger: longest loop period considered.")
    watch_prompt: bool = Field(False, description="Feed prompt tokens to the detector (loops can start in the prompt).")
    monitor_gate: float | None = Field(
        None, description="If set, a token trigger only counts when the neuron score (mean z) is >= this value."
    )

    # -- deactivation (the paper's actuator) -------------------------------------------------------
    deactivate: bool = Field(True, description="Switch the mapped neurons off when a loop is detected.")
    always_on: bool = Field(False, description="Deactivate from the first token, as in the paper (no trigger).")
    k: int | None = Field(None, ge=1, description="Neurons to deactivate; None uses the map's selection.")
    deactivate_value: Literal["zero", "pre_onset_mean"] = Field(
        "zero", description="Value written into deactivated neurons."
    )
    layers: tuple[int, ...] | None = Field(None, description="Restrict deactivation to these layers.")
    deactivate_window: int = Field(
        32, ge=0, le=100000, description="Tokens to keep neurons off after a trigger (0: until the loop breaks)."
    )

    # -- escalation: DRY-style penalty on the loop's next token -------------------------------------
    escalate: bool = Field(True, description="Penalise the tokens that would extend a persisting loop.")
    escalate_after: int = Field(
        0, ge=0, le=100000,
        description="Loop tokens with neurons off before escalating. 0: penalise from the first loop token; "
        "deactivation alone breaks a minority of loops (benchmarks/RESULTS.md).",
    )
    penalty_multiplier: float = Field(0.8, gt=0.0, le=1000.0)
    penalty_base: float = Field(1.75, ge=1.0, le=16.0)
    penalty_allowed_length: int = Field(2, ge=0, le=4096)
    penalty_max: float = Field(1e4, gt=0.0, description="Cap on one penalty, in logits.")

    # -- stop: the last resort ----------------------------------------------------------------------
    stop: bool = Field(True, description="Finish the sequence with reason 'repetition' if the loop survives.")
    stop_after: int = Field(48, ge=1, le=100000, description="Loop tokens under escalation before stopping.")

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        """True and False are not numbers here (Python and lax validation would take them as 1 and 0)."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is None or field.annotation in (bool, "bool"):
                    continue
                items = value if key == "layers" and isinstance(value, (list, tuple)) else [value]
                if any(isinstance(v, bool) for v in items):
                    raise ValueError(f"{key}: expected {'layer indexes' if key == 'layers' else 'a number'}, "
                                     f"got {value!r}")
        return data

    @model_validator(mode="after")
    def _check(self) -> "GuardConfig":
        if self.enabled and not (self.paper_trigger or self.suffix_trigger or self.always_on):
            raise ValueError("at least one of paper_trigger, suffix_trigger or always_on must be on")
        if self.window < self.ngram + 2:
            raise ValueError(f"window ({self.window}) must be >= ngram + 2 ({self.ngram + 2}): three equally spaced "
                             "copies of an n-gram span at least that many tokens, so a shorter window never fires")
        span = suffix_span(self.max_period)
        if self.suffix_trigger and self.min_repeat > span:
            raise ValueError(f"min_repeat ({self.min_repeat}) must be <= {span}: the suffix trigger looks back "
                             f"max(512, 4 * max_period) tokens, so a longer repeat is never seen")
        if self.layers is not None and (not self.layers or min(self.layers) < 0 or max(self.layers) > MAX_LAYER):
            raise ValueError(f"layers must be a non-empty list of layer indexes from 0 to {MAX_LAYER}")
        return self

    # -- construction ------------------------------------------------------------------------------
    def __init__(self, /, **data: Any) -> None:
        """``GuardConfig(k=64)``; a bad value raises ``ConfigError`` naming the field, as every other
        way of building one does."""
        try:
            self.__pydantic_validator__.validate_python(data, self_instance=self, strict=_STRICT.get())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "GuardConfig")) from None

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> "GuardConfig":
        """Named starting points: default (trigger -> deactivate -> escalate -> stop), monitor
        (detect and report only), paper (deactivation always on, no trigger), off."""
        base = _PRESET_FIELDS.get(name) if isinstance(name, str) else None
        if base is None:
            raise ConfigError(f"preset: unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
        if overrides:
            cfg = _validate(cls, {**base, **overrides, "preset": "custom"})
            named = _validate(cls, {**base, "preset": name})
            return named if cfg.to_dict() | {"preset": name} == named.to_dict() else cfg
        return _validate(cls, {**base, "preset": name})

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, strict: bool = False) -> "GuardConfig":
        """Build from plain data (request bodies, files). A ``preset`` key picks the starting point.

        ``strict`` refuses values of the wrong JSON type instead of coercing them ("64" is not a ``k``).
        """
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"invalid GuardConfig: expected an object, got {type(data).__name__}")
        data = dict(data or {})
        name = data.pop("preset", "default")
        if not isinstance(name, str):
            raise ConfigError(f"preset: expected a string, got {name!r}")
        if strict:  # types only; the preset's own values are checked below as usual
            typed = {k: tuple(v) if k == "layers" and isinstance(v, list) else v for k, v in data.items()}
            _validate(cls, {**_PRESET_FIELDS.get(name, {}), **typed, "preset": "custom"}, strict=True)
        if name == "custom":
            return _validate(cls, {**data, "preset": "custom"})
        return cls.from_preset(name, **data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "GuardConfig":
        return _validate(type(self), {**self.to_dict(), **changes})

    @property
    def acts_on_detection(self) -> bool:
        """Whether a detection changes decoding (neurons switched off on a trigger, penalties, a stop). When
        False (the monitor; the paper's always-on deactivation) an adapter may read each step's tokens one
        step late, without waiting for the device.

        >>> GuardConfig.from_preset("monitor").acts_on_detection, GuardConfig.from_preset("paper").acts_on_detection
        (False, False)
        >>> GuardConfig().acts_on_detection
        True
        """
        return self.enabled and (self.escalate or self.stop or (self.deactivate and not self.always_on))

    @property
    def repairs(self) -> bool:
        """Whether the guard changes decoding at all (switches neurons off, escalates, stops). False for the
        monitor, which only watches and reports: rollback, a repair, never runs for it, so its outputs are
        always the unguarded ones.

        >>> GuardConfig.from_preset("monitor").repairs, GuardConfig.from_preset("paper").repairs, GuardConfig().repairs
        (False, True, True)
        """
        return self.enabled and (self.deactivate or self.escalate or self.stop)


def _validate(cls, data: dict[str, Any], strict: bool = False) -> GuardConfig:
    # through __init__, which raises ConfigError (model_validate would call it too, but drop ``strict``
    # and wrap the ConfigError in a ValidationError)
    token = _STRICT.set(strict)
    try:
        return cls(**data)
    finally:
        _STRICT.reset(token)


def format_validation_error(exc: ValidationError, what: str, secret: frozenset[str] = frozenset()) -> str:
    """One line naming each bad field and its value; the value of a field in ``secret`` is never shown."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or what
        shown = "<hidden>" if secret & {str(x) for x in err.get("loc", ())} else repr(err.get("input"))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        # A nested config's own error already names its field and value: said once, not twice.
        named = isinstance((err.get("ctx") or {}).get("error"), ConfigError) or f"got {shown}" in msg
        parts.append(f"{loc}: {msg}" if named else f"{loc}: {msg} (got {shown})")
    return f"invalid {what}: " + "; ".join(parts)
