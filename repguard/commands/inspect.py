"""``repguard inspect MAP``: summarise a neuron map."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a neuron map's summary (counts per layer, top neurons, metadata)")
    p.add_argument("map", help="path to a neuron map (.safetensors), or an embedded model name")
    p.add_argument("--top", type=int, default=10, help="how many top neurons to list (default: 10)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..maps import find_map

    nmap = find_map(args.map)
    if args.json:
        print(json.dumps(nmap.meta.model_dump(mode="json"), indent=2))
    else:
        print(nmap.summary(top=args.top))
    return 0
