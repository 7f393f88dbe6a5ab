"""The fitting job behind ``repedit fit``: one edit per user, by any method, with or without selection.

:func:`fit_users` is what ``repedit fit`` runs in one process and what each ``repedit.scale`` worker
runs on its share of the users. Everything in it is per user — a user's edit, selection and
training depend on that user's pairs only — except the *neutral* texts (the KL term and the
fluency check), which are drawn from all pairs: :func:`neutral_sets` computes them once and a
scaled-out run hands the same sets to every worker, so that sharding cannot change a result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..io import InputError
from ..pairs.synthesis import REAL_HISTORY, Pair
from ..steering.edit import UserEdit
from .select import HeldOut, Selection, split_for_selection

FIT_JOB_METHODS = ("caa", "pca", "chameleon", "stylevector", "trained", "trained_lowrank")
TRAINED_METHODS = ("trained", "trained_lowrank")


@dataclass(frozen=True)
class FitOptions:
    """Settings of a fitting job (the ``repedit fit`` options; see its ``--help`` for units)."""

    method: str = "caa"
    layers: tuple[int, ...] | None = None
    strength: float = 1.0
    neutral_strength: float = 1.0
    positions: str | int = "all"
    batch_size: int = 8
    auto: bool = False
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    max_kl: float = 0.05
    held_out_fraction: float = 0.3
    epochs: int = 8
    lr: float = 0.05
    kl_weight: float = 0.1
    preference_weight: float = 0.0
    rank: int = 4
    val_items: int = 2
    seed: int = 0
    steps_per_epoch: int | None = None  # trained methods: see repedit.steering.train.TrainSettings

    def __post_init__(self) -> None:
        if self.method not in FIT_JOB_METHODS:
            raise InputError(f"unknown fit method {self.method!r}: expected one of {', '.join(FIT_JOB_METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NeutralSets:
    """Neutral ``(prompt, response)`` texts drawn from *all* pairs: ``select`` for the KL limit of
    likelihood selection, ``train`` for the KL term of trained edits, ``strength`` for the fluency
    check of trained edits' strength selection (each empty when the method does not use it)."""

    select: list[tuple[str, str]] = field(default_factory=list)
    train: list[tuple[str, str]] = field(default_factory=list)
    strength: list[tuple[str, str]] = field(default_factory=list)


def shard_invariant(pairs: Sequence[Pair], options: FitOptions) -> FitOptions:
    """``options`` with what a trained edit's schedule takes from *all* users fixed (the steps per
    epoch), for fitting the users in groups (``repedit fit --ray``)."""
    if options.method in TRAINED_METHODS and options.steps_per_epoch is None:
        from ..steering.train import most_training_items

        return dataclasses.replace(options, steps_per_epoch=most_training_items(pairs, options.val_items))
    return options


def neutral_sets(pairs: Sequence[Pair], options: FitOptions, *, n_train: int = 8) -> NeutralSets:
    """The neutral texts a fitting job with ``options`` uses, from all of its ``pairs`` (module docstring)."""
    if options.method in TRAINED_METHODS:
        pool = [p for p in pairs if p.source != REAL_HISTORY] or list(pairs)
        distinct = list(dict.fromkeys((p.prompt, p.neutral) for p in pool))
        return NeutralSets(train=distinct[:n_train], strength=distinct[:4] if options.auto else [])
    if options.auto:
        return NeutralSets(select=split_for_selection(pairs, options.held_out_fraction)[2])
    return NeutralSets()


@dataclass
class FitOutcome:
    """What a fitting job produced: the edits, the selection (with ``auto``), the training record
    (trained methods: ``{"settings", "best", "history", "seconds"}``) and one report line per user."""

    edits: dict[str, UserEdit]
    selection: Selection | None = None
    training: dict[str, Any] | None = None
    lines: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence["FitOutcome"]) -> "FitOutcome":
        """One outcome from the outcomes of disjoint sets of users (in the order given)."""
        edits: dict[str, UserEdit] = {}
        lines: list[str] = []
        for part in parts:
            overlap = set(edits) & set(part.edits)
            if overlap:
                raise InputError(f"users fitted twice: {sorted(overlap)[:5]}")
            edits.update(part.edits)
            lines += part.lines
        selections = [p.selection for p in parts if p.selection is not None]
        selection = None
        if selections:
            first = selections[0]
            selection = Selection({u: c for s in selections for u, c in s.choices.items()}, {u: e for s in selections for u, e in s.edits.items()},
                                  [row for s in selections for row in s.grid], first.max_kl, first.rule, dict(first.extra))
        records = [p.training for p in parts if p.training is not None]
        training = None
        if records:
            training = {"settings": records[0]["settings"], "best": {u: b for r in records for u, b in r["best"].items()},
                        "history": [row for r in records for row in r["history"]], "seconds": sum(r["seconds"] for r in records)}
            if any("selection" in r for r in records):
                training["selection"] = {"choices": {u: c for r in records for u, c in r.get("selection", {}).get("choices", {}).items()},
                                         "grid": [row for r in records for row in r.get("selection", {}).get("grid", [])]}
        return cls(edits, selection, training, lines)


