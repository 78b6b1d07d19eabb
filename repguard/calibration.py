"""Calibration's framework-free part: its settings, the records of generated texts, the journal a long run
resumes from, its progress log, and the arithmetic of the paper's score (Hiraoka & Inui, 2024).

The score of a neuron is its pooled mean activation over every position in the 30 tokens after a
repetition's onset minus its pooled mean over the 30 before (``OnsetWindowStats``), ranked globally
across layers. ``repguard.hf.calibrate`` drives a transformers model to produce the texts and the
activations; everything here works on plain token lists and tensors (torch, no framework).
"""

from __future__ import annotations

import json
import math
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .detect import Repetition
from .errors import ConfigError, RepGuardError
from .neuron_map import jaccard

log = logging.getLogger("repguard")

HELDOUT_OFFSET = 1 << 30  # text indexes of held-out texts: a random stream disjoint from calibration's


class CalibrationError(RepGuardError):
    """Calibration could not produce a map (for example: no text qualified)."""


@dataclass(frozen=True)
class CalibrationSettings:
    """Parameters of one calibration run; the defaults are the paper's."""

    num_texts: int = 256  # kept (qualifying) texts to collect
    max_generated: int | None = None  # cap on generated texts (default: 16 x num_texts)
    seed: int = 0
    batch_size: int = 64
    activation_batch_size: int = 32
    prompt_tokens: int = 10
    greedy_tokens: int = 200
    min_second_occurrence: int = 50
    context: int = 30
    ngram: int = 10
    window: int = 100
    min_count: int = 3
    select: float | int = 0.005  # a float in (0, 1] is a fraction of all neurons, an int a count
    store: float = 0.02  # fraction of all neurons stored as candidates (for top(k) beyond the selection)
    heldout_texts: int = 64  # kept held-out texts for the deactivation test (0: no test)
    deactivation_fractions: tuple[float, ...] = (0.001, 0.005, 0.01)
    deactivation_tokens: int = 160
    early_stop: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"calibration setting '{name}' {why} (got {getattr(self, name)!r})")

        need(self.num_texts >= 2, "num_texts", "must be >= 2 (split-half stability needs two halves)")
        need(self.max_generated is None or self.max_generated >= self.num_texts, "max_generated", "must be >= num_texts")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.activation_batch_size >= 1, "activation_batch_size", "must be >= 1")
        need(self.prompt_tokens >= 0, "prompt_tokens", "must be >= 0")
        need(self.greedy_tokens >= 1, "greedy_tokens", "must be >= 1")
        need(self.context >= 1, "context", "must be >= 1")
        need(self.ngram >= 1 and self.window >= self.ngram, "window", "must be >= ngram >= 1")
        need(self.min_count >= 3, "min_count", "must be >= 3")
        if isinstance(self.select, bool) or not isinstance(self.select, (int, float)):
            need(False, "select", "must be a count (int) or a fraction (float)")
        if isinstance(self.select, float):
            need(0.0 < self.select <= 1.0, "select", "as a fraction must be in (0, 1]")
        else:
            need(self.select >= 1, "select", "as a count must be >= 1")
        need(0.0 < self.store <= 1.0, "store", "must be a fraction in (0, 1]")
        need(self.heldout_texts >= 0, "heldout_texts", "must be >= 0")
        need(all(0.0 < f <= 1.0 for f in self.deactivation_fractions), "deactivation_fractions", "must lie in (0, 1]")
        need(self.deactivation_tokens >= 1, "deactivation_tokens", "must be >= 1")

    @property
    def generation_cap(self) -> int:
        return self.max_generated if self.max_generated is not None else 16 * self.num_texts

    def count(self, total: int) -> int:
        """Number of neurons selected out of ``total``."""
        if isinstance(self.select, float):
            return max(1, round(self.select * total))
        return min(int(self.select), total)


