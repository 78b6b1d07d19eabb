"""``repguard serve``: the OpenAI-compatible server (embedded model + transformers guard), or with
``--upstream URL`` the guard in front of an existing vLLM OpenAI server."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve OpenAI-compatible /v1/completions and /v1/chat/completions with the guard",
        description="Settings come from flags, then REPGUARD_<NAME> environment variables, then --config "
        "(JSON or TOML), then defaults. Everything is validated before the model loads.",
    )
    p.add_argument("--config", help="settings file (JSON, or TOML): every setting at the top level, or all in a "
                   "[serve] table (\"serve\" object); env REPGUARD_SERVE_CONFIG")
    p.add_argument("--model", help="embedded model name or local Hugging Face folder (default smollm2-135m)")
    p.add_argument("--served-model-name", help="name reported by /v1/models")
    p.add_argument("--neuron-map", help="neuron map path (default: the shipped map of the model)")
    p.add_argument("--guard", help="default guard config: a preset name or a JSON object of GuardConfig fields")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="where the embedded model runs: cpu, cuda, cuda:N, auto (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require this Bearer key on /v1 routes (prefer REPGUARD_API_KEY)")
    p.add_argument("--auth-metrics", action="store_const", const=True, help="require the key on /metrics too")
    p.add_argument("--auth-health", action="store_const", const=True, help="require the key on /health too")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--batch-wait-ms", type=float)
    p.add_argument("--max-tokens-limit", type=int)
    p.add_argument("--default-max-tokens", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--drain-timeout-s", type=float)
    p.add_argument("--rollback", help="rollback settings of guarded requests: a JSON object of RollbackConfig fields "
                   "(enabled, max_rollbacks, holdback, precise_trigger); {\"enabled\": false}: the single pass")
    p.add_argument("--holdback", type=int, help="streaming: tokens held back before they are sent, so a rollback "
                   "never retracts sent text (default: half the watch window + the n-gram, 210; overrides --rollback's)")
    p.add_argument("--rebatch-steps", type=int, help="embedded: a running batch takes waiting rows in after this many "
                   "steps (0: a batch runs to its end; default 16)")
    p.add_argument("--upstream", metavar="URL", help="guard an existing vLLM OpenAI server at URL instead of "
                   "loading a model (its /v1 routes are forwarded, rolled back on a loop)")
    p.add_argument("--upstream-tokenizer", metavar="PATH", help="local folder with the upstream model's tokenizer "
                   "(default: the upstream's /detokenize)")
    p.add_argument("--upstream-api-key", help="Bearer key of the upstream server (prefer REPGUARD_UPSTREAM_API_KEY)")
    p.add_argument("--upstream-timeout-s", type=float, help="longest wait for the upstream's next byte (default 300)")
    p.add_argument("--upstream-wait-s", type=float, help="at start, how long to wait for the upstream (default 60)")
    p.add_argument("--upstream-neuron-step", choices=["auto", "on", "off"],
                   help="re-decodes switch the mapped neurons off via repguard's vLLM plugin (auto: if it runs there)")
    p.add_argument("--upstream-engine-repair", choices=["auto", "on", "off"],
                   help="re-decodes send the repair with the request, applied by repguard's logits processor in the "
                   "upstream (auto: if it runs there; off: one-token resubmissions)")
    p.add_argument("--check", action="store_true", help="validate the settings, print them (key hidden) and exit")
    p.set_defaults(func=run)


def _guard_arg(value: str | None):
    if value is None:
        return None
    value = value.strip()
    if value.startswith("{"):
        from ..errors import ConfigError

        try:
            return json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"--guard: not valid JSON: {exc}") from None
    return {"preset": value}


def preflight(settings) -> None:
    """What the start checks before it binds, without loading the weights: the model folder (or embedded
    model), the neuron map and its fit to the model, the default guard against the map."""
    from .checks import device, guard_fits, model_info, neuron_map_for

    device("device", settings.device)
    info = model_info("model", settings.model)
    nmap = neuron_map_for("neuron_map", settings.neuron_map, info)
    guard_fits("guard", settings.guard_config(), nmap)


def _json_arg(flag: str, value: str | None):
    if value is None:
        return None
    from ..errors import ConfigError

    try:
        data = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: expected a JSON object")
    return data


def _show(settings) -> dict:
    shown = settings.model_dump()
    for secret in ("api_key", "upstream_api_key"):
        shown[secret] = "***" if shown.get(secret) else None
    return shown


def load_tokenizer(flag: str, path: str):
    """The upstream model's tokenizer from a local folder, or a one-line error naming ``flag``."""
    from pathlib import Path

    from ..errors import ConfigError, require

    if not Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: not a folder")
    transformers = require("transformers", "hf")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a folder it cannot read
        raise ConfigError(f"{flag} {path}: transformers cannot load a tokenizer from it ({exc})") from None


