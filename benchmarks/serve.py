"""Serving throughput and latency on the default model, side by side in one run:

1. **offline**: the same requests generated offline, 64 rows per batch, every row with its own user's
   edit in one mixed batch (``steer(model, edits, rows)`` around ``generate_batch``, i.e.
   ``model.generate``);
2. **server (JSON)**: ``repedit serve`` in a subprocess on loopback, ``--clients`` concurrent clients
   (asyncio + httpx, in this process), each sending ``--rounds`` requests one after the other;
3. **server (SSE)**: the same with ``"stream": true`` (adds time to first token).

Every request: one of the built-in prompts, one of ``--users`` users (a random direction at
``resid_post.12`` with norm 30, ~0.3 x the residual norm there), greedy, ``max_tokens`` =
``--max-tokens``. Throughput = completion tokens (end-of-turn excluded) / wall time of the whole
run. Server and offline use ``--threads`` torch threads each (the server via ``OMP_NUM_THREADS``;
torch.set_num_threads here). The server's answers are checked against the offline texts.
Target (issue "Export and serve"): server throughput ≥ 0.8× offline batched generation.

Afterwards (not timed with the rest), the store's compression ratio vs steering effect lost, from
``run_store_benchmark`` in ``benchmarks/store.py`` (skip with ``--no-compression``).

    python benchmarks/serve.py --threads 1 --clients 64 --users 8 --max-tokens 32 --rounds 2 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from repedit import load_model, model_fingerprint
from repedit.model.generation import GenerationSettings, generate_batch
from repedit.pairs.users import demo_prompts
from repedit.steering import SiteEdit, UserEdit, steer
from repedit.store import save_edits

NAME = "smollm2"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(model, tokenizer, edits: dict[str, UserEdit], requests: list[tuple[str, str]], batch: int, max_tokens: int):
    """Mixed-user batched generation of ``requests`` in batches of ``batch``: (seconds, tokens, texts)."""
    users = sorted(edits)
    settings = GenerationSettings(max_new_tokens=max_tokens, batch_size=batch)
    start, texts, tokens = time.perf_counter(), [], 0
    for i in range(0, len(requests), batch):
        part = requests[i:i + batch]
        with steer(model, [edits[u] for u in users], [users.index(u) for u, _ in part]):
            out = generate_batch(model, tokenizer, [[{"role": "user", "content": p}] for _, p in part], settings)
        texts += [g.text for g in out]
        tokens += sum(g.n_tokens for g in out)
    return time.perf_counter() - start, tokens, texts


async def clients(url: str, requests: list[tuple[str, str]], n_clients: int, max_tokens: int, stream: bool):
    """``n_clients`` concurrent clients; client c sends requests c, c + n, c + 2n, ... one at a time.

    Returns (seconds, completion tokens, texts, latencies, times to first token)."""
    texts: list[str | None] = [None] * len(requests)
    latencies, first_tokens, tokens = [], [], [0]
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n_clients)) as http:
        async def one(index: int) -> None:
            user, prompt = requests[index]
            body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "user": user, "max_tokens": max_tokens, "temperature": 0}
            sent = time.perf_counter()
            if stream:
                parts, first = [], None
                async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        for choice in event.get("choices", []):
                            if choice["delta"].get("content"):
                                first = first or time.perf_counter()
                                parts.append(choice["delta"]["content"])
                        if event.get("usage"):
                            tokens[0] += event["usage"]["completion_tokens"]
                texts[index] = "".join(parts)
                first_tokens.append((first or time.perf_counter()) - sent)
            else:
                r = await http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                answer = r.json()
                texts[index] = answer["choices"][0]["message"]["content"]
                tokens[0] += answer["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - sent)

        async def client(c: int) -> None:
            for index in range(c, len(requests), n_clients):
                await one(index)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(n_clients)))
    return time.perf_counter() - start, tokens[0], texts, latencies, first_tokens


def start_server(store: Path, port: int, threads: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "repedit", "serve", "--store", str(store), "--port", str(port), "--served-name", NAME,
               "--max-batch-size", str(batch), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"repedit serve did not start:\n{process.stdout.read() if process.stdout else ''}")
        time.sleep(0.2)


def compression_table(model, tokenizer, work: str) -> None:
    """Print compression ratio vs effect loss from ``benchmarks/store.py`` (the store's own benchmark)."""
    import importlib.util

    path = Path(__file__).with_name("store.py")
    spec = importlib.util.spec_from_file_location("repedit_bench_store", path)
    if not path.exists() or spec is None or spec.loader is None:
        print(f"compression ratio vs effect loss: {path} not found")
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.run_store_benchmark(model, tokenizer, work=work)
    print("store compression (benchmarks/store.py run_store_benchmark: 8 demo users, stylevector at resid_post.12)")
    print(f"{'k':>3} {'vector bytes ratio':>18} {'all bytes ratio':>15} {'effect lost mean':>16} {'max':>6} {'KL(orig||comp)':>14}")
    for r in rows:
        print(f"{r['k']:>3} {r['vector_ratio']:>17.2f}x {r['all_ratio']:>14.2f}x {r['mean_effect_lost']:>16.3f} {r['max_effect_lost']:>6.3f} {r['mean_kl_to_original']:>14.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--repeats", type=int, default=2, help="offline/server pairs run alternately (medians reported)")
    parser.add_argument("--no-compression", action="store_true", help="skip the store compression table")
    parser.add_argument("--store-work", default="runs/bench-store", help="work directory of the store benchmark (pairs cached there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    torch.manual_seed(0)
    fingerprint = model_fingerprint(model)
    edits = {f"user{u}": UserEdit(f"user{u}", [SiteEdit("resid_post.12", "add", vector=torch.nn.functional.normalize(torch.randn(576), dim=0) * 30)], fingerprint, 576)
             for u in range(args.users)}
    prompts = demo_prompts()
    requests = [(f"user{i % args.users}", prompts[i % len(prompts)]) for i in range(args.clients * args.rounds)]
    offline(model, tokenizer, edits, requests[:4], 4, 4)  # warm-up
    rows: dict[str, list] = {"offline": [], "server (JSON)": [], "server (SSE)": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = save_edits(edits, Path(tmp) / "store")
        port = free_port()
        server = start_server(store, port, args.threads, args.clients)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(clients(url, requests[:4], 4, 4, False))  # warm-up
            for _ in range(args.repeats):
                seconds, tokens, reference = offline(model, tokenizer, edits, requests, args.clients, args.max_tokens)
                rows["offline"].append((seconds, tokens, [], [], len(requests)))
                for label, stream in (("server (JSON)", False), ("server (SSE)", True)):
                    seconds, tokens, texts, latencies, ttft = asyncio.run(clients(url, requests, args.clients, args.max_tokens, stream))
                    same = sum(a == b for a, b in zip(texts, reference))
                    rows[label].append((seconds, tokens, latencies, ttft, same))
            counts = httpx.get(f"{url}/health").json()
        finally:
            server.terminate()
            server.wait(30)

    print(f"{len(requests)} requests ({args.clients} clients x {args.rounds} rounds), {args.users} users, max_tokens {args.max_tokens}, "
          f"greedy, {args.threads} torch thread(s) per side, median of {args.repeats} alternating repeats")
    base = statistics.median(t / s for s, t, *_ in rows["offline"])
    print(f"{'run':<15} {'tok/s':>7} {'x offline':>9} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'= offline':>9}")
    for label, runs in rows.items():
        rate = statistics.median(t / s for s, t, *_ in runs)
        latencies = [x for run in runs for x in run[2]]
        ttft = [x for run in runs for x in run[3]]
        cells = [f"{percentile(latencies, 50):7.2f}", f"{percentile(latencies, 95):7.2f}"] if latencies else ["      -", "      -"]
        cells += [f"{percentile(ttft, 50):9.2f}", f"{percentile(ttft, 95):9.2f}"] if ttft else ["        -", "        -"]
        same = min(run[4] for run in runs)
        print(f"{label:<15} {rate:7.1f} {rate / base:9.3f} {' '.join(cells)} {same:>5}/{len(requests)}")
    print("samples (tok/s, in run order): " + "; ".join(f"{label} " + ", ".join(f"{t / s_:.1f}" for s_, t, *_ in runs) for label, runs in rows.items()))
    print("server engine counters (all runs, warm-up included): " + ", ".join(f"{k} {counts[k]}" for k in
          ("prefills", "prefill_rows", "steps", "step_rows", "joined_running_batch", "peak_batch", "finished", "failed")))
    print(f"server worker time (all runs): prefill forwards {counts['prefill_seconds']:.1f} s, decode forwards {counts['decode_seconds']:.1f} s, "
          f"busy {counts['busy_seconds']:.1f} s; offline runs took {sum(s_ for s_, *_ in rows['offline']):.1f} s in all")
    print(f"mean rows per decode step {counts['step_rows'] / max(counts['steps'], 1):.1f}, per prefill {counts['prefill_rows'] / max(counts['prefills'], 1):.1f}")
    if not args.no_compression:
        compression_table(model, tokenizer, args.store_work)


if __name__ == "__main__":
    main()
