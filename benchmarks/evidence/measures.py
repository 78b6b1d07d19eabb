"""The benchmark's measures, on plain token lists (no framework)."""

from __future__ import annotations

import gzip
import re
from statistics import mean
from typing import Sequence

from repguard.detect import find_repetition


def loops(cont: Sequence[int], stopped: bool = False) -> bool:
    """The paper's detector (n=10, r=100, k=3) on the continuation; a stopped output is an unrepaired loop.
    It is ``repguard.detect.find_repetition``: the criterion rollback's first pass fires on (there over 400 tokens,
    200 before 2026-12-07, any three copies in a row), so it shares its criterion with a repguard trigger."""
    return stopped or find_repetition(list(cont)) is not None


def any_loop(cont: Sequence[int]) -> bool:
    """Wider loop label: the paper's detector, or two back-to-back copies of a span of >= 12 tokens
    (period <= 64). It also catches loops the paper's detector misses: copies with unequal spacing,
    periods over 45 tokens, and loops cut by the 200-token limit before a third copy. It is built from
    repguard's own detectors (``find_repetition`` and ``LoopDetector``'s suffix trigger at min_repeat=12,
    min_copies=2.0), so it shares its criterion with repguard's triggers (the suffix trigger's default is 1.5 copies)."""
    from repguard.detect import LoopDetector

    if find_repetition(list(cont)) is not None:
        return True
    det = LoopDetector(use_paper=False, use_suffix=True, min_repeat=12, min_copies=2.0, max_period=64)
    return any(det.update(t) is not None for t in cont)


def holtzman_loop(cont: Sequence[int], min_phrase: int = 2, copies: int = 3) -> bool:
    """Holtzman et al. (2020): the text ends in a phrase of >= 2 tokens repeated >= 3 times back to back.
    No repguard trigger uses this criterion."""
    cont = list(cont)
    for length in range(min_phrase, len(cont) // copies + 1):
        tail = cont[len(cont) - copies * length :]
        phrase = tail[:length]
        if all(tail[i * length : (i + 1) * length] == phrase for i in range(1, copies)):
            return True
    return False


_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_NORM = re.compile(r"[\W_]+", re.UNICODE)


def repeated_sentence(text: str, copies: int = 3, min_chars: int = 20) -> bool:
    """The same sentence or line (lower-cased, punctuation and spacing removed, >= ``min_chars`` characters)
    occurs >= 3 times anywhere in the text. No repguard trigger uses this criterion (it reads text, not ids).
    The split is after . ! ? and at line breaks, so a list item's number ("48.") is its own part; a line shorter
    than ``min_chars`` (e.g. a 19-character item name) is never counted, however often it repeats."""
    counts: dict[str, int] = {}
    for part in _SPLIT.split(text):
        key = _NORM.sub(" ", part.lower()).strip()
        if len(key) >= min_chars:
            counts[key] = counts.get(key, 0) + 1
            if counts[key] >= copies:
                return True
    return False


def rep_n(conts: Sequence[Sequence[int]], n: int) -> float:
    """Su et al.: 100 x (1 - unique n-grams / n-grams), pooled over all continuations (per-text n-gram sets)."""
    total = unique = 0
    for cont in conts:
        grams = [tuple(cont[i : i + n]) for i in range(len(cont) - n + 1)]
        total += len(grams)
        unique += len(set(grams))
    return 100.0 * (1 - unique / total) if total else 0.0


def gzip_ratio(text: str) -> float:
    """Compressed size / raw size of the text (lower: more repetitive); 1.0 for empty text."""
    raw = text.encode("utf-8")
    return len(gzip.compress(raw, mtime=0)) / len(raw) if raw else 1.0


def strict_loop(cont: Sequence[int], text: str | None = None, stopped: bool = False) -> bool:
    """The strictest label: any of the paper's detector, the wider label, Holtzman's criterion, or a repeated
    sentence (when the text is given) fires; a stopped output counts as an unrepaired loop."""
    return (stopped or any_loop(cont) or holtzman_loop(cont)
            or (text is not None and repeated_sentence(text)))


def seq_rep(cont: Sequence[int], n: int = 4) -> float:
    """Welleck et al.: 1 - unique n-grams / n-grams of one continuation (0 when it has no n-gram)."""
    grams = [tuple(cont[i : i + n]) for i in range(len(cont) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct(cont: Sequence[int], n: int = 2) -> float:
    """Unique n-grams / n-grams of one continuation (1 when it has no n-gram)."""
    grams = [tuple(cont[i : i + n]) for i in range(len(cont) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def distortion(base: Sequence[Sequence[int]], outs: Sequence[Sequence[int]], base_loops: Sequence[bool]) -> float | None:
    """Share of outputs, among those whose unguarded run did not loop, that differ from unguarded."""
    idx = [i for i, looped in enumerate(base_loops) if not looped]
    if not idx:
        return None
    return sum(list(outs[i]) != list(base[i]) for i in idx) / len(idx)


def identity(base: Sequence[Sequence[int]], outs: Sequence[Sequence[int]], triggered: Sequence[bool]) -> float | None:
    """Share of never-triggered outputs byte-identical to unguarded (None when every output triggered)."""
    idx = [i for i, t in enumerate(triggered) if not t]
    if not idx:
        return None
    return sum(list(outs[i]) == list(base[i]) for i in idx) / len(idx)


def precision_recall(fired: Sequence[bool], truth: Sequence[bool]) -> tuple[float | None, float | None]:
    """Trigger precision and recall against a reference labelling (the paper's detector)."""
    tp = sum(f and t for f, t in zip(fired, truth))
    nf, nt = sum(fired), sum(truth)
    return (tp / nf if nf else None, tp / nt if nt else None)


def summary(base, outs, base_loops, stopped, triggered=None) -> dict:
    """All per-method numbers for one run."""
    looped = [loops(o, s) for o, s in zip(outs, stopped)]
    n = len(outs)
    rate = sum(looped) / n
    rate0 = sum(base_loops) / n
    return {
        "n": n,
        "loop_rate": rate,
        "loop_cut": (1 - rate / rate0) if rate0 else None,
        "stopped": sum(stopped) / n,
        "seq_rep_4": mean(seq_rep(o) for o in outs),
        "distinct_2": mean(distinct(o) for o in outs),
        "distortion": distortion(base, outs, base_loops),
        "changed": sum(list(o) != list(b) for o, b in zip(outs, base)) / n,
        "identity": identity(base, outs, triggered) if triggered is not None else None,
        "triggered": sum(triggered) / n if triggered is not None else None,
        "mean_len": mean(len(o) for o in outs),
    }
