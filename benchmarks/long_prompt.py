"""Can one long prompt stall short requests? repedit's own server on the default model, side by side in one run.

For each engine setting (chunked prefill, the default, and ``--prefill-chunk 0``: every prompt in one
forward, as before), an in-process server (uvicorn thread + the engine's worker thread, as
``repedit serve`` runs) answers:

1. **solo**: ``--short`` short requests, one after the other, nothing else running;
2. **with a long prompt in flight**: one request whose prompt is ``--long-tokens`` tokens (the
   built-in prompts repeated) is sent first; while it is still in flight (checked on ``/health``
   after each short request: it must not have finished), the same short requests are sent one
   after the other.

Short requests: built-in prompts, users with random edits (``resid_post.12``, norm 30), greedy,
``--max-tokens`` tokens each. Reported: median and max latency of the short requests, and their
ratio to solo ("counted": short requests sent while the long one was in flight; without chunking the
first one waits for the whole prefill, and the long request is done before the second is sent). Target (issue 14): with a 6k-token prompt in flight, short requests' latency ≤ 2× solo.

    python benchmarks/long_prompt.py --long-tokens 6000 --short 6 --max-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import httpx
import torch

from repedit import load_model, model_fingerprint
from repedit.pairs.users import demo_prompts
from repedit.serve import BackgroundServer, Limits, ServerConfig, create_app
from repedit.steering import SiteEdit, UserEdit
from repedit.store import save_edits

USERS = ("u0", "u1", "u2", "u3")


def long_prompt_text(tokenizer, tokens: int) -> str:
    """The built-in prompts repeated until the text is ``tokens`` tokens (within one prompt's length)."""
    prompts, text, i = demo_prompts(), "", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += prompts[i % len(prompts)] + " "
        i += 1
    return text


def short_latencies(client: httpx.Client, prompts: list[str], max_tokens: int, long_done: threading.Event | None = None) -> list[float]:
    """Latency of each short request, sent one after the other; with ``long_done``, only the requests
    sent while the long request was still in flight count (at least one must be)."""
    out = []
    for i, prompt in enumerate(prompts):
        if long_done is not None and long_done.is_set():
            break
        start = time.perf_counter()
        response = client.post("/v1/chat/completions", json={"model": "bench", "messages": [{"role": "user", "content": prompt}],
                                                              "max_tokens": max_tokens, "temperature": 0, "user": USERS[i % len(USERS)]})
        response.raise_for_status()
        out.append(time.perf_counter() - start)
    if not out:
        raise RuntimeError("the long request finished before any short request was sent: make --long-tokens larger")
    return out


def run(model, tokenizer, store, prefill_chunk: int | None, args) -> dict[str, float]:
    config = ServerConfig("bench", Limits(max_tokens=64, default_max_tokens=32, max_body_bytes=1 << 22), None, max_batch_size=16,
                          prefill_chunk=prefill_chunk)
    app = create_app(model, tokenizer, store, config)
    prompts = demo_prompts()[: args.short]
    long_text = long_prompt_text(tokenizer, args.long_tokens)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        short_latencies(client, prompts[:2], args.max_tokens)  # warm-up
        solo = short_latencies(client, prompts, args.max_tokens)
        long_done = threading.Event()
        long_seconds: list[float] = []

        def send_long() -> None:
            start = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=1200) as own:
                response = own.post("/v1/chat/completions", json={"model": "bench", "messages": [{"role": "user", "content": long_text}],
                                                                  "max_tokens": 8, "temperature": 0})
            response.raise_for_status()
            long_seconds.append(time.perf_counter() - start)
            long_done.set()

        thread = threading.Thread(target=send_long)
        thread.start()
        while not client.get("/health").json()["in_flight"]:  # the long request has reached the engine
            time.sleep(0.01)
        time.sleep(0.2)
        loaded = short_latencies(client, prompts, args.max_tokens, long_done)
        thread.join()
        health = client.get("/health").json()
    return {"solo_median": statistics.median(solo), "solo_max": max(solo), "loaded_median": statistics.median(loaded), "loaded_max": max(loaded),
            "long_seconds": long_seconds[0], "chunks": health["prefill_chunks"], "counted": len(loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-tokens", type=int, default=6000)
    parser.add_argument("--short", type=int, default=6, help="short requests per phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    fingerprint, width = model_fingerprint(model), model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    edits = {}
    for user in USERS:
        vector = torch.randn(width, generator=generator)
        edits[user] = UserEdit(user, [SiteEdit("resid_post.12", "add", vector=vector / vector.norm() * 30)], fingerprint, width)
    with tempfile.TemporaryDirectory() as work:
        store = save_edits(edits, work)
        results = {label: run(model, tokenizer, store, chunk, args) for label, chunk in (("chunked (128)", 128), ("whole prompts", None))}
    print(f"\nlong prompt ~{args.long_tokens} tokens, {args.short} short requests of {args.max_tokens} tokens, {args.threads} threads")
    print(f"{'engine':<16} {'solo median s':>14} {'in-flight median s':>19} {'max s':>8} {'median ratio':>13} {'max ratio':>10} {'long req s':>11} {'chunks':>7} {'counted':>8}")
    for label, r in results.items():
        print(f"{label:<16} {r['solo_median']:>14.2f} {r['loaded_median']:>19.2f} {r['loaded_max']:>8.2f} {r['loaded_median'] / r['solo_median']:>13.2f} "
              f"{r['loaded_max'] / r['solo_median']:>10.2f} {r['long_seconds']:>11.1f} {r['chunks']:>7} {r['counted']:>8}")


if __name__ == "__main__":
    main()