def run_upstream(settings, check: bool) -> int:
    """``--upstream``: no model is loaded; the upstream must answer before the server binds."""
    from ..errors import require

    require("httpx", "serve")
    import uvicorn

    from ..serve.app import create_upstream_app
    from ..serve.upstream import UpstreamProxy

    tokenizer = load_tokenizer("upstream_tokenizer", settings.upstream_tokenizer) if settings.upstream_tokenizer else None
    proxy = UpstreamProxy(settings, tokenizer=tokenizer)
    proxy.connect(wait_s=0.0 if check else settings.upstream_wait_s)
    if check:
        shown = _show(settings)
        shown["upstream_models"] = proxy.models
        shown["upstream_neuron_step_available"] = proxy.neuron_step
        shown["upstream_engine_repair_available"] = proxy.engine_repair
        print(json.dumps(shown, indent=1, allow_nan=False))
        return 0
    app = create_upstream_app(proxy, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new work, let running requests finish
            proxy.draining = True
            super().handle_exit(sig, frame)

    form = "tokens+neurons" if proxy.neuron_step else "tokens"
    print(f"repguard serve: guarding {settings.upstream} ({', '.join(proxy.models)}; rollback form {form}) on "
          f"http://{settings.host}:{settings.port}", flush=True)
    Server(config).run()
    return 0


def run(args) -> int:
    from ..errors import require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    fields = ("model", "served_model_name", "neuron_map", "dtype", "device", "threads", "host", "port", "api_key",
              "auth_metrics", "auth_health", "max_batch_size", "max_queue", "batch_wait_ms", "max_tokens_limit",
              "default_max_tokens", "max_body_bytes", "drain_timeout_s", "rebatch_steps", "upstream", "upstream_tokenizer",
              "upstream_api_key", "upstream_timeout_s", "upstream_wait_s")
    cli = {f: getattr(args, f) for f in fields}
    cli["guard"] = _guard_arg(args.guard)
    cli["rollback"] = _json_arg("--rollback", args.rollback)
    if args.holdback is not None:
        cli["rollback"] = {**(cli["rollback"] or {}), "holdback": args.holdback}
    cli["upstream_neuron_step"] = {"on": True, "off": False, "auto": None, None: None}[args.upstream_neuron_step]
    cli["upstream_engine_repair"] = {"on": True, "off": False, "auto": None, None: None}[args.upstream_engine_repair]
    from ..serve.settings import load_settings

    settings = load_settings(cli, config_file=args.config)
    if settings.upstream:
        embedded_only = ("model", "served_model_name", "neuron_map", "dtype", "device", "threads", "max_batch_size",
                         "max_queue", "batch_wait_ms", "default_max_tokens", "rebatch_steps")
        given = [f for f in embedded_only if cli.get(f) is not None]
        if given:
            from ..errors import ConfigError

            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag}: not used with --upstream (the upstream server runs the model); leave it out")
        return run_upstream(settings, args.check)
    require("transformers", "hf")
    import uvicorn

    from ..serve.app import build_engine, create_app

    preflight(settings)
    if args.check:
        print(json.dumps(_show(settings), indent=1, allow_nan=False))
        return 0
    engine = build_engine(settings)
    app = create_app(engine, settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout_s, access_log=False,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new work, let admitted requests finish
            engine.drain()
            super().handle_exit(sig, frame)

    print(f"repguard serve: {engine.model_name} on http://{settings.host}:{settings.port}", flush=True)
    Server(config).run()
    return 0