def parse_select(text: str, flag: str = "--select") -> float | int:
    """``"0.5%"`` or ``"0.005"`` -> fraction 0.005; ``"230"`` -> count 230. ``flag`` names the option in errors."""
    text = text.strip()
    try:
        if text.endswith("%"):
            value: float | int = float(text[:-1]) / 100.0
        elif any(c in text for c in ".eE"):
            value = float(text)
        else:
            value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a count (230) or a fraction (0.5% or 0.005), got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a count (230) or a fraction (0.5% or 0.005), got {text!r}")
    return value


# -- generated texts and the journal of a long run -------------------------------------------------


@dataclass
class RepetitiveText:
    """A generated text with the paper's detector's first hit on it. ``ids`` may stop early (see the module doc)."""

    index: int
    ids: list[int]
    repetition: Repetition  # positions index ``ids`` (BOS at 0)

    @property
    def onset(self) -> int:
        return self.repetition.onset


@dataclass
class GenerationStats:
    generated: int = 0
    with_repeat: int = 0
    kept: int = 0
    tokens_decoded: int = 0
    seconds: float = 0.0
    resumed: int = 0  # texts whose decision was read back from the journal instead of generated


@dataclass(frozen=True)
class TextDecision:
    """What generating one text decided, final as soon as it is known (one journal line)."""

    index: int
    with_repeat: bool
    tokens_decoded: int
    text: RepetitiveText | None  # the kept text, or None


