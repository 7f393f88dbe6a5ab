"""Users per hour vs Ray actors, on the default model, side by side in one run; plus what bounds 1M users.

Per configuration, the same pairs job (``--users`` users made from the demo users' histories, the
first ``--prompts`` built-in prompts, greedy, ``--max-new-tokens``, blocks of ``--users-per-block``)
and the same fitting job (``stylevector`` on those pairs) run:

* ``in-process``: :func:`repedit.pairs.generate` / :func:`repedit.evaluate.fitting.fit_users` in this
  process (torch on all cores);
* ``ray x1``: :func:`repedit.scale.pairs_on_ray` / ``fit_on_ray`` on one actor holding all cores;
* ``ray x2``: two actors, the cores split between them.

Reported: wall seconds (model loading counts: in-process its load, Ray from creating the actors;
the Ray start is shown apart), users per hour, and the ratio to in-process (run first and again last,
because a shared machine drifts). Then the costs that grow with the number
of users already written — one vector-store write of ``--users-per-block`` users into a store of N
users, and one pairs ``.state.json`` write with N users' insights — for N in ``--store-sizes``.

    python benchmarks/scale.py --users 8 --prompts 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ holds kernels.py, store.py, ...: keep it off the path (transformers imports a top-level `kernels`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from repedit import load_model  # noqa: E402
from repedit.evaluate.fitting import FitOptions, fit_users  # noqa: E402
from repedit.io import write_json  # noqa: E402
from repedit.model.generation import GenerationSettings  # noqa: E402
from repedit.pairs import generate  # noqa: E402
from repedit.pairs.users import User, demo_prompts, demo_users  # noqa: E402
from repedit.scale import fit_on_ray, pairs_on_ray, ray_session  # noqa: E402
from repedit.steering import SiteEdit, UserEdit  # noqa: E402
from repedit.store import VectorStore  # noqa: E402


def make_users(n: int) -> list[User]:
    demo = demo_users()
    return [User(f"{demo[i % len(demo)].user_id}_{i}", demo[i % len(demo)].history[:6]) for i in range(n)]


def store_write_seconds(n_users: int, per_write: int, d_model: int, repeats: int = 3) -> float:
    """Median seconds of one store write of ``per_write`` users into a store that holds ``n_users``."""
    def edit(user: str) -> UserEdit:
        return UserEdit(user, [SiteEdit("resid_post.12", "add", vector=torch.randn(d_model))], "llama-bench", d_model)

    with tempfile.TemporaryDirectory() as folder:
        store = VectorStore(folder, create=True)
        store.put_many([edit(f"u{i}") for i in range(n_users)])
        times = []
        for r in range(repeats):
            started = time.perf_counter()
            store.put_many([edit(f"new{r}_{i}") for i in range(per_write)])
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def state_write_seconds(n_users: int, repeats: int = 3) -> float:
    """Median seconds of one atomic write of a pairs state with ``n_users`` users' insights and selections."""
    state = {"config": "x" * 64, "selected": {f"u{i}": [0, 3, 5, 7] for i in range(n_users)},
             "insights": {f"u{i}": "This user writes short, cheerful answers with emoji and asks questions back." * 2 for i in range(n_users)},
             "neutral": {}, "dropped": {}}
    with tempfile.TemporaryDirectory() as folder:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            write_json(Path(folder) / "pairs.jsonl.state.json", state)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--users-per-block", type=int, default=2)
    parser.add_argument("--store-sizes", type=int, nargs="+", default=[1000, 4000])
    args = parser.parse_args()
    cores = torch.get_num_threads()
    users, prompts = make_users(args.users), demo_prompts()[: args.prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, repetition_penalty=1.2, batch_size=8)
    options = FitOptions(method="stylevector", batch_size=8)  # real-history pairs: they survive short answers
    rows = []

    def in_process(out: Path, name: str) -> list:
        """The single-process pairs and fit jobs; appends a row and returns the pairs."""
        started = time.perf_counter()
        model, tokenizer = load_model()  # counted, as each actor's model load is
        pairs = generate(model, tokenizer, users, prompts, out=out / "single.jsonl", settings=settings, truncated="trim",
                         users_per_block=args.users_per_block, progress=False)
        pairs_seconds = time.perf_counter() - started
        started = time.perf_counter()
        fit_users(model, tokenizer, pairs, options, progress=False)
        rows.append((name, pairs_seconds, time.perf_counter() - started))
        return pairs

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        pairs = in_process(out, "in-process")
        started = time.perf_counter()
        with ray_session("local", num_cpus=cores):
            ray_start = time.perf_counter() - started
            for actors in (1, 2):
                started = time.perf_counter()
                on_ray = pairs_on_ray("smollm2-135m-instruct", users, prompts, out / f"ray{actors}.jsonl", actors=actors, settings=settings,
                                      truncated="trim", users_per_block=args.users_per_block, progress=False)
                pairs_seconds = time.perf_counter() - started
                same = (out / f"ray{actors}.jsonl").read_bytes() == (out / "single.jsonl").read_bytes()
                started = time.perf_counter()
                fit_on_ray("smollm2-135m-instruct", on_ray, out / f"store{actors}", options=options, actors=actors,
                           users_per_task=args.users_per_block, progress=False)
                rows.append((f"ray x{actors}" + ("" if same else " (pairs differ!)"), pairs_seconds, time.perf_counter() - started))
        in_process(Path(tempfile.mkdtemp(dir=folder)), "in-process again")  # the machine drifts: the first row, repeated last
    print(f"{args.users} users x {args.prompts} prompts, {args.max_new_tokens} new tokens, blocks of {args.users_per_block}, "
          f"{cores} cores; {len(pairs)} pairs; local Ray start {ray_start:.1f} s (not counted below)")
    base_pairs, base_fit = rows[0][1], rows[0][2]
    print(f"{'config':<14}{'pairs s':>9}{'users/h':>9}{'x':>6}{'fit s':>8}{'users/h':>10}{'x':>6}")
    for name, p, f in rows:
        print(f"{name:<14}{p:>9.1f}{args.users / p * 3600:>9.0f}{base_pairs / p:>6.2f}{f:>8.1f}{args.users / f * 3600:>10.0f}{base_fit / f:>6.2f}")
    print("writes that grow with the users already written:")
    for n in args.store_sizes:
        print(f"  N={n:>6}: store write of {args.users_per_block} users {store_write_seconds(n, args.users_per_block, 576) * 1000:8.1f} ms, "
              f"pairs state write {state_write_seconds(n) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
