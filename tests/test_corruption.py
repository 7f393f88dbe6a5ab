"""Damaged files never crash and never mislead: each file kind repedit reads × each kind of damage.

For every case the command line (``repedit.cli.main.main``, in process) must return 2 with one
``repedit <cmd>: error: ...`` line on stderr that names the damaged file (and the field where one is
wrong), and no traceback; an unexpected exception fails the case. The count of cases per file kind is
printed in pytest's terminal summary (``CORRUPTION_OUTCOMES``, reported by ``tests/conftest.py``).
A few cases also run ``python -m repedit`` in a subprocess, to see the real stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, build_tiny_model

import repedit
from repedit.cli.main import main
from repedit.io import save_tensors
from repedit.steering import SiteEdit, UserEdit
from repedit.store import save_edits

CORRUPTION_OUTCOMES: list[tuple[str, str, bool]] = []  # (file kind, damage, named error with exit 2)

USERS = [{"user_id": "alice", "history": [{"text": "Hi there, friend!", "prompt": "Say hi."}]}]
PAIR = {"user_id": "alice", "prompt": "Say hi.", "personalized": "Hey!! 🙌", "neutral": "Hello."}


def _random(n: int = 512, seed: int = 7) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


def _bad_utf8(data: bytes) -> bytes:
    cut = max(1, data.find(b'"', 2))  # inside the first JSON string (or early in a text file)
    return data[:cut] + b"\xff\xfe" + data[cut:]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny model folder, a store of three users, good users/prompts/pairs/tokens files, a good GGUF."""
    root = tmp_path_factory.mktemp("corruption")
    model = build_tiny_model("llama", seed=5)
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(0)
    edits = {u: UserEdit(u, [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN))], fp, HIDDEN) for u in ("alice", "bob", "carol")}
    store = save_edits(edits, root / "store")
    from repedit.store.gguf import export_gguf

    export_gguf(edits["alice"], root / "alice.gguf")
    return {"root": root, "model": model, "folder": folder, "store": store, "edits": edits, "fp": fp}


