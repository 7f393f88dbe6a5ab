"""Fake it: user/prompt formats and their errors, representative selection, pair I/O, resumability.

The generation tests run the real default model (marked ``default_model``); the kill-and-resume test
interrupts a real ``repedit pairs`` subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repedit.io import InputError
from repedit.model.generation import GenerationSettings
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED, PairTemplates, generate, read_pairs, select_representative
from repedit.pairs.users import User, demo_prompts, demo_users, read_prompts, read_users


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats and errors

def test_demo_data_is_rich_enough():
    users = demo_users()
    assert 6 <= len(users) <= 10
    assert len({u.user_id for u in users}) == len(users)
    assert all(len(u.history) >= 8 for u in users)
    assert len(demo_prompts()) >= 30
    # The styles differ measurably: the terse user's texts are far shorter than the elaborate user's.
    words = {u.user_id: sum(len(h.text.split()) for h in u.history) / len(u.history) for u in users}
    assert words["elaborate_elena"] > 4 * words["terse_tom"]
    emoji = {u.user_id: sum(sum(ord(c) > 0x1F000 for c in h.text) for h in u.history) for u in users}
    assert emoji["emoji_emma"] > 10 * max(1, max(v for k, v in emoji.items() if k != "emoji_emma"))


def test_read_users_roundtrip(tmp_path):
    path = write(tmp_path / "u.jsonl", json.dumps({
        "user_id": "a", "profile": "likes tea", "history": [{"text": "hi there", "prompt": "greet", "rating": 4, "timestamp": "2026-01-01"}, "plain string item"],
    }) + "\n\n")
    [user] = read_users(path)
    assert user.user_id == "a" and user.profile == "likes tea"
    assert user.history[0].prompt == "greet" and user.history[0].rating == 4
    assert user.history[1].text == "plain string item" and user.history[1].prompt is None


@pytest.mark.parametrize("lines, message", [
    (['{"user_id": "a", "history": [{"text": "x"}]}', '{"user_id": "b", "history": [{"text": "y"}'], r"u\.jsonl:2: invalid JSON"),
    (['{"history": [{"text": "x"}]}'], r"u\.jsonl:1: missing field 'user_id'"),
    (['{"user_id": "a", "history": []}'], r"u\.jsonl:1: user 'a': field 'history' is empty"),
    (['{"user_id": "a", "history": [{"text": "x"}]}', '{"user_id": "a", "history": [{"text": "y"}]}'], r"u\.jsonl:2: duplicate user_id 'a' \(first defined on line 1\)"),
    (['{"user_id": "a", "history": [{"prompt": "p"}]}'], r"u\.jsonl:1: user 'a': history\[0\]\.text must be a non-empty string"),
    (['{"user_id": "a", "history": [{"text": "x", "rating": "great"}]}'], r"u\.jsonl:1: user 'a': history\[0\]\.rating must be a number"),
])
def test_read_users_errors_name_file_line_and_field(tmp_path, lines, message):
    path = write(tmp_path / "u.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        read_users(path)


def test_read_prompts_formats_and_errors(tmp_path):
    assert read_prompts(write(tmp_path / "p.txt", "one\n\n two \n")) == ["one", "two"]
    assert read_prompts(write(tmp_path / "p.jsonl", '"one"\n{"prompt": "two", "id": 7}\n')) == ["one", "two"]
    with pytest.raises(InputError, match=r"p0\.txt: the prompts file is empty"):
        read_prompts(write(tmp_path / "p0.txt", "\n  \n"))
    with pytest.raises(InputError, match=r"p1\.jsonl:2: missing field 'prompt'"):
        read_prompts(write(tmp_path / "p1.jsonl", '"one"\n{"text": "two"}\n'))
    with pytest.raises(InputError, match=r"p2\.txt:3: duplicate prompt 'a' \(first on .*p2\.txt:1\)"):
        read_prompts(write(tmp_path / "p2.txt", "a\nb\na\n"))
    with pytest.raises(InputError, match=r"p3\.jsonl:1: invalid JSON"):
        read_prompts(write(tmp_path / "p3.jsonl", '{"prompt": \n'))


def test_read_pairs_jsonl_and_csv(tmp_path):
    jsonl = write(tmp_path / "p.jsonl", '{"positive": "yo!", "negative": "Hello.", "user_id": "u1", "prompt": "greet"}\n{"personalized": "a", "neutral": "b"}\n')
    pairs = read_pairs(jsonl)
    assert (pairs[0].user_id, pairs[0].personalized, pairs[0].neutral, pairs[0].prompt) == ("u1", "yo!", "Hello.", "greet")
    assert (pairs[1].user_id, pairs[1].source) == ("default", "user-provided")
    csv_path = write(tmp_path / "p.csv", 'user_id,prompt,personalized,neutral\nu2,"q, with comma","short","a longer, neutral answer"\n')
    [pair] = read_pairs(csv_path)
    assert (pair.user_id, pair.prompt, pair.neutral) == ("u2", "q, with comma", "a longer, neutral answer")
    with pytest.raises(InputError, match=r"bad\.csv:2: missing or empty field 'neutral'"):
        read_pairs(write(tmp_path / "bad.csv", "personalized,neutral\nx,\n"))
    with pytest.raises(InputError, match=r"bad\.jsonl:1: missing or empty field 'personalized'"):
        read_pairs(write(tmp_path / "bad.jsonl", '{"text": "x"}\n'))


def test_generate_rejects_bad_arguments():
    user = User("a", ())
    with pytest.raises(InputError, match="no prompts"):
        generate(None, None, [user], [])
    with pytest.raises(InputError, match="duplicate user ids: a"):
        generate(None, None, [user, user], ["p"])
    with pytest.raises(InputError, match="must contain \\{prompt\\}"):
        PairTemplates(request="no prompt field")


# ---------------------------------------------------------------- representative selection

def test_select_representative_covers_planted_clusters():
    torch.manual_seed(0)
    centres = torch.eye(8)[:4] * 10
    members = torch.cat([centres[c] + 0.1 * torch.randn(5, 8) for c in range(4)])
    chosen = select_representative(members, 4)
    assert sorted(i // 5 for i in chosen) == [0, 1, 2, 3]  # one item from each cluster
    assert select_representative(members, 4) == chosen  # deterministic
    assert select_representative(members[:3], 5) == [0, 1, 2]


def test_templates_use_history_prompts_as_few_shot_turns():
    user = demo_users()[0]
    turns = PairTemplates().personalized(user, [0, 1], "This user is terse.", "How do I X?")
    assert turns[0]["role"] == "system" and "This user is terse." in turns[0]["content"]
    assert [t["role"] for t in turns[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[2]["content"] == user.history[0].text and turns[-1]["content"] == "How do I X?"
    neutral = PairTemplates().neutral("How do I X?")
    assert all(user.history[0].text not in t["content"] for t in neutral)


# ---------------------------------------------------------------- the default model

def _small_users(n_items: int = 3) -> list[User]:
    users = {u.user_id: u for u in demo_users()}
    return [User(uid, users[uid].history[:n_items]) for uid in ("terse_tom", "emoji_emma")]


PROMPTS = ["Suggest a weekend activity.", "What should I pack for a beach trip?", "How do I boil the perfect egg?"]


@pytest.mark.default_model
def test_pairs_for_two_demo_users(default_model_and_tokenizer, tmp_path):
    model, tokenizer = default_model_and_tokenizer
    users = _small_users()
    settings = GenerationSettings(max_new_tokens=40, batch_size=6, repetition_penalty=1.2)
    pairs = generate(model, tokenizer, users, PROMPTS[:2], out=tmp_path / "pairs.jsonl", settings=settings, truncated="trim", progress=False)
    self_generated = [p for p in pairs if p.source == SELF_GENERATED]
    assert {p.user_id for p in self_generated} == {"terse_tom", "emoji_emma"}
    for pair in pairs:
        assert pair.personalized and pair.neutral and pair.personalized != pair.neutral
        assert pair.settings["model"].startswith("llama-") and pair.settings["max_new_tokens"] == 40
    # Real-history pairs carry the user's own text as the personalised side.
    texts = {h.text for u in users for h in u.history}
    assert all(p.personalized in texts for p in pairs if p.source == REAL_HISTORY)
    # The neutral answer depends on the prompt only: shared by both users.
    by_prompt = {}
    for pair in self_generated:
        by_prompt.setdefault(pair.prompt, set()).add(pair.neutral)
    assert all(len(v) == 1 for v in by_prompt.values())
    # The output file holds exactly the returned pairs; a rerun generates nothing new and returns the same.
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(line)["personalized"] for line in lines] == [p.personalized for p in pairs]
    assert generate(model, tokenizer, users, PROMPTS[:2], out=tmp_path / "pairs.jsonl", settings=settings, truncated="trim", progress=False) == pairs
    # Another configuration on the same output is refused instead of mixing pairs.
    with pytest.raises(InputError, match="started with other inputs, model or settings"):
        generate(model, tokenizer, users, PROMPTS, out=tmp_path / "pairs.jsonl", settings=settings, truncated="trim", progress=False)


def _keys(path: Path) -> list[tuple[str, str, str]]:
    return [(d["user_id"], d["prompt"], d["source"]) for d in map(json.loads, path.read_text().splitlines())]


@pytest.mark.default_model
def test_killed_run_resumes_without_loss_or_duplicates(default_model_and_tokenizer, tmp_path):
    model, tokenizer = default_model_and_tokenizer
    users = _small_users(2)
    users_file = write(tmp_path / "users.jsonl", "".join(
        json.dumps({"user_id": u.user_id, "history": [{"text": h.text, "prompt": h.prompt} for h in u.history]}) + "\n" for u in users
    ))
    prompts_file = write(tmp_path / "prompts.txt", "\n".join(PROMPTS) + "\n")
    out = tmp_path / "killed.jsonl"
    command = [
        sys.executable, "-m", "repedit", "pairs", "--users", str(users_file), "--prompts", str(prompts_file), "--out", str(out),
        "--max-new-tokens", "32", "--batch-size", "2", "--truncated", "trim",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    # Kill as soon as some but not all self-generated pairs are written (3 batches of 2 tasks).
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the job finished before it could be interrupted"
    written_before = _keys(out)
    assert 0 < len(written_before) < 6

    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    resumed = _keys(out)
    assert resumed[: len(written_before)] == written_before  # nothing rewritten or lost
    assert len(resumed) == len(set(resumed))  # nothing duplicated

    # The same job, uninterrupted, in this process: exactly the same set of pairs.
    settings = GenerationSettings(max_new_tokens=32, batch_size=2, repetition_penalty=1.2)
    reference = generate(model, tokenizer, users, PROMPTS, out=tmp_path / "reference.jsonl", settings=settings, truncated="trim", progress=False)
    assert set(resumed) == {p.key for p in reference}
    state = json.loads((tmp_path / "killed.jsonl.state.json").read_text())
    expected = {(u.user_id, p, SELF_GENERATED) for u in users for p in PROMPTS} | {(u.user_id, h.prompt, REAL_HISTORY) for u in users for h in u.history}
    assert set(resumed) | {tuple(json.loads(k)) for k in state["dropped"]} == expected


def test_shared_prefix_cache_gives_the_same_generations(tiny_model, tokenizer, monkeypatch):
    import repedit.model.generation as generation
    from repedit.model.generation import generate_chat

    used = []
    original = generation._shared_prefix_cache
    monkeypatch.setattr(generation, "_shared_prefix_cache", lambda *a, **k: used.append(original(*a, **k)) or used[-1])

    model = tiny_model("llama")
    templates = PairTemplates()
    users = demo_users()[:2]
    conversations = [templates.personalized(u, [0, 1], "This user writes.", p) for u in users for p in PROMPTS]
    settings = GenerationSettings(max_new_tokens=6, batch_size=6, repetition_penalty=1.2)
    plain = generate_chat(model, tokenizer, conversations, settings, progress=False)
    shared = generate_chat(model, tokenizer, conversations, settings, progress=False, prefix_messages=[len(c) - 1 for c in conversations])
    assert [g.text for g in shared] == [g.text for g in plain]
    assert all(g.n_tokens > 0 for g in plain)
    assert used and used[0] is not None  # the shared-prefix path really ran (2 users' prefixes, 3 rows each)
    assert used[0][0].shape[0] == 6
