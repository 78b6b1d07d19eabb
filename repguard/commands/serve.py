"""``repguard serve``: the OpenAI-compatible server (embedded model + transformers guard)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve OpenAI-compatible /v1/completions and /v1/chat/completions with the guard",
        description="Settings come from flags, then REPGUARD_<NAME> environment variables, then --config "
        "(JSON or TOML), then defaults. Everything is validated before the model loads.",
    )
    p.add_argument("--config", help="settings file (JSON, or TOML with an optional [serve] table); env REPGUARD_SERVE_CONFIG")
    p.add_argument("--model", help="embedded model name or local Hugging Face folder (default smollm2-135m)")
    p.add_argument("--served-model-name", help="name reported by /v1/models")
    p.add_argument("--neuron-map", help="neuron map path (default: the shipped map of the model)")
    p.add_argument("--guard", help="default guard config: a preset name or a JSON object of GuardConfig fields")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
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
    from .checks import guard_fits, model_info, neuron_map_for

    info = model_info("model", settings.model)
    nmap = neuron_map_for("neuron_map", settings.neuron_map, info)
    guard_fits("guard", settings.guard_config(), nmap)


def run(args) -> int:
    from ..errors import require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    require("transformers", "hf")
    import uvicorn

    from ..serve.app import build_engine, create_app
    from ..serve.settings import load_settings

    fields = ("model", "served_model_name", "neuron_map", "dtype", "threads", "host", "port", "api_key",
              "auth_metrics", "auth_health", "max_batch_size", "max_queue", "batch_wait_ms", "max_tokens_limit",
              "default_max_tokens", "max_body_bytes", "drain_timeout_s")
    cli = {f: getattr(args, f) for f in fields}
    cli["guard"] = _guard_arg(args.guard)
    settings = load_settings(cli, config_file=args.config)
    preflight(settings)
    if args.check:
        shown = settings.model_dump()
        shown["api_key"] = "***" if settings.api_key else None
        print(json.dumps(shown, indent=1, allow_nan=False))
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
