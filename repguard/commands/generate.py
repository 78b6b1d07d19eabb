"""``repguard generate``: guarded generation on a model, optionally beside the unguarded output."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time

from .checks import add_device_options

DEFAULT_PROMPTS = (
    "The tower is 100 meters high. The tower is",
    "Here is a list of the planets in the solar system:\n1.",
    "Once upon a time",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate with the guard (and, with --compare, without it, side by side)",
        description="Generate text with repguard on an embedded model (smollm2-135m, gemma3-270m) or a local "
        "Hugging Face folder. Without --prompt/--prompt-file, a few loop-prone example prompts are used.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name, local HF folder, or .gguf file (default: smollm2-135m)")
    p.add_argument("--map", default=None, help="neuron map path (default: the shipped map for the model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line (use \\n for newlines inside a prompt)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=160, help="tokens to generate per prompt (default: 160)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --sample (default: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --sample (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--preset", default="default", choices=["default", "monitor", "paper", "off"], help="guard preset")
    p.add_argument("--config", help="GuardConfig as JSON text or a path to a JSON file (overrides --preset)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one GuardConfig field, e.g. --set k=64 (repeatable; VALUE is JSON)")
    p.add_argument("--compare", action="store_true", help="also generate unguarded and print both side by side")
    p.add_argument("--rollback", type=int, default=2, metavar="N",
                   help="roll a loop confirmed by the paper's criterion back to its onset and re-decode it with the "
                   "repair active, up to N times per sequence, so the repeated copy never reaches the output "
                   "(default: 2)")
    p.add_argument("--no-rollback", dest="rollback", action="store_const", const=None,
                   help="guard in a single pass instead (hooks only: the form that streams and runs in vLLM)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    add_device_options(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.set_defaults(func=run)


def _load_config(args):
    from ..config import GuardConfig
    from ..errors import ConfigError

    from .checks import read_text

    data: dict = {"preset": args.preset}
    if args.config:
        text = args.config
        if not text.lstrip().startswith(("{", "[")):  # JSON text, or else a file path
            text = read_text("--config", text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: expected a JSON object of GuardConfig fields, got {type(data).__name__}")
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value
    return GuardConfig.from_dict(data)


def _prompts(args) -> list[str]:
    from ..errors import ConfigError
    from .checks import read_text

    if any(not p.strip() for p in args.prompt):
        raise ConfigError("--prompt: a prompt is empty")
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = [line.replace("\\n", "\n") for line in read_text("--prompt-file", args.prompt_file).splitlines()
                 if line.strip()]
        if not lines:
            raise ConfigError(f"--prompt-file {args.prompt_file}: no prompts (every line is blank)")
        prompts += lines
    return prompts or list(DEFAULT_PROMPTS)


def _check_args(args) -> None:
    """Every argument's range, before the model loads."""
    from . import checks

    checks.device("--device", args.device)
    checks.at_least("--max-new-tokens", args.max_new_tokens, 1)
    checks.at_least("--rollback", args.rollback, 0)
    checks.at_least("--batch-size", args.batch_size, 1)
    checks.at_least("--threads", args.threads, 1)
    checks.seed("--seed", args.seed)
    checks.in_range("--temperature", args.temperature, 0.0, 100.0, low_open=True)  # invalid with or without --sample
    checks.in_range("--top-p", args.top_p, 0.0, 1.0, low_open=True)


