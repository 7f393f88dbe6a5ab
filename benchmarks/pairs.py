"""Pairs per second for 1 user vs 8 users batched, on the default model; marginal cost per user.

Both jobs use the same prompts and settings; each runs in a fresh output file, so nothing is reused
(insights, neutral answers and personalised answers are all generated). The 8-user job batches rows
of different users together. Printed: wall time, pairs/s, the time a user adds in the batched job
((T8 - T1) / 7), and T8 / (8 x T1), the batched job's cost relative to running the users one at a time.

    python benchmarks/pairs.py --threads 2 --prompts 8 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from repedit import load_model
from repedit.model.generation import GenerationSettings
from repedit.pairs.synthesis import generate
from repedit.pairs.users import demo_prompts, demo_users


def run(model, tokenizer, users, prompts, settings) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pairs = generate(model, tokenizer, users, prompts, out=Path(tmp) / "pairs.jsonl", settings=settings,
                         truncated="trim", real_history=False, progress=False)
        seconds = time.perf_counter() - start
        state = json.loads((Path(tmp) / "pairs.jsonl.state.json").read_text())
    return seconds, len(pairs), len(state["dropped"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    users, prompts = demo_users()[:8], demo_prompts()[: args.prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, repetition_penalty=1.2)
    run(model, tokenizer, users[:1], prompts[:1], settings)  # warm-up
    t1, n1, d1 = run(model, tokenizer, users[:1], prompts, settings)
    t8, n8, d8 = run(model, tokenizer, users, prompts, settings)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, {time.strftime('%Y-%m-%d')}")
    print(f"settings: {args.prompts} prompts, max_new_tokens {args.max_new_tokens}, batch_size {args.batch_size}, greedy, trim")
    print(f"{'job':<22}{'seconds':>9}{'pairs kept':>12}{'dropped':>9}{'pairs/s':>9}{'tasks/s':>9}")
    for name, seconds, kept, dropped, users_n in (("1 user", t1, n1, d1, 1), ("8 users, batched", t8, n8, d8, 8)):
        tasks = users_n * args.prompts
        print(f"{name:<22}{seconds:>9.1f}{kept:>12}{dropped:>9}{kept / seconds:>9.2f}{tasks / seconds:>9.2f}")
    print(f"marginal cost per extra user in the batch: {(t8 - t1) / 7:.1f} s (a lone user costs {t1:.1f} s)")
    print(f"8 users batched / (8 x 1 user): {t8 / (8 * t1):.2f}")


if __name__ == "__main__":
    main()
