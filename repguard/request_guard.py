"""``RequestGuard``: rollback for engines that stream tokens, at the request level.

The engine is a black box that takes a prompt and streams token ids (vLLM's ``LLM`` / ``AsyncLLM``, an
OpenAI-compatible server). The guard watches one request's stream with the core ``SequenceGuard`` and
applies the core ``RollbackPolicy``; every repair is a *resubmission* of the prompt plus the kept tokens:

* a confirmed loop: the request is cancelled and resubmitted from the onset; the loop's next token is
  banned for the first new token by a one-token submission with a logit bias, then decoding continues;
* the re-decode repair (``RollbackState.repair_penalties``: a penalty on each token that would extend a
  repeat): the guard waits for the engine's pick; when the engine picked a penalised token, that position
  is decoded again by a one-token step with the penalties as its bias. Under greedy decoding this is
  exactly the per-token penalty (a token the engine did not pick stays the argmax once others are
  penalised); under sampling the penalised pick is re-drawn from the penalised distribution;
* an escalation penalty of the last pass (the token that would extend the loop): the same one-token
  step with that penalty as its bias;
* the neuron step, where the engine can run it, is a flag on the submission (``neurons_off``).

An engine that applies the repair itself (``engine_repair=True``: vLLM with repguard's logits processor)
gets it with each re-decode submission (``Submission.repair``: the penalty and the ban of the pass's first
token); the guard then steps in only for an escalation penalty beyond the repair's, so a rollback costs
one resubmission instead of one per penalised pick, with the same tokens under greedy decoding.

The guard never takes generation down: an exception inside it (the detector, the policy) is counted
(``repguard_guard_errors_total``), logged once for the request, and the request goes on unguarded: the
submission running then is neither cancelled nor resubmitted, every token it streams is passed through and
the request ends with the engine's own finish reason (``RequestGuard.broken``).

It does no I/O (a sans-I/O state machine): an adapter asks ``next_submission()``, sends it, feeds the
tokens it streams back to ``feed()``, cancels it when ``feed`` says so, and reports an engine-side end
with ``end()``. A request whose first submission never loops is never cancelled or resubmitted, so its
tokens are exactly the engine's. Prefix caching makes a resubmission cheap (the prompt is re-used), except
where it runs with the mapped neurons off: that one is salted apart (``submission_salt``), so it prefills again.

Seeded sampling stays reproducible: submission 0 is the caller's request with its own seed; submission
``i`` uses ``derive_seed(seed, i)``.

>>> from repguard.rollback import RollbackPolicy
>>> g = RequestGuard(RollbackPolicy(), max_new_tokens=40)
>>> sub = g.next_submission()
>>> loop = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
>>> cancel = g.feed(sub, [1, 2] + loop * 3)          # the third copy confirms the loop
>>> cancel, g.rollbacks
(True, 1)
>>> nxt = g.next_submission()                        # resubmitted from the onset, its next token banned
>>> len(nxt.generated), nxt.max_tokens, nxt.bias
(14, 1, {5: -inf})
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from . import metrics
from .config import GuardConfig
from .errors import ConfigError
from .policy import SequenceGuard, SequenceReport
from .repair import BAN, EngineRepair
from .rollback import RollbackPolicy, RollbackState, merge_reports

_SEED_MOD = 2**63 - 1
# The request field (vLLM extra_args / vllm_xargs) that marks a re-decode submission of a request the request-level
# guard counts in its own metrics: an engine-side guard that watches it (the neuron step) does not count it again.
# Not "repguard_*": a plugin of an earlier repguard refuses unknown repguard_* settings, and ignores this.
RESUBMISSION_KEY = "repguard-resubmission"
# Prefix-cache salt of a submission that runs with the mapped neurons off: its KV blocks differ from an unguarded
# run's, so no other request may reuse them (an engine's prefix cache keys blocks by tokens and salt only).
NEURONS_OFF_SALT = "repguard-neurons-off"
MAX_SALT_CHARS = 128  # the longest cache_salt vLLM's server accepts
# The most logit_bias entries of one request: vLLM's model runner V2 (its GPU default) refuses a request with more
# inside its worker, which fails the engine.
MAX_BIAS_TOKENS = 1024
CONTEXT_TOKENS = 5  # prompt tokens decoded before the output's, as an engine's incremental detokenizer does

log = logging.getLogger("repguard")


def submission_salt(salt: str | None, sub: "Submission") -> str | None:
    """The prefix-cache salt of ``sub`` for a request salted ``salt`` (the caller's tenant isolation is kept on
    every resubmission; a neurons-off submission is salted apart from every unguarded request)."""
    if not sub.neurons_off:
        return salt
    if not salt:
        return NEURONS_OFF_SALT
    if len(salt) + len(NEURONS_OFF_SALT) + 1 > MAX_SALT_CHARS:  # vLLM's limit: the caller's salt, hashed
        salt = hashlib.sha256(salt.encode()).hexdigest()
    return f"{salt}|{NEURONS_OFF_SALT}"


def neurons_off_config(config: GuardConfig) -> str:
    """The engine-side settings (vLLM ``repguard_config``) of a submission that runs with the mapped neurons off
    throughout: the request's own config, always on, with no escalation or stop of its own (the request-level
    guard decides those)."""
    cfg = config.replace(always_on=True, escalate=False, stop=False)
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "preset"})


def carried_bias(generated: Sequence[int], presence: float | None, frequency: float | None) -> dict[int, float]:
    """The logit bias that carries an engine's presence and frequency penalties over the tokens a resubmission
    sends as prompt (``Submission.generated``). An engine counts those penalties over its request's output only,
    so after a rollback the kept text went unpenalised. Frequency is carried exactly where the request's
    repetition penalty is 1 (an engine scales a biased logit by it); a kept token that the resubmission outputs
    again gets the presence penalty twice (the engine's own and this one).

    >>> carried_bias([5, 6, 5], presence=0.5, frequency=0.25)
    {5: -1.0, 6: -0.75}
    >>> carried_bias([5, 6, 5], presence=0, frequency=None)
    {}
    """
    p, f = float(presence or 0.0), float(frequency or 0.0)
    if not generated or (p == 0.0 and f == 0.0):
        return {}
    return {t: -(f * n + p) for t, n in Counter(generated).items()}


def add_bias(*parts: dict[int, float] | None) -> dict[int, float]:
    """The sum of logit biases (``{token: bias}``; None: none).

    >>> add_bias({5: 1.0}, None, {5: -3.0, 7: float("-inf")})
    {5: -2.0, 7: -inf}
    """
    out: dict[int, float] = {}
    for part in parts:
        for token, amount in (part or {}).items():
            out[token] = out.get(token, 0.0) + amount
    return out


def submission_bias(own: dict[int, float] | None, sub: "Submission", presence: float | None,
                    frequency: float | None) -> dict[int, float] | None:
    """The logit bias of ``sub`` for a request with the caller's own bias ``own`` and penalties: ``own``, the kept
    tokens' carried penalties (``carried_bias``) and the guard's step bias (a ban, a repair), summed, in at most
    ``MAX_BIAS_TOKENS`` entries: the caller's and the step's always, then the carried ones with the largest
    penalties (a kept text with more distinct tokens than there is room for carries its most repeated ones). A
    step that does not fit beside the caller's bias raises ``BiasLimitError``: the adapter treats it as a refused
    submission (``RequestGuard.refused``), as the engine would refuse it.

    >>> from repguard.request_guard import Submission
    >>> sub = Submission(index=1, attempt=1, generated=(5, 6, 5), max_tokens=1, bias={9: float("-inf")},
    ...                  neurons_off=False)
    >>> submission_bias({6: 2.0}, sub, presence=0.0, frequency=0.5)
    {6: 1.5, 5: -1.0, 9: -inf}
    """
    fixed = set(own or ())
    carried = carried_bias(sub.generated, presence, frequency)
    if sub.plain:  # the rest of a request whose guard failed: the caller's bias and penalties only
        return add_bias(own, _within(carried, fixed, MAX_BIAS_TOKENS)) or None
    step = sub.bias or {}
    fixed |= set(step)
    if len(fixed) > MAX_BIAS_TOKENS:  # the guard's step does not fit beside the caller's bias
        raise BiasLimitError(f"logit_bias: the caller's {len(own or ())} entries leave no room for the guard's "
                             f"{len(step)} (an engine takes at most {MAX_BIAS_TOKENS})")
    return add_bias(own, _within(carried, fixed, MAX_BIAS_TOKENS), step) or None


class BiasLimitError(ValueError):
    """A submission's logit bias would exceed ``MAX_BIAS_TOKENS`` (``submission_bias``)."""


def _within(bias: dict[int, float], fixed: set[int], limit: int) -> dict[int, float]:
    """``bias`` on the tokens of ``fixed`` plus its largest other entries that ``limit`` leaves room for."""
    extra = [t for t in bias if t not in fixed]
    room = max(0, limit - len(fixed))
    if len(extra) <= room:
        return bias
    kept = set(sorted(extra, key=lambda t: (-abs(bias[t]), t))[:room])
    return {t: a for t, a in bias.items() if t in fixed or t in kept}


def derive_seed(seed: int | None, index: int) -> int | None:
    """Seed of submission ``index`` of a request seeded with ``seed`` (0: the request's own seed)."""
    if seed is None or index == 0:
        return seed
    return (int(seed) * 1_000_003 + index * 7_919) % _SEED_MOD


# -- the output's text, as the engine would give it (one place for every request-level adapter) ----------
def text_ids(tokens: Sequence[int], finish_reason: str | None, stop_reason: str | int | None,
             include_stop: bool = False) -> list[int]:
    """The ids whose text is a finished output's: the EOS or stop token that ended it is not text (a stop
    token is, with ``include_stop_str_in_output``), as vLLM ends its text."""
    ids = list(tokens)
    if finish_reason == "stop" and ids and not isinstance(stop_reason, str):
        if not (include_stop and stop_reason is not None):
            ids = ids[:-1]
    return ids


def end_text(text: str, finish_reason: str | None, stop_reason: str | int | None, include_stop: bool = False,
             final: bool = True, stops: Sequence[str] = (), after: int = 0) -> str:
    """``text`` of the output's ids (``text_ids``) as the engine hands it out. ``final``: a stop string that
    ended it is cut off (kept with ``include_stop``): its first occurrence that ends past character ``after``
    (the text of the request's ``min_tokens``, where the engine looks for none: ``min_tokens_chars``). Not
    ``final`` (streaming): an incomplete character, and the possible start of a stop string in ``stops``, wait
    for the next tokens. Either way, an incomplete character at the end is not text: vLLM's detokenizer never
    emits one, even when the output ends there."""
    if final:
        if finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason:
            at = text.find(stop_reason, max(0, after - len(stop_reason) + 1))
            if at >= 0:
                text = text[: at + (len(stop_reason) if include_stop else 0)]
        return text.rstrip("\ufffd")
    text = text.rstrip("\ufffd")
    hold = max((len(s) for s in stops), default=1) - 1
    return text[: max(0, len(text) - hold)] if hold else text


def find_stop(text: str, stops: Sequence[str], after: int = 0) -> str | None:
    """The stop string whose occurrence in ``text`` ends first (None: none), as an engine that checks the text
    token by token finds it; only occurrences that end past character ``after`` count (``min_tokens_chars``:
    the engine looks for no stop string before ``min_tokens`` tokens)."""
    found = []
    for order, s in enumerate(stops):
        at = text.find(s, max(0, after - len(s) + 1)) if s else -1
        if at >= 0:
            found.append((at + len(s), order, s))
    return min(found)[2] if found else None


def min_tokens_chars(decode: Callable[[list[int]], str], prompt_ids: Sequence[int] | None, tokens: Sequence[int],
                     min_tokens: int | None) -> int:
    """Characters of the output's text that its first ``min_tokens`` tokens take (0: none): an engine looks
    for stop strings only in the text of later tokens."""
    if not min_tokens or not tokens:
        return 0
    return len(decode_output(decode, prompt_ids, list(tokens[:min_tokens])).rstrip("\ufffd"))


def decode_context(prompt_ids: Sequence[int] | None) -> list[int]:
    """The prompt's last tokens, decoded before the output's so that its first token reads as it does after the
    prompt (SentencePiece decoders drop a leading space at the start of a text): ``after_context``."""
    return list(prompt_ids or [])[-CONTEXT_TOKENS:]


def after_context(full: str, head: str) -> str | None:
    """The output's text from ``full`` (the text of context + output ids) and ``head`` (the context's text);
    None when the context's text is no clean prefix of it (decode the output's ids alone then)."""
    if head.endswith("\ufffd") or not full.startswith(head):
        return None
    return full[len(head):]


def decode_output(decode: Callable[[list[int]], str], prompt_ids: Sequence[int] | None, ids: Sequence[int]) -> str:
    """The text of output ``ids`` after the prompt, with a synchronous ``decode`` (``after_context``)."""
    ids = list(ids)
    if not ids:
        return ""
    context = decode_context(prompt_ids)
    if context:
        text = after_context(decode(context + ids), decode(context))
        if text is not None:
            return text
    return decode(ids)


@dataclass(frozen=True)
class Submission:
    """One engine request: the caller's prompt + ``generated``, for at most ``max_tokens`` new tokens."""

    index: int  # 0: the caller's own request
    attempt: int  # rollback pass it belongs to
    generated: tuple[int, ...]  # tokens already generated, appended to the prompt
    max_tokens: int
    bias: dict[int, float] | None  # logit bias for this (one-token) step; -inf bans
    neurons_off: bool  # the pass wants the mapped neurons off throughout (where the engine runs them)
    repair: EngineRepair | None = None  # engine_repair: what the engine applies at every step (skip 0, see below)
    plain: bool = False  # the rest of a request whose guard failed: nothing of the guard's own (no ban, no repair)

    def engine_repair(self, prompt_len: int) -> EngineRepair | None:
        """``repair`` for an engine whose request is the caller's ``prompt_len`` prompt tokens + ``generated``."""
        return None if self.repair is None else replace(self.repair, skip=prompt_len)


def check_request_config(config: GuardConfig) -> None:
    """Settings that need the neuron monitor cannot run on a token stream: refuse them by name."""
    if config.monitor_gate is not None:
        raise ConfigError("monitor_gate: needs the neuron monitor, which a request-level guard does not have; "
                          "leave it unset")
    if config.watch_prompt:
        raise ConfigError("watch_prompt: not supported by the request-level guard (it sees generated tokens only)")


class RequestGuard:
    """One request under rollback, driven by token streams (module doc)."""

    def __init__(self, policy: RollbackPolicy, max_new_tokens: int, eos_ids: Iterable[int] = (),
                 neuron_step: bool = False, greedy: bool = False, engine_repair: bool = False,
                 model_name: str = "model") -> None:
        """``greedy``: the engine decodes greedily, so a penalty on a token the engine did not pick anyway
        would change nothing; the guard then waits for the next token and resubmits only when the engine
        picked the penalised one (exact under greedy decoding, and far fewer resubmissions). Otherwise the
        last pass's escalation penalty is applied by a one-token step, exactly as the per-token policy would,
        and a re-decode's repair penalties when a draw lands on a penalised token (that position is drawn again
        with them): a weaker repair than penalties in every step's logits (a token x outside the penalised set S
        comes with P(x) + P(S) P_pen(x), not P_pen(x)); an engine that runs the repair itself
        (``engine_repair``) applies it exactly.
        ``engine_repair``: the engine applies each re-decode submission's ``repair`` itself (module doc).
        ``model_name``: the ``model`` label of the guard-errors counter."""
        check_request_config(policy.config)
        if not neuron_step:  # no neuron step here: passes must not claim (or count) switched-off neurons
            policy = policy.token_level()
        self.policy = policy
        self.model_name = model_name
        self.broken = False  # an exception inside the guard: the request goes on unguarded (module doc)
        self._out: list[int] = []  # broken: the request's tokens, passed through
        self._broken_report: SequenceReport | None = None
        self._last: Submission | None = None  # the last submission handed out
        self._streamed: list[int] = []  # the tokens of ``_last`` taken (up to a cancel)
        self._chunk_start = 0  # how many of them came before the newest chunk fed (an engine may send several)
        self.state: RollbackState = policy.start(max_new_tokens)
        self.eos = frozenset(int(e) for e in eos_ids)
        self.neuron_step = neuron_step
        self.greedy = greedy
        self.engine_repair = engine_repair
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.submissions = 0
        self.decoded = 0  # tokens the engine decoded for this request, discarded ones included
        self._current: Submission | None = None
        self._bias: dict[int, float] | None = None
        self._pending: dict[int, float] | None = None  # penalties for the next streamed token, applied if picked
        self._ban: int | None = None  # engine_repair: the pass's first token ban, sent with its first submission
        self._pass: list[int] = []
        self._seq: SequenceGuard | None = None
        self._new_pass()

    # -- what adapters read --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        """The request's final tokens (while running: the tokens decided so far, not yet final)."""
        if self.broken:
            return list(self._out)
        if self.state.final is not None:
            return list(self.state.final)
        return self.state.kept + self._pass

    @property
    def report(self) -> SequenceReport:
        if self._broken_report is not None:
            return self._broken_report
        if self.state.report is not None and self.done:
            return self.state.report
        return merge_reports(self.state.report, self._seq.report) if self._seq is not None else SequenceReport()

    @property
    def rollbacks(self) -> int:
        return self.state.rollbacks

    @property
    def form(self) -> str:
        """Which repair ran: token-level only, or with the neuron step."""
        return "tokens+neurons" if self.neuron_step else "tokens"

    @property
    def pending_penalties(self) -> dict[int, float]:
        """{token: penalty} the guard applies to the next token if the engine picks one of them (a copy; empty
        when none). Under greedy decoding an engine that adds them to its next logits itself picks what the
        re-decode would, and saves it."""
        return {} if self.broken else dict(self._pending or {})

    def take_released(self) -> list[int]:
        """Tokens that became final since the last call: while running, those older than the hold-back
        (streaming); once the request is done, all the rest (a response that is not streamed takes them
        only then, so that no hold-back limits its rollbacks)."""
        if not self.broken:
            try:
                return self.state.releasable(self._pass, finished=False)
            except Exception:
                self._fail()
        start, self.state.released = self.state.released, len(self._out)
        return self._out[start:]

    def limit_context(self, tokens_left: int | None) -> None:
        """The engine's context holds ``tokens_left`` generated tokens after this request's prompt
        (``max_model_len`` - the prompt's length; None: unknown). The budget never goes past it: a resubmission
        (prompt + generated) then always fits the context, which an engine refuses to fill, and an output that
        fills it ends with "length", as the engine ends it. Call it once the prompt's length is known."""
        if tokens_left is not None and tokens_left >= 1:
            self.state.max_new_tokens = min(self.state.max_new_tokens, int(tokens_left))

    def stop_may_straddle(self, stops: Sequence[str]) -> bool:
        """Can a stop string begin in the tokens a resubmission continues and end in its new ones? The engine
        searches only its own new text, so the adapter checks the text of ``tokens`` (and ends the request
        with ``finish("stop", stop)``) while this is True: the first few tokens of each resubmission. A token
        holds at least one byte of text (byte-fallback tokens one byte of a character), so a stop string's
        UTF-8 length bounds the tokens its end can take."""
        longest = max((len(s.encode("utf-8", "surrogatepass")) for s in stops), default=0)
        # Also once the request reached its length: a stop string its last token completes ends it ("stop").
        return ((not self.done or self.finish_reason == "length") and self._last is not None and self._last.index > 0
                and 0 < len(self._streamed) and self._chunk_start < longest)

    def finish(self, finish_reason: str, stop_reason: str | int | None = None) -> None:
        """The adapter ends the request here, with the tokens decided so far (a stop string it found in
        their text); the submission running, if any, is over. Once the request is done, only a stop found on
        the token that ended it at its length changes it: that request ends with "stop", as an engine, which
        checks stop strings before the length, ends it."""
        if self.done:
            if self.finish_reason == "length" and finish_reason == "stop":
                self.finish_reason, self.stop_reason = "stop", stop_reason
            return
        self.stop_reason = stop_reason
        if self.broken:
            return self._finish_broken(finish_reason)
        try:
            self._finish(finish_reason)
        except Exception:
            self._fail()
            self._finish_broken(finish_reason)

    # -- the protocol -----------------------------------------------------------------------------------
    def next_submission(self) -> Submission | None:
        """The request to send now, or None when the request is finished."""
        if self.done:
            return None
        if self._current is not None:
            return self._current
        if not self.broken:
            try:
                sub = self._next_submission()
            except Exception:
                self._fail()
            else:
                self._handed(sub)
                return sub
        # Unguarded: the rest of the budget, after the tokens so far (a one-token step in flight when the
        # guard broke has ended).
        budget = self.state.max_new_tokens - len(self._out)
        if budget <= 0:
            self._finish_broken("length")
            return None
        self._current = Submission(index=self.submissions, attempt=self.state.attempt, generated=tuple(self._out),
                                   max_tokens=budget, bias=None, neurons_off=False, plain=True)
        self.submissions += 1
        self._handed(self._current)
        return self._current

    def _handed(self, sub: Submission) -> None:
        self._last, self._streamed, self._chunk_start = sub, [], 0

    def _next_submission(self) -> Submission:
        cfg = self.state.pass_config()
        generated = tuple(self.state.kept + self._pass)
        budget = self.state.max_new_tokens - len(generated)
        bias = self._bias
        repair = None
        penalty = self.policy.repair if self.state.attempt > 0 else None
        if self.engine_repair and (penalty is not None or self._ban is not None):
            repair = EngineRepair(0, penalty, self._ban)
        self._current = Submission(
            index=self.submissions, attempt=self.state.attempt, generated=generated,
            max_tokens=1 if bias else budget, bias=dict(bias) if bias else None,
            neurons_off=self.neuron_step and cfg.always_on and cfg.deactivate, repair=repair,
        )
        self.submissions += 1
        return self._current

    def feed(self, sub: Submission, tokens: Iterable[int], penalised: bool = False) -> bool:
        """New tokens of ``sub``. Returns True when the adapter must cancel ``sub`` (the guard has moved on:
        a rollback, a one-token step, or the end of the request); later tokens of it are ignored.
        ``penalised``: the engine picked the first of ``tokens`` with ``pending_penalties`` added to its
        logits (an engine that applies them at every step of a greedy request): a pick among them is the
        re-decode's own, taken as it is rather than decoded again by a one-token step."""
        tokens = [int(t) for t in tokens]
        self.decoded += len(tokens)
        if sub is not self._current:
            return True
        self._chunk_start = len(self._streamed)
        if self.broken:
            return self._pass_through(tokens)
        taken = len(self._streamed)
        try:
            return self._feed(sub, tokens, penalised)
        except Exception:
            rest = tokens[len(self._streamed) - taken:]
            self._fail(sub)
            return self._pass_through(rest)

    def _feed(self, sub: Submission, tokens: list[int], penalised: bool = False) -> bool:
        seq = self._seq
        state = self.state
        for i, token in enumerate(tokens):
            self._streamed.append(token)
            self._bias = self._ban = None
            pending, self._pending = self._pending, None
            if pending is not None and token in pending and not (penalised and i == 0):
                # The engine picked a token the policy penalises: decode this position again with the penalties.
                self._bias = {t: -amount for t, amount in pending.items()}
                self._current = None
                return True
            self._pass.append(token)
            if token in self.eos:
                self._finish("stop")
                return True
            seq.observe(token)
            if seq.stopped:
                if state.end_pass(self._pass, seq.report):
                    self._new_pass()
                else:
                    self.finish_reason = "repetition"
                    self._current = None
                return True
            if len(state.kept) + len(self._pass) >= state.max_new_tokens:
                self._finish("length")
                return True
            penalty = seq.penalty
            if self.engine_repair:
                # The engine applies the repair itself; what is left is an escalation penalty beyond it.
                pending = {}
                if penalty is not None:
                    applied = self._repair().get(penalty[0], 0.0)
                    if penalty[1] > applied:
                        pending[penalty[0]] = penalty[1] - applied
                if pending and not self.greedy:
                    self._bias = {t: -a for t, a in pending.items()}
                    self._current = None
                    return True
            elif penalty is not None and not self.greedy:
                # The last pass's escalation penalty, exactly as the per-token policy applies it.
                token_id, amount = penalty
                self._bias = {t: -a for t, a in self._repair().items()}
                self._bias[token_id] = min(self._bias.get(token_id, 0.0), -amount)
                self._current = None
                return True
            else:
                pending = self._repair()
                if penalty is not None:
                    pending[penalty[0]] = max(pending.get(penalty[0], 0.0), penalty[1])
            if pending:
                # It only matters if the engine picks one of these tokens: wait for the next one.
                self._pending = pending
                if sub.max_tokens == 1:
                    self._current = None
                    return True
                continue
            if sub.max_tokens == 1:  # a one-token step is over: continue with a full submission
                self._current = None
                return True
        return False

    def feed_output(self, sub: Submission, tokens: Iterable[int], finish_reason: str | None = None,
                    stop_reason: str | int | None = None) -> bool:
        """One engine output (a streamed chunk) of ``sub``: its new tokens and, on its last output, the
        engine's finish reason. An engine-side "stop" (EOS, a stop token or string) is told with the token
        that ended it, which is kept but not watched. Returns True when ``sub`` is over for the guard."""
        tokens = list(tokens)
        if finish_reason is None:
            return self.feed(sub, tokens)
        if finish_reason == "stop" and tokens:
            if not self.feed(sub, tokens[:-1]):
                if isinstance(stop_reason, str) and tokens[-1] in self.pending_penalties and self.feed(sub, tokens[-1:]):
                    return True  # a pick the policy penalises completed a stop string: that position is decoded again
                self.end(sub, "stop", stop_reason, tail=tokens[-1:])
            return True
        if not self.feed(sub, tokens):
            self.end(sub, finish_reason, stop_reason)
        return True

    def end(self, sub: Submission, finish_reason: str | None, stop_reason: str | int | None = None,
            tail: Iterable[int] = ()) -> None:
        """The engine ended ``sub`` by itself (EOS, its own stop strings or tokens, max length, abort, error).
        ``tail``: the tokens that ended it (an EOS or stop token), kept in the output but not watched."""
        if sub is not self._current or self.done:
            return
        tail = [int(t) for t in tail]
        if self.broken:
            self._out.extend(tail)
        else:
            self._streamed.extend(tail)
            self._pass.extend(tail)
        if sub.max_tokens == 1 and finish_reason == "length" and self._streamed:
            self._current = None  # the step's one token was fed: continue
            return
        self.stop_reason = stop_reason
        if self.broken:
            return self._finish_broken(finish_reason or "stop")
        try:
            self._finish(finish_reason or "stop")
        except Exception:
            self._fail(sub)
            self._finish_broken(finish_reason or "stop")

    # -- failing open -----------------------------------------------------------------------------------
    def refused(self, sub: Submission) -> bool:
        """The engine refused ``sub`` before it ran (a setting of the guard's that it does not take): fail open.
        Counted and logged (called in the adapter's ``except``); ``next_submission`` then gives the rest of the
        request unguarded, with nothing of the guard's own (``Submission.plain``). False when the refusal is not
        the guard's to absorb (the caller's own request, or that plain rest): the adapter raises it then."""
        if sub.index == 0 or sub.plain or sub is not self._current or self.broken:
            return False
        self._fail(sub, where="rollback", refusal=True)
        if not self.done:
            self._current = None  # never ran: the plain rest goes in its place
        return True

    def _fail(self, sub: Submission | None = None, where: str = "observe", refusal: bool = False) -> None:
        """An exception inside the guard (called in its ``except``): count it, log it, go on unguarded with
        the tokens the engine produced so far (``sub``: the submission still running, now passed through).
        ``refusal``: the engine refused a resubmission (a request's own settings can cause it): one line, no
        traceback."""
        if self.broken:
            return
        self.broken = True
        metrics.record_error(self.model_name, where)
        if refusal:  # the traceback at DEBUG: an error of the adapter's own is told apart there
            log.warning("repguard: a rollback's resubmission was refused (%s); this request continues unguarded",
                        sys.exc_info()[1])
            log.debug("repguard: the refused resubmission", exc_info=True)
        else:
            log.exception("repguard: the request guard failed; this request continues unguarded")
        try:
            report = self.report
        except Exception:
            report = SequenceReport()
        report.errors += 1
        self._broken_report = report
        running = sub if sub is not None else self._current
        last = running if running is not None else self._last
        self._out = (list(last.generated) + self._streamed) if last is not None else []
        self._current, self._bias, self._pending = running, None, None
        if self._out and self._out[-1] in self.eos:
            self._finish_broken("stop")
        elif running is not None and len(self._out) >= self.state.max_new_tokens:
            self._finish_broken("length")

    def _pass_through(self, tokens: list[int]) -> bool:
        """Broken: the tokens of the submission running, unwatched; it ends only as the engine ends it."""
        for token in tokens:
            if self.done:
                return True
            self._out.append(token)
            self._streamed.append(token)  # a stop string across the submission's start is still found
            if token in self.eos:
                self._finish_broken("stop")
            elif len(self._out) >= self.state.max_new_tokens:
                self._finish_broken("length")
        return self.done

    def _finish_broken(self, reason: str) -> None:
        self.finish_reason = reason
        self._current = None

    # -- internals ---------------------------------------------------------------------------------------
    def _repair(self) -> dict[int, float]:
        return self.state.repair_penalties(self._pass)

    def _new_pass(self) -> None:
        self._pending = None
        self._pass = []
        self._current = None
        state = self.state
        if self.engine_repair:  # the engine bans the pass's first token and applies the repair itself
            self._ban, self._bias = state.ban, None
        else:
            bias = {t: -a for t, a in self._repair().items()}  # a re-decode's repair, from its first token on
            if state.ban is not None:
                bias[state.ban] = -BAN
            self._bias = bias or None
        state.ban = None
        self._seq = SequenceGuard(state.pass_config(), history=state.kept)

    def _finish(self, reason: str) -> None:
        self.state.end_pass(self._pass, self._seq.report, final=True)
        self.finish_reason = "repetition" if self._seq.report.finish_reason == "repetition" else reason
        self._current = None


__all__ = ["BiasLimitError", "EngineRepair", "MAX_BIAS_TOKENS", "RequestGuard", "Submission", "add_bias",
           "after_context", "carried_bias", "check_request_config", "decode_context", "decode_output", "derive_seed",
           "end_text", "find_stop", "min_tokens_chars", "neurons_off_config", "submission_bias", "submission_salt", "text_ids"]
