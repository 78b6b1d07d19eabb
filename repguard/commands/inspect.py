"""``repguard inspect MAP``: summarise a neuron map (given by path, or as the model it belongs to)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a neuron map's summary (counts per layer, top neurons, metadata)")
    p.add_argument("map", help="path to a neuron map (.safetensors), or a model (embedded name, local folder, .gguf "
                   "file) whose map to show")
    p.add_argument("--top", type=int, default=10, help="how many top neurons to list (default: 10)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..maps import find_map
    from .checks import at_least

    at_least("--top", args.top, 0)  # a negative count would slice the list from its end
    target = args.map
    if target.lower().endswith(".gguf") or (not target.endswith(".safetensors") and _is_model_folder(target)):
        from .checks import model_info

        info = model_info("map", target)  # a .gguf file is converted once into the cache
        nmap = find_map(info.name, shape_key=info.shape_key)
    else:
        nmap = find_map(target)
    if args.json:
        print(json.dumps(nmap.meta.model_dump(mode="json"), indent=2))
    else:
        print(nmap.summary(top=args.top))
    return 0


def _is_model_folder(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "config.json").is_file()
