"""Rollback for transformers: a thin adapter over the core ``repguard.rollback`` policy.

The policy (when to cut, where, what to ban, which settings each pass uses, how reports merge, which
streamed tokens are final) lives in the core and is shared with the vLLM and server paths. This module
runs its passes under the guard's hooks, in one of two ways:

* **in place** (the default wherever possible): the whole batch is one ``model.generate`` call. When the
  guard confirms a row's loop, the row is rewound there and then: the discarded tokens are masked out of
  attention (their KV entries stay, unused), the last kept token is fed again at its own position so the
  model predicts the onset's token anew, and the row goes on under the re-decode settings while the other
  rows keep decoding. No prefill is repeated and a re-decode overlaps the rest of the batch. It needs a
  left-padded batch (transformers drops an all-ones mask, and giving the batch one would change the
  attention kernel of every row) and plain sampling or greedy decoding (``_in_place_blocker``). Logits
  processors of the caller see a rewound row's ``input_ids`` with the discarded tokens still in them. On a
  model whose attention counts cache columns (a sliding window, attention chunks), a rewound row that could
  reach past that span is deferred instead: its discarded columns would take places in the window. It leaves
  the call and is re-decoded pass after pass once the call returns. So is a row whose second rollback keeps
  text from its first re-decode, decoded with the mapped neurons off: a fresh prefill reads it with them on.
  Settings that ``generate``'s own processors apply to a row's tokens (a repetition penalty, n-gram bans) run
  pass after pass: in place they would see a rewound row's discarded tokens.
* **pass after pass** otherwise: a row whose loop is confirmed stops (the guard forces EOS) and is decoded
  again from the onset in the next ``generate`` call, together with the other rows that rolled back, as a
  smaller batch after a fresh prefill of prompt + kept text.

Either way, rows that never trigger see exactly the inputs of an unguarded run, so they are byte-identical
to it (greedy, and seeded sampling: a rewound row changes no other row's random draws).

Streaming: with ``on_tokens(row, tokens)`` each row's tokens are handed out while they are decoded, held
back by ``holdback`` tokens (default: half the watch window plus the n-gram, 210 tokens), so that a
rollback never has to take back text already handed out. Every token handed out is final; together they
are exactly the row's returned sequence. If a rollback would cut into text already handed out (only
possible with a smaller ``holdback``), the row is not rolled back: it ends where its loop was confirmed,
with finish reason "repetition".
"""

from __future__ import annotations

import copy
import functools
import logging
import numbers
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .. import metrics
from ..config import GuardConfig
from ..errors import ConfigError
from ..policy import SequenceReport
from ..repair import BAN
from ..rollback import RollbackConfig, RollbackPolicy
from ..runtime import force_token, host_to_device, token_id_list
from .guard import Guard, call_setting, model_lock

log = logging.getLogger("repguard")


class _GuardFailed(Exception):
    """A fault of the rollback machinery (its processors, streamer, or policy calls) inside ``generate``: the
    batch is then generated unguarded (``_unguarded``), logged once and counted."""


class _CallerError(Exception):
    """An exception of the caller's own ``on_tokens``: passed through unchanged, never taken for a fault."""


@contextmanager
def _step():
    """A block of rollback work: any exception in it becomes ``_GuardFailed`` (the caller's own pass through)."""
    try:
        yield
    except (_GuardFailed, _CallerError):
        raise
    except Exception as exc:
        raise _GuardFailed(f"{type(exc).__name__}: {exc}") from exc


