"""Steering throughput on the default model, side by side in one run:

1. unsteered batched generation (32 rows);
2. steered, 32 different users in one mixed batch (one ``add`` edit per user at ``resid_post.12``);
3. the same 32 users run one at a time (batch 1, each with its own edit).

Every row generates exactly ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), so
tokens/s compare like for like. Batched rows repeat ``--repeats`` times (median); the one-at-a-time
run is done once. Targets (issue "Align it"): mixed batch ≥ 0.95× unsteered throughput and ≥ 4×
faster than one at a time.

    python benchmarks/steering.py --threads 1 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repedit import load_model, model_fingerprint
from repedit.model.generation import left_pad, render_chat
from repedit.pairs.users import demo_prompts
from repedit.steering import SiteEdit, UserEdit, steer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    torch.manual_seed(0)
    fingerprint = model_fingerprint(model)
    # Strength ~0.25 x the residual norm at layer 12 (~100): fluent, but a real edit on every row.
    users = [UserEdit(f"user{i}", [SiteEdit("resid_post.12", "add", vector=torch.nn.functional.normalize(torch.randn(576), dim=0) * 25)], fingerprint, 576)
             for i in range(args.rows)]
    prompts = (demo_prompts() * 2)[: args.rows]
    sequences = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def mixed_batch() -> float:
        start = time.perf_counter()
        with steer(model, users, list(range(args.rows))), torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **settings)
        return time.perf_counter() - start

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **settings)
        return time.perf_counter() - start

    plain()  # warm-up
    times = {"unsteered batch": [], "steered mixed batch": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        times["unsteered batch"].append(plain())
        times["steered mixed batch"].append(mixed_batch())
    start = time.perf_counter()
    for row in range(args.rows):
        with users[row].apply(model), torch.no_grad():
            model.generate(input_ids=torch.tensor([sequences[row]]), **settings)
    one_at_a_time = time.perf_counter() - start

    tokens = args.rows * args.new_tokens
    unsteered = statistics.median(times["unsteered batch"])
    mixed = statistics.median(times["steered mixed batch"])
    print(f"torch threads {args.threads}, {args.rows} rows x {args.new_tokens} new tokens, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'run':<34}{'seconds':>9}{'tokens/s':>10}")
    for name, seconds in (("unsteered, one batch", unsteered), ("steered, 32 users in one batch", mixed), ("steered, users one at a time", one_at_a_time)):
        print(f"{name:<34}{seconds:>9.2f}{tokens / seconds:>10.1f}")
    print(f"mixed batch throughput / unsteered: {unsteered / mixed:.3f}  (target >= 0.95)")
    print(f"mixed batch speed-up over one at a time: {one_at_a_time / mixed:.2f}x  (target >= 4)")
    print(f"samples (s): unsteered {[round(t, 2) for t in times['unsteered batch']]}, mixed {[round(t, 2) for t in times['steered mixed batch']]}")


if __name__ == "__main__":
    main()
