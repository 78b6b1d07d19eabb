"""Loop detection on token ids: the paper's offline detector and its streaming equivalents.

``find_repetition`` is the reference criterion (Hiraoka & Inui, 2024): an n-gram that occurs at least
``k`` times, equally spaced, within the last ``r`` tokens. ``LoopDetector`` computes the same criterion
one token at a time in O(n) per token, independent of history length, and adds an earlier trigger:
the longest suffix of the text that already occurred before (the quantity DRY computes), maintained
with an online suffix automaton (amortised O(1) per token).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError


def suffix_span(max_period: int) -> int:
    """How far back the suffix trigger looks, in tokens (its automaton holds the last ``suffix_span`` to twice
    that many): the longest repeat it can measure."""
    return max(512, 4 * max_period)


@dataclass(frozen=True)
class Repetition:
    """A repeated n-gram found by the paper's criterion. Positions index the scanned id list."""

    ngram: tuple[int, ...]
    p1: int
    p2: int
    p3: int

    @property
    def onset(self) -> int:
        """The paper's onset: the position whose prediction starts the second copy (p2 - 1)."""
        return self.p2 - 1

    @property
    def period(self) -> int:
        return self.p2 - self.p1


def find_repetition(ids: Sequence[int], n: int = 10, r: int = 100, k: int = 3) -> Repetition | None:
    """The paper's detector (n=10, r=100, k=3), returning the first hit in scan order, or None.

    For every start i, g = ids[i:i+n] and the window is ids[max(0, i+n-r) : i+n]; count the
    (overlapping) occurrences of g in the window; with at least k of them, accept iff the first three
    are equally spaced. Quadratic; meant for offline use. ``LoopDetector`` is the streaming twin.
    """
    ids = list(ids)
    for i in range(0, len(ids) - n + 1):
        g = ids[i : i + n]
        lo = max(0, i + n - r)
        hits = [j for j in range(lo, i + 1) if ids[j : j + n] == g]
        if len(hits) >= k and hits[1] - hits[0] == hits[2] - hits[1]:
            return Repetition(tuple(g), hits[0], hits[1], hits[2])
    return None


@dataclass(frozen=True)
class LoopEvent:
    """What a detector reports when it fires."""

    position: int  # index (in the detector's stream) of the token that made it fire
    onset: int  # index of the first token of the second copy
    period: int  # distance between copies, in tokens
    repeat_length: int  # tokens of the current copy that match an earlier one
    trigger: str  # "paper" or "suffix"