def _fails_open(method):
    """``_step`` around a method of the rollback machinery (called every decoding step: a plain ``try``)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (_GuardFailed, _CallerError):
            raise
        except Exception as exc:
            raise _GuardFailed(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


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

    @_fails_open
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

    @_fails_open
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


class _MinNewTokens:
    """Logits processor: ``min_new_tokens`` per row, over its whole generated text (kept + this pass): no
    end-of-sequence token before that, except where the guard ends the row (a stop forces the EOS, which
    ``generate``'s own processor would mask, leaving a row with no token to choose). ``guard`` None: the
    unguarded fallback, which must not fail the way the guard's own machinery may."""

    def __init__(self, guard: Guard | None, states, start_length: int, min_new: int, eos: list[int]) -> None:
        self.g, self.states, self.start_length, self.min_new, self.eos = guard, states, start_length, min_new, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.g is None:  # the unguarded fallback: ``states`` hold what each row handed out
            return self._no_end_yet(input_ids, scores)
        return self._guarded(input_ids, scores)

    @_fails_open
    def _guarded(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self._no_end_yet(input_ids, scores)

    def _no_end_yet(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        done = input_ids.shape[1] - self.start_length
        seqs = self.g.runtime.seqs if self.g is not None and self.g.watching else []
        rows = [i for i, st in enumerate(self.states) if len(st.kept) + done < self.min_new
                and not (i < len(seqs) and seqs[i] is not None and seqs[i].stopped)]
        if not rows or not self.eos:
            return scores
        out = scores.clone()
        out[torch.tensor(rows, device=scores.device)[:, None], torch.tensor(self.eos, device=scores.device)[None, :]] = float("-inf")
        return out


class _Release:
    """Streamer for one pass: hands out each row's tokens once the core policy says they are final."""

    def __init__(self, states, rows: list[int], eos: set[int], release, stop_pad: int | None = None) -> None:
        self.states, self.rows, self.eos, self.release = states, rows, eos, release
        self.texts: list[list[int]] = [[] for _ in rows]  # this pass's new tokens per row
        self.done = [False] * len(rows)
        self.prompt_seen = False
        # A call with stop criteria pads the rows they end: pad tokens wait until a token that is not one
        # follows (then they were the row's own), and a run of them at the end of the pass is dropped (_trim).
        self.stop_pad = stop_pad
        self.pads = [0] * len(rows)

    @_fails_open
    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            token = int(token)
            if token == self.stop_pad:
                self.pads[i] += 1
                continue
            if self.pads[i]:
                self.texts[i].extend([self.stop_pad] * self.pads[i])
                self.pads[i] = 0
            self.texts[i].append(token)
            self.done[i] = token in self.eos
            self.release(self.rows[i], self.states[i].releasable(self.texts[i]))

    def end(self) -> None:
        pass


class _InPlace:
    """Logits processor that runs every pass of a batch inside one ``generate`` call (``overlap``).

    Each step it reads the rows' newest tokens, and for each row:

    * a row whose loop the guard confirmed (it forces EOS) is handed to the core policy (``end_pass``); on a
      rollback the row is rewound in place: its discarded tokens (and its last kept token) are masked out of
      attention, its last kept token is fed again at the kept text's position, the guard restarts the row's
      watch with the re-decode settings, and the next step bans the loop's next token;
    * a row that reached its budget is ended (EOS forced; the EOS is not part of its text);
    * a re-decoded row gets the core's repair penalties.

    Rows that never trigger see the same batch, shapes and inputs as an unguarded run: their tokens are the
    same. The masking of a rewound row is applied just before the next forward, by ``prepare`` (a wrapper
    of the model's ``prepare_inputs_for_generation``), in place in the 2D attention mask and the position ids
    that ``generate`` carries from step to step.
    """

    def __init__(self, guard: Guard, states, prompts: list[list[int]], width: int, eos: list[int], release,
                 streaming: bool, window: int | None = None) -> None:
        self.g, self.states, self.prompts, self.width, self.release = guard, states, prompts, width, release
        # Attention that counts cache columns (a sliding window, chunks): a rewound row's discarded columns
        # would take places in it. A row whose re-decode could reach that far is deferred: it ends here and
        # is re-decoded pass after pass once the batch's call returns (``deferred``).
        self.window = window
        self.deferred: list[int] = []
        # Only a streamed row hands tokens out while it decodes: what is handed out is final, and a rollback
        # may not cut into it (``RollbackState.released``). Without streaming nothing is final before the end.
        self.streaming = streaming
        self.eos, self.eos0 = set(eos), eos[0]
        n = len(states)
        self.tokens: list[list[int]] = [[] for _ in range(n)]  # this pass's new tokens per row
        self.cols: list[list[int]] = [[] for _ in range(n)]  # input_ids column of each kept + pass token
        self.refed = [False] * n  # the newest token is the re-fed last kept token
        self.ban = [False] * n  # this step is the first of a re-decode: ban the loop's next token
        self.done = [False] * n
        self.fixes: list[tuple[int, list[int], int, int]] = []  # (row, columns to mask, new column, its source)

    def prepare(self, original):
        def prepare_inputs(input_ids, *args, **kwargs):
            if self.fixes:
                with _step():
                    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
                    for row, masked, col, src in self.fixes:
                        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] > col:
                            pos[row, col] = pos[row, src]  # the re-fed token takes its first copy's position
                        mask[row, torch.tensor(masked, device=mask.device)] = 0
                    self.fixes.clear()
            return original(input_ids, *args, **kwargs)

        return prepare_inputs

    def _report(self, row: int):
        return self.g._reports[row]

    def _finish(self, row: int) -> None:
        self.done[row] = True
        self.release(row, self.states[row].releasable())

    @_fails_open
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        newest = None
        if length > self.width:  # the guard read them this step already, unless it failed
            newest = self.g.newest if self.g.newest is not None else input_ids[:, -1].tolist()
        # A guard that failed open watches no more: its rows go on unguarded (no rollback either).
        seqs = self.g.runtime.seqs if self.g.watching else []
        force: dict[int, int] = {}
        penalties: list[tuple[int, int, float]] = []
        for row, st in enumerate(self.states):
            if self.done[row]:
                continue
            tokens = self.tokens[row]
            if newest is not None:
                self.cols[row].append(length - 1)
                if self.refed[row]:
                    self.refed[row], self.ban[row] = False, True
                else:
                    token = int(newest[row])
                    tokens.append(token)
                    if token in self.eos:  # the row ended by itself
                        st.end_pass(tokens, self._report(row))
                        self._finish(row)
                        continue
                    if self.streaming:
                        self.release(row, st.releasable(tokens))
            seq = seqs[row] if row < len(seqs) else None
            if seq is not None and seq.stopped:  # the guard confirmed a loop: it forces EOS
                kept_before, attempt = len(st.kept), st.attempt
                if st.end_pass([*tokens, self.eos0], self._report(row)):
                    if self._outgrows_window(row, length) or self._keeps_switched_off(st, kept_before, attempt):
                        self.done[row] = True
                        self.deferred.append(row)
                        force[row] = self.eos0
                        continue
                    self._rewind(row, length)
                    force[row] = st.kept[-1]
                else:
                    self._finish(row)
                    force[row] = self.eos0
                continue
            if len(st.kept) + len(tokens) >= st.max_new_tokens:  # budget reached
                st.end_pass(tokens, self._report(row))
                self._finish(row)
                force[row] = self.eos0
                continue
            # One amount per token: the ban and the repair may name the same token (the loop's next token often
            # extends an earlier repeat too), and of two writes to one logit only one would land.
            pen = st.repair_penalties(tokens) if st.attempt > 0 else {}
            if self.ban[row]:
                self.ban[row] = False
                if st.ban is not None:
                    pen = {**pen, st.ban: BAN}
            penalties.extend((row, token, amount) for token, amount in pen.items())
        if not force and not penalties:
            return scores
        out = scores.clone()
        if penalties:
            rows_, tokens_, amounts_ = host_to_device([[p[0] for p in penalties], [p[1] for p in penalties],
                                                       [p[2] for p in penalties]], scores.device)
            out[rows_.long(), tokens_.long()] -= amounts_.to(scores.dtype)
        for row, token in force.items():
            force_token(out, row, token)
        return out

    def _outgrows_window(self, row: int, length: int) -> bool:
        """Whether the row, rewound now, could attend from a column more than the window past its first token:
        the re-fed token takes column ``length`` and the re-decode may add the rest of the row's budget."""
        if self.window is None:
            return False
        st = self.states[row]
        first = self.width - len(self.prompts[row])
        return length + (st.max_new_tokens - len(st.kept)) - first >= self.window

    def _keeps_switched_off(self, st, kept_before: int, attempt: int) -> bool:
        """Whether a rollback out of a re-decode keeps some of that re-decode's tokens, whose cache entries were
        computed with the mapped neurons switched off. Pass after pass reads kept text from a fresh prefill,
        neurons on; in place would read those entries: such a row is deferred too."""
        return (attempt > 0 and len(st.kept) > kept_before and self.g.neuron_map is not None
                and st.policy.pass_config(attempt).always_on)

    def _rewind(self, row: int, length: int) -> None:
        st = self.states[row]
        keep = len(st.kept)  # > 0: the core rolls back only past the first token
        cols = self.cols[row]
        masked = cols[keep - 1:]
        # The last kept token is fed again at column ``length`` (the next one), at its first copy's position.
        self.fixes.append((row, masked, length, masked[0]))
        self.cols[row] = cols[: keep - 1]
        self.tokens[row] = []
        self.refed[row] = True
        self.g.rewind_row(row, st.pass_config(), st.kept, self.prompts[row])

    @_fails_open
    def close(self) -> None:
        """Rows still open when ``generate`` returned (it reached its length limit): end them as they are."""
        for row, st in enumerate(self.states):
            if not self.done[row]:
                if not self.refed[row]:
                    st.end_pass(self.tokens[row], self._report(row), final=True)
                else:
                    st.end_pass([], self._report(row), final=True)
                self._finish(row)


def _left_padded(rows: list[list[int]], pad: int, like_ids: torch.Tensor, like_mask: torch.Tensor):
    """``rows`` as a left-padded batch (ids, attention mask) of ``like_ids``' and ``like_mask``' dtypes and device."""
    width = max(len(r) for r in rows)
    device = like_ids.device
    ids = torch.full((len(rows), width), pad, dtype=like_ids.dtype, device=device)
    mask = torch.zeros((len(rows), width), dtype=like_mask.dtype, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=like_ids.dtype, device=device)
        mask[i, width - len(r):] = 1
    return ids, mask


def _trim(ids: list[int], eos: set[int], stop_pad: int | None = None) -> list[int]:
    """A row's tokens up to its first EOS (included); ``stop_pad``: the pad id of a call with stop criteria,
    which pad the rows they end: a run of it at the end is that padding, not text."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    if stop_pad is not None:
        end = len(ids)
        while end and ids[end - 1] == stop_pad:
            end -= 1
        return ids[:end]
    return ids


# Settings whose outputs rollback does not return (it returns RollbackOutput: each row's final tokens).
_OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _check_budget(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, generate_kwargs) -> None:
    """ConfigError naming the argument for inputs ``generate_with_rollback`` cannot run."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(f"input_ids must be a 2-D tensor of token ids [rows, length], got {shape}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ConfigError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    if attention_mask is not None and input_ids.shape[1] and bool((attention_mask.sum(dim=1) == 0).any()):
        raise ConfigError("attention_mask: a row has no prompt token (every position masked)")
    if max_new_tokens is not None:  # None: as generate reads the call (``_budget``)
        _check_budget(max_new_tokens)

    def setting(key):
        return call_setting(model, generate_kwargs, key)

    if (setting("num_return_sequences") or 1) > 1:
        raise ConfigError("num_return_sequences: rollback decodes one sequence per row of input_ids; repeat the "
                          "rows (input_ids.repeat_interleave(n, 0)) and sample for several")
    if generate_kwargs.get("past_key_values") is not None:
        raise ConfigError("past_key_values: rollback decodes each pass from its own prompt and cache (a cache the "
                          "first pass grew would hold its discarded tokens); pass the whole conversation as "
                          "input_ids")
    if setting("guidance_scale") not in (None, 1):  # generate runs a second forward for any other
        raise ConfigError("guidance_scale: classifier-free guidance is not supported (its second forward at every "
                          "step would count as a decoding step of its own)")
    for key in _OUTPUTS:
        if setting(key):
            raise ConfigError(f"{key}: rollback returns each row's final tokens and report (RollbackOutput), not "
                              "generate's scores or hidden states; drop the setting")


def _generate(model, ids, mask, kwargs: dict, **settings):
    """``model.generate`` for one pass with the call's own arguments ``kwargs`` and the executor's ``settings``.
    Where the call gave a ``generation_config``, the settings that are its fields go on a copy of it, as
    ``generate`` itself would merge them (passing both is deprecated in transformers and warns)."""
    call = {**kwargs, **settings}
    config = call.pop("generation_config", None)
    if config is not None:
        config = copy.deepcopy(config)
        call = config.update(**call)  # sets the fields, returns the rest (processors, streamer, model inputs)
        call["generation_config"] = config
    return model.generate(ids, attention_mask=mask, **call)


# What ``generate`` gives when nothing sets a length: 20 new tokens; transformers before 5 also read a
# ``max_length`` equal to its default 20 as 20 new tokens.
_DEFAULT_NEW_TOKENS = 20


def _budget(model, width: int, generate_kwargs: dict) -> int:
    """The new tokens per row that ``generate`` would give this call (``max_new_tokens`` not given): a
    ``max_new_tokens`` of the call's config or the model's, else the call's ``max_length`` or a config's (prompt
    width included), else 20. A call's config takes the fields it leaves unset from the model's (transformers
    before 5 reads a field still at its default as unset). Pops ``max_length`` from the call: each pass gets
    its own ``max_new_tokens``."""
    from transformers import GenerationConfig

    own = generate_kwargs.get("generation_config")
    model_config = getattr(model, "generation_config", None)
    library = GenerationConfig()

    def setting(key):
        for source in (own, model_config):
            value = getattr(source, key, None) if source is not None else None
            if value is not None and not (source is own and model_config is not None
                                          and value == getattr(library, key, None)):
                return value
        return getattr(own, key, None) if own is not None else None

    total = generate_kwargs.pop("max_length", None)
    new = setting("max_new_tokens")
    if new is not None:
        return new
    if total is None:
        total = setting("max_length")
        if total is not None and total == library.max_length:
            total = None  # the library's default length (transformers before 5): new tokens, as generate reads it
    if total is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        return min(_DEFAULT_NEW_TOKENS, limit - width) if limit else _DEFAULT_NEW_TOKENS
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total <= width:
        raise ConfigError(f"max_length: {total!r} leaves no new token after the prompt's {width} positions; set "
                          "max_new_tokens (or a larger max_length)")
    return int(total) - width


class _Streamer:
    """A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) fed as ``on_tokens``: the prompt
    first, as ``generate`` does, then each batch of released tokens, which are final (rolled-back text is
    never streamed), and ``end()`` when the call returns or raises."""

    def __init__(self, streamer, input_ids: torch.Tensor) -> None:
        if input_ids.shape[0] != 1:
            raise ConfigError(f"streamer: a transformers streamer takes one row, got {input_ids.shape[0]}; stream a "
                              "batch with on_tokens(row, tokens)")
        self.streamer = streamer
        streamer.put(input_ids.cpu())

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.streamer.put(torch.tensor(tokens, dtype=torch.long))

    def end(self) -> None:
        self.streamer.end()


def _inferred_mask(input_ids: torch.Tensor, pad: int | None, eos) -> torch.Tensor:
    """The attention mask ``generate`` infers when none is given: pad tokens masked where the pad id is in the
    batch and is not an EOS, else every token attended."""
    if pad is not None and int(pad) not in token_id_list(eos) and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


def generate_with_rollback(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    neuron_map=None,
    config: GuardConfig | dict | None = None,
    max_new_tokens: int | None = None,
    max_rollbacks: int = 2,
    precise_trigger: bool = True,
    model_name: str | None = None,
    on_tokens=None,
    holdback: int | None = None,
    repair: dict | None = None,
    rollback: RollbackConfig | dict | None = None,
    overlap: bool | None = None,
    **generate_kwargs,
) -> RollbackOutput:
    """Guarded ``model.generate`` with rollback; returns each row's generated tokens and report.
    ``on_tokens(row, tokens)`` streams final tokens, held back by ``holdback`` (module doc). ``repair``:
    ``RollbackConfig``'s ``repair_*`` settings, e.g. ``{"repair_multiplier": 0}`` to ban only the loop's
    next token. ``rollback``: any other ``RollbackConfig`` settings (they win over the arguments above).
    ``overlap``: None (default) re-decodes looping rows in place, inside the batch's one ``generate`` call,
    wherever that is possible (see ``_in_place_blocker``), else pass after pass; True requires it (ConfigError
    where it is not possible); False always runs pass after pass."""
    if overlap not in (None, True, False):
        raise ConfigError(f"overlap must be None, True or False, got {overlap!r}")
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, generate_kwargs)
    if max_new_tokens is None:
        max_new_tokens = _budget(model, input_ids.shape[1], generate_kwargs)
        _check_budget(max_new_tokens)
    else:
        generate_kwargs.pop("max_length", None)  # max_new_tokens takes precedence, as in generate
    max_new_tokens = int(max_new_tokens)  # a numpy integer, say
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
    streamer = generate_kwargs.pop("streamer", None)
    if on_tokens is not None and streamer is not None:
        raise ConfigError("pass on_tokens or streamer, not both: rollback streams through on_tokens")
    if streamer is not None:
        streamer = on_tokens = _Streamer(streamer, input_ids)
    try:
        # One guarded generation per model at a time (``model_lock``): the whole call, every pass, before
        # another thread's.
        with model_lock(model):
            return _generate_with_rollback(model, input_ids, attention_mask, neuron_map, cfg, policy,
                                           max_new_tokens, model_name, on_tokens, overlap, generate_kwargs)
    finally:
        if streamer is not None:
            streamer.end()


def _generate_with_rollback(model, input_ids, attention_mask, neuron_map, cfg, policy, max_new_tokens, model_name,
                            on_tokens, overlap, generate_kwargs) -> RollbackOutput:
    # A generation config the caller passes wins over the model's, as in ``generate``; the call's own
    # arguments win over both.
    gen = generate_kwargs.get("generation_config") or model.generation_config
    pad = generate_kwargs.pop("pad_token_id", None)
    if pad is None:
        pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = model.generation_config.pad_token_id
    if attention_mask is None:
        attention_mask = _inferred_mask(input_ids, pad, generate_kwargs.get("eos_token_id",
                                                                            getattr(gen, "eos_token_id", None)))
    if pad is None:
        pad = 0
    user_processors = generate_kwargs.pop("logits_processor", None) or []
    min_new = generate_kwargs.pop("min_new_tokens", None)
    if min_new is None and getattr(gen, "min_new_tokens", None):
        # Counted per row over its whole text by ``_MinNewTokens``; generate's own would mask the guard's ends.
        min_new, generate_kwargs["min_new_tokens"] = gen.min_new_tokens, 0
    eos = generate_kwargs.get("eos_token_id", getattr(gen, "eos_token_id", None))
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    states = [policy.start(max_new_tokens) for _ in prompts]

    given: list[list[int]] = [[] for _ in prompts]  # what ``on_tokens`` has had of each row

    def release(r: int, tokens: list[int]) -> None:
        if on_tokens is not None and tokens:
            given[r] += tokens
            try:
                on_tokens(r, tokens)
            except Exception as exc:
                raise _CallerError() from exc

    in_place = _in_place_blocker(model, gen, input_ids, attention_mask, generate_kwargs, min_new, policy) if overlap is not False else "off"
    if overlap is True and in_place is not None:
        raise ConfigError(f"overlap=True: passes cannot overlap here ({in_place}); use overlap=None or False")
    failed = False
    try:
        with Guard(model, neuron_map, policy.first, model_name=model_name, eos_token_id=eos) as g:
            g.record_metrics = False  # a row spans several passes: its merged report is recorded below, once
            g.observe_last = False  # each pass's tokens are read by the executors
            try:
                if in_place is None and g.eos:
                    deferred = _run_in_place(model, g, input_ids, attention_mask, prompts, states, policy, pad,
                                             user_processors, release, on_tokens is not None, max_new_tokens,
                                             generate_kwargs)
                    if deferred:
                        _run_passes(model, g, input_ids, attention_mask, prompts, states, pad, user_processors,
                                    min_new, release, on_tokens, generate_kwargs, only=deferred)
                else:
                    _run_passes(model, g, input_ids, attention_mask, prompts, states, pad, user_processors, min_new,
                                release, on_tokens, generate_kwargs)
            except _GuardFailed:
                failed = True
                for s in states:  # the rows' outputs will be unguarded ones: nothing of the guard's is theirs
                    s.report, s.rollbacks = SequenceReport(), 0
                g.runtime.fail_open(g.model_name, "rollback", [s.report for s in states], True,
                                    "this batch is generated unguarded")  # logs the traceback once, counts it
        if failed:
            complete = [s.final is not None and given[i] == s.final for i, s in enumerate(states)]
            finals = _unguarded(model, input_ids, attention_mask, prompts, given, complete, pad, user_processors,
                                min_new, max_new_tokens, g.eos, release, generate_kwargs)
            for s, tokens in zip(states, finals):
                s.final = tokens
    except _CallerError as exc:
        raise exc.__cause__ from None
    out = RollbackOutput([s.final or [] for s in states], [s.report or SequenceReport() for s in states],
                         [s.rollbacks for s in states], g.form)
    for tokens, report, rollbacks in zip(out.sequences, out.reports, out.rollbacks):
        kept = len(tokens) - bool(tokens and tokens[-1] in g.eos)  # the guard never observes an end token
        metrics.record_report(g.model_name, report)
        metrics.record_rollback(g.model_name, rollbacks, max(0, report.tokens_observed - kept))
    return out


def _unguarded(model, input_ids, attention_mask, prompts, given, complete, pad, user_processors, min_new,
               max_new_tokens, eos, release, generate_kwargs) -> list[list[int]]:
    """Each row's tokens generated with no guard, after a fault of the rollback machinery: what ``generate``
    gives for the call when no token was handed out yet (``given``), else the rows continued from what they
    handed out (streamed tokens are final); a row ``complete`` (ended, all of it handed out: at an EOS, its
    budget or a stop criterion) stays as it is."""
    from transformers import LogitsProcessorList

    eos = set(eos)
    kwargs = dict(generate_kwargs)
    stops = kwargs.get("stopping_criteria") or call_setting(model, kwargs, "stop_strings")
    stop_pad = pad if stops and pad not in eos else None  # rows the criteria end are padded from there on
    processors = list(user_processors)
    if not any(given):
        ids, mask, width, budget = input_ids, attention_mask, input_ids.shape[1], max_new_tokens
        if min_new:
            kwargs["min_new_tokens"] = min_new
    else:
        ids, mask = _left_padded([p + g for p, g in zip(prompts, given)], pad, input_ids, attention_mask)
        width = ids.shape[1]
        budget = max_new_tokens - min(len(g) for g in given)
        if min_new:  # counted over each row's whole text: the tokens it handed out count
            processors.append(_MinNewTokens(None, [SimpleNamespace(kept=g) for g in given], width, min_new,
                                            sorted(eos)))
    out = _generate(model, ids, mask, kwargs, max_new_tokens=max(1, budget), pad_token_id=pad,
                    logits_processor=LogitsProcessorList(processors))
    finals = []
    for i, g in enumerate(given):
        ended = complete[i] or (bool(g) and g[-1] in eos)
        new = [] if ended else _trim(out[i, width:].tolist()[: max_new_tokens - len(g)], eos, stop_pad)
        finals.append(g + new)
        release(i, new)
    return finals


def _run_passes(model, g: Guard, input_ids, attention_mask, prompts, states, pad, user_processors, min_new,
                release, on_tokens, generate_kwargs, only: list[int] | None = None) -> None:
    """Passes one after another: every row's first pass as one batch, then the rows that rolled back, as a
    smaller batch after a fresh prefill of prompt + kept text, and so on. ``only``: just these rows, which have
    rolled back already (their next pass is a re-decode)."""
    from transformers import LogitsProcessorList

    device = input_ids.device
    pending = list(range(len(prompts))) if only is None else list(only)
    first = only is None
    eos = set(g.eos)
    stops = generate_kwargs.get("stopping_criteria") or call_setting(model, generate_kwargs, "stop_strings")
    stop_pad = pad if stops and pad not in eos else None  # rows the criteria end are padded from there on
    while pending:
        ids, mask = _left_padded([prompts[r] + states[r].kept for r in pending], pad, input_ids, attention_mask)
        width = ids.shape[1]
        budgets = [states[r].budget for r in pending]
        step_max = max(budgets)
        kwargs = dict(generate_kwargs)
        processors = LogitsProcessorList(list(user_processors))
        if min_new:
            processors.append(_MinNewTokens(g, [states[r] for r in pending], width, min_new, g.eos))
        row_bans = {i: states[r].ban for i, r in enumerate(pending) if states[r].ban is not None}
        if row_bans:
            processors.append(_BanFirstToken(row_bans, width))
        if not first:
            processors.append(_Repair([states[r] for r in pending], width, eos))
        with _step():
            g.configure_rows([states[r].pass_config() for r in pending], histories=[states[r].kept for r in pending])
        streamer = None
        if on_tokens is not None:
            streamer = _Release([states[r] for r in pending], list(pending), eos, release, stop_pad)
        caps = [len(prompts[r]) + states[r].max_new_tokens - 1 for r in pending]
        with _prepare_wrapped(model, _position_cap(model, caps, device)):
            out = _generate(model, ids, mask, kwargs, max_new_tokens=step_max, pad_token_id=pad,
                            logits_processor=processors, streamer=streamer)
        still = []
        with _step():
            for i, r in enumerate(pending):
                new = _trim(out[i, width:].tolist()[: budgets[i]], eos, stop_pad)
                seq = g.runtime.seqs[i] if g.watching else None
                if seq is not None and new and new[-1] not in eos and len(seq.history) == len(states[r].kept) + len(new) - 1:
                    # generate() ends without a forward that would show the guard the row's last token.
                    seq.observe(new[-1])
                if states[r].end_pass(new, g.reports[i]):
                    still.append(r)
                else:
                    release(r, states[r].releasable())
        pending = still
        first = False


# ``generate``'s own processors that read a row's ``input_ids`` (or its length): in place they would see a rewound
# row's discarded tokens, which the passes one after another never show them. With these, the passes run.
_READS_INPUT_IDS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                    "sequence_bias": None, "exponential_decay_length_penalty": None, "min_length": 0,
                    "watermarking_config": None, "forced_eos_token_id": None, "begin_suppress_tokens": None}


