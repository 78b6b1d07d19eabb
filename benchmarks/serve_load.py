"""Load test of ``repguard serve`` on loopback with the official ``openai`` client.

32 concurrent streaming clients for 60 s, then the same with injected client disconnects (a share of
the streams is closed after a few chunks). Reports p50/p99 time to first token, generated tokens/s,
5xx and 429 counts, and broken streams (a stream the client did not close that raised or ended
without a finish_reason). Writes a markdown report.

    .venv/bin/python -m benchmarks.serve_load --duration 60 --clients 32 --out benchmarks/serve_load.md
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_support import ServerProcess  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "Repeat after me: go go go go go go",
    "The three primary colours are",
    "1 2 3 1 2 3 1 2 3",
    "Write a short note to a friend about the weather.",
    "The cat. The cat. The cat. The cat.",
]


@dataclass
class Phase:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    status_5xx: int = 0
    status_429: int = 0
    other_errors: int = 0
    broken: int = 0
    loops: int = 0
    repetition_stops: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client_loop(base: str, model: str, stop_at: float, phase: Phase, disconnect_p: float, seed: int,
                 max_tokens: int) -> None:
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
    while time.monotonic() < stop_at:
        prompt = rng.choice(PROMPTS)
        sampling = rng.random() < 0.25
        cut_after = rng.randint(1, 6) if rng.random() < disconnect_p else None
        t0 = time.perf_counter()
        first = None
        tokens = 0
        finish = None
        report = None
        try:
            stream = client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                temperature=0.8 if sampling else 0.0, stream_options={"include_usage": True},
            )
            chunks = 0
            for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if first is None and choice.text:
                        first = time.perf_counter() - t0
                    chunks += 1
                    if choice.finish_reason:
                        finish = choice.finish_reason
                        report = choice.model_extra.get("repguard")
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                if cut_after is not None and chunks >= cut_after:
                    stream.close()  # the client goes away mid-stream
                    tokens = chunks
                    break
            with phase.lock:
                phase.requests += 1
                if first is not None:
                    phase.ttft.append(first)
                phase.tokens += tokens
                if cut_after is not None and finish is None:
                    phase.disconnected += 1
                elif finish is None:
                    phase.broken += 1
                else:
                    phase.completed += 1
                    phase.loops += bool(report and report.get("fired"))
                    phase.repetition_stops += finish == "repetition"
        except openai.APIStatusError as exc:
            with phase.lock:
                phase.requests += 1
                if exc.status_code >= 500:
                    phase.status_5xx += 1
                elif exc.status_code == 429:
                    phase.status_429 += 1
                else:
                    phase.other_errors += 1
        except (openai.APIConnectionError, httpx.HTTPError):
            with phase.lock:
                phase.requests += 1
                phase.broken += 1


def run_phase(server: ServerProcess, model: str, clients: int, duration: float, disconnect_p: float,
              max_tokens: int) -> tuple[Phase, float]:
    phase = Phase()
    t0 = time.monotonic()
    stop_at = t0 + duration
    threads = [threading.Thread(target=_client_loop, args=(server.url + "/v1", model, stop_at, phase, disconnect_p,
                                                           i, max_tokens)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return phase, time.monotonic() - t0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--neuron-map", help="neuron map path (default: the shipped map)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--disconnect-share", type=float, default=0.3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve_load.md"))
    args = ap.parse_args(argv)

    extra = ["--neuron-map", args.neuron_map] if args.neuron_map else []
    server = ServerProcess("--model", args.model, "--threads", str(args.threads), "--max-batch-size",
                           str(args.max_batch_size), "--max-queue", str(2 * args.clients), *extra)
    log = Path(tempfile.mkdtemp(prefix="repguard-load-")) / "server.log"
    server.start(log)
    rows = []
    try:
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        for name, share in (("streaming", 0.0), ("streaming + disconnects", args.disconnect_share)):
            phase, wall = run_phase(server, model, args.clients, args.duration, share, args.max_tokens)
            time.sleep(1.0)
            health = httpx.get(server.url + "/health").json()
            rows.append((name, share, phase, wall, health))
            print(name, phase.requests, "requests", phase.tokens / wall, "tok/s", "health", health, flush=True)
    finally:
        rc = server.stop()
    cmd = "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# repguard serve under load (loopback, official openai client)", "",
        f"Command: `{cmd.strip()}`", "",
        f"Model {args.model}, {args.clients} concurrent streaming clients, {args.duration:.0f} s per phase, "
        f"max_tokens {args.max_tokens}, server --max-batch-size {args.max_batch_size} --threads {args.threads}; "
        "prompts mix normal and looping text, 25% sampled at T=0.8, the rest greedy. Dynamic batching: a batch "
        "runs to its end before the next starts, so TTFT includes queueing behind the running batch.",
        "Machine: 2 shared CPU cores (other jobs were running; absolute numbers are indicative only).", "",
        "| phase | requests | completed | disconnected (injected) | 5xx | 429 | broken streams | TTFT p50 (s) "
        "| TTFT p99 (s) | tokens/s | loops detected | stopped for repetition | slots after (queued/running) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, share, p, wall, health in rows:
        lines.append(
            f"| {name} | {p.requests} | {p.completed} | {p.disconnected} | {p.status_5xx} | {p.status_429} | "
            f"{p.broken} | {_pct(p.ttft, 50):.2f} | {_pct(p.ttft, 99):.2f} | {p.tokens / wall:.1f} | {p.loops} | "
            f"{p.repetition_stops} | {health['queued']}/{health['running']} |"
        )
    lines += ["", f"Server exit after SIGTERM: rc={rc} (uvicorn re-raises SIGTERM after a graceful shutdown: -15).", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    bad = sum(p.status_5xx + p.broken for _, _, p, _, _ in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
