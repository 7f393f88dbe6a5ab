"""``repedit pairs`` and ``repedit lamp ...``: per-user preference pairs and LaMP benchmark files."""

from __future__ import annotations

import argparse

from ..pairs.synthesis import DEFAULT_SETTINGS as PAIR_SETTINGS
from .common import add_input_limits, add_model_argument, add_ray_arguments, ray_if_asked


def _pairs(args: argparse.Namespace) -> None:
    with ray_if_asked(args):
        _run_pairs(args, args.ray is not None)


def _run_pairs(args: argparse.Namespace, on_ray: bool) -> None:
    from ..model.generation import GenerationSettings
    from ..model.loading import load_model
    from ..pairs.synthesis import generate
    from ..pairs.users import demo_prompts_path, demo_users_path, read_prompts, read_users

    limits = dict(max_text_chars=args.max_text_chars or None, max_items=args.max_history_items or None)
    if on_ray and args.users != "demo":
        from ..scale import read_users_dataset

        users = read_users_dataset(args.users, **limits)[: args.max_users]  # Ray Data: Parquet or JSONL
    else:
        users = read_users(demo_users_path() if args.users == "demo" else args.users, **limits)[: args.max_users]
    if args.hold_out:
        from ..pairs.users import split_history

        users, _ = split_history(users, args.hold_out)  # keep them unseen for `repedit eval --hold-out`
    prompts = read_prompts(demo_prompts_path() if args.prompts == "demo" else args.prompts, max_chars=args.max_prompt_chars or None)[: args.max_prompts]
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size, repetition_penalty=args.repetition_penalty,
    )
    options = dict(k=args.k, settings=settings, near_duplicate=args.near_duplicate, real_history=not args.no_real_history,
                   truncated=args.truncated, users_per_block=args.users_per_block)
    if on_ray:
        from ..scale import pairs_on_ray

        pairs = pairs_on_ray(args.model, users, prompts, args.out, actors=args.actors, num_gpus=args.num_gpus, **options)
    else:
        model, tokenizer = load_model(args.model)
        pairs = generate(model, tokenizer, users, prompts, out=args.out, **options)
    by_source: dict[str, int] = {}
    for pair in pairs:
        by_source[pair.source] = by_source.get(pair.source, 0) + 1
    print(f"{len(pairs)} pairs for {len(users)} users x {len(prompts)} prompts -> {args.out} ({by_source}); "
          f"dropped pairs and their reasons are in {args.out}.state.json")


def _lamp_convert(args: argparse.Namespace) -> None:
    from ..pairs.lamp import read_lamp, write_lamp

    data = read_lamp(args.questions, args.outputs, task=args.task)
    users_path, items_path = write_lamp(data, args.out)
    n_history = sum(len(user.history) for user in data.users)
    print(f"{data.task}: {len(data.users)} users ({n_history} history items), {len(data.items)} held-out items "
          f"({'with' if args.outputs else 'without'} gold outputs) -> {users_path}, {items_path}")


def _lamp_score(args: argparse.Namespace) -> None:
    import json

    from ..pairs.lamp import score_files

    print(json.dumps(score_files(args.outputs, args.predictions, task=args.task, use_stemmer=args.use_stemmer), indent=2))


def add_commands(commands: argparse._SubParsersAction) -> None:
    pairs = commands.add_parser("pairs", help="self-generate per-user preference pairs (personalised vs neutral); resumable")
    pairs.add_argument("--users", required=True, help="users JSONL (user_id, history, profile), or 'demo' for the built-in users; "
                       "with --ray also Parquet (a file or a folder)")
    pairs.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl, or 'demo' for the built-in prompts")
    pairs.add_argument("--out", required=True, help="output pairs JSONL; rerun the same command to resume")
    add_model_argument(pairs)
    pairs.add_argument("--k", type=int, default=4, help="representative history items shown per user (default 4)")
    pairs.add_argument("--max-new-tokens", type=int, default=PAIR_SETTINGS.max_new_tokens)
    pairs.add_argument("--batch-size", type=int, default=8)
    pairs.add_argument("--repetition-penalty", type=float, default=PAIR_SETTINGS.repetition_penalty)
    pairs.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (use --seed)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--temperature", type=float, default=0.7)
    pairs.add_argument("--top-p", type=float, default=0.95)
    pairs.add_argument("--near-duplicate", type=float, default=0.995, help="drop pairs whose responses' hidden-state cosine exceeds this")
    pairs.add_argument("--truncated", default="trim", choices=["drop", "trim", "keep"], help="answers cut at max-new-tokens: trim to the last full sentence (default), drop the pair, or keep them as they are")
    pairs.add_argument("--no-real-history", action="store_true", help="skip real-history (StyleVector) pairs")
    pairs.add_argument("--hold-out", type=int, default=0, help="leave each user's last N history items with a prompt out (for repedit eval)")
    pairs.add_argument("--max-users", type=int, default=None, help="use only the first N users")
    pairs.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    add_input_limits(pairs)
    add_ray_arguments(pairs, unit="--users-per-block", unit_help="users whose insights and answers are batched together: "
                      "the unit of work of a worker and of resuming (default 8)")
    pairs.set_defaults(run=_pairs)
    lamp = commands.add_parser("lamp", help="LaMP benchmark files: convert to users/items JSONL, score predictions with the official metrics")
    lamp_sub = lamp.add_subparsers(dest="lamp_command", required=True)
    lamp_convert = lamp_sub.add_parser("convert", help="LaMP *_questions.json (+ *_outputs.json) -> DIR/users.jsonl + DIR/items.jsonl")
    lamp_convert.add_argument("--questions", required=True, help="LaMP questions JSON (a list of {id, input, profile})")
    lamp_convert.add_argument("--outputs", default=None, help="LaMP outputs JSON ({task, golds}); without it items have no target")
    lamp_convert.add_argument("--task", default=None, help="LaMP_1, LaMP_2, LaMP_3, LaMP_4, LaMP_5 or LaMP_7 (default: the outputs file's task)")
    lamp_convert.add_argument("--out", required=True, help="output directory: users.jsonl (for repedit pairs) + items.jsonl")
    lamp_convert.set_defaults(run=_lamp_convert)
    lamp_score = lamp_sub.add_parser("score", help="official LaMP metrics of predictions against an outputs file, printed as JSON")
    lamp_score.add_argument("--outputs", required=True, help="LaMP outputs JSON with the gold outputs")
    lamp_score.add_argument("--predictions", required=True, help="predictions: JSON {task, golds: [{id, output}]} like LaMP's, or .jsonl of {id, output}")
    lamp_score.add_argument("--task", default=None, help="override the task of the outputs file")
    lamp_score.add_argument("--use-stemmer", action="store_true", help="Porter stemming in ROUGE (the official LaMP script does not stem)")
    lamp_score.set_defaults(run=_lamp_score)
