"""Vector store: the save_edits layout as a store, add/update against a fit from scratch, decay, crash
safety, concurrent readers, forget (nothing left), compress against scikit-learn's PCA, and the CLI."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import style_pairs, write_pairs_jsonl

import repedit
from repedit.cli.main import main
from repedit.io import InputError
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED, Pair
from repedit.steering import SiteEdit, UserEdit, fit_user_edits
from repedit.store import save_edits
from repedit.store.compress import steering_effect
from repedit.store.vectors import UnknownUserError, VectorStore

PROMPTS = ["Say hi.", "Describe the sea.", "Give advice.", "Name a colour.", "Tell a joke.", "Plan a trip.", "Cook rice."]


def pairs_for(user, positive, prompts, source=REAL_HISTORY):
    return style_pairs(user, positive, prompts, source)


def batch_a():
    return pairs_for("alice", "yo lol!!", PROMPTS[:3]) + pairs_for("bob", "Kindly note, dear sir,", PROMPTS[:2])


def batch_b():
    return pairs_for("alice", "yo lol!!", PROMPTS[3:]) + pairs_for("bob", "Kindly note, dear sir,", PROMPTS[2:5])


def random_edits(fingerprint, n, d=64, site="resid_post.1", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [UserEdit(f"u{i}", [SiteEdit(site, "add", vector=torch.randn(d, generator=g) * (1 + i), a=0.5 + i)], fingerprint, d)
            for i in range(n)]


def store_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


def test_fit_output_is_a_store(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    edits = fit_user_edits(model, tokenizer, batch_a(), method="stylevector", layers=[1], progress=False)
    save_edits(edits, tmp_path)
    store = VectorStore(tmp_path)
    assert store.list_users() == ["alice", "bob"] and store.has("alice") and not store.has("carol")
    torch.testing.assert_close(store.get("alice", model).edits[0].vector, edits["alice"].edits[0].vector)
    assert store.entries()["bob"]["weight"] == 2.0  # stylevector from 2 pairs: updatable
    with pytest.raises(UnknownUserError) as err:
        store.get("carol")
    assert isinstance(err.value, KeyError) and "carol" in str(err.value)
    for bad in ("../alice", "a/b", "..", "", "alice.json", "x" * 129):
        with pytest.raises(InputError, match="is not valid"):
            store.get(bad)
    with pytest.raises(InputError, match="not a vector store"):
        VectorStore(tmp_path / "nothing")


@pytest.mark.parametrize("method,source", [("stylevector", REAL_HISTORY), ("caa", SELF_GENERATED)])
def test_add_then_update_equals_fit_from_scratch(tiny_model, tokenizer, tmp_path, method, source):
    model = tiny_model("llama")
    relabel = lambda pairs: [Pair(p.user_id, p.prompt, p.personalized, p.neutral, "", source) for p in pairs]  # noqa: E731
    a, b = relabel(batch_a()), relabel(batch_b())
    store = VectorStore(tmp_path, create=True)
    store.add(model, tokenizer, a, method=method, layers=[1, 2], strength=1.5, progress=False)
    store.update(model, tokenizer, b, progress=False)
    scratch = fit_user_edits(model, tokenizer, a + b, method=method, layers=[1, 2], strength=1.5, progress=False)
    for user in ("alice", "bob"):
        got = store.get(user, model)
        assert [e.site for e in got.edits] == ["resid_post.1", "resid_post.2"] and all(e.a == 1.5 for e in got.edits)
        for mine, reference in zip(got.edits, scratch[user].edits):
            torch.testing.assert_close(mine.vector, reference.vector, rtol=1e-5, atol=1e-6)
        assert got.provenance["n_pairs"] == scratch[user].provenance["n_pairs"]
    assert store.weight("alice") == 7.0 and store.weight("bob") == 5.0
    # Only the current version is on disk: old files are gone once the index no longer names them.
    assert store_files(tmp_path) == ["alice@2.json", "alice@2.safetensors", "bob@2.json", "bob@2.safetensors", "index.json"]


def test_decay_weights_old_evidence(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    fit = lambda pairs: fit_user_edits(model, tokenizer, pairs, method="stylevector", layers=[1], progress=False)["alice"]  # noqa: E731
    a = [p for p in batch_a() if p.user_id == "alice"]
    b = [p for p in batch_b() if p.user_id == "alice"]
    va, vb = fit(a).edits[0].vector.double(), fit(b).edits[0].vector.double()
    expected = (0.5 * 3 * va + 4 * vb) / (0.5 * 3 + 4)  # γ·W·v_old + n·m_new over γ·W + n
    first, second = VectorStore(tmp_path / "one", create=True), VectorStore(tmp_path / "two", create=True)
    for store in (first, second):
        store.add(model, tokenizer, a, method="stylevector", layers=[1], progress=False)
    first.update(model, tokenizer, b, decay=0.5, progress=False)
    second.decay(0.5)  # the same thing in two steps: down-weight, then a plain update
    assert second.weight("alice") == 1.5
    second.update(model, tokenizer, b, progress=False)
    for store in (first, second):
        torch.testing.assert_close(store.get("alice").edits[0].vector.double(), expected, rtol=1e-5, atol=1e-6)
        assert store.weight("alice") == pytest.approx(5.5)
    with pytest.raises(InputError, match="decay"):
        first.update(model, tokenizer, b, decay=0.0)


def test_update_refuses_what_it_cannot_fold(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    store = VectorStore(tmp_path, create=True)
    store.add(model, tokenizer, batch_a(), method="stylevector", layers=[1], progress=False)
    with pytest.raises(InputError, match="not in the store: carol"):
        store.update(model, tokenizer, pairs_for("carol", "hey", PROMPTS[:2]), progress=False)
    with pytest.raises(InputError, match="already in the store: alice"):
        store.add(model, tokenizer, batch_a(), method="stylevector", layers=[1], progress=False)
    ready = UserEdit("dora", [SiteEdit("resid_post.1", "add", vector=torch.ones(64))], repedit.model_fingerprint(model), 64)
    store.put(ready)
    assert store.weight("dora") is None
    with pytest.raises(InputError, match="without running statistics"):
        store.update(model, tokenizer, pairs_for("dora", "hey", PROMPTS[:2]), progress=False)
    with pytest.raises(InputError, match="not on this one"):
        store.update(tiny_model("llama", seed=1), tokenizer, pairs_for("alice", "hey", PROMPTS[:2]), progress=False)
    with pytest.raises(InputError, match="no usable pairs for alice"):  # stylevector needs real-history pairs
        store.update(model, tokenizer, pairs_for("alice", "hey", PROMPTS[:2], SELF_GENERATED) + pairs_for("bob", "Sir", PROMPTS[:2]), progress=False)
    assert store.weight("alice") == 3.0  # every refusal left the store as it was


def test_crash_during_a_write_keeps_the_old_version(tiny_model, tmp_path, monkeypatch):
    fingerprint = repedit.model_fingerprint(tiny_model("llama"))
    old, new = random_edits(fingerprint, 2), random_edits(fingerprint, 2, seed=7)
    store = VectorStore(tmp_path, create=True)
    store.put_many(old)
    before = store_files(tmp_path)
    index_before = (tmp_path / "index.json").read_bytes()

    def check_old_version_intact():
        fresh = VectorStore(tmp_path)
        for edit in old:
            torch.testing.assert_close(fresh.get(edit.user_id).edits[0].vector, edit.edits[0].vector)
        assert (tmp_path / "index.json").read_bytes() == index_before and store_files(tmp_path) == before

    # 1. The second user's tensors fail to write: the first user's new files must not be half-committed.
    import repedit.io as rio

    real_save = rio.save_file
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(rio, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.put_many(new, replace_existing=True)
    monkeypatch.undo()
    check_old_version_intact()

    # 2. The crash hits the index rename itself (the commit point).
    real_replace = rio.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("index.json"):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(rio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        store.put_many(new, replace_existing=True)
    monkeypatch.undo()
    check_old_version_intact()

    # 3. A hard crash (no clean-up at all) leaves new files and a temporary index behind: readers ignore
    #    them and the next write deletes them.
    (tmp_path / "u0@9.json").write_text("{garbage")
    (tmp_path / "u0@9.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / ".index.json.abcd.tmp").write_text("{half")
    (tmp_path / "notes.txt").write_text("a user's own file is left alone")
    torch.testing.assert_close(VectorStore(tmp_path).get("u0").edits[0].vector, old[0].edits[0].vector)
    store.put_many(new, replace_existing=True)
    assert store_files(tmp_path) == ["index.json", "notes.txt", "u0@2.json", "u0@2.safetensors", "u1@2.json", "u1@2.safetensors"]
    torch.testing.assert_close(store.get("u1").edits[0].vector, new[1].edits[0].vector)


def test_readers_never_see_a_half_written_user(tiny_model, tmp_path):
    fingerprint = repedit.model_fingerprint(tiny_model("llama"))
    # Version j: vector all j and strength j, in two different files: a torn read would mix them.
    version = lambda j: UserEdit("alice", [SiteEdit("resid_post.1", "add", vector=torch.full((64,), float(j)), a=float(j))], fingerprint, 64)  # noqa: E731
    store = VectorStore(tmp_path, create=True)
    store.put(version(1))
    errors: list[BaseException] = []

    def writer():
        try:
            for j in range(2, 40):
                VectorStore(tmp_path).put(version(j), replace_existing=True)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    reader = VectorStore(tmp_path)
    while thread.is_alive() or not seen:
        edit = reader.get("alice")
        [site_edit] = edit.edits
        assert torch.all(site_edit.vector == site_edit.a), "a reader saw tensors and metadata of different versions"
        seen.add(site_edit.a)
    thread.join()
    assert not errors and reader.get("alice").edits[0].a == 39.0
    assert len(seen) > 1  # the reader really ran while versions changed


def test_forget_leaves_nothing_of_the_user(tiny_model, tokenizer, tmp_path):
    model = tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)
    # A `repedit fit` output (legacy layout) with two users, then three more and a compression.
    save_edits(fit_user_edits(model, tokenizer, batch_a(), method="stylevector", layers=[1], progress=False), tmp_path)
    store = VectorStore(tmp_path)
    store.put_many(random_edits(fingerprint, 3, seed=3))
    store.compress(3)
    kept_before = {u: store.get(u).edits[0].vector for u in ("alice", "u0", "u2")}
    forgotten = store.get("u1").edits[0].vector.double()
    store.forget("u1")
    store.forget("bob")  # a legacy-layout user: its <id>.json/.safetensors go too
    assert store.list_users() == ["alice", "u0", "u2"]
    for path in tmp_path.iterdir():
        for name in ("u1", "bob"):
            assert name not in path.name and name.encode() not in path.read_bytes(), f"{path.name} still mentions {name}"
    with pytest.raises(UnknownUserError):
        store.get("u1")
    with pytest.raises(UnknownUserError):
        store.forget("u1")
    # The others are unchanged; the forgotten vector is no longer in the span of the refitted basis.
    for user, vector in kept_before.items():
        torch.testing.assert_close(store.get(user).edits[0].vector, vector, rtol=1e-4, atol=1e-4)
    basis_file = next(p for p in tmp_path.iterdir() if p.name.startswith("_basis@") and p.suffix == ".safetensors")
    from safetensors.torch import load_file

    basis = load_file(str(basis_file))
    mean, b = basis["resid_post.1.mean"].double(), basis["resid_post.1.basis"].double()
    residual = (forgotten - mean) - b.T @ (b @ (forgotten - mean))
    assert residual.norm() / forgotten.norm() > 0.3


def test_compress_matches_pca_and_reports_effect_loss(tiny_model, tokenizer, tmp_path):
    from sklearn.decomposition import PCA

    model = tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)
    edits = random_edits(fingerprint, 5)
    chameleon = UserEdit("zed", [SiteEdit("resid_post.1", "project_out", direction=torch.ones(64))], fingerprint, 64)
    directory, copy = tmp_path / "store", tmp_path / "copy"
    store = VectorStore(directory, create=True)
    store.put_many(edits + [chameleon])
    shutil.copytree(directory, copy)
    prompts = ["Hello there.", "What is the sea?"]
    report = store.compress(2, model=model, tokenizer=tokenizer, prompts=prompts)
    assert report.users == ["u0", "u1", "u2", "u3", "u4"] and "additive" in report.skipped["zed"]
    # Independent oracle: scikit-learn's PCA (centred) with 2 components.
    x = np.stack([e.edits[0].vector.double().numpy() for e in edits])
    pca = PCA(n_components=2, svd_solver="full").fit(x)
    expected = pca.inverse_transform(pca.transform(x))
    for i, edit in enumerate(edits):
        got = store.get(edit.user_id, model)
        assert got.edits[0].a == edit.edits[0].a  # strengths are kept aside, not compressed
        np.testing.assert_allclose(got.edits[0].vector.double().numpy(), expected[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(report.reconstruction_error[edit.user_id]["resid_post.1"],
                                   np.linalg.norm(x[i] - expected[i]) / np.linalg.norm(x[i]), rtol=1e-4)
    assert report.sites["resid_post.1"]["explained_variance"] == pytest.approx(pca.explained_variance_ratio_.sum(), rel=1e-6)
    # On disk each compressed user holds only its 2 coefficients; the store-wide ratio is from file sizes.
    from safetensors.torch import load_file

    entry = store.entries()["u3"]
    assert entry["compressed"] and {k: tuple(v.shape) for k, v in load_file(str(directory / f"{entry['file']}.safetensors")).items()} == {"0.coef": (2,)}
    copy_sizes = sum(p.stat().st_size for p in (copy).glob("u*@*.safetensors"))
    assert report.tensor_bytes_before == copy_sizes
    after = sum(p.stat().st_size for p in directory.glob("u*@*.safetensors")) + sum(p.stat().st_size for p in directory.glob("_basis@*.safetensors"))
    assert report.tensor_bytes_after == after and report.tensor_ratio == pytest.approx(copy_sizes / after)
    # Effect lost: positive at k=2 of 4 possible directions, ~0 when the basis can reconstruct exactly.
    assert all(report.effect[u]["effect_lost"] > 0.01 and report.effect[u]["kl_to_original"] > 0 for u in report.users)
    exact = VectorStore(copy).compress(4, model=model, tokenizer=tokenizer, prompts=prompts)
    assert max(exact.summary()["max_reconstruction_error"], *(e["effect_lost"] for e in exact.effect.values())) < 1e-3
    with pytest.raises(InputError, match="at least 2 users"):
        VectorStore(tmp_path / "solo", create=True).compress(1)


def test_effect_lost_is_one_for_no_steering_at_all(tiny_model, tokenizer):
    """Definition check: an "approximation" that does nothing loses the whole effect (1) and its KL to
    the original equals the original's KL to the unsteered model."""
    model = tiny_model("llama")
    [edit] = random_edits(repedit.model_fingerprint(model), 1)
    nothing = edit * 0.0
    result = steering_effect(model, tokenizer, {"u0": edit}, {"u0": nothing}, ["Hello there.", "Name a colour."])["u0"]
    assert result["effect_lost"] == pytest.approx(1.0, abs=1e-6)
    assert result["kl_to_original"] == pytest.approx(result["kl_effect"], rel=1e-5) and result["kl_effect"] > 0
    same = steering_effect(model, tokenizer, {"u0": edit}, {"u0": edit}, ["Hello there."])["u0"]
    assert same["effect_lost"] == 0.0 and abs(same["kl_to_original"]) < 1e-7


