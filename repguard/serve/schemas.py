"""OpenAI-compatible request bodies, strict: unknown fields and wrong types are rejected (400).

The ``repguard`` body field takes the fields of ``GuardConfig`` (plus ``preset``), validated by the
same code as everywhere else in repguard, and two of the request's rollback: ``rollback`` (false: the
single pass) and ``holdback`` (streaming: tokens held back before they are sent). Responses are plain dicts built in ``router.py``: every
choice carries a ``repguard`` object with the guard's report.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..config import GuardConfig

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_HOLDBACK = 100_000
ROLLBACK_FIELDS = ("rollback", "holdback")  # the request's rollback settings, beside GuardConfig's fields


def _refuse(cls, name: str, message: str, data: Any):
    """A validation error at ``repguard.<name>`` (the router answers it as a 400 naming the field)."""
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(type=error, loc=("repguard", name),
                                                                              input=data)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationParams(_Strict):
    model: str | None = Field(None, max_length=512, description="Must name the served model when given.")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Capped by the server's max_tokens_limit.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (capped by the server's max_n).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} non-empty stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    repguard: GuardConfig | None = Field(
        None, description="Guard settings for this request: GuardConfig fields, or {'preset': 'monitor'|'off'|...}, "
        "plus 'rollback' (false: the single pass) and 'holdback' (streaming: tokens held back, 0 to 100000)."
    )
    _rollback: bool | None = PrivateAttr(None)
    _holdback: int | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _rollback_settings(cls, data: Any, handler):
        """Take ``rollback`` and ``holdback`` out of the ``repguard`` object before GuardConfig sees it."""
        found: dict[str, Any] = {}
        if isinstance(data, dict) and isinstance(data.get("repguard"), dict):
            raw = dict(data["repguard"])
            found = {k: raw.pop(k) for k in ROLLBACK_FIELDS if k in raw}
            data = {**data, "repguard": raw}
        rollback, holdback = found.get("rollback"), found.get("holdback")
        if rollback is not None and not isinstance(rollback, bool):
            _refuse(cls, "rollback", f"expected true or false, got {rollback!r}", data)
        if holdback is not None and (isinstance(holdback, bool) or not isinstance(holdback, int)
                                     or not 0 <= holdback <= MAX_HOLDBACK):
            _refuse(cls, "holdback", f"expected an integer from 0 to {MAX_HOLDBACK} (tokens held back while "
                    f"streaming), got {holdback!r}", data)
        model = handler(data)
        model._rollback, model._holdback = rollback, holdback
        return model

    @property
    def rollback(self) -> bool | None:
        """The request's ``repguard.rollback`` (None: the server's setting)."""
        return self._rollback

    @property
    def holdback(self) -> int | None:
        """The request's ``repguard.holdback`` (None: the server's setting)."""
        return self._holdback

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_float(cls, value: Any) -> Any:
        # JSON has one number type: 1 and 1.0 are the same temperature.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop_ok(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return stops or None

    @field_validator("repguard", mode="before")
    @classmethod
    def _guard_ok(cls, value: Any) -> Any:
        if value is None or isinstance(value, GuardConfig):
            return value
        return GuardConfig.from_dict(value, strict=True)  # ConfigError is a ValueError: pydantic reports it as 400

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):  # ``stream`` is declared (validated) first
            raise ValueError("only allowed when stream is true")
        return value


class CompletionRequest(_GenerationParams):
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts (non-empty strings).")

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("prompt list is empty")
        if any(not p for p in prompts):
            raise ValueError("prompt is empty")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = Field(None, description="Not supported: a request that sets it is refused.")

    @field_validator("name")
    @classmethod
    def _no_name(cls, value: str | None) -> None:
        # The chat templates served here have no place for a participant name; dropping it would be silent.
        if value is not None:
            raise ValueError("name: participant names are not supported by this server; leave it out")
        return None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Alias of max_tokens.")

    @field_validator("messages")
    @classmethod
    def _messages_ok(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text() for m in value):
            raise ValueError("every message is empty")
        return value
