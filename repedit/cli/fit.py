"""``repedit fit``: one steering edit per user from pairs (mean-difference methods or trained edits)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_argument, add_ray_arguments, parse_positions, ray_if_asked


def fit_options(args: argparse.Namespace):
    """The :class:`repedit.evaluate.fitting.FitOptions` of a ``repedit fit`` command line."""
    from ..evaluate.fitting import FitOptions

    return FitOptions(
        method=args.method, layers=tuple(args.layers) if args.layers else None, strength=args.strength,
        neutral_strength=args.neutral_strength, positions=parse_positions(args.positions), batch_size=args.batch_size, auto=args.auto,
        strengths=tuple(args.strengths), max_kl=args.max_kl, held_out_fraction=args.held_out_fraction, epochs=args.epochs, lr=args.lr,
        kl_weight=args.kl_weight, preference_weight=args.preference_weight, rank=args.rank, val_items=args.val_items, seed=args.seed,
    )


def _fit(args: argparse.Namespace) -> None:
    from ..io import write_json
    from ..pairs.synthesis import read_pairs
    from ..store.vectors import save_edits

    pairs = read_pairs(args.pairs)
    options = fit_options(args)
    if args.ray is not None:
        from ..scale import fit_on_ray

        with ray_if_asked(args):
            outcome = fit_on_ray(args.model, pairs, args.out, options=options, actors=args.actors, users_per_task=args.users_per_task,
                                 num_gpus=args.num_gpus)
    else:
        from ..evaluate.fitting import fit_users
        from ..model.loading import load_model

        model, tokenizer = load_model(args.model)
        outcome = fit_users(model, tokenizer, pairs, options)
        save_edits(outcome.edits, args.out)
        if outcome.selection is not None:
            outcome.selection.save(Path(args.out) / "selection.json")
        if outcome.training is not None:
            write_json(f"{args.out}/training.json", outcome.training)
    for line in outcome.lines:
        print(line)
    if outcome.training is not None:
        print(f"trained {len(outcome.training['best'])} users jointly in {outcome.training['seconds']:.1f} s")
    print(f"{len(outcome.edits)} edits -> {args.out}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    fit = commands.add_parser("fit", help="fit one steering edit per user from pairs (capture -> probes -> edit)")
    fit.add_argument("--pairs", required=True, help="pairs JSONL/CSV (repedit pairs output, or your own)")
    fit.add_argument("--out", required=True, help="output directory: <user>.safetensors + <user>.json, index.json")
    add_model_argument(fit)
    fit.add_argument("--method", default="caa", choices=["caa", "pca", "chameleon", "stylevector", "trained", "trained_lowrank"],
                     help="trained / trained_lowrank: gradient-trained edits on the users' real texts (repedit.steering.train)")
    fit.add_argument("--layers", type=int, nargs="+", default=None, help="resid_post layers to edit (default: 40%% depth)")
    fit.add_argument("--strength", type=float, default=1.0, help="strength a of each edit (1 = the fitted vector)")
    fit.add_argument("--neutral-strength", type=float, default=1.0, help="strength b of the CHAMELEON projection-out")
    fit.add_argument("--positions", default="all", help="all, prompt, generated, or a token index")
    fit.add_argument("--batch-size", type=int, default=8)
    fit.add_argument("--auto", action="store_true", help="choose layer and strength per user: best held-out gain with KL <= --max-kl")
    fit.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="strengths swept by --auto")
    fit.add_argument("--max-kl", type=float, default=0.05, help="fluency limit for --auto: KL to the unsteered model, nats/token")
    fit.add_argument("--held-out-fraction", type=float, default=0.3, help="share of each user's real-history pairs held out for --auto")
    fit.add_argument("--epochs", type=int, default=8, help="trained methods: most epochs (early stopping per user)")
    fit.add_argument("--lr", type=float, default=0.05, help="trained methods: Adam learning rate of vectors (model units)")
    fit.add_argument("--kl-weight", type=float, default=0.1, help="trained methods: weight of KL(unsteered || steered) on neutral text")
    fit.add_argument("--preference-weight", type=float, default=0.0, help="trained methods: weight of the BiPO-style preference term")
    fit.add_argument("--rank", type=int, default=4, help="trained_lowrank: rank k of the edit")
    fit.add_argument("--val-items", type=int, default=2, help="trained methods: each user's last N real-history pairs validate (early stopping)")
    fit.add_argument("--seed", type=int, default=0)
    add_ray_arguments(fit, unit="--users-per-task", unit_help="users fitted together by one worker task (default 8)")
    fit.set_defaults(run=_fit)