def _in_place_blocker(model, gen, input_ids, attention_mask, generate_kwargs, min_new, policy) -> str | None:
    """Why the passes of this call cannot run in one ``generate`` (None: they can). ``gen``: the generation
    config the call runs with (the caller's, else the model's)."""
    if policy.max_rollbacks == 0:
        return "no rollback"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"

    def setting(key, default=None):
        return call_setting(model, generate_kwargs, key, default)

    for key in ("num_beams", "num_return_sequences"):
        if (setting(key, 1) or 1) > 1:
            return f"{key} > 1"
    for key, neutral in _READS_INPUT_IDS.items():
        if setting(key, neutral) not in (neutral, None, [], {}):
            return f"{key} set (generate's processor would see a rewound row's discarded tokens)"
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        return "a batch that is not left-padded"
    for key in ("stopping_criteria", "stop_strings", "assistant_model", "past_key_values", "max_length",
                "cache_implementation", "prompt_lookup_num_tokens", "streamer"):
        if generate_kwargs.get(key) is not None:
            return f"{key} given"
    if setting("cache_implementation") is not None:
        return "a preset cache implementation"
    if min_new is not None:
        return "min_new_tokens given"
    if bool(attention_mask.bool().all()):
        # With no padding, attention runs without a mask (transformers drops an all-ones mask): there is no
        # mask to hide a rewound row's discarded tokens in, and giving the batch one would change the kernel
        # every row runs. A batch of one gains nothing from overlapping anyway.
        return "a batch without padding"
    return None


