"""The Triton fused attention + edit kernel on CPU through the interpreter: against the reference and
the SDPA oracle (odd sizes, grouped-query heads, left padding, decode), unedited rows bit for bit,
through the Hugging Face wiring on a tiny llama, and greedy generation on the default model.

Run by ``tests/kernels/test_kernels.py::test_triton_kernels_under_the_interpreter`` in a fresh process
with ``TRITON_INTERPRET=1``; in any other process this module skips."""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in its own process with TRITON_INTERPRET=1 (see test_kernels.py)", allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
from test_attention import KINDS, SHAPES, attention_case, attn_edits, edit_kwargs, logits_and_tokens, oracle_kwargs, sdpa_oracle  # noqa: E402
from test_kernels import assert_bits_equal  # noqa: E402

import repedit  # noqa: E402
from repedit import kernels, steering  # noqa: E402
from repedit.kernels import attention as reference  # noqa: E402
from repedit.model.generation import left_pad  # noqa: E402
from repedit.steering import SiteEdit, UserEdit, steer  # noqa: E402


def run(c, kind, **kw):
    args = (c["q"], c["k"], c["v"], c["w"], c["bias"], c["idx"])
    kw = dict(mask=c["padding"], **edit_kwargs(c, kind), **kw)
    return kernels.attention_edit(*args, **kw), reference.attention_edit(*args, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_equals_reference_and_sdpa_then_edit(shape, kind):
    c = attention_case(**shape)
    assert kernels.backend(c["q"]) == "triton-interpreter"
    got, want = run(c, kind)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), sdpa_oracle(c, **oracle_kwargs(c, kind)), rtol=1e-5, atol=1e-5)


def test_unedited_rows_are_bit_identical_and_all_masked_queries_are_zero():
    c = attention_case(**SHAPES[0])
    args = (c["q"], c["k"], c["v"], c["w"], None)
    plain = kernels.attention_edit(*args, mask=c["padding"])
    edited = kernels.attention_edit(*args, c["idx"], mask=c["padding"], values=c["values"], **edit_kwargs(c, "project_k_add"))
    assert_bits_equal(edited[1], plain[1])  # idx = -1
    assert (edited[0] - plain[0]).abs().max() > 1e-2
    none = kernels.attention_edit(*args, torch.tensor([-1, -1, -1]), mask=c["padding"], values=c["values"], **edit_kwargs(c, "project_k_add"))
    assert_bits_equal(none, plain)
    # row 2 has 3 left pads: queries 0..2 may attend to no key -> zero attention output (no bias here)
    assert torch.equal(plain[2, :3], torch.zeros_like(plain[2, :3]))


def test_decode_and_hf_mask_layouts():
    c = attention_case(**SHAPES[3])
    full = c["padding"][:, None, :] & torch.ones(17, 17, dtype=torch.bool).tril()
    args = (c["q"], c["k"], c["v"], c["w"], c["bias"], c["idx"])
    a = kernels.attention_edit(*args, mask=full[:, None], causal=False, table=c["table"])
    b = kernels.attention_edit(*args, mask=c["padding"], table=c["table"])
    assert_bits_equal(a, b)
    last = kernels.attention_edit(c["q"][:, :, -1:], *args[1:], mask=c["padding"], table=c["table"])
    torch.testing.assert_close(last, b[:, -1:], rtol=1e-5, atol=1e-5)


def test_bfloat16_within_bf16_rounding_of_the_fp32_oracle():
    c = attention_case(**SHAPES[0], dtype=torch.bfloat16)
    exact = sdpa_oracle(attention_case(**SHAPES[0]), **oracle_kwargs(c, "project_k_add")).float()  # same values in fp32
    got, want = run(c, "project_k_add")
    error = (got.float() - exact).abs().max()
    assert error < 3e-2 * exact.abs().max(), error  # a few bf16 ulps of the largest output
    # within 3x the reference's own bf16 error: the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest)
    assert error <= (want.float() - exact).abs().max() * 3


def test_fused_steering_runs_the_triton_attention_on_a_tiny_llama():
    from conftest import build_tiny_model

    torch.manual_seed(1)
    model = build_tiny_model("llama")
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(7)
    ids, mask = left_pad([torch.randint(0, 1000, (n,)).tolist() for n in (5, 7, 4)], 0)
    edits, rows = attn_edits(fp), [0, None, 1]
    with steer(model, edits, rows):
        want_logits, want_tokens = logits_and_tokens(model, ids, mask)
    calls = []
    original = kernels.triton_attention.attention_edit
    kernels.ops._triton_attention.attention_edit = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with steering.fused_steering(model, edits, rows, force=True) as handle:
            assert "attn_out.1" in handle.fused_sites
            got_logits, got_tokens = logits_and_tokens(model, ids, mask)
    finally:
        kernels.ops._triton_attention.attention_edit = original
    assert len(calls) == 12  # two layers x (prefill + 5 decode steps), all in the Triton kernel
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_tokens.tolist() == want_tokens.tolist()


@pytest.mark.default_model
def test_greedy_generation_on_the_default_model_with_the_triton_attention_forced(default_model_and_tokenizer):
    """SmolLM2-135M: attn_out.12 edits (projection + add, and a value-path edit) for two left-padded
    users; 6 greedy tokens through the Triton kernel (interpreter) == SDPA + the steering hooks."""
    model, tokenizer = default_model_and_tokenizer
    fp, d = repedit.model_fingerprint(model), model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    value_edit = steering.value_edit_as_attn_out(model, 12, torch.randn(model.model.layers[12].self_attn.v_proj.out_features, generator=g) * 2)
    edits = [
        UserEdit("a", [SiteEdit("attn_out.12", "project_out", direction=torch.randn(d, generator=g)),
                       SiteEdit("attn_out.12", "add", vector=torch.randn(d, generator=g) * 3)], fp, d),
        UserEdit("b", [SiteEdit("attn_out.12", "add", vector=value_edit)], fp, d),
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(["Write a haiku about rain.", "Hi", "Tell me a joke"], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    rows = [0, 1, None]

    def generate():
        with torch.no_grad():
            return model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id).tolist()

    with steer(model, edits, rows):
        want = generate()
    with steering.fused_steering(model, edits, rows, force=True) as handle:
        assert handle.fused_sites == ["attn_out.12"]
        got = generate()
        assert handle.attention_tables[12].calls == 6
    assert got == want
    assert generate() != want  # the edits change the greedy tokens
    assert model.config._attn_implementation == "sdpa"
