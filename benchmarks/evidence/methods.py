"""The compared methods: what each one passes to ``generate`` and which guard config it installs.

A method is a name. Fixed names are the issue's baselines; ``rg[key=value;...]`` is a repguard config
built from the default preset with the given overrides (``layers=14..22`` is a range), used for tuning;
``rgrand[...]`` is the same with the map's random control set (K random neurons) in place of the top-K.
``rg+dry[...]`` adds a prototype escalation: the DRY penalty, applied to a row only after repguard's
trigger fired on it (rows never triggered stay untouched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from repguard.config import GuardConfig

# Stop at the first detection, as vLLM's repetition_detection does; triggers pinned (paper criterion, or
# two back-to-back copies of a span of >= 12 tokens) so the baseline does not move with repguard's defaults.
STOP_ONLY = {"deactivate": False, "escalate": False, "stop": True, "paper_trigger": True, "paper_spacing": "first",
             "suffix_trigger": True, "min_repeat": 12, "min_copies": 2.0, "max_period": 64, "monitor_gate": None}


@dataclass
class Method:
    name: str
    gen: dict[str, Any] = field(default_factory=dict)  # extra generate() kwargs
    guard: GuardConfig | None = None
    neurons: str = "top"  # "top" or "random" (the paper's control)
    dry: bool = False
    dry_after_trigger: bool = False  # prototype: DRY on a row only once repguard's trigger has fired on it
    group: str = "baseline"


def _value(text: str) -> Any:
    if ".." in text:
        lo, hi = text.split("..")
        return tuple(range(int(lo), int(hi) + 1))
    if "," in text:
        return tuple(int(x) for x in text.split(","))
    try:
        return json.loads(text.replace("None", "null").replace("True", "true").replace("False", "false"))
    except json.JSONDecodeError:
        return text


def parse_overrides(spec: str) -> dict[str, Any]:
    out = {}
    for part in filter(None, spec.split(";")):
        key, _, val = part.partition("=")
        out[key.strip()] = _value(val.strip())
    return out


def method(name: str, k: int | None = None) -> Method:
    """Build a method from its name; ``k`` is the paper's K (the map's selection when None)."""
    fixed = {
        "none": Method("none"),
        "rep_penalty_1.1": Method("rep_penalty_1.1", {"repetition_penalty": 1.1}),
        "rep_penalty_1.2": Method("rep_penalty_1.2", {"repetition_penalty": 1.2}),
        "rep_penalty_1.3": Method("rep_penalty_1.3", {"repetition_penalty": 1.3}),
        "no_repeat_3": Method("no_repeat_3", {"no_repeat_ngram_size": 3}),
        "no_repeat_4": Method("no_repeat_4", {"no_repeat_ngram_size": 4}),
        "dry_0.8": Method("dry_0.8", dry=True),
        "stop_on_repeat": Method("stop_on_repeat", guard=GuardConfig.from_preset("default", **STOP_ONLY)),
        "monitor": Method("monitor", guard=GuardConfig.from_preset("monitor"), group="repguard"),
        "paper_topk": Method("paper_topk", guard=GuardConfig.from_preset("paper", k=k), group="neurons"),
        "paper_randomk": Method("paper_randomk", guard=GuardConfig.from_preset("paper", k=k), neurons="random", group="neurons"),
        "repguard_deactivate": Method(
            "repguard_deactivate", guard=GuardConfig.from_preset("default", escalate=False, stop=False), group="repguard"
        ),
        "repguard_default": Method("repguard_default", guard=GuardConfig.from_preset("default"), group="repguard"),
    }
    if name in fixed:
        return fixed[name]
    if name.startswith("rg[") and name.endswith("]"):
        overrides = parse_overrides(name[3:-1])
        return Method(name, guard=GuardConfig.from_preset("default", **overrides), group="tuning")
    if name.startswith("rgrand[") and name.endswith("]"):  # the paper's control, behind repguard's trigger
        overrides = parse_overrides(name[7:-1])
        return Method(name, guard=GuardConfig.from_preset("default", **overrides), neurons="random", group="neurons")
    if name.startswith("rg+dry[") and name.endswith("]"):
        overrides = parse_overrides(name[7:-1])
        return Method(name, guard=GuardConfig.from_preset("default", **overrides), dry_after_trigger=True,
                      group="prototype")
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(fixed)} or rg[key=value;...]")


GROUPS = {
    "baselines": ["none", "rep_penalty_1.1", "rep_penalty_1.2", "rep_penalty_1.3", "no_repeat_3", "no_repeat_4",
                  "dry_0.8", "stop_on_repeat"],
    "neurons": ["paper_topk", "paper_randomk"],
    "repguard": ["monitor", "repguard_deactivate", "repguard_default"],
}
GROUPS["all"] = GROUPS["baselines"] + GROUPS["neurons"] + GROUPS["repguard"]
