"""Automatic layer/strength selection: the grid's numbers, the KL constraint, and the choice rule."""

from __future__ import annotations

import pytest
from conftest import write_pairs_jsonl

from repedit.evaluate.scoring import response_logprobs
from repedit.evaluate.select import HeldOut, select_layer_strength
from repedit.io import InputError
from repedit.pairs.synthesis import SELF_GENERATED, Pair
from repedit.steering import fit_user_edits

PROMPTS = ["Say hi.", "Describe the sea.", "Give advice.", "Name a colour."]
NEUTRAL = [("What is rain?", "Rain is water falling from clouds."), ("Define a chair.", "A chair is a seat for one person.")]


def make_pairs():
    pairs = []
    for user, style in (("alice", "YO!!! lol"), ("bob", "Kindly note, dear sir,")):
        pairs += [Pair(user, p, f"{style} {p}", f"A plain answer about {p.lower()}", "", SELF_GENERATED) for p in PROMPTS]
    held = [HeldOut("alice", "Tell a joke.", "YO!!! lol a joke"), HeldOut("bob", "Tell a joke.", "Kindly note, dear sir, a joke")]
    return pairs, held


def test_grid_and_choices(tiny_model, tokenizer):
    model = tiny_model("llama")
    pairs, held = make_pairs()
    selection = select_layer_strength(model, tokenizer, pairs, held, NEUTRAL, layers=[0, 1], strengths=[0.5, 2.0], max_kl=10.0)
    assert len(selection.grid) == 2 * 2 * 2
    # One grid number recomputed directly: alice's gain at layer 1, strength 2.
    edit = fit_user_edits(model, tokenizer, pairs, layers=[1], progress=False)["alice"] * 2.0
    base = response_logprobs(model, tokenizer, [held[0].prompt], [held[0].text])
    steered = response_logprobs(model, tokenizer, [held[0].prompt], [held[0].text], edits=[edit], rows=[0])
    row = next(r for r in selection.grid if (r["user_id"], r["layer"], r["strength"]) == ("alice", 1, 2.0))
    assert row["gain"] == pytest.approx(float(steered[0] - base[0]), abs=1e-4)
    for user, choice in selection.choices.items():
        allowed = [r for r in selection.grid if r["user_id"] == user and r["kl"] <= 10.0 and r["gain"] > 0]
        if allowed:
            top = max(allowed, key=lambda r: r["gain"])
            assert (choice["layer"], choice["strength"]) == (top["layer"], top["strength"])
            assert selection.edits[user].edits[0].site == f"resid_post.{top['layer']}"
        else:
            assert choice["strength"] == 0.0 and user not in selection.edits


def test_kl_limit_can_forbid_every_edit(tiny_model, tokenizer):
    model = tiny_model("llama")
    pairs, held = make_pairs()
    selection = select_layer_strength(model, tokenizer, pairs, held, NEUTRAL, layers=[1], strengths=[1.0], max_kl=1e-9)
    assert all(r["kl"] > 1e-9 for r in selection.grid)
    assert all(c["strength"] == 0.0 and c["layer"] is None for c in selection.choices.values()) and not selection.edits


def test_selection_needs_held_out_data_for_every_user(tiny_model, tokenizer):
    model = tiny_model("llama")
    pairs, held = make_pairs()
    with pytest.raises(InputError, match=r"no held-out texts for users \['bob'\]"):
        select_layer_strength(model, tokenizer, pairs, held[:1], NEUTRAL, layers=[1])
    with pytest.raises(InputError, match="neutral"):
        select_layer_strength(model, tokenizer, pairs, held, [], layers=[1])


def test_split_for_selection_and_fit_auto_cli(tiny_folder, tmp_path):
    import json

    from repedit.cli.main import main
    from repedit.evaluate.select import split_for_selection
    from repedit.pairs.synthesis import REAL_HISTORY
    from repedit.store import VectorStore

    pairs, _ = make_pairs()
    pairs += [Pair(u, f"Question {i}?", f"{u} answer {i}", f"Neutral answer {i}.", "", REAL_HISTORY) for u in ("alice", "bob") for i in range(4)]
    train, held, neutral = split_for_selection(pairs, 0.5)
    assert [(h.user_id, h.text) for h in held] == [("alice", "alice answer 2"), ("alice", "alice answer 3"), ("bob", "bob answer 2"), ("bob", "bob answer 3")]
    assert len(train) == len(pairs) - 4 and all((p.user_id, p.personalized) not in {(h.user_id, h.text) for h in held} for p in train)
    assert len(neutral) == len({(p.prompt, p.neutral) for p in pairs})

    folder, model = tiny_folder
    pairs_file = write_pairs_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "edits"
    args = ["fit", "--auto", "--pairs", str(pairs_file), "--out", str(out), "--model", str(folder), "--layers", "0", "1",
            "--strengths", "0.5", "1", "--max-kl", "10", "--held-out-fraction", "0.5", "--positions", "generated"]
    assert main(args) == 0
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["grid"]) == 2 * 2 * 2 and set(selection["choices"]) == {"alice", "bob"}
    store = VectorStore(out)
    assert store.list_users() == sorted(u for u, c in selection["choices"].items() if c["layer"] is not None)  # unsteered users get no edit
    for user in store.list_users():
        choice = selection["choices"][user]
        edit = store.get(user, model=model)
        assert edit.positions == "generated" and edit.edits[0].site == f"resid_post.{choice['layer']}"
