"""Automatic layer and strength selection, per user, under a fluency constraint.

For every candidate layer the edits are fitted once; for every strength multiplier each user's edit
is scored on two teacher-forced measures (:mod:`repedit.evaluate.scoring`), all users in one batch:

* **personalisation gain**: mean log-probability (nats/token) of the user's *held-out* texts given
  their prompts, steered minus unsteered;
* **fluency cost**: mean KL(unsteered ‖ steered) (nats/token) over neutral responses to neutral
  prompts — how far the edit moves the model where it should not matter.

Each user gets the (layer, strength) with the highest gain among those with KL ≤ ``max_kl``
(default 0.05 nats/token); when no candidate has a positive gain within the limit the user stays
unsteered (strength 0). The full grid is returned too, for effect-vs-strength figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputError, expect, read_json, write_json
from ..pairs.synthesis import REAL_HISTORY, Pair
from ..steering.edit import UserEdit
from ..steering.fit import fit_user_edits
from .scoring import reference_logprobs, response_kl, response_logprobs

DEFAULT_MAX_KL = 0.05
SELECTION_FORMAT = "repedit.selection"


@dataclass(frozen=True)
class HeldOut:
    """A user's held-out text and the prompt it answers (not used for fitting)."""

    user_id: str
    prompt: str
    text: str


@dataclass
class Selection:
    """Per-user choice and the whole grid.

    ``choices[user]`` = ``{"layer", "strength", "gain", "kl"}`` (``layer`` None and ``strength`` 0
    when steering did not help within the KL limit); ``edits[user]`` is the chosen edit (absent for
    unsteered users); ``grid`` has one row per (user, layer, strength) with ``gain`` and ``kl``.
    """

    choices: dict[str, dict[str, Any]]
    edits: dict[str, UserEdit]
    grid: list[dict[str, Any]] = field(default_factory=list)
    max_kl: float | None = DEFAULT_MAX_KL  # None: admissibility by the fluency of generated answers (``rule``)
    rule: str = "kl"  # "kl" (KL on neutral text ≤ max_kl) or "fluency" (FluencyRule on generated answers)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the training record of trained edits

    def save(self, path: str | Path) -> Path:
        """Write the choices, grid, limit and rule as JSON (atomically) to ``path``. The edits are not
        in it: they go to a vector store (:func:`repedit.store.save_edits`), which reads them back."""
        write_json(path, {"format": SELECTION_FORMAT, "rule": self.rule, "max_kl": self.max_kl, "choices": self.choices,
                          "grid": self.grid, **self.extra})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, edits: dict[str, UserEdit] | None = None) -> "Selection":
        """Read a :meth:`save` file; ``edits`` (e.g. from the store) are attached as they are."""
        record = dict(read_json(path, dict))
        if record.pop("format", SELECTION_FORMAT) != SELECTION_FORMAT:
            raise InputError(f"{path}: not a repedit selection (field 'format')")
        for key in ("choices", "grid"):
            if key not in record:
                raise InputError(f"{path}: missing field {key!r}")
        choices = expect(record.pop("choices"), dict, f"{path}: field 'choices'")
        for user, choice in choices.items():
            expect(choice, dict, f"{path}: choices[{user!r}]")
            expect(choice.get("strength", 0.0), float, f"{path}: choices[{user!r}].strength")
        grid = [expect(row, dict, f"{path}: grid[{i}]") for i, row in enumerate(expect(record.pop("grid"), list, f"{path}: field 'grid'"))]
        max_kl = expect(record.pop("max_kl", None), (float, type(None)), f"{path}: field 'max_kl'")
        rule = record.pop("rule", "kl")
        if rule not in ("kl", "fluency"):
            raise InputError(f"{path}: field 'rule': expected 'kl' or 'fluency', got {rule!r}")
        return cls(choices, dict(edits or {}), grid, max_kl, rule, record)



def split_for_selection(pairs: Sequence[Pair], held_out_fraction: float = 0.3, max_neutral: int = 12) -> tuple[list[Pair], list[HeldOut], list[tuple[str, str]]]:
    """Split pairs into ``(training pairs, held-out user texts, neutral (prompt, response) pairs)``.

    The last ``held_out_fraction`` of each user's real-history pairs (at least one, if the user has
    two or more) become held-out texts and leave the training set; the neutral set is the first
    ``max_neutral`` distinct prompts' neutral responses.
    """
    if not 0 < held_out_fraction < 1:
        raise InputError(f"held_out_fraction must be between 0 and 1, got {held_out_fraction}")
    held_keys: set[tuple[str, str, str]] = set()
    held_out: list[HeldOut] = []
    for user in dict.fromkeys(p.user_id for p in pairs):
        real = [p for p in pairs if p.user_id == user and p.source == REAL_HISTORY]
        n = max(1, int(round(len(real) * held_out_fraction))) if len(real) >= 2 else 0
        for pair in real[len(real) - n:]:
            held_keys.add(pair.key)
            held_out.append(HeldOut(user, pair.prompt, pair.personalized))
    neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in pairs))[:max_neutral]
    return [p for p in pairs if p.key not in held_keys], held_out, neutral