def _run_in_place(model, g: Guard, input_ids, attention_mask, prompts, states, policy, pad, user_processors,
                  release, streaming, max_new_tokens, generate_kwargs) -> list[int]:
    """Every pass of every row inside one ``generate`` call (``_InPlace``): a looping row is re-decoded while
    the other rows go on, from the KV cache of its kept text, with no new prefill. Returns the rows deferred
    to passes one after another (a re-decode that could outgrow a sliding window)."""
    from transformers import LogitsProcessorList

    step = _InPlace(g, states, prompts, input_ids.shape[1], g.eos, release, streaming, _column_window(model))
    with _step():
        g.reserve([policy.pass_config(a) for a in range(1, policy.max_rollbacks + 1)])
        g.configure_rows([s.pass_config() for s in states], histories=None)
    # Each pass decodes at most its budget plus one step (the re-fed token, or the EOS that ends it).
    limit = (policy.max_rollbacks + 1) * (max_new_tokens + 2)
    processors = LogitsProcessorList([*user_processors, step])
    caps = [len(p) + max_new_tokens - 1 for p in prompts]
    try:
        with _prepare_wrapped(model, step.prepare, _position_cap(model, caps, input_ids.device)):
            _generate(model, input_ids, attention_mask, generate_kwargs, max_new_tokens=limit, pad_token_id=pad,
                      logits_processor=processors)
    finally:
        g.reserve([])
    step.close()
    return step.deferred


