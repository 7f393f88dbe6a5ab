"""Peers side by side: repeng and steering-vectors against repedit's methods, same pairs, model and layer, one run.

For every method, one additive vector per user at ``resid_post.L`` (default 12, 40% depth of the default model):

* ``repeng`` — ``ControlVector.train`` (PCA of the paired differences, last token) on each user's self-generated
  pairs. repeng returns unit vectors and leaves the coefficient to the user; it is applied here at the norm of
  the same user's mean difference (the ``caa`` vector), so that both move the model by the same amount;
* ``steering-vectors`` — ``train_steering_vector`` (mean difference at the last token) on the same pairs, as is;
* ``repedit caa`` / ``repedit stylevector`` — :func:`repedit.steering.fit_user_edits` (mean difference over
  the response tokens; stylevector on the users' real-history pairs);
* ``repedit trained`` — with ``--trained-store DIR`` (e.g. ``runs/demo/store``), the trained edits a demo run
  wrote (not refitted here: their cost is what ``benchmarks/train.py`` measures, so fit time shows ``nan``).

Reported per method: fit seconds for all users; held-out log-likelihood (nats/token of the users' held-out real
texts, teacher-forced, the measure `repedit eval` uses) and its gain over unsteered; generation throughput
(new tokens per second, all users' held-out prompts in mixed batches); style attribution accuracy of the answers
(the independent classifier of :class:`repedit.evaluate.StyleAttributor`, trained on the users' training texts;
chance = 1/8). Every method is applied through repedit's ``steer()``, so the comparison is of the vectors.

    python benchmarks/peers.py --pairs runs/demo/pairs.jsonl --trained-store runs/demo/store

Needs ``pip install --no-deps repeng steering-vectors`` (``--no-deps`` keeps pip from changing transformers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from repedit import load_model, model_fingerprint
from repedit.evaluate import StyleAttributor, response_logprobs
from repedit.evaluate.conditions import EVAL_SETTINGS, generate_with_edits
from repedit.evaluate.evaluation import eval_inputs
from repedit.model.generation import GenerationSettings
from repedit.pairs.synthesis import SELF_GENERATED, read_pairs
from repedit.pairs.users import demo_users, read_users
from repedit.steering import SiteEdit, UserEdit, fit_user_edits
from repedit.store import VectorStore


def _chat_text(tokenizer, prompt: str, response: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)


def _vector_edits(model, vectors: dict[str, torch.Tensor], layer: int, method: str) -> dict[str, UserEdit]:
    fingerprint, d_model = model_fingerprint(model), model.config.hidden_size
    return {user: UserEdit(user, [SiteEdit(f"resid_post.{layer}", "add", vector=v.float())], fingerprint, d_model, method=method)
            for user, v in vectors.items()}


def fit_steering_vectors(model, tokenizer, pairs, layer: int) -> dict[str, torch.Tensor]:
    from steering_vectors import train_steering_vector

    vectors = {}
    for user in sorted({p.user_id for p in pairs}):
        samples = [(_chat_text(tokenizer, p.prompt, p.personalized), _chat_text(tokenizer, p.prompt, p.neutral)) for p in pairs if p.user_id == user]
        found = train_steering_vector(model, tokenizer, samples, layers=[layer], read_token_index=-1, move_to_cpu=True, batch_size=8)
        vectors[user] = found.layer_activations[layer].detach().float().cpu()
    return vectors


def fit_repeng(model, tokenizer, pairs, layer: int, norms: dict[str, float]) -> dict[str, torch.Tensor]:
    if not hasattr(np, "float_"):  # repeng 0.x still names np.float_, removed in numpy 2
        np.float_ = np.float64
    from repeng import ControlVector, DatasetEntry

    vectors = {}
    for user in sorted({p.user_id for p in pairs}):
        dataset = [DatasetEntry(_chat_text(tokenizer, p.prompt, p.personalized), _chat_text(tokenizer, p.prompt, p.neutral))
                   for p in pairs if p.user_id == user]
        # repeng's layer i >= 0 reads hidden_states[i + 1], the output of block i: resid_post.layer.
        found = ControlVector.train(model, tokenizer, dataset, hidden_layers=[layer], batch_size=8)
        unit = torch.as_tensor(found.directions[layer]).float()
        vectors[user] = unit / unit.norm() * norms[user]
    return vectors


def measure(model, tokenizer, edits: dict[str, UserEdit] | None, items, attributor, settings: GenerationSettings) -> dict[str, float]:
    users = sorted(edits) if edits else []
    table = [edits[u] for u in users] if edits else None
    rows = [users.index(item.user_id) if edits and item.user_id in edits else None for item in items]
    loglik = response_logprobs(model, tokenizer, [i.prompt for i in items], [i.text for i in items], edits=table, rows=rows if edits else None,
                               batch_size=settings.batch_size)
    conversations = [[{"role": "user", "content": item.prompt}] for item in items]
    start = time.perf_counter()
    answers = generate_with_edits(model, tokenizer, conversations, table or [None], rows if edits else [None] * len(items), settings)
    seconds = time.perf_counter() - start
    return {
        "loglik": float(loglik.mean()),
        "tokens_per_s": sum(a.n_tokens for a in answers) / seconds,
        "attribution": attributor.accuracy([a.text for a in answers], [i.user_id for i in items]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True, help="pairs JSONL made with --hold-out (e.g. runs/demo/pairs.jsonl)")
    parser.add_argument("--users", default="demo", help="users JSONL the pairs were made from, or 'demo'")
    parser.add_argument("--hold-out", type=int, default=3)
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--trained-store", default=None, help="a store of trained edits for the same users (repedit demo's runs/demo/store)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model()
    pairs = read_pairs(args.pairs)
    users = demo_users() if args.users == "demo" else read_users(args.users)
    inputs = eval_inputs(users, pairs, args.hold_out)
    history_users = [u for u, texts in inputs.history.items() for _ in texts]
    attributor = StyleAttributor().fit([t for texts in inputs.history.values() for t in texts], history_users)
    settings = GenerationSettings(**{**EVAL_SETTINGS.to_dict(), "max_new_tokens": args.max_new_tokens})
    own = [p for p in pairs if p.source == SELF_GENERATED]

    fitted: dict[str, tuple[float, dict[str, UserEdit]]] = {}
    start = time.perf_counter()
    caa = fit_user_edits(model, tokenizer, pairs, method="caa", layers=[args.layer], progress=False)
    fitted["repedit caa"] = (time.perf_counter() - start, caa)
    start = time.perf_counter()
    stylevector = fit_user_edits(model, tokenizer, pairs, method="stylevector", layers=[args.layer], progress=False)
    fitted["repedit stylevector"] = (time.perf_counter() - start, stylevector)
    start = time.perf_counter()
    vectors = fit_steering_vectors(model, tokenizer, own, args.layer)
    fitted["steering-vectors"] = (time.perf_counter() - start, _vector_edits(model, vectors, args.layer, "steering-vectors"))
    norms = {u: float((e.edits[0].vector * e.edits[0].a).norm()) for u, e in caa.items()}
    start = time.perf_counter()
    vectors = fit_repeng(model, tokenizer, own, args.layer, norms)
    fitted["repeng"] = (time.perf_counter() - start, _vector_edits(model, vectors, args.layer, "repeng"))
    if args.trained_store:
        store = VectorStore(args.trained_store)  # trained in an earlier run: its cost is benchmarks/train.py's, not repeated here
        fitted["repedit trained"] = (float("nan"), {u: store.get(u, model=model) for u in store.list_users()})

    results = {"unsteered": {"fit_s": 0.0, **measure(model, tokenizer, None, inputs.test_items, attributor, settings)}}
    for name, (seconds, edits) in fitted.items():
        results[name] = {"fit_s": seconds, **measure(model, tokenizer, edits, inputs.test_items, attributor, settings)}
    base = results["unsteered"]["loglik"]
    n_users = len({i.user_id for i in inputs.test_items})
    print(f"{n_users} users, {len(inputs.test_items)} held-out items, resid_post.{args.layer}, {args.max_new_tokens}-token answers; "
          f"attribution chance {attributor.chance:.2f}")
    print(f"{'method':<22}{'fit s':>8}{'loglik':>9}{'gain':>8}{'tok/s':>8}{'attrib':>8}")
    for name, r in results.items():
        print(f"{name:<22}{r['fit_s']:>8.1f}{r['loglik']:>9.3f}{r['loglik'] - base:>+8.3f}{r['tokens_per_s']:>8.1f}{r['attribution']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
