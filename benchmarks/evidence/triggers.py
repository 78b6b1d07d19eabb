"""Trigger precision/recall and lead, offline: replay unguarded outputs through ``LoopDetector``.

Ground truth is the paper's detector on the same continuation. A trigger that fires on an output the
paper's detector calls clean would change that output (distortion); the lead is how many tokens
before the paper's criterion completes the trigger fires (room to repair before the third copy).
"""

from __future__ import annotations

from repguard.detect import LoopDetector, find_repetition


def paper_fire_position(cont) -> int | None:
    """Index of the token at which the paper's criterion first holds (streaming view)."""
    det = LoopDetector(use_paper=True, use_suffix=False)
    for i, t in enumerate(cont):
        if det.update(t) is not None:
            return i
    return None


def first_fire(cont, **kw) -> int | None:
    det = LoopDetector(**kw)
    for i, t in enumerate(cont):
        if det.update(t) is not None:
            return i
    return None


def analyse(outputs, configs: dict[str, dict]) -> list[dict]:
    truth = [find_repetition(o) is not None for o in outputs]
    paper_pos = [paper_fire_position(o) for o in outputs]
    rows = []
    for name, kw in configs.items():
        fires = [first_fire(o, **kw) for o in outputs]
        fired = [f is not None for f in fires]
        tp = sum(f and t for f, t in zip(fired, truth))
        leads = sorted(p - f for f, p in zip(fires, paper_pos) if f is not None and p is not None)
        rows.append({
            "trigger": name,
            "precision": tp / sum(fired) if any(fired) else None,
            "recall": tp / sum(truth) if any(truth) else None,
            "false_trigger_rate": sum(f and not t for f, t in zip(fired, truth)) / max(1, truth.count(False)),
            "median_lead": leads[len(leads) // 2] if leads else None,
            "share_lead_ge_1": sum(x >= 1 for x in leads) / len(leads) if leads else None,
        })
    return rows


SUFFIX_GRID = {
    "paper's criterion only": dict(use_paper=True, use_suffix=False),
    "suffix only, 12 x 2.0": dict(use_paper=False, use_suffix=True, min_repeat=12, min_copies=2.0),
    "paper + suffix 12 x 2.0 (old default)": dict(use_paper=True, use_suffix=True, min_repeat=12, min_copies=2.0),
    "paper + suffix 12 x 2.5": dict(use_paper=True, use_suffix=True, min_repeat=12, min_copies=2.5),
    "paper + suffix 12 x 1.5 (new default)": dict(use_paper=True, use_suffix=True, min_repeat=12, min_copies=1.5),
    "paper + suffix 8 x 1.5": dict(use_paper=True, use_suffix=True, min_repeat=8, min_copies=1.5),
    "paper + suffix 20 x 1.5": dict(use_paper=True, use_suffix=True, min_repeat=20, min_copies=1.5),
}
