"""Architecture adapters: every supported family is found, unsupported models fail with a clear message."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, HIDDEN, N_LAYERS, build_tiny_model
from torch import nn

import repedit
from repedit import UnsupportedModelError, get_adapter
from repedit.model.arch import LAYOUTS

# Hand-written from the Hugging Face modeling files (independent of repedit's table): dotted paths,
# relative to the CausalLM, of the decoder stack, and per block the attention, MLP, the two pre-norms,
# and the modules whose output is what attention / MLP add to the residual stream.
_LLAMA_LIKE = dict(
    decoder="model", blocks="model.layers", attn="self_attn", mlp="mlp", input_norm="input_layernorm",
    pre_mlp_norm="post_attention_layernorm", attn_out="self_attn", mlp_out="mlp", final_norm="model.norm",
    embed="model.embed_tokens", unembed="lm_head",
)
_GEMMA2_LIKE = {
    **_LLAMA_LIKE, "pre_mlp_norm": "pre_feedforward_layernorm", "attn_out": "post_attention_layernorm",
    "mlp_out": "post_feedforward_layernorm",
}
_NEOX = dict(
    decoder="gpt_neox", blocks="gpt_neox.layers", attn="attention", mlp="mlp", input_norm="input_layernorm",
    pre_mlp_norm="post_attention_layernorm", attn_out="post_attention_dropout", mlp_out="post_mlp_dropout",
    final_norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in", unembed="lm_head",
)
EXPECTED = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "phi3": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "olmo": _LLAMA_LIKE, "smollm3": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE, "gemma3": _GEMMA2_LIKE,
    "gpt2": dict(
        decoder="transformer", blocks="transformer.h", attn="attn", mlp="mlp", input_norm="ln_1", pre_mlp_norm="ln_2",
        attn_out="attn", mlp_out="mlp", final_norm="transformer.ln_f", embed="transformer.wte", unembed="lm_head",
    ),
    "gpt_neox": _NEOX, "gpt_neox_seq": _NEOX,
}
EXPECTED_TYPE = {"gemma3": "gemma3_text", "gpt_neox_seq": "gpt_neox"}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_finds_every_part(tiny_model, arch):
    model = tiny_model(arch)
    expected = EXPECTED[arch]
    adapter = get_adapter(model)
    sub = model.get_submodule

    assert adapter.model_type == EXPECTED_TYPE.get(arch, arch)
    assert adapter.n_layers == N_LAYERS
    assert adapter.d_model == HIDDEN
    assert adapter.decoder is sub(expected["decoder"])
    assert adapter.module_prefix == expected["decoder"]
    assert adapter.blocks is sub(expected["blocks"])
    assert adapter.final_norm is sub(expected["final_norm"])
    assert adapter.embed is sub(expected["embed"])
    assert adapter.unembed is sub(expected["unembed"])
    for layer in range(N_LAYERS):
        block = f"{expected['blocks']}.{layer}"
        assert adapter.block(layer) is sub(block)
        assert adapter.attn(layer) is sub(f"{block}.{expected['attn']}")
        assert adapter.mlp(layer) is sub(f"{block}.{expected['mlp']}")
        assert adapter.input_norm(layer) is sub(f"{block}.{expected['input_norm']}")
        assert adapter.pre_mlp_norm(layer) is sub(f"{block}.{expected['pre_mlp_norm']}")
        assert adapter.attn_out_module(layer) is sub(f"{block}.{expected['attn_out']}")
        assert adapter.mlp_out_module(layer) is sub(f"{block}.{expected['mlp_out']}")
        # module_path names the same modules, as dotted names usable with get_submodule
        assert adapter.module_path("block", layer) == block
        assert sub(adapter.module_path("attn_out", layer)) is adapter.attn_out_module(layer)
        assert sub(adapter.module_path("mlp_out", layer)) is adapter.mlp_out_module(layer)


def test_bare_decoder_is_supported():
    """A bare decoder stack (no LM head) is found too: prefix '' and no unembed."""
    model = build_tiny_model("llama").model
    adapter = get_adapter(model)
    assert adapter.decoder is model
    assert adapter.module_prefix == ""
    assert adapter.n_layers == N_LAYERS
    assert adapter.unembed is None


def _all_layout_attribute_names() -> set[str]:
    names = set()
    for layout in LAYOUTS.values():
        names.update(n for n in (layout.blocks, layout.attn, layout.mlp, layout.input_norm, layout.pre_mlp_norm,
                                 layout.final_norm, layout.embed, layout.attn_out, layout.mlp_out) if n)
    return names


def test_plain_module_is_unsupported_and_message_lists_what_was_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match=r"unsupported model Sequential \(model_type='Sequential'\)") as info:
        get_adapter(model)
    message = str(info.value)
    for name in _all_layout_attribute_names():
        assert name in message, f"attribute {name!r} not named in the error message"
    assert "llama" in message and "gpt2" in message  # the supported types are listed


def test_bert_is_unsupported():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match=r"BertModel \(model_type='bert'\)") as info:
        get_adapter(model)
    assert "self_attn" in str(info.value) and "ln_1" in str(info.value) and "input_layernorm" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_known_type_with_wrong_layout_is_rejected():
    """A model claiming model_type 'llama' but laid out like GPT-2 is refused, naming the llama layout."""
    model = build_tiny_model("gpt2")
    model.config.model_type = "llama"
    with pytest.raises(UnsupportedModelError, match=r"model_type='llama'.*self_attn.*input_layernorm"):
        get_adapter(model)


def test_load_model_rejects_unsupported_folder(tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match=r"model_type='bert'"):
        repedit.load_model(str(folder))


@pytest.mark.parametrize("arch, layout_of", [("llama", "llama"), ("gpt2", "gpt2"), ("gpt_neox", "gpt_neox"), ("gemma2", "gemma2")])
def test_unknown_type_with_matching_layout_is_accepted(arch, layout_of):
    model = build_tiny_model(arch)
    model.config.model_type = f"my_custom_{arch}"
    adapter = get_adapter(model)
    assert adapter.model_type == f"my_custom_{arch}"
    # the most specific matching layout is chosen: a Gemma 2 block also has every Llama child, but its
    # attention output is the post-attention norm, not self_attn
    assert adapter.layout == LAYOUTS[layout_of]
    assert adapter.n_layers == N_LAYERS and adapter.d_model == HIDDEN


def test_unknown_type_gemma2_decomposition_is_right(tokenizer):
    """With an unknown model_type, a Gemma 2 layout still gives resid_post == resid_pre + attn_out + mlp_out."""
    model = build_tiny_model("gemma2")
    model.config.model_type = "my_custom_gemma2"
    acts = repedit.capture(model, tokenizer, ["a short text to check"], sites=["resid_pre.1", "resid_post.1", "attn_out.1", "mlp_out.1"],
                           position="all", progress=False)
    total = acts["resid_pre.1"] + acts["attn_out.1"] + acts["mlp_out.1"]
    torch.testing.assert_close(total, acts["resid_post.1"], atol=1e-4, rtol=0)


def test_get_adapter_is_cached_without_keeping_the_model_alive(monkeypatch):
    import gc
    import weakref

    from repedit.model import arch

    model = build_tiny_model("llama")
    first = get_adapter(model)
    calls = []
    monkeypatch.setattr(arch, "_find_adapter", lambda *a: calls.append(a) or pytest.fail("layout searched again"))
    again = get_adapter(model)
    assert again == first and again.decoder is model.model and calls == []
    monkeypatch.undo()
    alive = weakref.ref(model)
    del model, first, again
    gc.collect()
    assert alive() is None  # the cache holds no reference back to the model


def test_site_layer_reads_canonical_names_only():
    from repedit.model.sites import site_layer

    assert [site_layer(n) for n in ("resid_post.12", "attn_out.0", "mlp_out.29")] == [12, 0, 29]
    for bad in ("resid_post.-1", "blocks.3.hook_resid_post", "pooled", "foo.3"):
        with pytest.raises(repedit.InputError, match="not a canonical site name"):
            site_layer(bad)
    assert repedit.parse_site("resid_post.-1", 4) is repedit.parse_site("resid_post.-1", 4)  # parsed once, then cached