class TextJournal:
    """Every text's decision as one JSON line, appended the moment it is final, so a stopped calibration
    resumes where it stopped: a resumed run reads the decisions back and generates only the texts it lacks.

    The first line records what decides the texts (model identity and dtype, seed, lengths, detector); a
    journal written with anything else is refused, naming what differs, rather than mixed in. A last line
    cut short by a kill is cut off the file (that text is generated again); a last line that is a whole
    record but lost its newline is kept, and the newline written before anything is appended. A file that
    is not a calibration journal is never overwritten, not even to start over."""

    FORMAT = "repguard-calibration-texts/1"

    def __init__(self, path: str | os.PathLike, header: dict, resume: bool = True) -> None:
        self.path = Path(path)
        self.header = {"format": self.FORMAT, **header}
        self.decisions: dict[str, dict[int, TextDecision]] = {}
        if resume and self.path.is_file() and self.path.stat().st_size:
            self._read()
        else:
            self.check_replaceable(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header) + "\n")
        self._file = self.path.open("a")

    @classmethod
    def is_journal(cls, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a calibration journal (its first line starts as a journal header does; the
        header may be torn by a kill)."""
        prefix = json.dumps({"format": cls.FORMAT.partition("/")[0]})[:-2]  # '{"format": "repguard-calibration-texts'
        try:
            with Path(path).open("rb") as f:
                head = f.read(len(prefix))
        except OSError:
            return False
        return head == prefix.encode()

    @classmethod
    def check_replaceable(cls, path: str | os.PathLike) -> None:
        """Refuse to start a journal over a file that exists and is not one (a neuron map, the user's notes)."""
        path = Path(path)
        if path.is_file() and path.stat().st_size and not cls.is_journal(path):
            raise CalibrationError(
                f"{path} exists and is not a journal of calibration texts (its first line is not a journal "
                "header); refusing to overwrite it: pass another --journal PATH, or move the file away"
            )

    def _read(self) -> None:
        if not self.is_journal(self.path):
            self.check_replaceable(self.path)
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = data.endswith(b"\n")
        if complete:
            lines.pop()  # the empty piece after the last newline
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
            if len(lines) == 1 and not complete:  # only the header, cut short by a kill: nothing to resume
                log.warning("%s: its header was cut short when the run stopped; starting the journal over", self.path)
                self.path.write_text(json.dumps(self.header) + "\n")
                return
        if header != self.header:
            raise CalibrationError(
                f"{self.path}: this journal of calibration texts was written for another run; it differs in "
                f"{_header_difference(header, self.header)}. Start it over with --no-resume, or write another "
                "journal with --journal PATH"
            )
        records = lines[1:]
        for number, line in enumerate(records, start=2):
            try:
                stream, decision = _parse_record(line)
            except ValueError:
                if number == len(lines):  # the last line, cut short when the run was stopped: cut it off the file
                    os.truncate(self.path, len(data) - len(line) - complete)
                    log.warning("%s: line %d was cut short when the run stopped; that text is generated again",
                                self.path, number)
                    return
                raise CalibrationError(
                    f"{self.path}: line {number} is not a calibration text record; start the journal over with "
                    "--no-resume, or write another journal with --journal PATH"
                ) from None
            self.decisions.setdefault(stream, {})[decision.index] = decision
        if not complete:  # a whole last record whose newline was lost: new records start on a line of their own
            with self.path.open("ab") as f:
                f.write(b"\n")

    def done(self, stream: str) -> dict[int, TextDecision]:
        return self.decisions.setdefault(stream, {})

    def record(self, stream: str, decision: TextDecision) -> None:
        t = decision.text
        line = {"stream": stream, "index": decision.index, "with_repeat": decision.with_repeat,
                "tokens": decision.tokens_decoded}
        if t is not None:
            r = t.repetition
            line.update(ids=t.ids, repetition={"ngram": list(r.ngram), "p1": r.p1, "p2": r.p2, "p3": r.p3})
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.done(stream)[decision.index] = decision

    def close(self) -> None:
        self._file.close()


def _parse_record(line: bytes) -> tuple[str, TextDecision]:
    """(stream, decision) of one journal line; ``ValueError`` for anything that is not a whole record."""
    try:
        d = json.loads(line)
        stream = d["stream"]
        if not isinstance(stream, str):
            raise ValueError("stream")
        rep = d.get("repetition")
        text = RepetitiveText(d["index"], d["ids"], Repetition(tuple(rep["ngram"]), rep["p1"], rep["p2"],
                                                               rep["p3"])) if rep else None
        return stream, TextDecision(int(d["index"]), bool(d["with_repeat"]), int(d["tokens"]), text)
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None


def _header_difference(found, wanted: dict) -> str:
    """What a journal's header has that this run's lacks, key by key, both values shown (shortened)."""
    if not isinstance(found, dict):
        return "its header line (unreadable)"

    def short(value) -> str:  # a path or a digest in full (they differ anywhere), a long list cut short
        text = json.dumps(value)
        return text if isinstance(value, str) or len(text) <= 60 else text[:57] + "..."

    keys = [k for k in dict.fromkeys([*wanted, *found]) if found.get(k) != wanted.get(k)]
    return "; ".join(f"{k} (journal: {short(found.get(k))}, this run: {short(wanted.get(k))})" for k in keys)


class ProgressLog:
    """INFO lines while texts are generated (kept/generated, kept rate, speed, time left), at most one per
    ``every`` seconds; and one early warning when the kept rate so far cannot reach the requested count."""

    def __init__(self, desc: str, count: int, cap: int, every: float, done: dict[int, TextDecision],
                 count_setting: str = "num_texts, --num-texts") -> None:
        self.desc, self.count, self.cap, self.every = desc, count, cap, every
        self.count_setting = count_setting  # the setting (and flag) that asked for ``count`` texts
        self.t0 = self.last = time.perf_counter()
        self.generated = len(done)
        self.kept = sum(d.text is not None for d in done.values())
        self.start_kept, self.tokens = self.kept, 0
        self.warned = False

    def add(self, d: TextDecision) -> None:
        self.generated += 1
        self.kept += d.text is not None
        self.tokens += d.tokens_decoded
        self.check_rate()
        if time.perf_counter() - self.last >= self.every:
            self.log()

    def check_rate(self) -> None:
        if self.warned or self.generated < min(self.cap, 32) or self.kept >= self.count:
            return
        rate = self.kept / self.generated
        expected = self.kept + rate * (self.cap - self.generated)
        if expected < self.count:
            self.warned = True
            log.warning(
                "%s: only %d of %d generated texts qualified so far (%.1f%% kept); at that rate the cap of %d "
                "generated texts (max_generated, --max-generated) gives about %d kept texts, fewer than the %d "
                "requested (%s): raise the cap, lower the count, or check that the model "
                "loops under greedy decoding", self.desc, self.kept, self.generated, 100 * rate, self.cap,
                int(expected), self.count, self.count_setting,
            )

    def log(self, final: GenerationStats | None = None) -> None:
        """One progress line; ``final``: the run's result (the texts of the last batch past the
        ``count``-th kept one are not counted), said once at the end."""
        now = time.perf_counter()
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        if final is not None:
            self.kept, self.generated = final.kept, final.generated
        new_kept = self.kept - self.start_kept
        if final is not None:
            left = f"finished in {_duration(elapsed)}"
        elif self.kept >= self.count:
            left = "done"
        elif new_kept > 0:
            left = f"about {_duration((self.count - self.kept) * elapsed / new_kept)} left"
        else:
            left = "time left unknown (no text kept yet)"
        log.info("%s: kept %d/%d texts of %d generated (%.1f%% kept), %.0f tok/s, %s", self.desc,
                 min(self.kept, self.count), self.count, self.generated, 100 * self.kept / max(1, self.generated),
                 self.tokens / elapsed, left)


class PassLog:
    """INFO lines while a pass over ``total`` items runs (the activation pass, the deactivation test): done of
    total, rate, time left, at most one per ``every`` seconds, so a run without progress bars still shows it
    advancing; and one line at its end."""

    def __init__(self, desc: str, total: int, every: float, unit: str = "texts") -> None:
        self.desc, self.total, self.every, self.unit = desc, total, every, unit
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self.last >= self.every:
            self.last = now
            elapsed = now - self.t0
            log.info("%s: %d/%d %s, %.2f/s, about %s left", self.desc, self.done, self.total, self.unit,
                     self.done / max(elapsed, 1e-9), _duration((self.total - self.done) * elapsed / self.done))

    def end(self) -> None:
        log.info("%s: %d/%d %s in %s", self.desc, self.done, self.total, self.unit,
                 _duration(time.perf_counter() - self.t0))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- the paper's score ------------------------------------------------------------------------------


class OnsetWindowStats:
    """Float64 sums of activations at each position relative to the onset, per split half.

    Relative positions run from ``-context`` to ``+context``: ``[-context, 0)`` is the paper's
    ``before`` window, ``[0, context)`` its ``after`` window, ``+context`` is kept for the profile plot.
    Memory: 2 x (2 context + 1) x layers x width doubles, whatever the number of texts.
    """

    def __init__(self, num_layers: int, width: int, context: int = 30) -> None:
        self.num_layers, self.width, self.context = num_layers, width, context
        w = 2 * context + 1
        self.sums = torch.zeros(2, w, num_layers, width, dtype=torch.float64)
        self.counts = torch.zeros(2, w, num_layers, dtype=torch.float64)
        self.sumsq = torch.zeros(2, 2, num_layers, width, dtype=torch.float64)  # [half, before/after]

    def add(self, layer: int, acts: torch.Tensor, onsets: Sequence[int], lengths: Sequence[int],
            halves: Sequence[int]) -> None:
        """Add one layer's activations ``acts`` [batch, time, width] of texts with these onsets."""
        c = self.context
        rel = torch.arange(-c, c + 1)
        pos = torch.as_tensor(list(onsets)).unsqueeze(1) + rel  # [batch, 2c + 1]
        valid = (pos >= 0) & (pos < torch.as_tensor(list(lengths)).unsqueeze(1)) & (pos < acts.shape[1])
        idx = pos.clamp(0, acts.shape[1] - 1).unsqueeze(-1).expand(-1, -1, acts.shape[2])
        got = acts.detach().gather(1, idx.to(acts.device)).cpu().double() * valid.unsqueeze(-1)
        halves_t = torch.as_tensor(list(halves))
        for h in (0, 1):
            rows = halves_t == h
            if not bool(rows.any()):
                continue
            g = got[rows]
            self.sums[h, :, layer] += g.sum(0)
            self.counts[h, :, layer] += valid[rows].sum(0).double()
            self.sumsq[h, 0, layer] += g[:, :c].square().sum((0, 1))
            self.sumsq[h, 1, layer] += g[:, c : 2 * c].square().sum((0, 1))

    def pooled(self, halves: Sequence[int] = (0, 1)) -> dict[str, torch.Tensor]:
        """The paper's score and the per-neuron mean/std before and after onset, [layers, width] each."""
        c = self.context
        h = list(halves)
        sums, counts, sumsq = self.sums[h].sum(0), self.counts[h].sum(0), self.sumsq[h].sum(0)
        n_before = counts[:c].sum(0).clamp(min=1).unsqueeze(-1)  # [layers, 1]
        n_after = counts[c : 2 * c].sum(0).clamp(min=1).unsqueeze(-1)
        mean_b, mean_a = sums[:c].sum(0) / n_before, sums[c : 2 * c].sum(0) / n_after
        std_b = (sumsq[0] / n_before - mean_b.square()).clamp(min=0).sqrt()
        std_a = (sumsq[1] / n_after - mean_a.square()).clamp(min=0).sqrt()
        return {"score": mean_a - mean_b, "mean_before": mean_b, "std_before": std_b,
                "mean_after": mean_a, "std_after": std_a}

    def profile(self, layers: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """Mean activation at each relative position [-c..+c] for each given neuron: [neurons, 2c + 1]."""
        sums = self.sums.sum(0)[:, layers.long(), neurons.long()]  # [w, k]
        counts = self.counts.sum(0)[:, layers.long()].clamp(min=1)
        return (sums / counts).T.contiguous()


def check_scores(pooled: dict[str, torch.Tensor], texts: int, dtype: str | None = None) -> None:
    """Refuse, saying what to do, the statistics no loadable map can come from: a NaN or infinite score or
    statistic (activations that overflowed, as float16 does), or no neuron whose activation rises."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in pooled.items()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        raise CalibrationError(
            "the activation statistics are not finite (NaN or infinite values: "
            + ", ".join(f"{n} in {name}" for name, n in bad.items())
            + f"){f' in {dtype}' if dtype else ''}: the activations overflowed; calibrate in float32 "
            "(--dtype float32), or bfloat16, whose range is float32's; no map was written"
        )
    score = pooled["score"]
    if not bool((score > 0).any()):
        raise CalibrationError(
            f"no neuron's activation is higher after the repetition onset than before it (no positive score among "
            f"{score.numel()} neurons over {texts} texts): calibrate with more texts (--num-texts), or check that "
            "the model's MLP activations are not constant; no map was written"
        )


def top_set(score: torch.Tensor, k: int) -> set[tuple[int, int]]:
    flat = score.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    order = order[flat[order] > 0]
    width = score.shape[1]
    return {(int(i) // width, int(i) % width) for i in order}


def selection_counts(settings: CalibrationSettings, total: int) -> tuple[int, int]:
    """(selected, stored) neuron counts out of ``total``: stored covers the selection, ``store`` and every
    deactivation-test fraction, so ``top(k)`` works for each of them."""
    num_selected = settings.count(total)
    num_stored = max(num_selected, round(settings.store * total),
                     *(round(f * total) for f in settings.deactivation_fractions))
    return num_selected, min(num_stored, total)


def split_half_jaccard(stats: OnsetWindowStats, k: int) -> float:
    """Stability of the top set: the Jaccard index of the top-``k`` sets scored on the two halves of the texts."""
    return round(jaccard(top_set(stats.pooled((0,))["score"], k), top_set(stats.pooled((1,))["score"], k)), 4)


def random_control(seed: int, total: int, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's control: ``count`` random (layer, neuron) pairs, fixed by the seed."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:count]
    return (perm // width).to(torch.int32), (perm % width).to(torch.int32)


__all__ = [
    "HELDOUT_OFFSET", "CalibrationError", "CalibrationSettings", "GenerationStats", "OnsetWindowStats",
    "PassLog", "ProgressLog", "RepetitiveText", "TextDecision", "TextJournal", "check_scores", "parse_select", "random_control",
    "selection_counts", "split_half_jaccard", "top_set",
]
