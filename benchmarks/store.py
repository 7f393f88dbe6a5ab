"""Store compression on the default model: compression ratio vs reconstruction error and steering effect lost.

1. Real-history (StyleVector) pairs for the 8 demo users: each history item's text vs the model's
   neutral answer to its prompt, made by :func:`repedit.pairs.synthesis.generate` (greedy, ``--max-new-tokens``
   per neutral answer, cut back to the last full sentence; one self-generated prompt per user, which
   the stylevector fit ignores). Cached in ``--work`` and resumed on a rerun.
2. One ``stylevector`` edit per user at ``resid_post.12`` (40% depth), strength ``--strength``.
3. The uncompressed store is copied once per ``k`` in ``--ks`` and each copy is compressed to ``k``
   components (capped at n_users − 1 = 7), with the steering effect measured on ``--prompts`` demo
   prompts (definitions in :mod:`repedit.store.compress`): KL(original ‖ compressed), KL(original ‖
   unsteered) and the fraction of the effect lost.

Bytes are the safetensors files of the compressed users plus the basis ("vectors") and the same
with the JSON metadata ("all"); ratio = before / after.

    python benchmarks/store.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def fit_demo_edits(model, tokenizer, work: Path, *, max_new_tokens: int = 48, strength: float = 1.0, progress: bool = True):
    """StyleVector edits of the 8 demo users from real-history pairs (pairs cached under ``work``)."""
    from repedit.model.generation import GenerationSettings
    from repedit.pairs.synthesis import generate
    from repedit.pairs.users import demo_prompts, demo_users_path, read_users
    from repedit.steering import fit_user_edits

    users = read_users(demo_users_path())
    settings = GenerationSettings(max_new_tokens=max_new_tokens, repetition_penalty=1.2, batch_size=8)
    work.mkdir(parents=True, exist_ok=True)
    pairs = generate(model, tokenizer, users, demo_prompts()[:1], out=work / "pairs.jsonl", settings=settings,
                     truncated="trim", progress=progress)
    return fit_user_edits(model, tokenizer, pairs, method="stylevector", strength=strength, progress=progress), pairs


def run_store_benchmark(model=None, tokenizer=None, *, ks: Sequence[int] = (1, 2, 4, 8), work: str | Path = "runs/bench-store",
                        n_prompts: int = 8, max_new_tokens: int = 48, strength: float = 1.0, progress: bool = False) -> list[dict[str, Any]]:
    """Compression ratio vs effect loss for each ``k``: one summary row per ``k`` (see the module docstring).

    Loads the default model when none is given. Importable (e.g. by ``benchmarks/serve.py``).
    """
    from repedit import load_model
    from repedit.pairs.users import demo_prompts
    from repedit.store.vectors import VectorStore

    if model is None:
        model, tokenizer = load_model()
    work = Path(work)
    edits, pairs = fit_demo_edits(model, tokenizer, work, max_new_tokens=max_new_tokens, strength=strength, progress=progress)
    base = work / "store-full"
    shutil.rmtree(base, ignore_errors=True)
    VectorStore(base, create=True).put_many(list(edits.values()))
    prompts = demo_prompts()[:n_prompts]
    rows = []
    for k in ks:
        copy = work / f"store-k{k}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        start = time.perf_counter()
        report = VectorStore(copy).compress(k, model=model, tokenizer=tokenizer, prompts=prompts)
        summary = report.summary()
        rows.append({
            "k": k, "k_used": max(s["k"] for s in report.sites.values()), "users": len(report.users),
            "vector_bytes_before": report.tensor_bytes_before, "vector_bytes_after": report.tensor_bytes_after,
            "vector_ratio": report.tensor_ratio, "all_bytes_before": report.total_bytes_before,
            "all_bytes_after": report.total_bytes_after, "all_ratio": report.total_ratio,
            "explained_variance": min(s["explained_variance"] for s in report.sites.values()),
            "mean_reconstruction_error": summary["mean_reconstruction_error"], "max_reconstruction_error": summary["max_reconstruction_error"],
            "mean_kl_to_original": summary["mean_kl_to_original"], "mean_kl_effect": summary["mean_kl_effect"],
            "mean_effect_lost": summary["mean_effect_lost"], "max_effect_lost": max(e["effect_lost"] for e in report.effect.values()),
            "seconds": time.perf_counter() - start, "per_user": report.to_dict()["effect"],
            "n_pairs": {u: e.provenance["n_pairs"] for u, e in edits.items()},
            "vector_norms": {u: float(e.edits[0].vector.norm()) for u, e in edits.items()},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompts", type=int, default=8, help="demo prompts the steering effect is measured on")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of the neutral answers in the pairs")
    parser.add_argument("--strength", type=float, default=1.0, help="strength a of every stylevector edit")
    parser.add_argument("--work", default="runs/bench-store")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run_store_benchmark(ks=args.ks, work=args.work, n_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                               strength=args.strength, progress=True)
    first = rows[0]
    print(f"\n{first['users']} users, stylevector at resid_post.12, strength {args.strength:g}; pairs per user "
          f"{sorted(first['n_pairs'].values())}; vector norms {min(first['vector_norms'].values()):.1f}-{max(first['vector_norms'].values()):.1f}; "
          f"effect on {args.prompts} demo prompts; torch threads {args.threads}")
    print("| k | k used | explained var. | vector bytes before → after | ratio | all bytes before → after | ratio "
          "| rel. recon. error mean (max) | KL(orig‖comp) nats/tok | KL(orig‖unsteered) | effect lost mean (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['k_used']} | {r['explained_variance']:.3f} | {r['vector_bytes_before']} → {r['vector_bytes_after']} | "
              f"{r['vector_ratio']:.2f}× | {r['all_bytes_before']} → {r['all_bytes_after']} | {r['all_ratio']:.2f}× | "
              f"{r['mean_reconstruction_error']:.3f} ({r['max_reconstruction_error']:.3f}) | {max(r['mean_kl_to_original'], 0.0):.4f} | "
              f"{r['mean_kl_effect']:.4f} | {r['mean_effect_lost']:.3f} ({r['max_effect_lost']:.3f}) |")
    print("(KL values below 0 from float rounding are shown as 0; the JSON keeps them as computed)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
