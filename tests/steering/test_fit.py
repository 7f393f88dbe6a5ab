"""`repedit fit`: one edit per user from pairs, against a hand computation on captured activations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import style_pairs, write_pairs_jsonl

import repedit
from repedit.cli.main import main
from repedit.io import InputError
from repedit.pairs.synthesis import REAL_HISTORY, SELF_GENERATED
from repedit.probes import capture_pairs
from repedit.steering import fit_user_edits
from repedit.store import VectorStore, save_edits

PROMPTS = ["Say hi.", "Describe the sea.", "Give advice.", "Name a colour."]


def pairs_for(user, positive, source=SELF_GENERATED):
    return style_pairs(user, positive, PROMPTS, source)


@pytest.fixture()
def pairs():
    return pairs_for("alice", "YO!!! lol") + pairs_for("bob", "Kindly note, dear sir,") + pairs_for("alice", "my own words:", REAL_HISTORY)


def test_caa_is_each_users_mean_difference(tiny_model, tokenizer, pairs):
    model = tiny_model("llama")
    edits = fit_user_edits(model, tokenizer, pairs, method="caa", layers=[1], strength=2.0, progress=False)
    assert list(edits) == ["alice", "bob"]
    own = [p for p in pairs if p.source == SELF_GENERATED]
    acts = capture_pairs(model, tokenizer, own, ["resid_post.1"], progress=False)
    x = acts["resid_post.1"].double().numpy()
    for user, edit in edits.items():
        rows = [i for i, m in enumerate(acts.metadata) if m["user_id"] == user]
        pos = [i for i in rows if acts.metadata[i]["label"] == 1]
        neg = [i for i in rows if acts.metadata[i]["label"] == 0]
        expected = x[pos].mean(0) - x[neg].mean(0)
        [site_edit] = edit.edits
        assert site_edit.site == "resid_post.1" and site_edit.operator == "add" and site_edit.a == 2.0
        np.testing.assert_allclose(site_edit.vector.double().numpy(), expected, rtol=1e-4, atol=1e-5)
        assert edit.model_fingerprint == repedit.model_fingerprint(model) and edit.provenance["n_pairs"] == 4


def test_stylevector_uses_real_history_only_and_chameleon_builds_subspace_edits(tiny_model, tokenizer, pairs):
    model = tiny_model("llama")
    style = fit_user_edits(model, tokenizer, pairs, method="stylevector", layers=[0], progress=False)
    assert list(style) == ["alice"] and style["alice"].provenance["sources"] == [REAL_HISTORY]
    chameleon = fit_user_edits(model, tokenizer, pairs, method="chameleon", layers=[1, 2], strength=0.5, neutral_strength=0.8, progress=False)
    for edit in chameleon.values():
        assert [e.site for e in edit.edits] == ["resid_post.1", "resid_post.2"]
        for site_edit in edit.edits:
            assert site_edit.operator == "chameleon" and (site_edit.a, site_edit.b) == (0.5, 0.8)
            gram = site_edit.basis @ site_edit.basis.T
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="unknown fit method"):
        fit_user_edits(model, tokenizer, pairs, method="magic")
    with pytest.raises(InputError, match="fewer than 5 usable pairs"):
        fit_user_edits(model, tokenizer, pairs, min_pairs=5, progress=False)


def test_fit_cli_writes_loadable_edits(tiny_folder, tokenizer, pairs, tmp_path):
    folder, model = tiny_folder
    pairs_file = write_pairs_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "edits"
    assert main(["fit", "--pairs", str(pairs_file), "--out", str(out), "--model", str(folder), "--layers", "1", "--strength", "3"]) == 0
    store = VectorStore(out)  # `repedit fit` writes a vector store: one on-disk format for fit, eval, serve and export
    assert store.list_users() == ["alice", "bob"]
    loaded = store.get("alice", model=model)
    assert loaded.method == "caa"
    direct = fit_user_edits(model, tokenizer, pairs, layers=[1], strength=3.0, progress=False)["alice"]
    torch.testing.assert_close(loaded.edits[0].vector, direct.edits[0].vector)
    with pytest.raises(InputError, match="is not valid"):
        save_edits({"../evil": dataclasses.replace(direct, user_id="../evil")}, tmp_path / "bad")
