"""Load test of ``repguard serve`` on loopback with the official ``openai`` client.

Concurrent streaming clients (32 by default) for a fixed time per phase, on a loop-prone prompt mix,
against the embedded backend and against ``--upstream`` in front of a CPU vLLM server. Phases per
backend: rollback on (the default), rollback on with injected client disconnects (a share of the streams
is closed after a few chunks), and the guard off (the unguarded throughput); the embedded backend also
runs with re-batching off (``--rebatch-steps 0``: a batch runs to its end, the behaviour before it), for
time to first token both ways.

Reports per phase: 5xx and 429 counts, broken streams (a stream the client did not close that raised or
ended without a finish_reason), p50/p99 time to first text and to the end, streamed tokens/s, loops the
guard saw, rollbacks and the tokens they decoded and discarded (the server's own counters). Writes a
markdown report and a JSON file.

    .venv/bin/python -m benchmarks.serve_load --duration 60 --clients 32 --backend both
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serve_support import ServerProcess, free_port  # noqa: E402

# Loop-prone: four of the six prompts make greedy SmolLM2 loop within a few dozen tokens.
PROMPTS = [
    "Once upon a time",
    "Repeat after me: go go go go go go",
    "I like apples. I like apples. I like apples.",
    "1 2 3 1 2 3 1 2 3",
    "Write a short note to a friend about the weather.",
    "The cat. The cat. The cat. The cat.",
]
OFF = {"repguard": {"preset": "off"}}


@dataclass
class Phase:
    name: str = ""
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    status_5xx: int = 0
    status_429: int = 0
    other_errors: int = 0
    broken: int = 0
    loops: int = 0
    rollbacks: int = 0
    repetition_stops: int = 0
    wall_s: float = 0.0
    server: dict = field(default_factory=dict)  # the server's counters over the phase
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("ttft", "latency", "lock")}
        data.update(ttft_p50_s=_pct(self.ttft, 50), ttft_p99_s=_pct(self.ttft, 99),
                    latency_p50_s=_pct(self.latency, 50), latency_p99_s=_pct(self.latency, 99),
                    tokens_per_s=self.tokens / self.wall_s if self.wall_s else None)
        return data


def _client_loop(base: str, model: str, stop_at: float, phase: Phase, disconnect_p: float, seed: int,
                 max_tokens: int, guard_off: bool) -> None:
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
    while time.monotonic() < stop_at:
        prompt = rng.choice(PROMPTS)
        sampling = rng.random() < 0.25
        # an injected disconnect: the client goes away after a few chunks, or after waiting a random time for
        # the next byte (a guarded stream may hold all its text back until its end)
        cut_chunks = rng.randint(1, 6) if rng.random() < disconnect_p else None
        wait_s = rng.uniform(0.5, 10.0) if cut_chunks is not None else None
        cut = False
        t0 = time.perf_counter()
        first = None
        tokens = 0
        finish = None
        report = None
        try:
            caller = client.with_options(timeout=wait_s) if wait_s is not None else client
            stream = caller.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                temperature=0.8 if sampling else 0.0, stream_options={"include_usage": True},
                extra_body=OFF if guard_off else None,
            )
            chunks = 0
            try:
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
                    if cut_chunks is not None and chunks >= cut_chunks and finish is None:
                        cut = True
                        stream.close()
                        break
            except (openai.APITimeoutError, httpx.TimeoutException):
                if wait_s is None:
                    raise
                cut = True  # the injected client stopped waiting and closed the connection
                stream.close()
            if cut:
                tokens = 0  # what it received is not counted as delivered output
            with phase.lock:
                phase.requests += 1
                if first is not None:
                    phase.ttft.append(first)
                phase.tokens += tokens
                if cut and finish is None:
                    phase.disconnected += 1
                elif finish is None:
                    phase.broken += 1
                else:
                    phase.completed += 1
                    phase.latency.append(time.perf_counter() - t0)
                    phase.loops += bool(report and report.get("fired"))
                    phase.rollbacks += int((report or {}).get("rollbacks") or 0)
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
        except openai.APITimeoutError:
            with phase.lock:  # an injected client that gave up before the response began
                phase.requests += 1
                if wait_s is not None:
                    phase.disconnected += 1
                else:
                    phase.broken += 1
        except (openai.APIConnectionError, httpx.HTTPError):
            with phase.lock:
                phase.requests += 1
                phase.broken += 1


COUNTERS = ("repguard_rollbacks_total", "repguard_rollback_tokens_total", "repguard_generated_tokens_total",
            "repguard_loops_detected_total")


def _counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)) for name in COUNTERS}


def run_phase(url: str, model: str, name: str, clients: int, duration: float, disconnect_p: float, max_tokens: int,
              guard_off: bool = False) -> Phase:
    phase = Phase(name=name)
    before = _counters(url)
    t0 = time.monotonic()
    stop_at = t0 + duration
    threads = [threading.Thread(target=_client_loop, args=(url + "/v1", model, stop_at, phase, disconnect_p, i,
                                                           max_tokens, guard_off)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall_s = time.monotonic() - t0
    time.sleep(1.0)
    after = _counters(url)
    phase.server = {k: after[k] - before[k] for k in COUNTERS}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        health = httpx.get(url + "/health", timeout=10).json()
        phase.server["after_queued"], phase.server["after_running"] = health.get("queued"), health.get("running")
    print(name, json.dumps(phase.summary()), flush=True)
    return phase


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def _load() -> str:
    return " ".join(os.getloadavg().__repr__().strip("()").split(", "))


def embedded_phases(args) -> list[Phase]:
    phases = []
    extra = ["--neuron-map", args.neuron_map] if args.neuron_map else []
    for rebatch in (args.rebatch_steps, 0):
        server = ServerProcess("--model", args.model, "--threads", str(args.threads), "--max-batch-size",
                               str(args.max_batch_size), "--max-queue", str(2 * args.clients), "--rebatch-steps",
                               str(rebatch), *extra)
        server.start(Path(tempfile.mkdtemp(prefix="repguard-load-")) / "server.log")
        try:
            model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
            tag = f"embedded, rebatch {rebatch}"
            phases.append(run_phase(server.url, model, f"{tag}: rollback on", args.clients, args.duration, 0.0,
                                    args.max_tokens))
            if rebatch == 0:
                break  # before/after: only the TTFT phase
            phases.append(run_phase(server.url, model, f"{tag}: rollback on + disconnects", args.clients,
                                    args.duration, args.disconnect_share, args.max_tokens))
            phases.append(run_phase(server.url, model, f"{tag}: guard off", args.clients, args.duration, 0.0,
                                    args.max_tokens, guard_off=True))
        finally:
            rc = server.stop()
            if phases:
                phases[-1].server["exit_rc"] = rc
    return phases


def upstream_phases(args) -> list[Phase]:
    from repguard.hf.models import ensure_converted

    folder = ensure_converted(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="repguard-load-vllm-"))
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(tmp / "cache"), "VLLM_PLUGINS": "",
           "TOKENIZERS_PARALLELISM": "false"}
    log = tmp / "vllm.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
         args.model, "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs",
         str(args.max_batch_size), "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    vllm = f"http://127.0.0.1:{port}"
    phases = []
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vLLM did not start:\n" + log.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(vllm + "/v1/models", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        proxy = ServerProcess("--upstream", vllm, startup_timeout=300)
        proxy.start(tmp / "proxy.log")
        try:
            tag = "upstream (vLLM CPU)"
            phases.append(run_phase(proxy.url, args.model, f"{tag}: rollback on", args.clients, args.duration, 0.0,
                                    args.max_tokens))
            phases.append(run_phase(proxy.url, args.model, f"{tag}: rollback on + disconnects", args.clients,
                                    args.duration, args.disconnect_share, args.max_tokens))
            phases.append(run_phase(proxy.url, args.model, f"{tag}: guard off", args.clients, args.duration, 0.0,
                                    args.max_tokens, guard_off=True))
        finally:
            rc = proxy.stop()
            if phases:
                phases[-1].server["exit_rc"] = rc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return phases


def _f(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def report(args, phases: list[Phase], load_before: str, load_after: str, argv) -> str:
    cmd = "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# repguard serve under load (loopback, official openai client)", "",
        f"Command: `{cmd.strip()}`", "",
        f"Model {args.model}, {args.clients} concurrent streaming clients, {args.duration:.0f} s per phase, "
        f"max_tokens {args.max_tokens}, {args.max_batch_size} rows per batch (vLLM: --max-num-seqs), server "
        f"--threads {args.threads}; the loop-prone prompt mix of `PROMPTS`, 25% sampled at T=0.8, the rest greedy. "
        "Rollback with its defaults (holdback 110 tokens: with this max_tokens a guarded stream's text "
        "arrives with its end, so its time to first text is its latency; the guard-off rows show the queueing).",
        f"Machine: 2 CPU cores shared with other engineers' jobs; load average before {load_before}, after "
        f"{load_after}. Absolute numbers are indicative only; compare phases of one run.", "",
        "| phase | requests | completed | disconnected (injected) | 5xx | 429 | broken streams | TTFT p50 / p99 (s) "
        "| latency p50 / p99 (s) | tokens/s | loops seen | rollbacks | extra decoded tokens | stopped for repetition "
        "| slots after (queued/running) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        s = p.summary()
        lines.append(
            f"| {p.name} | {p.requests} | {p.completed} | {p.disconnected} | {p.status_5xx} | {p.status_429} | "
            f"{p.broken} | {_f(s['ttft_p50_s'])} / {_f(s['ttft_p99_s'])} | {_f(s['latency_p50_s'])} / "
            f"{_f(s['latency_p99_s'])} | {_f(s['tokens_per_s'], '.1f')} | {p.loops} | "
            f"{p.server.get('repguard_rollbacks_total', 0):.0f} | {p.server.get('repguard_rollback_tokens_total', 0):.0f} "
            f"| {p.repetition_stops} | {p.server.get('after_queued', '-')}/{p.server.get('after_running', '-')} |"
        )
    lines.append("")
    for backend in ("embedded, rebatch", "upstream"):
        on = next((p for p in phases if p.name.startswith(backend) and p.name.endswith("rollback on")), None)
        off = next((p for p in phases if p.name.startswith(backend) and p.name.endswith("guard off")), None)
        if on and off and off.tokens:
            extra = on.server.get("repguard_rollback_tokens_total", 0)
            lines.append(f"- {on.name.split(':')[0]}: guarded / unguarded throughput "
                         f"{(on.tokens / on.wall_s) / (off.tokens / off.wall_s):.2f} (streamed tokens/s); the guarded "
                         f"phase decoded {extra:.0f} extra tokens that its rollbacks discarded "
                         f"({extra / max(1, on.tokens):.0%} of the tokens it delivered).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--neuron-map", help="neuron map path (default: the shipped map)")
    ap.add_argument("--backend", choices=["embedded", "upstream", "both"], default="both")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--rebatch-steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--disconnect-share", type=float, default=0.3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "serve_load.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve-load.json"))
    args = ap.parse_args(argv)

    load_before = _load()
    phases: list[Phase] = []
    if args.backend in ("embedded", "both"):
        phases += embedded_phases(args)
    if args.backend in ("upstream", "both"):
        phases += upstream_phases(args)
    load_after = _load()
    text = report(args, phases, load_before, load_after, argv)
    Path(args.out).write_text(text)
    Path(args.json).write_text(json.dumps({"settings": vars(args), "load_before": load_before,
                                           "load_after": load_after, "phases": [p.summary() for p in phases]},
                                          indent=1, allow_nan=False))
    print(text)
    bad = sum(p.status_5xx + p.broken for p in phases)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
