"""LaMP-format I/O (repedit.pairs.lamp): conversion of the small fixtures in tests/data/lamp, round trip through
users JSONL, the official metrics against hand-computed values, clear errors for bad files, and the CLI.

The fixtures are invented texts in the LaMP file format (no LaMP data ships with repedit)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from repedit.cli.main import main
from repedit.io import InputError, check_user_id
from repedit.pairs.lamp import LABELS, LampItem, lamp_metrics, normalize_task, read_lamp, read_outputs, read_predictions, score_files, write_lamp
from repedit.pairs.users import read_users

DATA = Path(__file__).resolve().parents[1] / "data" / "lamp"
TASK_NAMES = ["LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"]


def questions(task: str) -> Path:
    return DATA / f"{task}_dev_questions.json"


def outputs(task: str) -> Path:
    return DATA / f"{task}_dev_outputs.json"


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


# ---- conversion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASK_NAMES)
def test_convert_each_task(task):
    data = read_lamp(questions(task), outputs(task))
    raw_q = json.loads(questions(task).read_text(encoding="utf-8"))
    raw_o = {g["id"]: g["output"] for g in json.loads(outputs(task).read_text(encoding="utf-8"))["golds"]}
    assert data.task == task  # detected from the outputs file
    assert len(data.users) == len(data.items) == len(raw_q)
    number = task.split("_")[1]
    for user, item, q in zip(data.users, data.items, raw_q):
        assert user.user_id == f"lamp{number}-{q['id']}" == check_user_id(user.user_id) == item.user_id
        assert item == LampItem(user.user_id, q["id"], q["input"], raw_o[q["id"]])
        assert len(user.history) == len(q["profile"])
        for h, p in zip(user.history, q["profile"]):
            if task == "LaMP_1":
                assert (h.text, h.prompt) == (f"{p['title']}\n{p['abstract']}", None)
            elif task == "LaMP_2":
                assert (h.text, h.label, h.prompt) == (p["description"], p["tag"], None)
            elif task == "LaMP_3":
                assert (h.text, h.rating) == (p["text"], float(p["score"]))
            elif task == "LaMP_4":
                assert (h.text, h.prompt) == (p["title"], f"Write a headline for this article: {p['text']}")
            elif task == "LaMP_5":
                assert (h.text, h.prompt) == (p["title"], f"Write a title for this paper abstract: {p['abstract']}")
            else:
                assert (h.text, h.prompt, h.label, h.rating) == (p["text"], None, None, None)
            assert h.timestamp == p.get("date")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_round_trip_through_users_jsonl(task, tmp_path):
    data = read_lamp(questions(task), outputs(task))
    users_path, items_path = write_lamp(data, tmp_path / "out")
    assert users_path == tmp_path / "out" / "users.jsonl" and items_path == tmp_path / "out" / "items.jsonl"
    assert read_users(users_path) == data.users
    rows = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines()]
    assert [LampItem(r["user_id"], r["id"], r["input"], r["target"]) for r in rows] == data.items
    assert {r["task"] for r in rows} == {task}
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_test_split_without_outputs_needs_the_task():
    data = read_lamp(questions("LaMP_4"), task="LaMP-4")
    assert data.task == "LaMP_4" and [item.target for item in data.items] == [None, None]
    with pytest.raises(InputError, match=re.escape(str(questions("LaMP_4"))) + r".*--task"):
        read_lamp(questions("LaMP_4"))


def test_task_names_and_override(tmp_path):
    assert {normalize_task(t) for t in ("LaMP_4", "LaMP-4", "lamp4", "4", " lamp_4 ")} == {"LaMP_4"}
    with pytest.raises(InputError, match="LaMP_6.*private"):
        normalize_task("LaMP_6")
    with pytest.raises(InputError, match="unknown LaMP task 'LaMP_9'.*LaMP_1, LaMP_2, LaMP_3, LaMP_4, LaMP_5, LaMP_7"):
        normalize_task("LaMP_9")
    # the override names the task when the file's task field is missing or not recognisable...
    golds = {"golds": [{"id": "410", "output": "a"}, {"id": "411", "output": "b"}]}
    assert read_outputs(write(tmp_path / "o1.json", golds), task="LaMP_4")[0] == "LaMP_4"
    assert read_outputs(write(tmp_path / "o2.json", {"task": "LaMP_4_time", **golds}), task="LaMP_4")[0] == "LaMP_4"
    # ...but may not contradict a task the file does name
    with pytest.raises(InputError, match=re.escape(str(outputs("LaMP_4"))) + r".*'task' says 'LaMP_4', but the task here is LaMP_5"):
        read_lamp(questions("LaMP_4"), outputs("LaMP_4"), task="LaMP_5")


# ---- metrics, hand-computed ------------------------------------------------------------------------

def test_lamp1_accuracy_and_macro_f1_by_hand():
    golds = ["[1]", "[2]", "[2]", "[1]"]
    preds = ["[1]", "[2]", "no idea", " [2] "]  # the third is outside the label set: wrong for every label
    # accuracy: items 1 and 2 right -> 2/4.
    # "[1]": TP 1 (item 1), FP 0, FN 1 (item 4)        -> P 1,   R 1/2, F1 2/3
    # "[2]": TP 1 (item 2), FP 1 (item 4), FN 1 (item 3) -> P 1/2, R 1/2, F1 1/2
    # macro F1 = (2/3 + 1/2) / 2 = 7/12
    m = lamp_metrics("LaMP_1", golds, preds)
    assert m == pytest.approx({"accuracy": 0.5, "f1": 7 / 12})


def test_lamp2_macro_f1_averages_over_all_15_official_tags():
    assert len(LABELS["LaMP_2"]) == 15 and {"sci-fi", "based on a book", "true story"} <= set(LABELS["LaMP_2"])
    golds = ["comedy", "action", "comedy"]
    preds = ["comedy", "comedy", "classic"]
    # accuracy 1/3. comedy: TP 1, FP 1, FN 1 -> F1 1/2; action (FN 1) and classic (FP 1) -> 0;
    # the other 12 tags appear nowhere -> 0 (the official script averages over all 15). macro = (1/2) / 15 = 1/30
    assert lamp_metrics("LaMP_2", golds, preds) == pytest.approx({"accuracy": 1 / 3, "f1": 1 / 30})


def test_lamp3_mae_rmse_by_hand_with_the_official_unparsable_rule():
    golds = ["5", "1", "3", "4", "2"]
    preds = ["4", "1", "great product", "2.5", "nan"]
    # errors: |4-5| = 1; 0; "great product" with gold 3: 1 and 5 are equally far, the official rule picks 5 -> 2;
    # |2.5-4| = 1.5 (numbers are used as given); "nan" counts as unparsable, gold 2: 5 is farther -> 3.
    # MAE = (1 + 0 + 2 + 1.5 + 3) / 5 = 1.5; RMSE = sqrt((1 + 0 + 4 + 2.25 + 9) / 5) = sqrt(3.25)
    m = lamp_metrics("LaMP_3", golds, preds)
    assert m == pytest.approx({"MAE": 1.5, "RMSE": math.sqrt(3.25)})
    # gold 1 and an unparsable prediction -> 5 (error 4); gold 5 -> 1 (error 4)
    assert lamp_metrics("LaMP_3", ["1", "5"], ["?", "?"]) == pytest.approx({"MAE": 4.0, "RMSE": 4.0})


def test_rouge_by_hand():
    golds = ["new study finds coffee helps memory", "Rain expected"]
    preds = ["Coffee helps memory, says new study!", ""]
    # item 1, tokens (lower-cased, punctuation dropped): gold new study finds coffee helps memory (6),
    # prediction coffee helps memory says new study (6). Shared unigrams: new study coffee helps memory = 5
    # -> P = R = 5/6, ROUGE-1 F = 5/6. Longest common subsequence: "coffee helps memory" (3) -> ROUGE-L F = 3/6.
    # item 2: empty prediction -> 0 for both. Means: ROUGE-1 (5/6 + 0) / 2 = 5/12, ROUGE-L (1/2 + 0) / 2 = 1/4
    assert lamp_metrics("LaMP_4", golds, preds) == pytest.approx({"rouge-1": 5 / 12, "rouge-L": 1 / 4})
    # no stemming by default (as in the official script); use_stemmer=True maps cats->cat, running/runs->run
    assert lamp_metrics("LaMP_7", ["cats running"], ["cat runs"])["rouge-1"] == 0.0
    assert lamp_metrics("LaMP_7", ["cats running"], ["cat runs"], use_stemmer=True)["rouge-1"] == pytest.approx(1.0)


def test_score_files_json_and_jsonl(tmp_path):
    # LaMP_3 golds are 3 (id 310) and 5 (id 311); predictions 4 and 5 -> MAE (1 + 0) / 2 = 0.5, RMSE sqrt(1/2)
    as_json = write(tmp_path / "p.json", {"task": "LaMP_3", "golds": [{"id": "311", "output": "5"}, {"id": "310", "output": "4"}]})
    as_jsonl = write(tmp_path / "p.jsonl", '{"id": "310", "output": 4}\n\n{"id": "311", "output": "5"}\n')
    expected = {"task": "LaMP_3", "n": 2, "MAE": 0.5, "RMSE": math.sqrt(0.5)}
    assert score_files(outputs("LaMP_3"), as_json) == pytest.approx(expected)
    assert score_files(outputs("LaMP_3"), as_jsonl) == pytest.approx(expected)
    assert read_predictions(as_jsonl) == (None, {"310": "4", "311": "5"})
    # scoring the golds against themselves is perfect
    assert score_files(outputs("LaMP_5"), outputs("LaMP_5"))["rouge-L"] == pytest.approx(1.0)
    assert score_files(outputs("LaMP_2"), outputs("LaMP_2"))["accuracy"] == 1.0


# ---- malformed input: InputError naming the file, the item and the field ----------------------------

Q4 = json.loads(questions("LaMP_4").read_text(encoding="utf-8"))


def _q4(change):
    data = json.loads(json.dumps(Q4))
    change(data)
    return data


BAD_QUESTIONS = {
    "not json": ("[{oops", r"invalid JSON"),
    "not a list": ({"id": "410"}, r"expected a non-empty JSON list of questions"),
    "question not an object": (["just a string"], r"question \[0\]: expected an object with 'id', 'input', 'profile'"),
    "missing input": (_q4(lambda d: d[1].pop("input")), r"question \[1\] \(id '411'\): missing field 'input'"),
    "id not a string": (_q4(lambda d: d[0].update(id=410)), r"question \[0\]: field 'id' must be a non-empty string"),
    "id unusable as user id": (_q4(lambda d: d[0].update(id="4/10")), r"question \[0\] \(id '4/10'\): field 'id' cannot make a repedit user id"),
    "duplicate id": (_q4(lambda d: d[1].update(id="410")), r"question \[1\] \(id '410'\): duplicate question id"),
    "profile not a list": (_q4(lambda d: d[0].update(profile="x")), r"\(id '410'\): field 'profile' must be a non-empty list.*\['title', 'text'\]"),
    "empty profile": (_q4(lambda d: d[0].update(profile=[])), r"\(id '410'\): field 'profile' must be a non-empty list"),
    "profile item not an object": (_q4(lambda d: d[0]["profile"].append(3)), r"\(id '410'\): profile\[2\]: expected an object"),
    "profile field missing": (_q4(lambda d: d[1]["profile"][1].pop("title")), r"\(id '411'\): profile\[1\]: missing field 'title'"),
    "profile field wrong type": (_q4(lambda d: d[0]["profile"][0].update(text=["a"])), r"profile\[0\]: field 'text' must be a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUESTIONS))
def test_bad_questions_file(case, tmp_path):
    content, pattern = BAD_QUESTIONS[case]
    path = write(tmp_path / "LaMP_4_bad_questions.json", content)
    with pytest.raises(InputError, match=re.escape(str(path)) + r".*" + pattern):
        read_lamp(path, task="LaMP_4")


def test_invalid_utf8_missing_file_and_bad_rating(tmp_path):
    path = tmp_path / "q.json"
    path.write_bytes(b'[{"id": "1", "input": "caf\xe9"}]')
    with pytest.raises(InputError, match=re.escape(str(path)) + r":1:27: invalid UTF-8 \(byte 0xe9\)"):
        read_lamp(path, task="LaMP_7")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "nope.json")) + ": file not found"):
        read_lamp(tmp_path / "nope.json", task="LaMP_7")
    q3 = json.loads(questions("LaMP_3").read_text(encoding="utf-8"))
    q3[1]["profile"][0]["score"] = "great"
    bad = write(tmp_path / "q3.json", q3)
    with pytest.raises(InputError, match=re.escape(str(bad)) + r": question \[1\] \(id '311'\): profile\[0\]: field 'score' must be a rating 1..5"):
        read_lamp(bad, task="LaMP_3")


BAD_OUTPUTS = {
    "not an object": ([{"id": "410", "output": "x"}], r"expected a JSON object \{\"task\": ..., \"golds\": \[...\]\}"),
    "missing task": ({"golds": []}, r"missing field 'task'"),
    "empty golds": ({"task": "LaMP_4", "golds": []}, r"field 'golds' is empty"),
    "unknown task": ({"task": "LaMP_9", "golds": []}, r"field 'task': unknown LaMP task 'LaMP_9'"),
    "private task": ({"task": "LaMP_6", "golds": []}, r"field 'task': LaMP_6 .* private"),
    "missing golds": ({"task": "LaMP_4"}, r"missing field 'golds'"),
    "golds not a list": ({"task": "LaMP_4", "golds": {"410": "x"}}, r"field 'golds' must be a list"),
    "gold without output": ({"task": "LaMP_4", "golds": [{"id": "410"}]}, r"golds\[0\] \(id '410'\): field 'output' must be a string"),
    "gold id not a string": ({"task": "LaMP_4", "golds": [{"id": 410, "output": "x"}]}, r"golds\[0\]: field 'id' must be a non-empty string"),
    "duplicate gold id": ({"task": "LaMP_4", "golds": [{"id": "410", "output": "x"}, {"id": "410", "output": "y"}]}, r"golds\[1\]: duplicate id '410'"),
    "gold not a label": ({"task": "LaMP_1", "golds": [{"id": "110", "output": "[3]"}]}, r"golds\[0\] \(id '110'\): field 'output' '\[3\]' is not a LaMP_1 label"),
    "gold not a rating": ({"task": "LaMP_3", "golds": [{"id": "310", "output": "six"}]}, r"golds\[0\] \(id '310'\): field 'output' must be a rating 1..5"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_bad_outputs_file(case, tmp_path):
    content, pattern = BAD_OUTPUTS[case]
    path = write(tmp_path / "bad_outputs.json", content)
    with pytest.raises(InputError, match=re.escape(str(path)) + r".*" + pattern):
        read_outputs(path)


def test_ids_must_match_between_questions_and_outputs(tmp_path):
    golds = {"task": "LaMP_4", "golds": [{"id": "410", "output": "x"}]}  # nothing for question 411
    path = write(tmp_path / "o.json", golds)
    with pytest.raises(InputError, match=re.escape(str(questions("LaMP_4"))) + r": question \[1\] \(id '411'\): no gold output.*" + re.escape(str(path))):
        read_lamp(questions("LaMP_4"), path)
    golds["golds"] += [{"id": "411", "output": "y"}, {"id": "999", "output": "z"}]  # 999 has no question
    write(path, golds)
    with pytest.raises(InputError, match=re.escape(str(path)) + r": 1 gold ids have no question in .*\['999'\]"):
        read_lamp(questions("LaMP_4"), path)


def test_bad_predictions(tmp_path):
    cases = {
        "p1.jsonl": ('{"id": "410", "output": "a"}\n{"id": "411"}\n', r"p1.jsonl:2 \(id '411'\): field 'output' must be a string"),
        "p2.jsonl": ('{"id": "410", "output": "a"}\n{"id": "411", "output": "b"\n', r"p2.jsonl:2: invalid JSON"),
        "p3.json": ({"task": "LaMP_5", "golds": [{"id": "410", "output": "a"}, {"id": "411", "output": "b"}]}, r"p3.json: field 'task' says 'LaMP_5', but the task here is LaMP_4"),
        "p4.json": ([{"id": "410", "output": "a"}, {"id": "412", "output": "b"}], r"p4.json: prediction ids do not match the gold ids of .*1 missing \(e.g. \['411'\]\), 1 unknown \(e.g. \['412'\]\)"),
        "p5.json": ({"task": "LaMP_4"}, r"p5.json: expected .*field 'golds'"),
        "p6.jsonl": ("", r"p6.jsonl: no predictions"),
    }
    for name, (content, pattern) in cases.items():
        path = write(tmp_path / name, content)
        with pytest.raises(InputError, match=pattern):
            score_files(outputs("LaMP_4"), path)


# ---- CLI -------------------------------------------------------------------------------------------

def test_cli_convert_and_score(tmp_path, capsys):
    out = tmp_path / "lamp4"
    assert main(["lamp", "convert", "--questions", str(questions("LaMP_4")), "--outputs", str(outputs("LaMP_4")), "--out", str(out)]) == 0
    assert "LaMP_4: 2 users (4 history items), 2 held-out items (with gold outputs)" in capsys.readouterr().out
    assert read_users(out / "users.jsonl") == read_lamp(questions("LaMP_4"), outputs("LaMP_4")).users
    items = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    # predictions in LaMP's own format, made from the items file; item 411's is the hand-computed ROUGE case above
    answers = {"410": "Old Rail Yard To Become Park", "411": "Coffee helps memory, says new study!"}
    preds = write(tmp_path / "preds.json", {"task": "LaMP_4", "golds": [{"id": i["id"], "output": answers[i["id"]]} for i in items]})
    assert main(["lamp", "score", "--outputs", str(outputs("LaMP_4")), "--predictions", str(preds)]) == 0
    # 410 exact: 1 and 1; 411: ROUGE-1 5/6, ROUGE-L 1/2 -> means (1 + 5/6) / 2 = 11/12 and (1 + 1/2) / 2 = 3/4
    assert json.loads(capsys.readouterr().out) == pytest.approx({"task": "LaMP_4", "n": 2, "rouge-1": 11 / 12, "rouge-L": 3 / 4})
    # test split: no outputs, task given
    assert main(["lamp", "convert", "--questions", str(questions("LaMP_7")), "--task", "LaMP_7", "--out", str(tmp_path / "t")]) == 0
    assert "without gold outputs" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    damaged = tmp_path / "LaMP_4_dev_questions.json"
    damaged.write_text(questions("LaMP_4").read_text(encoding="utf-8")[:-40], encoding="utf-8")  # truncated file
    assert main(["lamp", "convert", "--questions", str(damaged), "--outputs", str(outputs("LaMP_4")), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("repedit lamp: error: ") and str(damaged) in err and "invalid JSON" in err
    assert not (tmp_path / "o").exists()
    assert main(["lamp", "convert", "--questions", str(questions("LaMP_4")), "--out", str(tmp_path / "o")]) == 2  # no task
    assert "--task" in capsys.readouterr().err
    assert main(["lamp", "score", "--outputs", str(outputs("LaMP_4")), "--predictions", str(outputs("LaMP_5"))]) == 2
    assert "field 'task' says 'LaMP_5'" in capsys.readouterr().err
