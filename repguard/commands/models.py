"""``repguard models``: list the embedded models, convert one into the cache."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list embedded models, or convert one into the cache (`models convert NAME`)")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    p.set_defaults(func=run_list)
    lst = msub.add_parser("list", help="list embedded models and whether they are installed and converted")
    lst.set_defaults(func=run_list)
    conv = msub.add_parser("convert", help="de-quantise an embedded model's GGUF, or a .gguf file, into fp32 "
                           "safetensors in the cache (once)")
    conv.add_argument("name", help="embedded model name or path to a .gguf file")
    conv.set_defaults(func=run_convert)


def _installed(spec) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(pkg.split("==")[0].replace("-", "_")) is not None for pkg in spec.packages)


def run_list(args) -> int:
    from ..hf.models import DEFAULT_MODEL, EMBEDDED, _manifest_ok, cache_dir

    for name, spec in EMBEDDED.items():
        folder = cache_dir() / "models" / name
        state = "converted" if _manifest_ok(folder) else ("installed" if _installed(spec) else "not installed")
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {spec.description}")
        print(f"    licence: {spec.licence}; {state}" + (f" at {folder}" if state == "converted" else ""))
        if state == "not installed":
            print(f"    install: {spec.install_hint}")
    print("A local Hugging Face model folder or a .gguf file works wherever a model name is accepted.")
    return 0


def run_convert(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..hf.models import EMBEDDED, ensure_converted, ensure_converted_gguf, is_gguf

    if not is_gguf(args.name) and args.name not in EMBEDDED and Path(args.name).is_dir():
        raise ConfigError(f"models convert {args.name}: a local Hugging Face folder needs no conversion; pass it "
                          "as --model wherever a model is asked for (convert takes an embedded model's name or a "
                          ".gguf file)")
    print(ensure_converted_gguf(args.name) if is_gguf(args.name) else ensure_converted(args.name))
    return 0