def test_store_cli(tiny_folder, tokenizer, tmp_path, capsys):
    folder, model = tiny_folder
    store_dir = tmp_path / "store"
    a = write_pairs_jsonl(tmp_path / "a.jsonl", batch_a())
    b = write_pairs_jsonl(tmp_path / "b.jsonl", batch_b())
    assert main(["store", "add", "--store", str(store_dir), "--pairs", str(a), "--model", str(folder), "--method", "stylevector", "--layers", "1"]) == 0
    assert main(["store", "update", "--store", str(store_dir), "--pairs", str(b), "--model", str(folder), "--decay", "0.5"]) == 0
    assert "alice: 7 pairs in total, evidence weight 5.5" in capsys.readouterr().out
    assert main(["store", "forget", "--store", str(store_dir), "--decay", "0.5", "--user", "bob"]) == 0
    capsys.readouterr()
    assert main(["store", "list", "--store", str(store_dir), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries["bob"]["weight"] == 0.5 * (0.5 * 2 + 3) and entries["alice"]["sites"] == ["resid_post.1"]
    report = tmp_path / "report.json"
    assert main(["store", "compress", "--store", str(store_dir), "--k", "1", "--model", str(folder), "--max-prompts", "2", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["summary"]["users"] == 2 and "effect lost" in capsys.readouterr().out
    out = tmp_path / "alice.gguf"
    assert main(["export", "gguf", "--store", str(store_dir), "--user", "alice", "--out", str(out), "--no-bake"]) == 0
    assert "--control-vector-scaled" in capsys.readouterr().out
    assert main(["store", "import-gguf", "--store", str(store_dir), "--gguf", str(out), "--user", "alice2", "--model", str(folder)]) == 0
    torch.testing.assert_close(VectorStore(store_dir).get("alice2").edits[0].vector, VectorStore(store_dir).get("alice").edits[0].vector)
    doubled = tmp_path / "alice-x2.gguf"  # --factor multiplies the edit's strength into the baked vector
    assert main(["export", "gguf", "--store", str(store_dir), "--user", "alice", "--out", str(doubled), "--factor", "2"]) == 0
    alice = VectorStore(store_dir).get("alice").edits[0]
    torch.testing.assert_close(repedit.store.read_gguf_directions(doubled)[0][1], (2 * alice.a * alice.vector.double()).float())
    assert main(["store", "forget", "--store", str(store_dir), "--user", "alice", "alice2"]) == 0
    assert main(["store", "list", "--store", str(store_dir)]) == 0
    assert "1 users in" in capsys.readouterr().out
    assert main(["export", "gguf", "--store", str(store_dir), "--user", "alice", "--out", str(out)]) == 2
    assert "no steering edit for user 'alice'" in capsys.readouterr().err
    assert main(["store", "forget", "--store", str(store_dir)]) == 2
