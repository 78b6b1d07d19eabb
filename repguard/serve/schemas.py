"""OpenAI-compatible request bodies, strict: unknown fields and wrong types are rejected (400).

As in the OpenAI API, ``null`` is the default of every supported field. An OpenAI parameter this server does
not implement (``logprobs``, ``frequency_penalty``, ``tools``, ...) is accepted only with a value that changes
nothing (what clients that send every option, set or not, put there) and is then dropped; any other value is
refused with a 400 naming it, never ignored.

The ``repguard`` body field takes the fields of ``GuardConfig`` (plus ``preset``), validated by the
same code as everywhere else in repguard, and two of the request's rollback: ``rollback`` (false: the
single pass) and ``holdback`` (streaming: tokens held back before they are sent). Responses are plain dicts built in ``router.py``: every
choice carries a ``repguard`` object with the guard's report.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..config import GuardConfig

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_HOLDBACK = 100_000
ROLLBACK_FIELDS = ("rollback", "holdback")  # the request's rollback settings, beside GuardConfig's fields

# OpenAI parameters not implemented here, each with its values that change nothing. A value matches with its
# JSON type (``false`` is not ``0``, ``true`` is not ``1``), except that ``0`` and ``0.0`` are one number.
_NO_OP_SAMPLING: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
}
COMPLETION_NO_OPS: dict[str, tuple[Any, ...]] = {
    **_NO_OP_SAMPLING, "logprobs": (None,), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
}
CHAT_NO_OPS: dict[str, tuple[Any, ...]] = {
    **_NO_OP_SAMPLING, "logprobs": (None, False), "top_logprobs": (None,),
    # no tools can be given (OpenAI refuses an empty list), so no tool is ever called whatever these say
    "tools": (None,), "functions": (None,), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "store": (None, False), "metadata": (None,),
}
MESSAGE_NO_OPS: dict[str, tuple[Any, ...]] = {  # what an SDK's response message carries when sent back as history
    "refusal": (None,), "tool_calls": (None, []), "function_call": (None,), "audio": (None,), "annotations": (None, []),
    "reasoning": (None,), "reasoning_content": (None,),
}


def _refuse(cls, name: str, message: str, data: Any, loc: tuple[str, ...] = ("repguard",)):
    """A validation error at ``<loc>.<name>`` (the router answers it as a 400 naming the field)."""
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(type=error, loc=(*loc, name),
                                                                              input=data)])


def rollback_fields(raw: dict[str, Any]) -> tuple[dict[str, Any], bool | None, int | None, tuple[str, str] | None]:
    """A request's ``repguard`` object split into its GuardConfig fields and its rollback settings (both
    servers): ``(fields, rollback, holdback, (field, message) of a bad one or None)``."""
    fields = dict(raw)
    found = {k: fields.pop(k) for k in ROLLBACK_FIELDS if k in fields}
    rollback, holdback = found.get("rollback"), found.get("holdback")
    if rollback is not None and not isinstance(rollback, bool):
        return fields, None, None, ("rollback", f"expected true or false, got {rollback!r}")
    if holdback is not None and (isinstance(holdback, bool) or not isinstance(holdback, int)
                                 or not 0 <= holdback <= MAX_HOLDBACK):
        return fields, None, None, ("holdback", f"expected an integer from 0 to {MAX_HOLDBACK} (tokens held back "
                                    f"while streaming), got {holdback!r}")
    return fields, rollback, holdback, None


def is_number(value: Any) -> bool:
    """A JSON number (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value: Any, no_op: Any) -> bool:
    if is_number(value) and is_number(no_op):
        return value == no_op
    return type(value) is type(no_op) and value == no_op


def _drop_no_ops(cls, data: Any, no_ops: dict[str, tuple[Any, ...]]) -> Any:
    """``data`` without the unsupported parameters that carry a no-op value; 400 for one that carries another."""
    if not isinstance(data, dict):
        return data
    for name, values in no_ops.items():
        if name in data and not any(_same(data[name], v) for v in values):
            accepted = " or ".join(json.dumps(v) for v in values)
            _refuse(cls, name, f"not supported by this server; only {accepted} (no effect) is accepted, or leave it "
                    "out", data[name], loc=())
    return {k: v for k, v in data.items() if k not in no_ops}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationParams(_Strict):
    NO_OPS: ClassVar[dict[str, tuple[Any, ...]]] = {}  # the endpoint's unsupported parameters and their no-op values

    model: str | None = Field(None, max_length=512, description="Must name the served model when given.")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Capped by the server's max_tokens_limit.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily (null: 1).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="null: 1.")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (capped by the server's max_n; null: 1).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} non-empty stop strings.")
    stream: bool = Field(False, description="null: false.")
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
        rollback = holdback = None
        if isinstance(data, dict) and isinstance(data.get("repguard"), dict):
            raw, rollback, holdback, bad = rollback_fields(data["repguard"])
            # Rollback settings alone keep the server's guard settings (None: the server's).
            data = {**data, "repguard": None if not raw and (rollback is not None or holdback is not None) else raw}
            if bad is not None:
                _refuse(cls, *bad, data)
        model = handler(data)
        model._rollback, model._holdback = rollback, holdback
        return model

    @model_validator(mode="before")
    @classmethod
    def _unsupported_no_ops(cls, data: Any) -> Any:
        return _drop_no_ops(cls, data, cls.NO_OPS)

    @property
    def rollback(self) -> bool | None:
        """The request's ``repguard.rollback`` (None: the server's setting)."""
        return self._rollback

    @property
    def holdback(self) -> int | None:
        """The request's ``repguard.holdback`` (None: the server's setting)."""
        return self._holdback

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI marks these nullable: clients that send every option send null for the ones not set.
        return cls.model_fields[info.field_name].default if value is None else value

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
    NO_OPS = COMPLETION_NO_OPS

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

    @model_validator(mode="before")
    @classmethod
    def _unsupported_no_ops(cls, data: Any) -> Any:
        return _drop_no_ops(cls, data, MESSAGE_NO_OPS)

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
    NO_OPS = CHAT_NO_OPS

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000, description="The newer name of max_tokens.")

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")  # ``max_tokens`` is declared (validated) first
        if value is not None and other is not None and value != other:
            raise ValueError(f"{value} conflicts with max_tokens ({other}): they are two names of one setting; "
                             "send one of them")
        return value

    @field_validator("messages")
    @classmethod
    def _messages_ok(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text() for m in value):
            raise ValueError("every message is empty")
        return value
