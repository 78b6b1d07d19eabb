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

It does no I/O (a sans-I/O state machine): an adapter asks ``next_submission()``, sends it, feeds the
tokens it streams back to ``feed()``, cancels it when ``feed`` says so, and reports an engine-side end
with ``end()``. A request whose first submission never loops is never cancelled or resubmitted, so its
tokens are exactly the engine's. Prefix caching makes a resubmission cheap (the prompt is re-used).

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

from dataclasses import dataclass, replace
from typing import Iterable

from .config import GuardConfig
from .errors import ConfigError
from .policy import SequenceGuard, SequenceReport
from .repair import BAN, EngineRepair
from .rollback import RollbackPolicy, RollbackState, merge_reports

_SEED_MOD = 2**63 - 1


def derive_seed(seed: int | None, index: int) -> int | None:
    """Seed of submission ``index`` of a request seeded with ``seed`` (0: the request's own seed)."""
    if seed is None or index == 0:
        return seed
    return (int(seed) * 1_000_003 + index * 7_919) % _SEED_MOD


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
                 neuron_step: bool = False, greedy: bool = False, engine_repair: bool = False) -> None:
        """``greedy``: the engine decodes greedily, so a penalty on a token the engine did not pick anyway
        would change nothing; the guard then waits for the next token and resubmits only when the engine
        picked the penalised one (exact under greedy decoding, and far fewer resubmissions). Otherwise
        every penalty is applied by a one-token step, exactly as the per-token policy would.
        ``engine_repair``: the engine applies each re-decode submission's ``repair`` itself (module doc)."""
        check_request_config(policy.config)
        if not neuron_step:  # no neuron step here: passes must not claim (or count) switched-off neurons
            policy = policy.token_level()
        self.policy = policy
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
        if self.state.final is not None:
            return list(self.state.final)
        return self.state.kept + self._pass

    @property
    def report(self) -> SequenceReport:
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
        return dict(self._pending or {})

    def take_released(self) -> list[int]:
        """Tokens that became final since the last call (streaming)."""
        return self.state.releasable(self._pass, finished=False)

    # -- the protocol -----------------------------------------------------------------------------------
    def next_submission(self) -> Submission | None:
        """The request to send now, or None when the request is finished."""
        if self.done:
            return None
        if self._current is not None:
            return self._current
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

    def feed(self, sub: Submission, tokens: Iterable[int]) -> bool:
        """New tokens of ``sub``. Returns True when the adapter must cancel ``sub`` (the guard has moved on:
        a rollback, a one-token step, or the end of the request); later tokens of it are ignored."""
        tokens = list(tokens)
        self.decoded += len(tokens)
        if sub is not self._current:
            return True
        seq = self._seq
        state = self.state
        for token in tokens:
            token = int(token)
            self._bias = self._ban = None
            pending, self._pending = self._pending, None
            if pending is not None and token in pending:
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
        self._pass.extend(int(t) for t in tail)
        if sub.max_tokens == 1 and finish_reason == "length":
            self._current = None  # the step's one token was fed: continue
            return
        self.stop_reason = stop_reason
        self._finish(finish_reason or "stop")

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


__all__ = ["EngineRepair", "RequestGuard", "Submission", "check_request_config", "derive_seed"]