def select_layer_strength(
    model, tokenizer, pairs: Sequence[Pair], held_out: Sequence[HeldOut], neutral: Sequence[tuple[str, str]], *,
    method: str = "caa", layers: Sequence[int], strengths: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    max_kl: float = DEFAULT_MAX_KL, batch_size: int = 16, progress: bool = False,
) -> Selection:
    """Sweep ``layers`` × ``strengths`` and pick, per user, the best gain with KL ≤ ``max_kl``.

    Args:
        pairs: training pairs (see :func:`repedit.steering.fit_user_edits`).
        held_out: users' texts kept out of ``pairs``; every fitted user needs at least one.
        neutral: ``(prompt, response)`` pairs of neutral text for the KL constraint.
    """
    if not layers or not strengths:
        raise InputError("give at least one layer and one strength to sweep")
    layers = list(dict.fromkeys(layers))
    if not neutral:
        raise InputError("the KL constraint needs neutral (prompt, response) pairs")
    users_with_held_out = {h.user_id for h in held_out}
    base = response_logprobs(model, tokenizer, [h.prompt for h in held_out], [h.text for h in held_out], batch_size=batch_size)
    # The unsteered side of every KL in the sweep: computed once, shared by all users, layers and strengths.
    neutral_reference = reference_logprobs(model, tokenizer, [p for p, _ in neutral], [r for _, r in neutral], batch_size=batch_size)
    grid: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    best_edit: dict[str, UserEdit] = {}
    # One capture for every layer (a forward pass yields them all), then one single-layer edit per layer.
    fitted_all = fit_user_edits(model, tokenizer, pairs, method=method, layers=list(layers), batch_size=batch_size, progress=progress)
    for layer in layers:
        site = f"resid_post.{layer}"
        fitted = {
            user: replace(edit, edits=[e for e in edit.edits if e.site == site], provenance={**edit.provenance, "sites": [site]})
            for user, edit in fitted_all.items()
        }
        missing = sorted(set(fitted) - users_with_held_out)
        if missing:
            raise InputError(f"no held-out texts for users {missing}: selection needs held-out data for every fitted user")
        users = list(fitted)
        for strength in strengths:
            edits = [fitted[u] * strength for u in users]
            index = {u: i for i, u in enumerate(users)}
            rows = [index.get(h.user_id) for h in held_out]
            steered = response_logprobs(model, tokenizer, [h.prompt for h in held_out], [h.text for h in held_out], edits=edits, rows=rows, batch_size=batch_size)
            # KL: every neutral item under every user's edit, all in one set of batches.
            kl_rows = [i for i in range(len(users)) for _ in neutral]
            kl = response_kl(
                model, tokenizer, [p for _ in users for p, _ in neutral], [r for _ in users for _, r in neutral],
                edits=edits, rows=kl_rows, batch_size=batch_size, reference=neutral_reference * len(users),
            )
            for i, user in enumerate(users):
                mine = torch.tensor([j for j, h in enumerate(held_out) if h.user_id == user])
                gain = float((steered[mine] - base[mine]).mean())
                user_kl = float(kl[i * len(neutral):(i + 1) * len(neutral)].mean())
                grid.append({"user_id": user, "layer": layer, "strength": strength, "gain": gain, "kl": user_kl})
                current = best.get(user)
                if user_kl <= max_kl and gain > 0 and (current is None or gain > current["gain"]):
                    best[user] = {"layer": layer, "strength": strength, "gain": gain, "kl": user_kl}
                    best_edit[user] = edits[i]
    users_seen = list(dict.fromkeys(row["user_id"] for row in grid))
    choices = {u: best.get(u, {"layer": None, "strength": 0.0, "gain": 0.0, "kl": 0.0}) for u in users_seen}
    return Selection(choices, best_edit, grid, max_kl)


def validation_items(pairs: Sequence[Pair], val_items: int) -> list:
    """The validation split :func:`repedit.steering.train_user_edits` uses, as :class:`HeldOut`
    items: each user's last ``val_items`` real-history pairs (prompt and the user's own text)."""

    real: dict[str, list[Pair]] = {}
    for pair in pairs:
        if pair.source == REAL_HISTORY:
            real.setdefault(pair.user_id, []).append(pair)
    return [HeldOut(user, p.prompt, p.personalized) for user, ps in real.items() for p in ps[-val_items:]]
