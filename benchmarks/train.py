"""Cost of trained per-user edits on the default model, side by side in one run.

Every user is trained **alone** (one run per user), then all N users (default 8) **jointly** in one
batch (each row steered by its own user's parameters). Same settings and pairs in both; by default
early stopping is off (``patience`` = epochs) so that both do the same number of steps and the
difference is what batching saves or costs. ``--early-stopping`` uses the default patience instead
(what a new user actually gets from ``repedit fit --method trained``).

Reported: seconds per user alone (min, median, max), the joint run's seconds and seconds per user,
and two ratios of the joint run to the alone runs:

* ``joint / Σ alone`` — what one batched run costs against N separate runs (1.0 = no saving);
* marginal cost of a user, ``(t_joint − t_alone(first)) / (N − 1) / median(t_alone)`` — issue 12's
  target is ≤ 0.3 (which batching can reach only where rows are nearly free, e.g. on a GPU;
  on a CPU compute grows with the rows).

Every run, alone or joint, takes the same number of steps per epoch (the most training items of the
N users, as a scaled-out run sets it), so an alone run does exactly the work of its user's rows in the
joint run and ends at the same edit. ``--padding`` lists the ``max_padding`` settings to compare side by
side (``inf`` = the old fixed micro-batches of ``batch_size`` rows, padded to their longest row).

Each run is repeated ``--repeats`` times; the minimum is quoted.

    python benchmarks/train.py --pairs runs/demo/pairs.jsonl --threads 1 --epochs 2 --padding 1.25,inf
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from repedit import load_model
from repedit.pairs.synthesis import read_pairs
from repedit.steering.train import TrainSettings, most_training_items, train_user_edits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="pairs JSONL with real-history pairs (e.g. runs/demo/pairs.jsonl from repedit demo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--early-stopping", action="store_true", help="default patience instead of patience = epochs")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda on a GPU machine)")
    parser.add_argument("--padding", default="1.25", help="comma-separated max_padding values to compare (e.g. 1.25,inf)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(device=args.device)
    pairs = read_pairs(args.pairs)
    users = list(dict.fromkeys(p.user_id for p in pairs))[: args.users]
    pairs = [p for p in pairs if p.user_id in users]
    base = TrainSettings(layers=(args.layer,), epochs=args.epochs)
    base = replace(base, steps_per_epoch=most_training_items(pairs, base.val_items),
                   **({} if args.early_stopping else {"patience": max(args.epochs, 1)}))
    neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs if p.source != "real-history"))[: base.n_neutral]
    print(f"device {args.device}, threads {args.threads}, epochs {args.epochs} ({'early stopping' if args.early_stopping else 'no early stopping'}), "
          f"layer {args.layer}, users {len(users)}, {base.steps_per_epoch} steps per epoch", flush=True)
    for padding in [float(v) for v in args.padding.split(",")]:
        measure(model, tokenizer, pairs, users, replace(base, max_padding=padding), neutral, args.repeats)


def measure(model, tokenizer, pairs, users: list[str], settings: TrainSettings, neutral, repeats: int) -> None:
    """Every user alone, then all jointly, under ``settings``; prints the times and ratios."""

    def run(subset: list[str]) -> tuple[float, int, dict]:
        best, epochs = float("inf"), 0
        for _ in range(repeats):
            started = time.perf_counter()
            result = train_user_edits(model, tokenizer, [p for p in pairs if p.user_id in subset], settings=settings, neutral=neutral, progress=False)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
            epochs = max(row["epoch"] for row in result.history)
        return best, epochs, result.edits

    print(f"max_padding {settings.max_padding}:", flush=True)
    alone = {}
    for user in users:
        alone[user] = run([user])
        print(f"  alone {user:<16}{alone[user][0]:>8.1f} s  ({alone[user][1]} epochs)", flush=True)
    joint, joint_epochs, joint_edits = run(users)
    n = len(users)
    times = [t for t, _, _ in alone.values()]
    # Same work, same result: each user's joint edit against its alone edit (model units).
    differs = max(float((alone[u][2][u].edits[0].vector - joint_edits[u].edits[0].vector).abs().max()) for u in users)
    median = statistics.median(times)
    marginal = (joint - times[0]) / max(n - 1, 1) / median
    print(f"alone: min {min(times):.1f} s, median {median:.1f} s, max {max(times):.1f} s per user; sum {sum(times):.1f} s")
    print(f"jointly: {joint:.1f} s ({joint_epochs} epochs), {joint / n:.1f} s per user; largest |joint − alone| edit entry {differs:.1e}")
    print(f"joint / sum alone = {joint / sum(times):.2f}; marginal cost of a user = {marginal:.2f}x a median lone user (target <= 0.3); "
          f"slowest lone user {max(times):.1f} s (target <= 60 s)")


if __name__ == "__main__":
    main()
