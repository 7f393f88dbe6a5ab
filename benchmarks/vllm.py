"""Generation throughput on the default model, side by side in one run: vLLM (unsteered and with 32
distinct users through repedit's worker extension), repedit's own engine, and Hugging Face ``generate``.

Every condition generates the same ``--requests`` chat requests (built-in prompts), greedy,
``--max-tokens`` new tokens each (``ignore_eos`` in vLLM; repedit's paths stop at end-of-turn, so
tokens are counted, not assumed). Users: ``--users`` random directions at ``resid_post.12`` with norm
30 (~0.3x the residual norm there), request i steered as user i mod users.

1. **vLLM unsteered**: ``LLM.generate`` on all requests at once (vLLM schedules them);
2. **vLLM steered**: the same, each request with its user (``repedit.serve.vllm.generate``);
3. **repedit engine**: every request submitted at once to :class:`repedit.serve.Engine` (continuous
   batching, per-row steering), max batch = ``--requests``;
4. **HF generate**: one mixed-user batch through ``steer()`` + ``generate_batch`` (``model.generate``).

Throughput = generated tokens / wall seconds; the steered runs also report the time spent inside
repedit's hooks (the worker extension's ``repedit_status``: ``hook_seconds`` over ``forwards``). Conditions alternate for ``--repeats`` rounds; medians
are reported. Both engines get the same two cores (vLLM: ``VLLM_CPU_OMP_THREADS_BIND``; torch:
``--threads``). ``--vllm-dtype`` / ``--model-dtype`` (default float32) set vLLM's dtype and that of the HF model
behind repedit's engine and HF generate (bfloat16 is what vLLM's ``dtype="auto"`` picks on CPU for this model).
Targets (issue 14): vLLM steered >= 0.9x vLLM unsteered and >= 2x repedit's engine.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        python benchmarks/vllm.py --requests 32 --users 32 --max-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# This file is named vllm.py: drop its folder from the path so that `import vllm` finds vLLM, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="vLLM's weights and activations (bfloat16 is what vLLM's dtype 'auto' picks on CPU for this model)")
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the HF model behind repedit's engine and HF generate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vllm

    from repedit import load_model, model_fingerprint
    from repedit.model.generation import GenerationSettings, generate_batch, render_chat
    from repedit.model.loading import DEFAULT_MODEL
    from repedit.pairs.users import demo_prompts
    from repedit.serve import Engine, GenerationRequest, SamplingParams, Tokens
    from repedit.serve.vllm import generate, load_llm
    from repedit.steering import SiteEdit, UserEdit, steer
    from repedit.store import save_edits

    model, tokenizer = load_model(dtype=getattr(torch, args.model_dtype))
    fingerprint, width = model_fingerprint(model), model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    edits = {}
    for u in range(args.users):
        vector = torch.randn(width, generator=generator)
        edits[f"user{u}"] = UserEdit(f"user{u}", [SiteEdit("resid_post.12", "add", vector=vector / vector.norm() * 30)], fingerprint, width)
    prompts = demo_prompts()
    chats = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(args.requests)]
    ids = [render_chat(tokenizer, c) for c in chats]
    users = [f"user{i % args.users}" for i in range(args.requests)]
    names = sorted(edits)

    with tempfile.TemporaryDirectory() as work:
        store = save_edits(edits, work)
        llm = load_llm(DEFAULT_MODEL, store, max_model_len=512, refresh_seconds=60.0, dtype=args.vllm_dtype)
        params = vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

        def vllm_unsteered():
            out = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in out)

        hooks = {"seconds": 0.0, "forwards": 0, "wall": 0.0}

        def vllm_steered():
            before = llm.collective_rpc("repedit_status")[0]
            start = time.perf_counter()
            out = generate(llm, ids, users, store, params)
            hooks["wall"] += time.perf_counter() - start
            after = llm.collective_rpc("repedit_status")[0]
            hooks["seconds"] += after["hook_seconds"] - before["hook_seconds"]
            hooks["forwards"] += after["forwards"] - before["forwards"]
            return sum(len(o.outputs[0].token_ids) for o in out)

        def repedit_engine():
            engine = Engine(model, tokenizer, max_batch_size=args.requests, batch_window=0.05).start()
            counts, done = [0], threading.Semaphore(0)

            def on_event(event):
                if isinstance(event, Tokens):
                    counts[0] += len(event.ids)
                else:
                    done.release()

            try:
                for prompt_ids, user in zip(ids, users):
                    engine.submit(GenerationRequest(prompt_ids, edits[user], SamplingParams(max_tokens=args.max_tokens), on_event))
                for _ in ids:
                    done.acquire()
            finally:
                engine.close()
            return counts[0]

        def hf_generate():
            with steer(model, [edits[n] for n in names], [names.index(u) for u in users]):
                out = generate_batch(model, tokenizer, chats, GenerationSettings(max_new_tokens=args.max_tokens, batch_size=args.requests))
            return sum(g.n_tokens for g in out)

        conditions = {"vLLM unsteered": vllm_unsteered, "vLLM, 32 users": vllm_steered, "repedit engine": repedit_engine, "HF generate": hf_generate}
        for run in conditions.values():  # warm-up (not timed)
            if run is not hf_generate:
                run()
        rates: dict[str, list[float]] = {name: [] for name in conditions}
        hooks.update(seconds=0.0, forwards=0, wall=0.0)  # the timed rounds only
        for _ in range(args.repeats):
            for name, run in conditions.items():
                start = time.perf_counter()
                tokens = run()
                rates[name].append(tokens / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{args.requests} requests, {args.users} users, {args.max_tokens} tokens each, {args.threads} threads, {args.repeats} repeats; "
          f"vLLM {args.vllm_dtype}, repedit engine and HF {args.model_dtype}")
    print(f"{'condition':<16} {'tokens/s (median)':>18} {'runs':>24} {'x vLLM unsteered':>17}")
    for name in conditions:
        runs = ", ".join(f"{v:.1f}" for v in rates[name])
        print(f"{name:<16} {median[name]:>18.1f} {runs:>24} {median[name] / median['vLLM unsteered']:>17.2f}")
    print(f"vLLM steered / repedit engine: {median['vLLM, 32 users'] / median['repedit engine']:.2f}x; "
          f"vLLM steered / HF generate: {median['vLLM, 32 users'] / median['HF generate']:.2f}x")
    print(f"repedit's hooks in the steered vLLM runs: {hooks['seconds'] * 1e3:.0f} ms over {hooks['forwards']} forwards "
          f"({hooks['seconds'] / max(hooks['forwards'], 1) * 1e3:.2f} ms per forward, {100 * hooks['seconds'] / max(hooks['wall'], 1e-9):.1f}% of their wall time)")


if __name__ == "__main__":
    main()
