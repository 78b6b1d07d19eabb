"""``repguard calibrate``: find a model's repetition neurons and write a neuron map and its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checks


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="find a model's repetition neurons (Hiraoka & Inui, 2024) and write a neuron map",
        description="Generate repetitive texts (BOS + 10 sampled + 200 greedy tokens), keep those whose repeat "
        "starts after position 50, record the MLP activations 30 tokens before and after the onset, and rank "
        "every neuron by mean(after) - mean(before). Writes the map, and a Markdown report with figures next to it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name, local Hugging Face folder, or .gguf file (converted once into the cache)")
    p.add_argument("--out", required=True, help="path of the neuron map to write (.safetensors)")
    p.add_argument("--num-texts", type=int, default=256,
                   help="number of KEPT (qualifying) repetitive texts to collect; texts are generated in batches "
                   "until that many qualify (about a quarter do)")
    p.add_argument("--max-generated", type=int, default=None,
                   help="stop after generating this many texts even if fewer qualified (None: 16 x --num-texts)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and dtype give the same map)")
    p.add_argument("--batch-size", type=int, default=64, help="texts decoded together")
    p.add_argument("--select", default="0.5%",
                   help="neurons to select: a fraction of all neurons (0.5%% or 0.005) or a count (230)")
    p.add_argument("--store", default="2%", help="fraction of all neurons stored as ranked candidates")
    p.add_argument("--heldout", type=int, default=64,
                   help="held-out repetitive texts for the report's deactivation test (0: skip the test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest when other processes share the CPU)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write <out stem>.md and PNG figures next to the map (the stem: --out without .safetensors)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (progress is logged at --log-level INFO either way, every 30 s)")
    p.add_argument("--journal", default=None, metavar="PATH",
                   help="JSON-lines file that receives every generated text's decision (and each kept text) as soon "
                   "as it is final (default: <out stem>.texts.jsonl next to --out; never --out itself)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the journal a stopped run left behind, generating only the texts it lacks "
                   "(the map is the one an uninterrupted run makes); --no-resume starts the journal over (never over "
                   "a file that is not a journal). A journal written with other settings or for another model (its "
                   "path or name, or a digest of its weights) is refused, naming what differs")
    p.add_argument("--keep-journal", action="store_true",
                   help="keep the journal after the map is written (it is removed by default); a later run with a "
                   "larger --num-texts then reuses its texts")
    checks.add_device_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..hf.calibrate import CalibrationSettings, TextJournal, calibrate, parse_select
    from ..hf.models import EMBEDDED, load_model
    from ..hf.calibration_report import is_report_file
    from ..neuron_map import is_map_file, map_sibling

    device = checks.device("--device", args.device)
    checks.at_least("--num-texts", args.num_texts, 2)  # split-half stability needs two halves
    checks.at_least("--max-generated", args.max_generated, 1)
    if args.max_generated is not None and args.max_generated < args.num_texts:
        raise ConfigError(f"--max-generated must be >= --num-texts ({args.num_texts}), got {args.max_generated}")
    checks.at_least("--batch-size", args.batch_size, 1)
    checks.at_least("--heldout", args.heldout, 0)
    checks.at_least("--threads", args.threads, 1)
    checks.seed("--seed", args.seed)
    select = parse_select(args.select)
    if isinstance(select, float):
        checks.in_range("--select", select, 0.0, 1.0, low_open=True)
    else:
        checks.at_least("--select", select, 1)
    store = parse_select(args.store, "--store")
    if not isinstance(store, float):  # a count would silently become the default fraction
        raise ConfigError(f"--store must be a fraction of all neurons (2% or 0.02), got the count {args.store!r}")
    checks.in_range("--store", store, 0.0, 1.0, low_open=True)
    # Every file the run writes is checked now, not after a run of many minutes, and none of the user's files
    # that is not an earlier run's map, report or journal is ever replaced.
    checks.writable_file("--out", args.out)
    if Path(args.out).is_file() and not is_map_file(args.out):
        raise ConfigError(f"--out {args.out}: the file exists and is not a neuron map; refusing to overwrite it: "
                          "pass another --out PATH, or move the file away")
    model_dir = Path(args.model)
    if model_dir.is_dir() and Path(args.out).resolve().is_relative_to(model_dir.resolve()):
        raise ConfigError(f"--out {args.out}: is inside the model folder {args.model}; write the map elsewhere")
    journal = Path(args.journal) if args.journal else map_sibling(args.out, ".texts.jsonl")
    checks.writable_file("--journal", str(journal))
    written = [("--out", Path(args.out))]
    if args.report:
        report = [map_sibling(args.out, suffix) for suffix in (".md", "-layers.png", "-onset.png", "-deactivation.png")]
        for path in report:
            checks.writable_file("--report", str(path))
        earlier = is_report_file(report[0])  # its figures are an earlier report's too (made before they had a mark)
        for path in report:
            if path.is_file() and not is_report_file(path) and not (earlier and path.suffix == ".png"):
                raise ConfigError(f"--report: {path} exists and is not part of a calibration report; refusing to "
                                  "overwrite it: pass another --out, --no-report, or move the file away")
        written += [("the report", path) for path in report]
    for what, path in written:
        if journal.resolve() == path.resolve():
            raise ConfigError(f"--journal {journal} is the same file as {what} ({path}); the map, its report and "
                              "the journal need a file each: pass another --journal PATH")
    TextJournal.check_replaceable(journal)  # never start a journal over a map or another file of the user's
    info = checks.model_info("--model", args.model)
    earlier = _check_replaced_map(Path(args.out), info)
    torch.set_num_threads(args.threads)
    settings = CalibrationSettings(
        num_texts=args.num_texts, max_generated=args.max_generated, seed=args.seed, batch_size=args.batch_size,
        select=select, store=store, heldout_texts=args.heldout,
    )
    if not args.progress:  # no bar at all, the model load's included (progress is logged at INFO)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok, name = load_model(args.model, dtype=args.dtype, device=device)
    if earlier is not None:  # same shape: the weights tell a fine-tune, or the base model, from this one
        from ..errors import MapMismatchError
        from ..hf.guard import check_map_weights
        from ..hf.introspect import fingerprint

        try:
            if not earlier.fits_weights(fingerprint(model)):
                raise MapMismatchError("another final norm")
            check_map_weights(earlier, model, name)
        except MapMismatchError:
            raise ConfigError(f"--out {args.out}: holds the neuron map of '{earlier.meta.model_name}', a model of this "
                              "shape with other weights; refusing to replace it: pass another --out PATH, or move "
                              "the file away") from None
        print(f"replacing the earlier map of '{earlier.meta.model_name}' at {args.out} once the new one is written",
              file=sys.stderr)
    source = args.model if args.model in EMBEDDED else str(Path(args.model).resolve())  # what the journal names
    try:
        result = calibrate(model, tok, name, settings, progress=args.progress, dtype=args.dtype, journal=journal,
                           resume=args.resume, source=source)
    except KeyboardInterrupt:
        if journal.is_file():  # what a stopped run keeps: the same command goes on from it
            how = ("the same command resumes from them (--no-resume starts over)" if args.resume else
                   "run the command again without --no-resume to resume from them")
            print(f"repguard calibrate: interrupted; the texts decided so far are kept in {journal}: {how}",
                  file=sys.stderr)
        raise
    path = result.map.save(args.out)  # replaces --out only with a map that loads back
    if not args.keep_journal:  # the texts are safe to drop only once the map is
        journal.unlink(missing_ok=True)
    print(result.map.summary(top=5))
    print(f"wrote {path}")
    if args.report:
        from ..hf.calibration_report import write_report

        report = write_report(result, path, settings, command=["repguard", *sys.argv[1:]])
        print(f"wrote {report}")
    return 0


def _check_replaced_map(out: Path, info):
    """``--out`` may replace an earlier map of this model (a new calibration), never the map of another: one of
    another shape is refused now; the map of this shape is returned, for its weights to be compared with the
    model's once it is loaded (None: no map there, or a damaged one of this model, said on stderr). A map this
    repguard cannot load is judged by what its header records: another model's, or one of another format
    version (a newer repguard's), is refused too."""
    from ..errors import ConfigError, RepGuardError
    from ..neuron_map import FORMAT_VERSION, NeuronMap, header_metadata

    if not out.is_file():
        return None
    refuse = "refusing to replace it: pass another --out PATH, or move the file away"
    try:
        nmap = NeuronMap.load(out)
    except RepGuardError as exc:
        meta = header_metadata(out) or {}
        name, key = meta.get("model_name"), meta.get("fingerprint")
        if (key is not None and info.shape_key is not None and key != info.shape_key) or (
                name is not None and (key is None or info.shape_key is None) and name != info.name):
            raise ConfigError(f"--out {out}: holds a neuron map of '{name}', another model than '{info.name}', "
                              f"which this repguard cannot read ({exc}); {refuse}") from None
        if "format_version" in meta and meta["format_version"] != FORMAT_VERSION:
            raise ConfigError(f"--out {out}: holds a neuron map of format version {meta['format_version']!r}, which "
                              f"this repguard (format version {FORMAT_VERSION}) cannot read; {refuse}") from None
        print(f"replacing the damaged map at {out} once the new one is written ({exc})", file=sys.stderr)
        return None
    meta = nmap.meta
    other = meta.fingerprint != info.shape_key if info.shape_key is not None else meta.model_name != info.name
    if other:
        raise ConfigError(f"--out {out}: holds the neuron map of '{meta.model_name}' ({meta.architecture}, "
                          f"{meta.num_layers} layers x {meta.intermediate_size} neurons), another model than "
                          f"'{info.name}'; {refuse}")
    return nmap
