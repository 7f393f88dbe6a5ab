"""Model loading (alias, local folder, .gguf path, cache) and the `repedit capture` CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

import repedit
from repedit.cli.main import main
from repedit.io import InputError
from repedit.model.loading import default_gguf_path


def test_load_model_from_local_folder(tiny_folder):
    folder, original = tiny_folder
    model, tokenizer = repedit.load_model(str(folder))
    assert not model.training and tokenizer.pad_token is not None
    assert repedit.model_fingerprint(model) == repedit.model_fingerprint(original)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_load_tokenizer_loads_no_weights_and_matches_load_model(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    _, tokenizer = repedit.load_model(str(folder))
    alone = repedit.load_tokenizer(folder)
    assert alone("Ahoy, matey!").input_ids == tokenizer("Ahoy, matey!").input_ids and alone.pad_token == tokenizer.pad_token
    with pytest.raises(InputError, match="model folder not found"):
        repedit.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="GGUF file not found"):
        repedit.load_tokenizer(str(tmp_path / "missing.gguf"))


def test_load_model_errors(tmp_path):
    with pytest.raises(InputError, match="GGUF file not found"):
        repedit.load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="model folder not found"):
        repedit.load_model(str(tmp_path / "no-such-folder"))


def test_cli_capture_from_jsonl(tiny_folder, tmp_path):
    folder, model = tiny_folder
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(
        json.dumps({"text": "The first text.", "tag": "a"}) + "\n"
        + json.dumps({"prompt": "Say hi.", "response": "Hi there!", "tag": "b"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hello"}], "tag": "c"}) + "\n"
    )
    out = tmp_path / "acts"
    code = main(["capture", "--model", str(folder), "--inputs", str(inputs), "--out", str(out), "--sites", "resid_post.1", "attn_out.0", "--position", "mean"])
    assert code == 0
    acts = repedit.Activations.load(out)
    assert acts.sites == ["attn_out.0", "resid_post.1"] and acts.n_items == 3
    assert [m["tag"] for m in acts.metadata] == ["a", "b", "c"]
    tokenizer = repedit.load_model(str(folder))[1]
    ids = tokenizer("The first text.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[2][0].mean(0)
    assert torch.allclose(acts["resid_post.1"][0], expected, atol=1e-5)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys, tiny_folder):
    folder, _ = tiny_folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["capture", "--model", str(folder), "--inputs", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "ok"}\n')
    assert main(["capture", "--model", str(folder), "--inputs", str(good), "--out", str(tmp_path / "o"), "--sites", "resid_post.7"]) == 2
    assert "valid layers are 0..2" in capsys.readouterr().err


@pytest.mark.default_model
def test_gguf_path_is_dequantised_once_then_cached(tmp_path, monkeypatch, default_model_and_tokenizer):
    reference, _ = default_model_and_tokenizer
    monkeypatch.setenv("REPEDIT_CACHE", str(tmp_path / "cache"))
    from_gguf = repedit.load_tokenizer(str(default_gguf_path()))  # before the cache exists: read from the GGUF itself
    model, tokenizer = repedit.load_model(str(default_gguf_path()))
    from_cache = repedit.load_tokenizer(str(default_gguf_path()))
    text = "Hello there, 🏴‍☠️ matey!\n- a list"
    assert from_gguf(text).input_ids == from_cache(text).input_ids == tokenizer(text).input_ids
    assert from_gguf.pad_token == from_cache.pad_token == tokenizer.pad_token
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "repedit-cache.json").exists()
    start = time.perf_counter()
    again, _ = repedit.load_model(str(default_gguf_path()))
    assert time.perf_counter() - start < 10  # the cache is read, not the GGUF dequantised again (~15 s)
    # Same weights whichever way it was loaded: GGUF, cache, or the alias (the session fixture).
    fingerprint = repedit.model_fingerprint(reference)
    assert repedit.model_fingerprint(model) == repedit.model_fingerprint(again) == fingerprint
    assert repedit.model_fingerprint(again.to(torch.bfloat16)) == fingerprint
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


