"""``repedit fit``: one steering edit per user from pairs (mean-difference methods or trained edits)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .common import add_model_argument, parse_positions


def _fit(args: argparse.Namespace) -> None:
    from ..model.loading import load_model
    from ..pairs.synthesis import read_pairs
    from ..steering.fit import fit_user_edits
    from ..store.vectors import save_edits

    pairs = read_pairs(args.pairs)
    model, tokenizer = load_model(args.model)
    positions = parse_positions(args.positions)
    if args.method in ("trained", "trained_lowrank"):
        edits = _fit_trained(args, model, tokenizer, pairs)
        edits = {user: dataclasses.replace(edit, positions=positions) for user, edit in edits.items()}
    elif args.auto:
        from ..evaluate.select import select_layer_strength, split_for_selection
        from ..steering.fit import default_layers

        train, held_out, neutral = split_for_selection(pairs, args.held_out_fraction)
        layers = args.layers or sorted({max(1, int(default_layers(model)[0] * f)) for f in (0.5, 0.75, 1.0, 1.25)})
        selection = select_layer_strength(
            model, tokenizer, train, held_out, neutral, method=args.method, layers=layers, strengths=args.strengths,
            max_kl=args.max_kl, batch_size=args.batch_size,
        )
        edits = {user: dataclasses.replace(edit, positions=positions) for user, edit in selection.edits.items()}
        selection.save(Path(args.out) / "selection.json")
        for user, choice in selection.choices.items():
            print(f"{user}: layer {choice['layer']}, strength {choice['strength']}, held-out gain {choice['gain']:+.3f} nats/token, KL {choice['kl']:.3f}")
    else:
        edits = fit_user_edits(
            model, tokenizer, pairs, method=args.method, layers=args.layers, strength=args.strength,
            neutral_strength=args.neutral_strength, positions=positions, batch_size=args.batch_size,
        )
    save_edits(edits, args.out)
    for user_id, edit in edits.items():
        print(f"{user_id}: {edit.method} at {', '.join(edit.sites)} from {edit.provenance['n_pairs']} pairs")
    print(f"{len(edits)} edits -> {args.out}")


def _fit_trained(args: argparse.Namespace, model, tokenizer, pairs) -> dict:
    """``repedit fit --method trained|trained_lowrank``: train, then (with ``--auto``) pick each user's
    strength by the fluency of generated answers on their validation items; writes ``training.json``."""
    from ..evaluate.select import validation_items
    from ..io import write_json
    from ..pairs.synthesis import REAL_HISTORY
    from ..steering.train import TrainSettings, train_user_edits

    settings = TrainSettings(
        kind="lowrank" if args.method == "trained_lowrank" else "vector", layers=tuple(args.layers) if args.layers else None,
        rank=args.rank, epochs=args.epochs, lr=args.lr, kl_weight=args.kl_weight, preference_weight=args.preference_weight,
        val_items=args.val_items, batch_size=args.batch_size, seed=args.seed,
    )
    result = train_user_edits(model, tokenizer, pairs, settings=settings)
    record = result.record()
    edits = result.edits
    if args.auto:
        from ..evaluate.strength import select_strength_by_generation

        validation = validation_items(pairs, settings.val_items)
        neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs if p.source != REAL_HISTORY))[:4]
        selection = select_strength_by_generation(model, tokenizer, edits, validation, neutral=neutral, factors=args.strengths)
        edits = selection.edits
        record["selection"] = {"choices": selection.choices, "grid": selection.grid}
        selection.save(Path(args.out) / "selection.json")
        for user, choice in selection.choices.items():
            print(f"{user}: strength {choice['strength']}, validation gain {choice['gain']:+.3f} nats/token, KL {choice['kl']:.3f}, "
                  f"fluent {choice['fluent']}")
    write_json(f"{args.out}/training.json", record)
    for user, best in result.best.items():
        print(f"{user}: validation NLL {best['unsteered_val_nll']:.3f} unsteered -> {best['init_val_nll']:.3f} mean difference -> "
              f"{best['val_nll']:.3f} trained (epoch {best['epoch']})")
    print(f"trained {len(result.edits)} users jointly in {result.seconds:.1f} s")
    return edits


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
    fit.set_defaults(run=_fit)