def fit_users(model, tokenizer, pairs: Sequence[Pair], options: FitOptions = FitOptions(), *,
              neutral: NeutralSets | None = None, progress: bool = True) -> FitOutcome:
    """Fit one edit per user of ``pairs`` with ``options`` (``repedit fit``).

    Args:
        pairs: the users' pairs (all of them, or one worker's share of the users).
        neutral: the neutral texts (default :func:`neutral_sets` of ``pairs``; a scaled-out run passes
            the sets of all pairs, so a user's result does not depend on which worker fitted it).
    """
    from ..steering.fit import default_layers, fit_user_edits

    if not pairs:
        raise InputError("no pairs to fit")
    neutral = neutral if neutral is not None else neutral_sets(pairs, options)
    lines: list[str] = []
    selection = training = None
    if options.method in TRAINED_METHODS:
        edits, selection, training, lines = _fit_trained(model, tokenizer, pairs, options, neutral, progress)
    elif options.auto:
        from .select import select_layer_strength

        train, held_out, _ = split_for_selection(pairs, options.held_out_fraction)
        layers = list(options.layers) if options.layers else sorted({max(1, int(default_layers(model)[0] * f)) for f in (0.5, 0.75, 1.0, 1.25)})
        selection = select_layer_strength(model, tokenizer, train, held_out, neutral.select, method=options.method, layers=layers,
                                          strengths=list(options.strengths), max_kl=options.max_kl, batch_size=options.batch_size)
        edits = dict(selection.edits)
        lines = [f"{user}: layer {c['layer']}, strength {c['strength']}, held-out gain {c['gain']:+.3f} nats/token, KL {c['kl']:.3f}"
                 for user, c in selection.choices.items()]
    else:
        edits = fit_user_edits(model, tokenizer, pairs, method=options.method, layers=options.layers, strength=options.strength,
                               neutral_strength=options.neutral_strength, positions=options.positions, batch_size=options.batch_size,
                               progress=progress)
    edits = {user: dataclasses.replace(edit, positions=options.positions) for user, edit in edits.items()}
    if selection is not None:
        selection.edits = edits
    lines += [f"{user}: {edit.method} at {', '.join(edit.sites)} from {edit.provenance['n_pairs']} pairs" for user, edit in edits.items()]
    return FitOutcome(edits, selection, training, lines)


def _fit_trained(model, tokenizer, pairs: Sequence[Pair], options: FitOptions, neutral: NeutralSets,
                 progress: bool) -> tuple[dict[str, UserEdit], Selection | None, dict[str, Any], list[str]]:
    """Trained edits, then (with ``auto``) each user's strength by the fluency of generated answers."""
    from ..steering.train import TrainSettings, train_user_edits
    from .select import validation_items

    settings = TrainSettings(
        kind="lowrank" if options.method == "trained_lowrank" else "vector", layers=tuple(options.layers) if options.layers else None,
        rank=options.rank, epochs=options.epochs, lr=options.lr, kl_weight=options.kl_weight, preference_weight=options.preference_weight,
        val_items=options.val_items, batch_size=options.batch_size, seed=options.seed, steps_per_epoch=options.steps_per_epoch,
    )
    result = train_user_edits(model, tokenizer, pairs, settings=settings, neutral=neutral.train or None, progress=progress)
    record = result.record()
    edits = result.edits
    selection = None
    lines: list[str] = []
    if options.auto:
        from .strength import select_strength_by_generation

        validation: list[HeldOut] = validation_items(pairs, settings.val_items)
        selection = select_strength_by_generation(model, tokenizer, edits, validation, neutral=neutral.strength, factors=list(options.strengths),
                                                  progress=progress)
        edits = selection.edits
        record["selection"] = {"choices": selection.choices, "grid": selection.grid}
        lines += [f"{user}: strength {c['strength']}, validation gain {c['gain']:+.3f} nats/token, KL {c['kl']:.3f}, fluent {c['fluent']}"
                  for user, c in selection.choices.items()]
    lines += [f"{user}: validation NLL {b['unsteered_val_nll']:.3f} unsteered -> {b['init_val_nll']:.3f} mean difference -> "
              f"{b['val_nll']:.3f} trained (epoch {b['epoch']})" for user, b in result.best.items()]
    return edits, selection, record, lines
