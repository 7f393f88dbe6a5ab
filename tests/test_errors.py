"""Clear errors for bad inputs: the message names what is wrong and what would be valid."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import N_LAYERS, make_config

from repedit import InputError, capture, parse_site
from repedit.model.inputs import read_inputs_jsonl


def test_unknown_site_kind_lists_valid_kinds(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match=r"unknown site kind 'resid_mid'.*valid kinds are resid_pre, resid_post, attn_out, mlp_out"):
        capture(model, tokenizer, ["hello"], sites=["resid_mid.1"], progress=False)
    with pytest.raises(InputError, match=r"unknown site 'residual'.*resid_pre, resid_post, attn_out, mlp_out"):
        capture(model, tokenizer, ["hello"], sites="residual", progress=False)


def test_layer_out_of_range_gives_the_range(tiny_model, tokenizer):
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match=rf"layer {N_LAYERS} .*out of range.*{N_LAYERS} layers.*0\.\.{N_LAYERS - 1}"):
        capture(model, tokenizer, ["hello"], sites=[f"resid_post.{N_LAYERS}"], progress=False)
    with pytest.raises(InputError, match=rf"0\.\.{N_LAYERS - 1}"):
        parse_site(f"mlp_out.-{N_LAYERS + 1}", N_LAYERS)
    # the boundaries are accepted
    assert parse_site(f"attn_out.-{N_LAYERS}", N_LAYERS).layer == 0
    assert parse_site(f"blocks.{N_LAYERS - 1}.hook_resid_post", N_LAYERS).name == f"resid_post.{N_LAYERS - 1}"


def test_empty_inputs(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="no inputs"):
        capture(model, tokenizer, [], sites=["resid_post.0"], progress=False)
    with pytest.raises(InputError, match="no sites"):
        capture(model, tokenizer, ["hello"], sites=[], progress=False)


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken"\n{"text": "never read"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}:2") + ".*invalid JSON"):
        read_inputs_jsonl(path)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n\n{"label": 0}\n', encoding="utf-8")  # blank line 2 is skipped
    with pytest.raises(InputError, match=re.escape(f"{path}:3") + r".*'text'.*'messages'.*'prompt'.*'response'.*found \['label'\]"):
        read_inputs_jsonl(path)
    path.write_text('{"prompt": "only a prompt"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}:1")):
        read_inputs_jsonl(path)
    path.write_text('{"prompt": "p", "response": 3}\n', encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}:1") + r".*'response' must be a string"):
        read_inputs_jsonl(path)


def test_jsonl_valid_file_keeps_metadata(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('"plain"\n{"text": "t", "label": 1}\n{"prompt": "p", "response": "r", "user": "u"}\n', encoding="utf-8")
    items, metadata = read_inputs_jsonl(path)
    assert items == ["plain", "t", ("p", "r")]
    assert metadata == [{}, {"label": 1}, {"user": "u"}]


LONG_TEXT = " ".join(f"word{i}" for i in range(20))


def test_too_long_text_error(tiny_model, tokenizer):
    model = tiny_model("llama")
    n = len(tokenizer(LONG_TEXT).input_ids)
    assert n > 8
    with pytest.raises(InputError, match=rf"input 0 has {n} tokens, more than the model's context of 8"):
        capture(model, tokenizer, [LONG_TEXT], sites=["resid_post.0"], max_length=8, truncation="error", progress=False)


def test_too_long_text_truncated_left_with_warning_keeps_last_tokens(tiny_model, tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(LONG_TEXT).input_ids
    with pytest.warns(UserWarning, match="truncated on the left"):
        acts = capture(model, tokenizer, [LONG_TEXT, "short"], sites=["resid_post.1"], position="all", max_length=8, progress=False)
    assert acts.n_tokens.tolist() == [8, 1]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[-8:]]), output_hidden_states=True).hidden_states[2][0]
    assert (acts.item("resid_post.1", 0) - expected).abs().max() <= 1e-4


def test_context_limit_read_from_model_config(tokenizer):
    """Without max_length, GPT-2's n_positions is the limit (positions beyond it would crash the model)."""
    from transformers import AutoModelForCausalLM

    config = make_config("gpt2")
    config.n_positions = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tokenizer(LONG_TEXT).input_ids
    assert len(ids) > 16
    with pytest.warns(UserWarning, match="context of 16 tokens"):
        acts = capture(model, tokenizer, [LONG_TEXT], sites=["resid_post.0"], position="all", progress=False)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[-16:]]), output_hidden_states=True).hidden_states[1][0]
    assert (acts["resid_post.0"] - expected).abs().max() <= 1e-4
    with pytest.raises(InputError, match="context of 16"):
        capture(model, tokenizer, [LONG_TEXT], sites=["resid_post.0"], truncation="error", progress=False)


def test_short_texts_do_not_warn(tiny_model, tokenizer):
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        capture(model, tokenizer, ["short text"], sites=["resid_post.0"], max_length=8, progress=False)


def test_response_span_on_plain_texts(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match=r"input 1 has no response tokens.*\(prompt, response\) pairs"):
        capture(model, tokenizer, [("prompt", "response"), "just a text"], sites=["resid_post.0"], span="response", progress=False)


def test_unknown_position_and_span(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match=r"unknown position 'first'.*last, mean, all"):
        capture(model, tokenizer, ["hello"], sites=["resid_post.0"], position="first", progress=False)
    with pytest.raises(InputError, match=r"unknown span 'answer'.*full, prompt, response"):
        capture(model, tokenizer, ["hello"], sites=["resid_post.0"], span="answer", progress=False)


def test_metadata_length_mismatch(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match="metadata has 1 entries for 2 inputs"):
        capture(model, tokenizer, ["a", "b"], sites=["resid_post.0"], metadata=[{"label": 1}], progress=False)


def test_bad_item_type(tiny_model, tokenizer):
    model = tiny_model("llama")
    with pytest.raises(InputError, match=r"input 1: expected a text.*got int"):
        capture(model, tokenizer, ["fine", 42], sites=["resid_post.0"], progress=False)
