"""The real default model (SmolLM2-135M-Instruct, 30 llama layers): a left-padded batch against each
text run alone through Hugging Face with ``output_hidden_states=True``.

fp32 numerics: batched and solo runs sum in a different order (BLAS blocks by sequence length), so
they differ by a few fp32 ulps of each token's largest activation. Measured on this machine: at most
~3.5e-6 of the per-token max |activation| (0.02 absolute at the attention-sink token 0, whose
activations reach ~23000), and up to ~2.5e-4 absolute elsewhere. The fp32 checks therefore use a
per-token relative bound; the float64 run shows the remaining difference is rounding, not a bug.
"""

from __future__ import annotations

import copy

import pytest
import torch

from repedit import capture, get_adapter

pytestmark = pytest.mark.default_model

TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Write a short poem about the sea, the wind and the stars at night, please. Make it rhyme.",
    "I like cats.",
    "Hi",
]
# fp32 bounds (see the module docstring for the measured values they cover with ~3x margin)
REL_TOL_FP32 = 1e-5  # max |diff| of a token <= REL_TOL_FP32 * max |reference| of that token
ABS_TOL_FP32 = 1e-3  # positions >= 1, layers <= 20 (outside the attention sink, activations < ~200)
ABS_TOL_FP64 = 1e-4  # every layer, every position


def _solo_hidden(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return [h[0] for h in model(input_ids=ids, output_hidden_states=True).hidden_states]


def test_left_padded_batch_matches_each_text_alone_fp32(default_model_and_tokenizer):
    model, tokenizer = default_model_and_tokenizer
    adapter = get_adapter(model)
    n = adapter.n_layers
    assert n == 30 and adapter.d_model == 576
    acts = capture(model, tokenizer, TEXTS, sites="resid_post", position="all", padding_side="left",
                   batch_size=len(TEXTS), progress=False)
    worst_rel, worst_abs = 0.0, 0.0
    for i, text in enumerate(TEXTS):
        hidden = _solo_hidden(model, tokenizer, text)
        assert int(acts.n_tokens[i]) == hidden[0].shape[0]
        for layer in range(n - 1):
            got, ref = acts.item(f"resid_post.{layer}", i), hidden[layer + 1]
            diff = (got - ref).abs().max(-1).values  # per token
            scale = ref.abs().max(-1).values
            worst_rel = max(worst_rel, (diff / scale).max().item())
            if layer <= 20 and diff.numel() > 1:
                worst_abs = max(worst_abs, diff[1:].max().item())
        # last layer: HF's hidden_states[-1] is the final-norm output of the raw resid_post.{n-1}
        with torch.no_grad():
            normed = adapter.final_norm(acts.item(f"resid_post.{n - 1}", i))
        diff = (normed - hidden[-1]).abs().max(-1).values
        assert (diff <= REL_TOL_FP32 * hidden[-1].abs().max(-1).values + 1e-5).all()
    assert worst_rel <= REL_TOL_FP32, worst_rel
    assert worst_abs <= ABS_TOL_FP32, worst_abs


def test_left_padded_batch_matches_each_text_alone_fp64(default_model_and_tokenizer):
    model, tokenizer = default_model_and_tokenizer
    model64 = copy.deepcopy(model).to(torch.float64)
    texts = TEXTS[:3]
    try:
        acts = capture(model64, tokenizer, texts, sites="resid_post", position="all", padding_side="left",
                       batch_size=len(texts), dtype=torch.float64, progress=False)
        n = get_adapter(model64).n_layers
        for i, text in enumerate(texts):
            hidden = _solo_hidden(model64, tokenizer, text)
            for layer in range(n - 1):
                got = acts.item(f"resid_post.{layer}", i)
                assert got.dtype == torch.float64
                diff = (got - hidden[layer + 1]).abs().max().item()  # includes position 0 (the attention sink)
                assert diff <= ABS_TOL_FP64, (text, layer, diff)
    finally:
        del model64