def _copy_store(world, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(world["store"], tmp_path / "store"))


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _check(kind: str, damage: str, argv: list[str], capsys, needles: list[str]) -> None:
    try:
        code, err = _run(argv, capsys)
    except BaseException:
        CORRUPTION_OUTCOMES.append((kind, damage, False))
        raise
    ok = code == 2 and "Traceback" not in err and all(n in err for n in needles)
    CORRUPTION_OUTCOMES.append((kind, damage, ok))
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("repedit "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ----------------------------------------------------------------- the store: index.json, edit JSON, edit safetensors

INDEX_CASES = {
    "truncated": lambda good: good[: len(good) // 2],
    "random bytes": lambda good: _random(),
    "invalid UTF-8": _bad_utf8,
    "wrong type: array": lambda good: b"[]",
    "wrong type: users a string": lambda good: json.dumps({**json.loads(good), "users": "alice bob carol"}).encode(),
    "wrong type: user id a number": lambda good: json.dumps({**json.loads(good), "users": ["alice", 7]}).encode(),
    "wrong type: entry file a list": lambda good: json.dumps(_with_entry(json.loads(good), "file", ["x"])).encode(),
    "wrong type: weight a string": lambda good: json.dumps(_with_entry(json.loads(good), "weight", "heavy")).encode(),
    "traversal in entry file": lambda good: json.dumps(_with_entry(json.loads(good), "file", "../../etc/passwd")).encode(),
    "generation NaN": lambda good: json.dumps({**json.loads(good), "generation": float("nan")}).encode(),
    "user id with newline": lambda good: json.dumps({**json.loads(good), "users": ["alice", "evil\n"]}).encode(),
}


def _with_entry(index: dict, key: str, value) -> dict:
    index["entries"]["alice"][key] = value
    return index


@pytest.mark.parametrize("damage", list(INDEX_CASES))
def test_damaged_index(world, tmp_path, capsys, damage):
    store = _copy_store(world, tmp_path)
    index = store / "index.json"
    index.write_bytes(INDEX_CASES[damage](index.read_bytes()))
    needles = [str(index)] + ({"wrong type: users a string": ["'users'"], "wrong type: user id a number": ["'users[1]'"],
                               "wrong type: entry file a list": ["entries['alice'].file"], "wrong type: weight a string": ["entries['alice'].weight"],
                               "traversal in entry file": ["entries['alice'].file"], "user id with newline": ["users[1]"]}.get(damage, []))
    _check("store index.json", damage, ["store", "list", "--store", store], capsys, needles)


def _edit_files(store: Path, user: str) -> tuple[Path, Path]:
    index = json.loads((store / "index.json").read_text())
    base = index["entries"][user]["file"]
    return store / f"{base}.json", store / f"{base}.safetensors"


EDIT_JSON_CASES = {
    "truncated": (lambda meta, raw: raw[: len(raw) // 2], []),
    "random bytes": (lambda meta, raw: _random(), []),
    "invalid UTF-8": (lambda meta, raw: _bad_utf8(raw), []),
    "wrong type: top level": (lambda meta, raw: b'"an edit"', []),
    "wrong type: edits an object": (lambda meta, raw: json.dumps({**meta, "edits": {"site": "resid_post.1"}}).encode(), ["'edits'"]),
    "wrong type: d_model a string": (lambda meta, raw: json.dumps({**meta, "d_model": "64"}).encode(), ["'d_model'"]),
    "wrong type: strength a string": (lambda meta, raw: json.dumps({**meta, "edits": [{**meta["edits"][0], "a": "strong"}]}).encode(), ["edits[0].a"]),
    "unknown key in an edit": (lambda meta, raw: json.dumps({**meta, "edits": [{**meta["edits"][0], "vector": [1, 2]}]}).encode(), ["edits[0]"]),
    "NaN strength": (lambda meta, raw: json.dumps({**meta, "edits": [{**meta["edits"][0], "a": float("nan")}]}).encode(), ["edits[0].a"]),
    "infinite strength": (lambda meta, raw: json.dumps({**meta, "edits": [{**meta["edits"][0], "a": float("inf")}]}).encode(), ["edits[0].a"]),
    "huge strength": (lambda meta, raw: json.dumps({**meta, "edits": [{**meta["edits"][0], "a": 1e30}]}).encode(), ["edits[0].a"]),
    "wrong d_model": (lambda meta, raw: json.dumps({**meta, "d_model": 576}).encode(), ["shape [64]", "[576]"]),
    "wrong positions": (lambda meta, raw: json.dumps({**meta, "positions": [0]}).encode(), ["'positions'"]),
}


@pytest.mark.parametrize("damage", list(EDIT_JSON_CASES))
def test_damaged_edit_json(world, tmp_path, capsys, damage):
    store = _copy_store(world, tmp_path)
    path, _ = _edit_files(store, "bob")
    change, extra = EDIT_JSON_CASES[damage]
    path.write_bytes(change(json.loads(path.read_text()), path.read_bytes()))
    _check("edit .json", damage, ["export", "gguf", "--store", store, "--user", "bob", "--out", tmp_path / "bob.gguf"], capsys, [str(path.stem)] + extra)
    assert not (tmp_path / "bob.gguf").exists()


EDIT_TENSOR_CASES = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "random bytes": lambda raw: _random(),
    "empty file": lambda raw: b"",
    "wrong tensor shape [2, d]": {"0.vector": torch.ones(2, HIDDEN)},
    "wrong tensor shape [d + 1]": {"0.vector": torch.ones(HIDDEN + 1)},
    "wrong tensor name": {"0.vector": torch.ones(HIDDEN), "7.vector": torch.ones(HIDDEN)},
    "integer dtype": {"0.vector": torch.ones(HIDDEN, dtype=torch.int32)},
    "missing tensor": {"0.direction": torch.ones(HIDDEN)},
    "NaN values": {"0.vector": torch.full((HIDDEN,), float("nan"))},
    "inf values": {"0.vector": torch.full((HIDDEN,), float("inf"))},
    "huge values (1e30)": {"0.vector": torch.full((HIDDEN,), 1e30)},
}
TENSOR_NEEDLES = {"wrong tensor shape [2, d]": ["'0.vector'", "[2, 64]", "expected [64]"], "wrong tensor shape [d + 1]": ["[65]"],
                  "wrong tensor name": ["'7.vector'"], "integer dtype": ["dtype"], "missing tensor": ["needs a vector"],
                  "NaN values": ["NaN"], "inf values": ["inf"], "huge values (1e30)": ["1e+30"]}


def _damage_tensors(path: Path, damage: str) -> None:
    change = EDIT_TENSOR_CASES[damage]
    if callable(change):
        path.write_bytes(change(path.read_bytes()))
    else:
        save_tensors(path, change)


@pytest.mark.parametrize("damage", list(EDIT_TENSOR_CASES))
def test_damaged_edit_tensors(world, tmp_path, capsys, damage):
    store = _copy_store(world, tmp_path)
    _, path = _edit_files(store, "bob")
    _damage_tensors(path, damage)
    needles = [path.name if damage != "missing tensor" else "bob"] + TENSOR_NEEDLES.get(damage, [])
    _check("edit .safetensors", damage, ["export", "gguf", "--store", store, "--user", "bob", "--out", tmp_path / "bob.gguf"], capsys, needles)
    assert not (tmp_path / "bob.gguf").exists()
    assert _run(["export", "gguf", "--store", store, "--user", "alice", "--out", tmp_path / "alice.gguf"], capsys)[0] == 0  # the others still export


# ----------------------------------------------------------------- pairs inputs: users.jsonl, prompts, pairs JSONL/CSV, state.json

def _pairs_argv(tmp_path: Path, users: Path, prompts: Path, world) -> list:
    return ["pairs", "--users", users, "--prompts", prompts, "--out", tmp_path / "out.jsonl", "--model", world["folder"], "--max-new-tokens", 4]


TEXT_CASES = {
    "truncated": lambda good: good[: len(good) * 3 // 4],  # torn inside the last line
    "random bytes": lambda good: _random(),
    "invalid UTF-8": _bad_utf8,
}
USERS_TYPES = {
    "wrong type: history a string": ({"user_id": "alice", "history": "hi"}, "'history'"),
    "wrong type: user id a number": ({"user_id": 7, "history": ["hi"]}, "'user_id'"),
    "user id with a newline": ({"user_id": "evil\n", "history": ["hi"]}, "'user_id'"),
    "user id with a path": ({"user_id": "../alice", "history": ["hi"]}, "'user_id'"),
    "wrong type: rating a string": ({"user_id": "alice", "history": [{"text": "hi", "rating": "five"}]}, "rating"),
}


@pytest.mark.parametrize("damage", list(TEXT_CASES) + list(USERS_TYPES))
def test_damaged_users_jsonl(world, tmp_path, capsys, damage):
    users, prompts = tmp_path / "users.jsonl", tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\n")
    good = _jsonl(USERS * 1) + _jsonl([{"user_id": "bob", "history": ["Hello."]}])
    users.write_bytes(TEXT_CASES[damage](good) if damage in TEXT_CASES else _jsonl([USERS_TYPES[damage][0]]))
    needles = [str(users)] + ([USERS_TYPES[damage][1]] if damage in USERS_TYPES else [])
    if damage == "truncated":  # the first line survives; the torn second one is malformed JSON
        needles.append(":2")
    _check("users.jsonl", damage, _pairs_argv(tmp_path, users, prompts, world), capsys, needles)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("damage", ["random bytes", "invalid UTF-8", "over-long prompt", "wrong type"])
def test_damaged_prompts(world, tmp_path, capsys, damage, suffix):
    users, prompts = tmp_path / "users.jsonl", tmp_path / f"prompts{suffix}"
    users.write_bytes(_jsonl(USERS))
    good = b"Say hi.\nName a colour.\n" if suffix == ".txt" else _jsonl(["Say hi.", {"prompt": "Name a colour."}])
    if damage == "over-long prompt":
        data = good + (b"x" * 5000 + b"\n" if suffix == ".txt" else _jsonl(["x" * 5000]))
    elif damage == "wrong type":
        if suffix == ".txt":
            pytest.skip("a text file has no types")
        data = _jsonl([{"prompt": ["Say hi."]}])
    else:
        data = TEXT_CASES[damage](good)
    prompts.write_bytes(data)
    if damage == "random bytes" and suffix == ".txt":
        data = _random().replace(b"\n", b"")  # may happen to be valid: make sure it is not
        prompts.write_bytes(b"\xff" + data)
    needles = [str(prompts)] + (["5000 characters", "--max-prompt-chars"] if damage == "over-long prompt" else [])
    _check(f"prompts{suffix}", damage, _pairs_argv(tmp_path, users, prompts, world), capsys, needles)


PAIRS_TYPES = {
    "wrong type: personalized a number": ({**PAIR, "personalized": 3}, "'personalized'"),
    "wrong type: user id a list": ({**PAIR, "user_id": ["alice"]}, "'user_id'"),
    "user id with a newline": ({**PAIR, "user_id": "evil\n"}, "'user_id'"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("damage", list(TEXT_CASES) + list(PAIRS_TYPES))
def test_damaged_pairs_file(world, tmp_path, capsys, damage, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        good = ("user_id,prompt,personalized,neutral\n" + "alice,Say hi.,Hey!!,Hello.\n" * 2).encode()
    else:
        good = _jsonl([PAIR, PAIR])
    if damage in PAIRS_TYPES:
        if suffix == ".csv":
            if damage != "user id with a newline":
                pytest.skip("CSV cells are strings")
            good = b'user_id,prompt,personalized,neutral\n"evil\n",Say hi.,Hey!!,Hello.\n'
        else:
            good = _jsonl([PAIRS_TYPES[damage][0]])
        data = good
    elif damage == "truncated" and suffix == ".csv":
        data = b'user_id,prompt,personalized,neutral\nalice,"Say hi.,Hey'  # torn inside a quoted cell
    else:
        data = TEXT_CASES[damage](good)
    path.write_bytes(data)
    needles = [str(path)] + ([PAIRS_TYPES[damage][1]] if damage in PAIRS_TYPES else [])
    _check(f"pairs{suffix}", damage, ["store", "add", "--store", tmp_path / "new-store", "--pairs", path, "--model", world["folder"]], capsys, needles)
    assert not (tmp_path / "new-store" / "index.json").exists() or json.loads((tmp_path / "new-store" / "index.json").read_text())["users"] == []


@pytest.fixture(scope="module")
def finished_pairs(world, tmp_path_factory):
    """A completed tiny-model pairs run: ``(folder, users, prompts, out)``."""
    folder = tmp_path_factory.mktemp("pairs-run")
    users, prompts = folder / "users.jsonl", folder / "prompts.txt"
    users.write_bytes(_jsonl(USERS))
    prompts.write_text("Say hi.\n")
    out = folder / "out.jsonl"
    assert main([str(a) for a in _pairs_argv(folder, users, prompts, world)]) == 0
    return folder, users, prompts, out


STATE_CASES = {
    "truncated": lambda state, raw: raw[: len(raw) // 2],
    "random bytes": lambda state, raw: _random(),
    "invalid UTF-8": lambda state, raw: _bad_utf8(raw),
    "wrong type: insights a list": lambda state, raw: json.dumps({**state, "insights": ["x"]}).encode(),
    "wrong type: neutral text a number": lambda state, raw: json.dumps({**state, "neutral": {p: {**e, "text": 1} for p, e in state["neutral"].items()}}).encode(),
}


@pytest.mark.parametrize("damage", list(STATE_CASES))
def test_damaged_pairs_state(world, finished_pairs, tmp_path, capsys, damage):
    import shutil

    folder, users, prompts, out = finished_pairs
    for name in (out.name, out.name + ".state.json"):  # with tiny random models every pair may be dropped: no out.jsonl then
        if (folder / name).exists():
            shutil.copy(folder / name, tmp_path / name)
    state_path = tmp_path / (out.name + ".state.json")
    state_path.write_bytes(STATE_CASES[damage](json.loads(state_path.read_text()), state_path.read_bytes()))
    needles = [str(state_path)] + (["'insights'"] if "insights" in damage else ["neutral"] if "neutral" in damage else [])
    _check("pairs .state.json", damage, _pairs_argv(tmp_path, users, prompts, world), capsys, needles)


# ----------------------------------------------------------------- tokens.json and GGUF control vectors

TOKENS_CASES = {
    **TEXT_CASES,
    "wrong type: array": lambda good: b'["tok"]',
    "wrong type: users a number": lambda good: b'{"tok": 3}',
    "user id with a newline": lambda good: b'{"tok": ["evil\\n"]}',
}


@pytest.mark.parametrize("damage", list(TOKENS_CASES))
def test_damaged_tokens_file(world, tmp_path, capsys, damage):
    path = tmp_path / "tokens.json"
    path.write_bytes(TOKENS_CASES[damage](b'{"tok-alice": ["alice"], "tok-all": "*"}'))
    _check("tokens.json", damage, ["serve", "--tokens", path, "--store", world["store"], "--model", world["folder"]], capsys, [str(path)])


def _gguf_cases(good: bytes) -> dict[str, bytes]:
    import gguf

    from repedit.store.gguf import ARCH

    def written(name: str, tensors: dict[str, object], arch: str = ARCH) -> bytes:
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"repedit-corruption-{os.getpid()}-{name}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        for tensor_name, value in tensors.items():
            writer.add_tensor(tensor_name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = path.read_bytes()
        path.unlink()
        return data

    import numpy as np

    return {
        "truncated": good[: len(good) // 2],
        "random bytes": _random(),
        "GGUF magic + random bytes": b"GGUF" + _random(),
        "GGUF header + random bytes": good[:24] + _random(),
        "wrong tensor shape [2, d]": written("shape", {"direction.1": np.ones((2, HIDDEN), dtype=np.float32)}),
        "wrong length for the model": written("length", {"direction.1": np.ones(HIDDEN + 1, dtype=np.float32)}),
        "wrong tensor name": written("name", {"vector.1": np.ones(HIDDEN, dtype=np.float32)}),
        "not a control vector": written("arch", {"direction.1": np.ones(HIDDEN, dtype=np.float32)}, arch="llama"),
        "NaN values": written("nan", {"direction.1": np.full(HIDDEN, np.nan, dtype=np.float32)}),
        "inf values": written("inf", {"direction.1": np.full(HIDDEN, np.inf, dtype=np.float32)}),
        "huge values (1e30)": written("huge", {"direction.1": np.full(HIDDEN, 1e30, dtype=np.float32)}),
    }


GGUF_DAMAGES = ["truncated", "random bytes", "GGUF magic + random bytes", "GGUF header + random bytes", "wrong tensor shape [2, d]",
                "wrong length for the model", "wrong tensor name", "not a control vector", "NaN values", "inf values", "huge values (1e30)"]


@pytest.mark.parametrize("damage", GGUF_DAMAGES)
def test_damaged_gguf(world, tmp_path, capsys, damage):
    path = tmp_path / "vector.gguf"
    path.write_bytes(_gguf_cases((world["root"] / "alice.gguf").read_bytes())[damage])
    _check("control vector .gguf", damage, ["store", "import-gguf", "--store", tmp_path / "s", "--gguf", path, "--user", "dora", "--model", world["folder"]],
           capsys, [str(path)])
    assert not (tmp_path / "s" / "index.json").exists() or "dora" not in (tmp_path / "s" / "index.json").read_text()


# ----------------------------------------------------------------- the real command line: stderr of a subprocess

@pytest.mark.parametrize("kind", ["index random bytes", "edit safetensors random bytes", "users invalid UTF-8"])
def test_subprocess_stderr_has_no_traceback(world, tmp_path, kind):
    store = _copy_store(world, tmp_path)
    if kind == "index random bytes":
        (store / "index.json").write_bytes(_random())
        argv, needle = ["store", "list", "--store", store], "index.json"
    elif kind == "edit safetensors random bytes":
        _, path = _edit_files(store, "bob")
        path.write_bytes(_random())
        argv, needle = ["export", "gguf", "--store", store, "--user", "bob", "--out", tmp_path / "x.gguf"], path.name
    else:
        users = tmp_path / "users.jsonl"
        users.write_bytes(_bad_utf8(_jsonl(USERS)))
        argv, needle = ["pairs", "--users", users, "--prompts", "demo", "--out", tmp_path / "o.jsonl"], "invalid UTF-8"
    result = subprocess.run([sys.executable, "-m", "repedit", *map(str, argv)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(repedit.__file__).parents[1])})
    assert result.returncode == 2 and "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_case_count_and_summary():
    """Runs last in this file: every case above ended in a named error (the count is in the terminal summary too)."""
    if not CORRUPTION_OUTCOMES:
        pytest.skip("run with the cases above")
    failed = [(kind, damage) for kind, damage, ok in CORRUPTION_OUTCOMES if not ok]
    print(f"corruption suite: {len(CORRUPTION_OUTCOMES)} cases, {len(CORRUPTION_OUTCOMES) - len(failed)} named errors with exit 2")
    assert not failed
