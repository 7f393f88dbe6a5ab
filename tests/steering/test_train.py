"""Trained per-user edits (repedit.steering.train) and the low-rank operator they use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch

import repedit
from repedit.evaluate.scoring import response_logprobs
from repedit.io import InputError
from repedit.kernels import lowrank_edit
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED, Pair
from repedit.steering import RowParams, SiteEdit, UserEdit, apply_operator
from repedit.steering.train import TrainSettings, micro_batches, train_user_edits
from repedit.store.vectors import VectorStore

PROMPTS = ["Say hi.", "Describe the sea.", "Give advice.", "Name a colour.", "Tell a joke.", "Plan a trip."]
STYLES = {"alice": "YO!!! lol so", "bob": "Kindly note, dear sir, that", "cara": "hmm. ok. fine."}
FAST = TrainSettings(layers=(1,), epochs=3, val_items=2, n_neutral=2, batch_size=8, lr=0.05, kl_weight=0.1)


def make_pairs(users=STYLES) -> list[Pair]:
    pairs = []
    for user, style in users.items():
        pairs += [Pair(user, p, f"{style} {p.lower()} {i}", f"A plain answer to {p}", "", REAL_HISTORY) for i, p in enumerate(PROMPTS)]
        pairs += [Pair(user, p, f"{style} about {p.lower()}", f"Here is an answer to {p}", "", SELF_GENERATED) for p in PROMPTS[:2]]
    return pairs


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def lowrank_site(site: str, d: int, k: int, seed: int, a: float = 1.0) -> SiteEdit:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen)).Q.T
    return SiteEdit(site, "lowrank", basis=basis, weight=torch.randn(k, d, generator=gen) * 0.1, bias=torch.randn(k, generator=gen), a=a)


def test_lowrank_operator_matches_the_loreft_formula_and_the_kernel():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16)
    edits = [lowrank_site("resid_post.0", 16, 3, seed) for seed in range(2)]
    # Hand formula per row: h + a·Rᵀ(Wh + b − Rh)
    expected = torch.stack([h[b] + (h[b] @ (e.weight - e.basis).T + e.bias) @ e.basis for b, e in zip([0, 1], edits)] + [h[2]])
    basis = torch.stack([torch.zeros(3, 16)] + [e.basis for e in edits])
    weight = torch.stack([torch.zeros(3, 16)] + [e.weight for e in edits])
    bias = torch.stack([torch.zeros(3)] + [e.bias for e in edits])
    a = torch.tensor([0.0, 1.0, 1.0])
    got = lowrank_edit(h, torch.tensor([1, 2, -1]), basis, weight, bias, a)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got[2], h[2])  # idx -1: bit for bit unchanged
    via_operator = apply_operator("lowrank", h, RowParams(basis=basis[[1, 2, 0]], weight=weight[[1, 2, 0]], bias=bias[[1, 2, 0]], a=a[[1, 2, 0]]))
    torch.testing.assert_close(via_operator, expected)
    with pytest.raises(InputError, match=r"weight \[3, 16\]"):
        SiteEdit("resid_post.0", "lowrank", basis=edits[0].basis, weight=torch.zeros(2, 16), bias=torch.zeros(3))


def test_lowrank_edits_in_a_mixed_batch_equal_solo_runs_and_survive_save_load_and_store(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    fingerprint, d = repedit.model_fingerprint(model), model.config.hidden_size
    users = [
        UserEdit("u0", [lowrank_site("resid_post.1", d, 2, 0, a=2.0)], fingerprint, d),
        UserEdit("u1", [lowrank_site("resid_post.1", d, 4, 1, a=2.0), SiteEdit("resid_post.0", "add", vector=torch.randn(d), a=0.5)], fingerprint, d),
    ]
    prompts, texts = PROMPTS[:4], ["one two three", "four five", "six", "seven eight nine ten"]
    rows = [0, 1, None, 1]
    mixed = response_logprobs(model, tokenizer, prompts, texts, edits=users, rows=rows, batch_size=4)
    for i, row in enumerate(rows):
        solo = response_logprobs(model, tokenizer, [prompts[i]], [texts[i]], edits=[users[row]] if row is not None else None,
                                 rows=[0] if row is not None else None)
        assert float(mixed[i]) == pytest.approx(float(solo[0]), abs=1e-5)
    plain = response_logprobs(model, tokenizer, prompts, texts)
    assert float(mixed[2]) == pytest.approx(float(plain[2]), abs=1e-6) and float(mixed[0]) != pytest.approx(float(plain[0]), abs=1e-3)
    users[1].save(tmp_path / "u1")
    loaded = UserEdit.load(tmp_path / "u1", model)
    assert torch.equal(loaded.edits[0].weight, users[1].edits[0].weight) and torch.equal(loaded.edits[0].bias, users[1].edits[0].bias)
    store = VectorStore(tmp_path / "store", create=True)
    store.put_many(users)
    again = response_logprobs(model, tokenizer, prompts, texts, edits=[store.get("u0"), store.get("u1")], rows=rows, batch_size=4)
    torch.testing.assert_close(again, mixed)


def test_training_changes_only_the_edit_lowers_the_objective_and_is_deterministic(tiny_model, tokenizer):
    model = tiny_model("llama")
    before = weights_hash(model)
    grads_before = [p.requires_grad for p in model.parameters()]
    first = train_user_edits(model, tokenizer, make_pairs(), settings=FAST, progress=False)
    assert weights_hash(model) == before  # model weights unchanged
    assert [p.requires_grad for p in model.parameters()] == grads_before and all(p.grad is None for p in model.parameters())
    for user in STYLES:
        rows = [h for h in first.history if h["user_id"] == user]
        assert rows[-1]["train_nll"] < rows[1]["train_nll"] or first.best[user]["val_nll"] < first.best[user]["init_val_nll"]
        assert first.best[user]["val_nll"] <= first.best[user]["init_val_nll"]
        assert first.edits[user].method == "trained" and first.edits[user].edits[0].operator == "add"
    # The objective fell overall: the users' validation texts are likelier than unsteered.
    assert sum(b["val_nll"] for b in first.best.values()) < sum(b["unsteered_val_nll"] for b in first.best.values())
    second = train_user_edits(model, tokenizer, make_pairs(), settings=FAST, progress=False)
    for user in STYLES:
        assert torch.equal(first.edits[user].edits[0].vector, second.edits[user].edits[0].vector)


def test_joint_training_equals_training_each_user_alone(tiny_model, tokenizer):
    model = tiny_model("llama")
    joint = train_user_edits(model, tokenizer, make_pairs(), settings=FAST, progress=False)
    alone = train_user_edits(model, tokenizer, [p for p in make_pairs() if p.user_id == "bob"], settings=FAST,
                             neutral=[("Say hi.", "Here is an answer to Say hi."), ("Describe the sea.", "Here is an answer to Describe the sea.")],
                             progress=False)
    # Same neutral texts, in the same order, as the joint run's default (the first two self-generated prompts'
    # neutral answers); each user walks them from an offset of its own id, so its place in the joint batch does not matter.
    torch.testing.assert_close(joint.edits["bob"].edits[0].vector, alone.edits["bob"].edits[0].vector, atol=1e-4, rtol=1e-4)


def test_micro_batches_group_rows_of_similar_length_within_the_padding_bound():
    lengths = [10, 100, 12, 11, 95, 300, 10]
    # Fixed micro-batches (the old rule): sorted, 3 rows each, whatever their lengths.
    assert micro_batches(lengths, 3) == [[0, 6, 3], [2, 4, 1], [5]]
    # Padding ≤ 1.25x the real tokens: the short rows together, the two ~100-token rows together, 300 alone.
    groups = micro_batches(lengths, 16, 1.25)
    assert groups == [[0, 6, 3, 2], [4, 1], [5]]
    for group in groups:  # the bound, checked by hand for each group
        assert len(group) * max(lengths[k] for k in group) <= 1.25 * sum(lengths[k] for k in group)
    assert sorted(k for g in groups for k in g) == list(range(len(lengths)))
    assert micro_batches([], 4, 1.25) == [] and micro_batches([5, 5, 5], 2, 1.0) == [[0, 1], [2]]


def test_the_micro_batch_rule_changes_time_not_the_trained_edits(tiny_model, tokenizer):
    model = tiny_model("llama")
    # Users whose texts differ in length, so that the two rules group the rows differently.
    pairs = make_pairs({"alice": "YO!!! lol so", "bob": "Kindly note, dear sir, that " * 6, "cara": "ok"})
    tight = train_user_edits(model, tokenizer, pairs, settings=dataclasses.replace(FAST, max_padding=1.0), progress=False)
    fixed = train_user_edits(model, tokenizer, pairs, settings=dataclasses.replace(FAST, max_padding=float("inf")), progress=False)
    for user in ("alice", "bob", "cara"):
        torch.testing.assert_close(tight.edits[user].edits[0].vector, fixed.edits[user].edits[0].vector, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="max_padding"):
        TrainSettings(max_padding=0.5)


@pytest.mark.parametrize("arch, kind", [("llama", "vector"), ("llama", "lowrank"), ("gemma2", "vector"), ("gpt2", "vector")])
def test_the_frozen_prefix_is_used_where_exact_and_changes_nothing(tiny_model, tokenizer, arch, kind):
    """Blocks below the first trained site run once per item; the edits equal a run that recomputes them.
    GPT-2 adds its position embeddings to ``inputs_embeds``, so there the cut is inexact: the check turns it off."""
    model = tiny_model(arch)
    settings = dataclasses.replace(FAST, kind=kind, rank=2, layers=(2,), epochs=2)
    cached = train_user_edits(model, tokenizer, make_pairs(), settings=settings, progress=False)
    recomputed = train_user_edits(model, tokenizer, make_pairs(), settings=dataclasses.replace(settings, prefix_cache_bytes=0), progress=False)
    used = cached.settings["frozen_prefix"]
    assert used["blocks"] == 2 and used["used"] == (arch != "gpt2")
    assert recomputed.settings["frozen_prefix"]["used"] is False and recomputed.settings["frozen_prefix"]["checked_gap"] is None
    if arch != "gpt2":
        assert used["checked_gap"] <= 1e-4
    else:
        assert used["checked_gap"] > 1e-4
    for user in STYLES:
        for a, b in zip(cached.edits[user].edits, recomputed.edits[user].edits):
            for name in ("vector", "basis", "weight", "bias"):
                if getattr(a, name) is not None:
                    torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4)
    assert [h["val_nll"] for h in cached.history] == pytest.approx([h["val_nll"] for h in recomputed.history], abs=1e-5)


def test_lowrank_training_starts_at_the_mean_difference_and_learns(tiny_model, tokenizer):
    model = tiny_model("llama")
    settings = dataclasses.replace(FAST, kind="lowrank", rank=2, epochs=0)
    start = train_user_edits(model, tokenizer, make_pairs(), settings=settings, progress=False)
    vector = train_user_edits(model, tokenizer, make_pairs(), settings=dataclasses.replace(FAST, epochs=0), progress=False)
    for user in STYLES:
        low, add = start.edits[user].edits[0], vector.edits[user].edits[0]
        assert low.operator == "lowrank" and low.basis.shape == (2, model.config.hidden_size)
        # W = R at initialisation, so the edit adds Rᵀβ, which equals the mean-difference vector.
        torch.testing.assert_close(low.basis.T @ low.bias, add.vector, atol=1e-4, rtol=1e-4)
        assert start.best[user]["val_nll"] == pytest.approx(vector.best[user]["val_nll"], abs=1e-4)
    trained = train_user_edits(model, tokenizer, make_pairs(), settings=dataclasses.replace(settings, epochs=3), progress=False)
    assert sum(b["val_nll"] for b in trained.best.values()) <= sum(b["init_val_nll"] for b in trained.best.values())


def test_training_refuses_users_with_too_few_items_and_stops_on_nan(tiny_model, tokenizer):
    model = tiny_model("llama")
    pairs = make_pairs() + [Pair("dan", "Say hi.", "hey", "Hello.", "", REAL_HISTORY), Pair("dan", "Tell a joke.", "nah", "A joke.", "", REAL_HISTORY)]
    with pytest.raises(InputError, match=r"need 4.*'dan' has 2"):
        train_user_edits(model, tokenizer, pairs, settings=FAST, progress=False)
    with pytest.raises(InputError, match=r"user 'alice' \(NLL nan.*'bob'.*gave a non-finite loss"):
        train_user_edits(model, tokenizer, make_pairs(), settings=dataclasses.replace(FAST, lr=math.nan), progress=False)


def test_fit_cli_trains_writes_edits_and_writes_nothing_on_nan(tiny_folder, tmp_path):
    from conftest import write_pairs_jsonl

    from repedit.cli.main import main

    folder, model = tiny_folder
    pairs_file = write_pairs_jsonl(tmp_path / "pairs.jsonl", make_pairs())
    out = tmp_path / "edits"
    assert main(["fit", "--method", "trained", "--pairs", str(pairs_file), "--out", str(out), "--model", str(folder),
                 "--layers", "1", "--epochs", "2"]) == 0
    store = VectorStore(out)
    assert store.list_users() == sorted(STYLES)
    assert store.get("alice", model=model).method == "trained"
    record = json.loads((out / "training.json").read_text())
    assert set(record["best"]) == set(STYLES) and record["settings"]["epochs"] == 2
    bad = tmp_path / "bad"
    assert main(["fit", "--method", "trained_lowrank", "--pairs", str(pairs_file), "--out", str(bad), "--model", str(folder),
                 "--layers", "1", "--epochs", "2", "--lr", "nan"]) == 2
    assert not bad.exists()


@pytest.mark.default_model
def test_fluency_rule_rejects_a_degenerate_edit_and_admits_the_unsteered_model(default_model_and_tokenizer):
    from repedit.evaluate.select import HeldOut
    from repedit.evaluate.strength import select_strength_by_generation
    from repedit.model.generation import GenerationSettings

    model, tokenizer = default_model_and_tokenizer
    torch.manual_seed(0)
    # 40x the residual norm at layer 12 (~100): far beyond any style, the answers loop or fall apart.
    vector = torch.randn(576)
    huge = UserEdit("u", [SiteEdit("resid_post.12", "add", vector=vector / vector.norm() * 4000.0)], repedit.model_fingerprint(model), 576)
    validation = [HeldOut("u", "How do I keep basil alive indoors?", "South window. Water when the soil's dry. Pinch the tops."),
                  HeldOut("u", "What's a good way to start running?", "Run-walk intervals. Three days a week. Go slow.")]
    selection = select_strength_by_generation(model, tokenizer, {"u": huge}, validation, factors=(0.0, 1.0),
                                              settings=GenerationSettings(max_new_tokens=32, repetition_penalty=1.2, batch_size=4), progress=False)
    rows = {r["strength"]: r for r in selection.grid}
    assert rows[0.0]["fluent"] and rows[0.0]["gain"] == pytest.approx(0.0, abs=1e-6)
    assert not rows[1.0]["fluent"] and rows[1.0]["reasons"], rows[1.0]
    assert selection.choices["u"]["strength"] == 0.0 and "u" not in selection.edits