@contextmanager
def _prepare_wrapped(model, *wrappers):
    """``model.prepare_inputs_for_generation`` wrapped by each of ``wrappers`` (None: skipped) for the block, for
    calls of this thread (another thread's ``generate`` of the model, unguarded, keeps the model's own)."""
    wrappers = [w for w in wrappers if w is not None]
    if not wrappers:
        yield
        return
    original = model.__dict__.get("prepare_inputs_for_generation")
    base = prepare = model.prepare_inputs_for_generation
    for wrap in wrappers:
        prepare = wrap(prepare)
    owner = threading.get_ident()

    def prepare_inputs(*args, **kwargs):
        return (prepare if threading.get_ident() == owner else base)(*args, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs
    try:
        yield
    finally:
        if original is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = original


# Learned absolute position tables (gpt2, gpt_neo, gpt_bigcode: ``wpe``; opt, biogpt: ``embed_positions``).
_POSITION_TABLES = {"wpe", "embed_positions", "position_embeddings"}


def _position_limit(model) -> int | None:
    """How many positions a model with a learned absolute position table can take (None: it has no such
    table; rotary and ALiBi models take any position)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)
    if not limit:
        return None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            return int(limit)
    return None


def _position_cap(model, caps: list[int], device):
    """On a model with a learned position table, a wrapper of ``prepare_inputs_for_generation`` that holds each
    row's position ids at or below ``caps[row]``: the last position the row's own text can take (prompt +
    max_new_tokens - 1). A batch under rollback runs longer than an unguarded one (a rewound row decodes on
    while the other rows have ended; a re-decode pass decodes to its longest row's budget), and the rows that
    have ended, or passed their budget, would run past the table (an index error on CPU, a device assert on
    CUDA). Their tokens are discarded; no token a row keeps is decoded at a capped position. None where the
    model takes any position."""
    if _position_limit(model) is None:
        return None
    cap = torch.tensor(caps, dtype=torch.long, device=device)[:, None]

    def wrap(original):
        def prepare_inputs(*args, **kwargs):
            inputs = original(*args, **kwargs)
            pos = inputs.get("position_ids") if isinstance(inputs, dict) else None
            if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[0] == cap.shape[0]:
                inputs["position_ids"] = torch.minimum(pos, cap.to(pos.dtype))
            return inputs

        return prepare_inputs

    return wrap


def _column_window(model) -> int | None:
    """The smallest attention span that counts cache columns rather than positions (a sliding window or
    attention chunks) in any layer of ``model``; None when every layer attends to the whole cache."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    spans = []
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window and getattr(text, "use_sliding_window", True) is not False:
        if types is None or any("sliding" in str(t) for t in types):
            spans.append(int(window))
    chunk = getattr(text, "attention_chunk_size", None)
    if chunk and (types is None or any("chunk" in str(t) for t in types)):
        spans.append(int(chunk))
    return min(spans) if spans else None