def run(args) -> int:
    import torch

    from ..errors import ConfigError
    from ..hf.models import input_device, load_model
    from .checks import device, guard_fits, model_info, neuron_map_for

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = _load_config(args)
    prompts = _prompts(args)
    info = model_info("--model", args.model)
    if info.context_length and args.max_new_tokens >= info.context_length:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: the model's context is {info.context_length} tokens")
    nmap = neuron_map_for("--map", args.map, info)  # before the (slow) model load
    guard_fits("--config/--set", config, nmap)
    model, tok, name = load_model(args.model, dtype=args.dtype, device=device("--device", args.device))
    if args.map is None and info.shape_key is not None:  # found by shape: the one calibrated on these weights
        from ..hf.introspect import fingerprint
        from ..maps import find_map

        fp = fingerprint(model)
        if not nmap.fits_weights(fp):
            nmap = find_map(info.name, shape_key=info.shape_key, fits=lambda m: m.fits_weights(fp))
            guard_fits("--config/--set", config, nmap)
    texts = [_render(tok, p, args.chat) for p in prompts]
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    longest = max(len(tok(t, add_special_tokens=not args.chat)["input_ids"]) for t in texts)
    if context and longest + args.max_new_tokens > context:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: with the longest prompt ({longest} tokens) it "
                          f"exceeds the model's context of {context} tokens")
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.pad_token_id)
    if args.sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    batches = [(start, texts[start : start + args.batch_size]) for start in range(0, len(texts), args.batch_size)]
    encoded = [tok(batch, return_tensors="pt", padding=True, add_special_tokens=not args.chat).to(input_device(model))
               for _, batch in batches]
    plain: list[list[int]] = []
    if args.compare:  # the reference run has no hooks installed at all
        for enc in encoded:
            torch.manual_seed(args.seed)
            out = model.generate(**enc, **gen_kwargs)[:, enc.input_ids.shape[1]:]
            plain += [_strip(row.tolist(), tok) for row in out]
    results = []
    if args.rollback is not None and config.repairs:  # a config that repairs nothing (monitor): the single pass
        from ..hf.rollback import generate_with_rollback

        for (start, batch), enc in zip(batches, encoded):
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            kw = {k: v for k, v in gen_kwargs.items() if k != "max_new_tokens"}
            out = generate_with_rollback(model, enc.input_ids, enc.attention_mask, neuron_map=nmap, config=config,
                                         max_new_tokens=args.max_new_tokens, max_rollbacks=args.rollback,
                                         model_name=name, **kw)
            if not args.json:
                print(f"[{len(batch)} prompt(s) guarded with rollback in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
            for i, prompt in enumerate(prompts[start : start + len(batch)]):
                results.append({"prompt": prompt, "guarded_ids": out.sequences[i],
                                "unguarded_ids": plain[start + i] if plain else None, "report": out.reports[i]})
    else:
        results = _generate_guarded(model, tok, nmap, config, name, prompts, batches, encoded, plain, gen_kwargs, args)
    for r in results:
        if args.json:
            print(json.dumps({
                "prompt": r["prompt"],
                "guarded": tok.decode(r["guarded_ids"], skip_special_tokens=True),
                "unguarded": tok.decode(r["unguarded_ids"], skip_special_tokens=True) if r["unguarded_ids"] is not None else None,
                "identical": r["unguarded_ids"] == r["guarded_ids"] if r["unguarded_ids"] is not None else None,
                "report": r["report"].to_dict(),
            }))
        else:
            _show(r, tok)
    return 0


def _generate_guarded(model, tok, nmap, config, name, prompts, batches, encoded, plain, gen_kwargs, args) -> list[dict]:
    import torch

    from ..hf.guard import guard

    results = []
    with guard(model, nmap, config, model_name=name) as g:
        for (start, batch), enc in zip(batches, encoded):
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            guarded = model.generate(**enc, **gen_kwargs)[:, enc.input_ids.shape[1]:]
            if not args.json:
                print(f"[{len(batch)} prompt(s) guarded in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
            for i, prompt in enumerate(prompts[start : start + len(batch)]):
                results.append({
                    "prompt": prompt,
                    "guarded_ids": _strip(guarded[i].tolist(), tok),
                    "unguarded_ids": plain[start + i] if plain else None,
                    "report": g.reports[i],
                })
    return results


def _render(tok, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(tok, "chat_template", None):
        from ..errors import ConfigError

        raise ConfigError("--chat: this model's tokenizer has no chat template")
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _strip(ids: list[int], tok) -> list[int]:
    """Cut after the first EOS and drop trailing padding (rows that ended early are padded)."""
    from ..runtime import token_id_list

    eos, pad = set(token_id_list(tok.eos_token_id)), tok.pad_token_id
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    while ids and ids[-1] == pad:
        ids.pop()
    return ids


def _marked(ids: list[int], report, tok) -> str:
    """Decode ``ids`` with markers where the guard acted (after the token that triggered it)."""
    marks: dict[int, list[str]] = {}
    for change in report.actions:
        marks.setdefault(change.position, []).append(f"⟦{change.level.upper()}⟧")
    if not marks:
        return tok.decode(ids, skip_special_tokens=True)
    out, last = [], 0
    for pos in sorted(marks):
        cut = min(pos + 1, len(ids)) if pos > 0 or report.actions[0].reason != "always_on" else 0
        out.append(tok.decode(ids[last:cut], skip_special_tokens=True))
        out.append("".join(marks[pos]))
        last = cut
    out.append(tok.decode(ids[last:], skip_special_tokens=True))
    return "".join(out)


def _show(r, tok) -> None:
    width = shutil.get_terminal_size((120, 20)).columns
    report = r["report"]
    guarded = _marked(r["guarded_ids"], report, tok)
    print("=" * width)
    print("PROMPT: " + r["prompt"].replace("\n", "⏎ "))
    if r["unguarded_ids"] is not None:
        same = r["unguarded_ids"] == r["guarded_ids"]
        col = max(30, (width - 3) // 2)
        left = _wrap("UNGUARDED", tok.decode(r["unguarded_ids"], skip_special_tokens=True), col)
        right = _wrap("GUARDED" + ("  (identical)" if same else ""), guarded, col)
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            print(f"{a:<{col}} │ {b}")
        if not same:
            first = next((i for i, (a, b) in enumerate(zip(r["unguarded_ids"], r["guarded_ids"])) if a != b),
                         min(len(r["unguarded_ids"]), len(r["guarded_ids"])))
            print(f"-- outputs first differ at generated token {first}")
    else:
        for line in _wrap("GUARDED", guarded, width):
            print(line)
    print("-- repguard report: " + _summary(report))


def _wrap(title: str, text: str, width: int) -> list[str]:
    lines = [title, "-" * min(width, len(title))]
    for para in text.replace("\r", "").split("\n"):
        lines += textwrap.wrap(para, width) or [""]
    return lines


def _summary(report) -> str:
    if report.errors:
        return "the guard failed on this output (logged above) and it was generated unguarded from there"
    if not report.detections and not report.actions:
        return f"no loop detected in {report.tokens_observed} tokens; output untouched"
    det = report.detections[0] if report.detections else None
    parts = []
    if det:
        parts.append(f"loop detected at token {det.position} (onset {det.onset}, period {det.period}, {det.trigger} trigger)")
    if report.actions:
        parts.append("actions: " + ", ".join(f"{a.level}@{a.position} ({a.reason})" for a in report.actions))
    parts.append(f"{report.tokens_under_intervention} tokens under intervention")
    if report.finish_reason:
        parts.append(f"finish_reason={report.finish_reason}")
    if report.max_neuron_score is not None:
        parts.append(f"max neuron z={report.max_neuron_score:.2f}")
    return "; ".join(parts)