class _SuffixAutomaton:
    """Online suffix automaton over token ids, tracking the longest suffix that occurred earlier.

    After each ``extend``, ``repeat_length`` is the length of the longest suffix of the text that also
    ends at an earlier position, and ``repeat_end`` is the first such earlier end position.
    """

    __slots__ = ("next", "link", "length", "first_end", "last", "size", "repeat_length", "repeat_end")

    def __init__(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [-1]
        self.last = 0
        self.size = 0
        self.repeat_length = 0
        self.repeat_end = -1

    def extend(self, c: int) -> None:
        nxt, link, length, first_end = self.next, self.link, self.length, self.first_end
        pos = self.size
        self.size += 1
        cur = len(length)
        nxt.append({})
        length.append(length[self.last] + 1)
        link.append(0)
        first_end.append(pos)
        p = self.last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                first_end.append(first_end[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        self.last = cur
        s = link[cur]
        self.repeat_length = length[s]
        self.repeat_end = first_end[s] if s > 0 else -1


class LoopDetector:
    """Streaming loop detector for one sequence; call ``update`` once per new token.

    Two triggers, either of which can be disabled:

    * ``paper``: the paper's criterion (n-gram ``ngram`` seen ``min_count`` times, equally spaced,
      within ``window`` tokens). With ``spacing="first"`` (the paper's rule: the *first* three
      occurrences in the window must be equally spaced) it fires exactly where ``find_repetition`` would
      first find a hit. With ``spacing="consecutive"`` any three consecutive occurrences in the window
      will do: the paper's criterion at every window up to ``window``. The paper's rule is not monotone
      in the window: an earlier, unequally spaced occurrence that a wider window takes in hides a loop
      that a narrower one catches; "consecutive" fires wherever "first" does, never later.
    * ``suffix``: the current text ends in at least ``min_copies`` back-to-back copies of a span of
      period <= ``max_period``, with at least ``min_repeat`` repeated tokens. Phrase reuse across a
      gap (period > repeat length) never counts, which keeps false triggers rare. The period is measured
      to the *earliest* earlier occurrence of the repeated suffix (the automaton keeps first end
      positions): where the loop's phrase also occurred earlier in the text, the trigger fires only once
      the copies reach back that far (later, by whole copies), or through the paper trigger.
    """

    __slots__ = (
        "ngram", "window", "min_count", "min_repeat", "min_copies", "max_period", "use_paper",
        "use_suffix", "_newest", "_ids", "_grams", "_expiry", "_sam", "_pos", "_shadow", "_offset", "_span",
    )

    def __init__(
        self,
        ngram: int = 10,
        window: int = 100,
        min_count: int = 3,
        *,
        use_paper: bool = True,
        use_suffix: bool = True,
        min_repeat: int = 12,
        min_copies: float = 2.0,
        max_period: int = 64,
        spacing: str = "first",
    ) -> None:
        if spacing not in ("first", "consecutive"):
            raise ConfigError(f"spacing: must be 'first' or 'consecutive', got {spacing!r}")
        if ngram < 1:
            raise ConfigError(f"ngram: must be >= 1, got {ngram}")
        if window < ngram:
            raise ConfigError(f"window: must be >= ngram ({ngram}), got {window}")
        if min_count < 3:
            raise ConfigError(f"min_count: must be >= 3 (the criterion compares three spacings), got {min_count}")
        if max_period < 1:
            raise ConfigError(f"max_period: must be >= 1, got {max_period}")
        self.ngram, self.window, self.min_count = ngram, window, min_count
        self.min_repeat, self.min_copies, self.max_period = min_repeat, min_copies, max_period
        self.use_paper, self.use_suffix = use_paper, use_suffix
        self._newest = spacing == "consecutive"
        self._ids: deque[int] = deque(maxlen=ngram)
        self._grams: dict[tuple[int, ...], deque[int]] = {}
        self._expiry: deque[tuple[int, tuple[int, ...]]] = deque()
        self._sam = _SuffixAutomaton()  # always kept: the policy needs the loop period
        # The automaton covers a sliding span of recent tokens, so memory and per-token cost stay flat
        # however long the sequence grows. Once it holds more than ``_span`` tokens, a second automaton
        # (the shadow) starts on the newest tokens, one extension per token; when the first reaches
        # 2 * ``_span`` tokens the shadow, by then holding exactly the last ``_span``, replaces it. This is
        # the state a rebuild from the last ``_span`` tokens would give, without rebuilding in one step.
        self._span = suffix_span(max_period)
        self._shadow: _SuffixAutomaton | None = None
        self._offset = 0  # stream position of the automaton's first token
        self._pos = -1

    @property
    def length(self) -> int:
        return self._pos + 1

    @property
    def repeat_length(self) -> int:
        """Longest suffix that occurred earlier."""
        return self._sam.repeat_length

    @property
    def repeat_period(self) -> int:
        """Distance to the earliest earlier occurrence of that suffix (0 when none)."""
        sam = self._sam
        if sam.repeat_length == 0:
            return 0
        return self._pos - (sam.repeat_end + self._offset)

    def update(self, token: int) -> LoopEvent | None:
        self._pos += 1
        pos = self._pos
        event = None
        sam = self._sam
        if sam.size >= 2 * self._span:  # hand over to the shadow, which then holds the last _span tokens
            sam = self._sam = self._shadow
            self._shadow = None
            sam.extend(token)
            self._offset = pos + 1 - sam.size
        else:
            sam.extend(token)
            if sam.size >= self._span + 2:
                if self._shadow is None:
                    self._shadow = _SuffixAutomaton()
                self._shadow.extend(token)
        if self.use_suffix:
            event = self._check_suffix(pos)
        if self.use_paper:
            paper = self._check_paper(pos, token)
            if event is None:
                event = paper
        return event

    def _check_suffix(self, pos: int) -> LoopEvent | None:
        sam = self._sam
        length = sam.repeat_length
        if length < self.min_repeat:
            return None
        period = pos - (sam.repeat_end + self._offset)
        if period > self.max_period or (length + period) < self.min_copies * period:
            return None
        return LoopEvent(pos, pos - length + 1, period, length, "suffix")

    def _check_paper(self, pos: int, token: int) -> LoopEvent | None:
        ids = self._ids
        ids.append(token)
        n = self.ngram
        if len(ids) < n:
            return None
        start = pos - n + 1
        gram = tuple(ids)
        lo = pos + 1 - self.window  # earliest start whose n-gram lies inside the window
        expiry = self._expiry
        while expiry and expiry[0][0] < lo:
            old, key = expiry.popleft()
            hits = self._grams.get(key)
            if hits is not None:
                while hits and hits[0] < lo:
                    hits.popleft()
                if not hits:
                    del self._grams[key]
        hits = self._grams.get(gram)
        if hits is None:
            hits = self._grams[gram] = deque()
        while hits and hits[0] < lo:
            hits.popleft()
        hits.append(start)
        expiry.append((start, gram))
        if len(hits) < self.min_count:
            return None
        if self._newest:  # the newest three (each consecutive three is the newest once)
            p1, p2 = hits[-3], hits[-2]
            if p2 - p1 != start - p2:
                return None
        else:
            p1, p2 = hits[0], hits[1]
            if p2 - p1 != hits[2] - p2:
                return None
        return LoopEvent(pos, p2, p2 - p1, pos - p2 + 1, "paper")
