"""Scale-out on a real local Ray (2 actors, tiny model in a local folder): results equal the
single-process run; a killed worker and a killed driver lose and duplicate nothing."""

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

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'repedit[ray]'")
psutil = pytest.importorskip("psutil")

from conftest import build_tiny_model, style_pairs  # noqa: E402

from repedit.capture.embedding import Embedder  # noqa: E402
from repedit.evaluate.evaluation import eval_inputs, evaluate_users  # noqa: E402
from repedit.evaluate.fitting import FitOptions, fit_users  # noqa: E402
from repedit.io import InputError  # noqa: E402
from repedit.model.generation import GenerationSettings  # noqa: E402
from repedit.model.loading import load_model  # noqa: E402
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED, generate  # noqa: E402
from repedit.pairs.users import HistoryItem, User, demo_users, read_users  # noqa: E402
from repedit.scale import eval_on_ray, fit_on_ray, pairs_on_ray, ray_session, read_users_dataset  # noqa: E402
from repedit.store.vectors import VectorStore  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=8, batch_size=4)
PROMPTS = ["Suggest a weekend activity.", "How do I boil an egg?"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny llama saved as a local folder: what every actor loads."""
    path = tmp_path_factory.mktemp("scale") / "tiny-llama"
    build_tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def session():
    with ray_session("local", num_cpus=2) as running:
        yield running


def _users(n: int = 5) -> list[User]:
    demo = demo_users()
    return [User(f"{demo[i % len(demo)].user_id}_{i}", demo[i % len(demo)].history[:3]) for i in range(n)]


def _ray_worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("ModelWorker" in part for part in (p.info["cmdline"] or []))]


def test_local_ray_listens_on_loopback_only_and_stops_only_its_own_processes(tmp_path):
    """In a fresh interpreter: every socket the local Ray's processes listen on is 127.0.0.1, and
    leaving the session ends them while a process that is not ours (a stand-in) lives on."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, psutil\n"
        "from repedit.scale import ray_session\n"
        "me = psutil.Process()\n"
        "with ray_session('local', num_cpus=1) as s:\n"
        "    procs = me.children(recursive=True)\n"
        "    listening = sorted({c.laddr.ip for p in procs for c in p.net_connections('inet') if c.status == 'LISTEN'})\n"
        "    print(json.dumps({'address': s.address, 'local': s.local, 'pids': [p.pid for p in procs], 'listening': listening}))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["local"] and report["address"].startswith("127.0.0.1:")
    assert len(report["pids"]) >= 2  # gcs_server, raylet, ...
    assert report["listening"] and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in report["listening"]), report["listening"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in report["pids"]):
        time.sleep(0.5)
    assert not [p for p in report["pids"] if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert bystander.poll() is None
    bystander.kill()


def test_pairs_on_two_actors_equal_the_single_process_run_and_survive_a_killed_worker(folder, session, tmp_path):
    model, tokenizer = load_model(folder)
    users = _users(5)
    single = generate(model, tokenizer, users, PROMPTS, out=tmp_path / "single.jsonl", settings=SETTINGS, users_per_block=2,
                      truncated="keep", progress=False)
    assert {p.source for p in single} == {REAL_HISTORY, SELF_GENERATED} and len(single) >= 15
    killed: list[int] = []

    def kill_one_worker(phase: str, index: int) -> None:
        if phase == "block" and index == 0:  # both actors hold a block now: one is killed mid-task
            pid = _ray_worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    on_ray = pairs_on_ray(str(folder), users, PROMPTS, tmp_path / "ray.jsonl", actors=2, settings=SETTINGS, users_per_block=2,
                          truncated="keep", progress=False, on_unit=kill_one_worker)
    assert len(killed) == 1 and killed[0] not in _ray_worker_pids()  # Ray restarted the actor elsewhere and retried its block
    # Greedy decoding: the same pairs, byte for byte in the same order, nothing lost or doubled.
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()
    assert on_ray == single and len({p.key for p in on_ray}) == len(on_ray)
    state = lambda name: json.loads((tmp_path / f"{name}.jsonl.state.json").read_text())  # noqa: E731
    assert state("ray") == state("single")


def test_killed_driver_resumes_where_it_stopped(folder, session, tmp_path):
    """`repedit pairs --ray` killed with SIGKILL after its first block; the rerun writes the rest."""
    users = _users(6)
    users_file = tmp_path / "users.jsonl"
    users_file.write_text("".join(json.dumps({"user_id": u.user_id, "history": [{"text": h.text, "prompt": h.prompt} for h in u.history]}) + "\n"
                                  for u in users))
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs.jsonl"
    command = [sys.executable, "-m", "repedit", "pairs", "--users", str(users_file), "--prompts", str(prompts_file), "--out", str(out),
               "--model", str(folder), "--max-new-tokens", "8", "--batch-size", "4", "--users-per-block", "1", "--truncated", "keep", "--ray", "--ray-cpus", "2",
               "--actors", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1:
            os.kill(process.pid, signal.SIGKILL)  # the driver only: its Ray and actors are left to notice
            break
        time.sleep(0.1)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the job finished before it could be interrupted"
    before = out.read_text().splitlines()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    after = out.read_text().splitlines()
    assert after[:len(before)] == before  # what was written stays
    keys = [(d["user_id"], d["prompt"], d["source"]) for d in map(json.loads, after)]
    assert len(keys) == len(set(keys))
    # The oracle: the same command in one process, without Ray.
    single = [part if part != str(out) else str(tmp_path / "single.jsonl") for part in command[: command.index("--ray")]]
    assert subprocess.run(single, capture_output=True, text=True, cwd=ROOT, timeout=300).returncode == 0
    assert (tmp_path / "single.jsonl").read_text().splitlines() == after


def _fit_pairs() -> list:
    styles = {"pirate": "Arr matey", "emoji": "wow 🎉🎉", "formal": "Kindly note", "terse": "ok."}
    prompts = [f"Question number {i}?" for i in range(4)]
    pairs = []
    for n, (user, style) in enumerate(styles.items()):  # 4 to 7 own texts: unequal numbers of training items
        own = [f"Question number {i}?" for i in range(4 + n)]
        pairs += style_pairs(user, style, prompts) + style_pairs(user, style + " really", own, source=REAL_HISTORY)
    return pairs


@pytest.mark.parametrize("options", [FitOptions(method="caa", layers=(1, 2), batch_size=4),
                                     FitOptions(method="trained", layers=(1,), epochs=2, val_items=1, batch_size=4)],
                         ids=["caa", "trained"])
def test_fitted_vectors_on_two_actors_equal_the_single_process_fit(folder, session, tmp_path, options):
    model, tokenizer = load_model(folder)
    pairs = _fit_pairs()
    single = fit_users(model, tokenizer, pairs, options, progress=False)
    groups: list[int] = []
    on_ray = fit_on_ray(str(folder), pairs, tmp_path / "store", options=options, actors=2, users_per_task=1, progress=False,
                        on_unit=groups.append)
    assert sorted(groups) == [0, 1, 2, 3] and set(on_ray.edits) == set(single.edits) == {"pirate", "emoji", "formal", "terse"}
    store = VectorStore(tmp_path / "store")
    for user, edit in single.edits.items():
        stored = store.get(user)
        for mine, theirs in zip(edit.edits, stored.edits):
            assert mine.site == theirs.site
            torch.testing.assert_close(theirs.vector.double(), mine.vector.double(), atol=1e-6, rtol=0)
    if options.method == "trained":
        assert set(json.loads((tmp_path / "store" / "training.json").read_text())["best"]) == set(single.edits)


def test_interrupted_fit_reruns_only_the_missing_groups(folder, session, tmp_path):
    pairs = _fit_pairs()
    options = FitOptions(method="caa", layers=(1,), batch_size=4)

    def stop_after_first(group: int) -> None:
        raise KeyboardInterrupt  # the driver stops right after writing its first group

    with pytest.raises(KeyboardInterrupt):
        fit_on_ray(str(folder), pairs, tmp_path / "store", options=options, actors=1, users_per_task=2, progress=False, on_unit=stop_after_first)
    first = VectorStore(tmp_path / "store").list_users()
    assert len(first) == 2
    rerun: list[int] = []
    outcome = fit_on_ray(str(folder), pairs, tmp_path / "store", options=options, actors=1, users_per_task=2, progress=False, on_unit=rerun.append)
    assert rerun == [1] and set(outcome.edits) == {"pirate", "emoji", "formal", "terse"}
    assert sorted(VectorStore(tmp_path / "store").list_users()) == sorted(outcome.edits)


def _toy_embedder(texts):
    rows = torch.zeros(len(texts), 26)
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                rows[i, ord(ch) - 97] += 1
    return torch.nn.functional.normalize(rows + 1e-3, dim=-1)


def test_eval_on_two_actors_equals_the_single_process_evaluation(folder, session, tmp_path):
    model, tokenizer = load_model(folder)
    prompts = [f"Question number {i}?" for i in range(5)]
    styles = {"pirate": "Arr matey", "emoji": "wow party", "formal": "Kindly note"}
    users = [User(u, tuple(HistoryItem(f"{s} answer {i}", prompts[i]) for i in range(5))) for u, s in styles.items()]
    pairs = [p for u, s in styles.items() for p in style_pairs(u, s, prompts[:3]) + style_pairs(u, s, prompts[:3], source=REAL_HISTORY)]
    pairs = [p.__class__(p.user_id, p.prompt, p.personalized, p.neutral, f"This user writes like {p.user_id}.", p.source) for p in pairs]
    inputs = eval_inputs(users, pairs, 2)
    edits = fit_users(model, tokenizer, pairs, FitOptions(method="caa", layers=(1,), batch_size=4), progress=False).edits
    del edits["formal"]
    embedder = Embedder("toy", _toy_embedder)
    kwargs = dict(insights=inputs.insights, history=inputs.history, neutral=inputs.neutral, embedder=embedder, examples=inputs.examples,
                  factors=(0.0, 1.0), settings=GenerationSettings(max_new_tokens=6, batch_size=4))
    single = evaluate_users(model, tokenizer, inputs.test_items, edits, progress=False, **kwargs)
    on_ray = eval_on_ray(str(folder), inputs.test_items, edits, actors=2, users_per_task=2, progress_dir=tmp_path / "progress",
                         progress=False, **kwargs)
    assert on_ray.samples == single.samples
    for user, conditions in single.per_user.items():
        for condition, metrics in conditions.items():
            for name, value in metrics.items():
                if name != "latency_s" and isinstance(value, float):
                    assert on_ray.per_user[user][condition][name] == pytest.approx(value, abs=1e-6, nan_ok=True), (user, condition, name)
    assert len(on_ray.strength_curve) == len(single.strength_curve) == 4  # 2 edited users x 2 factors
    for a, b in zip(on_ray.strength_curve, single.strength_curve):
        assert a["user_id"] == b["user_id"] and a["gain"] == pytest.approx(b["gain"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == ["group-0.json", "group-1.json"]


def test_users_from_parquet_through_ray_data_equal_the_jsonl_reader(session, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    users = _users(4)
    rows = [{"user_id": u.user_id, "history": [{"text": h.text, "prompt": h.prompt} for h in u.history]} for u in users]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "users.parquet")
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_users_dataset(tmp_path / "users.parquet") == read_users(tmp_path / "users.jsonl")
    assert read_users_dataset(tmp_path / "users.jsonl") == read_users(tmp_path / "users.jsonl")
    rows[2]["history"] = []
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad.parquet: row 3: user .*'history' is empty"):
        read_users_dataset(tmp_path / "bad.parquet")


def test_import_does_not_load_ray_and_a_missing_ray_is_named(tmp_path):
    code = "import sys, repedit.scale, repedit.cli.main; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout.strip() == "False"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in _fit_pairs()))
    code = ("import sys; sys.modules['ray'] = None\n"
            "from repedit.cli.main import main\n"
            f"raise SystemExit(main(['fit', '--pairs', {str(pairs)!r}, '--out', {str(tmp_path / 'o')!r}, '--ray']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "pip install 'repedit[ray]'" in result.stderr


def test_fit_command_with_ray_writes_the_store_the_single_process_command_writes(folder, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in _fit_pairs()))
    common = [sys.executable, "-m", "repedit", "fit", "--pairs", str(pairs), "--model", str(folder), "--layers", "1", "--batch-size", "4"]
    single = subprocess.run(common + ["--out", str(tmp_path / "single")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    on_ray = subprocess.run(common + ["--out", str(tmp_path / "ray"), "--ray", "--ray-cpus", "2", "--actors", "2", "--users-per-task", "2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert single.returncode == 0 and on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert on_ray.stdout.splitlines()[-1] == single.stdout.splitlines()[-1].replace("single", "ray")  # "4 edits -> DIR"
    a, b = VectorStore(tmp_path / "single"), VectorStore(tmp_path / "ray")
    assert sorted(a.list_users()) == sorted(b.list_users()) == ["emoji", "formal", "pirate", "terse"]
    for user in a.list_users():
        torch.testing.assert_close(b.get(user).edits[0].vector, a.get(user).edits[0].vector, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "ray" / "fit-progress.json").read_text())["done"] == [0, 1]


def test_a_worker_that_keeps_dying_is_a_named_error_not_a_hang(folder, session):
    from repedit.scale import WorkerPool

    with WorkerPool(str(folder), 1, retries=0) as pool:
        os.kill(pool.pids()[0], signal.SIGKILL)
        with pytest.raises(InputError, match=r"a Ray worker died 1 times running unit 1 of 1 \(pid\)"):
            pool.call("pid")
