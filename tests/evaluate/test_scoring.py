"""Teacher-forced scoring under steering against a direct computation on the HF model."""

from __future__ import annotations

import torch
from conftest import HIDDEN

import repedit
from repedit.evaluate.scoring import response_kl, response_logprobs
from repedit.steering import SiteEdit, UserEdit

PROMPTS = ["Say hi.", "Describe the sea in a few words.", "Name a colour."]
RESPONSES = ["Hi there, friend!", "Blue, wide and deep.", "Green."]


def direct_logprob(model, tokenizer, prompt, response):
    """Oracle: render the chat by hand, run the model on the single sequence, average the response tokens."""
    prefix = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    end = len(tokenizer(prefix + response, add_special_tokens=False)["input_ids"])  # the response ends here
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    targets = ids[0, start:end]
    return logprobs[start - 1:end - 1].gather(-1, targets[:, None]).mean()


def test_logprobs_match_a_direct_computation(tiny_model, tokenizer):
    model = tiny_model("llama")
    got = response_logprobs(model, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    expected = torch.stack([direct_logprob(model, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_per_row_edits_and_kl(tiny_model, tokenizer):
    model = tiny_model("llama")
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(0)
    strong = UserEdit("a", [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 3)], fp, HIDDEN)
    zero = UserEdit("b", [SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN), a=0.0)], fp, HIDDEN)
    rows = [0, 1, None]
    plain = response_logprobs(model, tokenizer, PROMPTS, RESPONSES)
    steered = response_logprobs(model, tokenizer, PROMPTS, RESPONSES, edits=[strong, zero], rows=rows, batch_size=3)
    assert not torch.isclose(steered[0], plain[0])
    torch.testing.assert_close(steered[1:], plain[1:])
    with strong.apply(model):  # the mixed batch row equals the edit applied alone
        alone = response_logprobs(model, tokenizer, PROMPTS[:1], RESPONSES[:1])
    torch.testing.assert_close(steered[:1], alone, atol=1e-5, rtol=1e-5)
    kl = response_kl(model, tokenizer, PROMPTS, RESPONSES, edits=[strong, zero], rows=rows)
    assert kl[0] > 1e-3 and abs(kl[1]) < 1e-6 and abs(kl[2]) < 1e-6


def test_kl_with_a_precomputed_reference_equals_kl_without(tiny_model, tokenizer):
    from repedit.evaluate.scoring import reference_logprobs

    model = tiny_model("llama")
    fp = repedit.model_fingerprint(model)
    torch.manual_seed(1)
    edit = UserEdit("a", [SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN) * 2)], fp, HIDDEN)
    rows = [0, None, 0]
    direct = response_kl(model, tokenizer, PROMPTS, RESPONSES, edits=[edit], rows=rows, batch_size=2)
    reference = reference_logprobs(model, tokenizer, PROMPTS, RESPONSES, batch_size=3)
    cached = response_kl(model, tokenizer, PROMPTS, RESPONSES, edits=[edit], rows=rows, batch_size=2, reference=reference)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)
    assert direct[0] > 1e-3 and abs(direct[1]) < 1e-6
