"""Cost of trained per-user edits on the default model, side by side in one run:

1. one user trained alone;
2. N users (default 8) trained jointly in one batch (each row steered by its own user's parameters).

Both run the same number of epochs (early stopping off: ``patience`` = epochs) on the same pairs,
so the joint run's extra time is what the extra users cost. Reports seconds, seconds per user,
the marginal cost of a user in the joint run relative to a lone user
(``(t_joint − t_alone) / (N − 1) / t_alone``; issue 12 target ≤ 0.3) and the lone user's time
(target ≤ 60 s on 1 CPU thread). Each run is repeated ``--repeats`` times; the minimum is quoted.

    python benchmarks/train.py --pairs runs/demo/pairs.jsonl --threads 1 --epochs 4
"""

from __future__ import annotations

import argparse
import time

import torch

from repedit import load_model
from repedit.pairs import read_pairs
from repedit.steering.train import TrainSettings, train_user_edits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", required=True, help="pairs JSONL with real-history pairs (e.g. runs/demo/pairs.jsonl from repedit demo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    pairs = read_pairs(args.pairs)
    users = list(dict.fromkeys(p.user_id for p in pairs))[: args.users]
    settings = TrainSettings(layers=(args.layer,), epochs=args.epochs, patience=args.epochs)
    neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs if p.source != "real-history"))[: settings.n_neutral]

    def run(subset: list[str]) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            train_user_edits(model, tokenizer, [p for p in pairs if p.user_id in subset], settings=settings, neutral=neutral, progress=False)
            best = min(best, time.perf_counter() - started)
        return best

    alone = run(users[:1])
    joint = run(users)
    n = len(users)
    marginal = (joint - alone) / max(n - 1, 1) / alone
    print(f"threads {args.threads}, epochs {args.epochs}, layer {args.layer}, users {n}")
    print(f"{'run':<28}{'seconds':>9}{'s/user':>9}")
    print(f"{'1 user alone (' + users[0] + ')':<28}{alone:>9.1f}{alone:>9.1f}")
    print(f"{f'{n} users jointly':<28}{joint:>9.1f}{joint / n:>9.1f}")
    print(f"marginal cost of a user in the joint run: {marginal:.2f}x a lone user (target <= 0.3); lone user {alone:.1f} s (target <= 60 s)")


if __name__ == "__main__":
    main()
