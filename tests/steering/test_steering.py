"""Steering edits: every operator against its hand-computed formula, positions, mixed-user batches,
arithmetic, persistence, wrong-model refusal and hook removal."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, build_tiny_model

import repedit
from repedit.io import InputError
from repedit.model.generation import left_pad, render_chat
from repedit.steering import SiteEdit, UserEdit, ablation, steer

LAYER = 1


def hidden_after(model, ids, layer=LAYER, mask=None):
    """HF oracle: hidden_states[layer+1] (= resid_post.layer) for ids [B, T]."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]


def edited_resid_post(model, edit, ids, layer=LAYER):
    """resid_post.layer as the next block sees it, with ``edit`` applied (read by a later hook)."""
    seen = {}

    def record(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = model.model.layers[layer + 1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with edit.apply(model), torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["h"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    model = build_tiny_model("llama")
    fingerprint = repedit.model_fingerprint(model)
    ids = torch.randint(0, 1000, (2, 7))
    return model, fingerprint, ids


def make(fingerprint, *site_edits, positions="all"):
    return UserEdit("u", list(site_edits), fingerprint, HIDDEN, positions=positions)


def orthonormal(k):
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, k))
    return q.T.contiguous()


def test_add(setup):
    model, fp, ids = setup
    v = torch.randn(HIDDEN)
    h = hidden_after(model, ids)
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "add", vector=v, a=2.5)), ids)
    torch.testing.assert_close(got, h + 2.5 * v)


def test_project_out_direction_and_subspace(setup):
    model, fp, ids = setup
    h = hidden_after(model, ids)
    u = torch.randn(HIDDEN)
    unit = u / u.norm()
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "project_out", direction=u)), ids)
    torch.testing.assert_close(got, h - (h @ unit)[..., None] * unit)
    assert (got @ unit).abs().max() < 1e-4
    basis = orthonormal(3)
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "project_out", basis=basis, b=0.5)), ids)
    torch.testing.assert_close(got, h - 0.5 * (h @ basis.T) @ basis)


def test_chameleon(setup):
    model, fp, ids = setup
    h = hidden_after(model, ids)
    basis, u = orthonormal(2), torch.randn(HIDDEN)
    unit = u / u.norm()
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "chameleon", basis=basis, direction=u, a=0.7, b=0.9)), ids)
    torch.testing.assert_close(got, h + 0.7 * (h @ basis.T) @ basis - 0.9 * (h @ unit)[..., None] * unit)


def test_clamp_sets_the_projection(setup):
    model, fp, ids = setup
    h = hidden_after(model, ids)
    u = torch.randn(HIDDEN)
    unit = u / u.norm()
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "clamp", direction=u, target=3.0)), ids)
    torch.testing.assert_close(got, h + (3.0 - h @ unit)[..., None] * unit)
    torch.testing.assert_close(got @ unit, torch.full(h.shape[:2], 3.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gate", ["tanh", "relu"])
def test_gated_add(setup, gate):
    model, fp, ids = setup
    h = hidden_after(model, ids)
    v = torch.randn(HIDDEN)
    unit = v / v.norm()
    got = edited_resid_post(model, make(fp, SiteEdit(f"resid_post.{LAYER}", "gated_add", vector=v, a=1.5, tau=2.0, gate=gate)), ids)
    g = torch.tanh((h @ unit) / 2.0) if gate == "tanh" else torch.relu((h @ unit) / 2.0)
    torch.testing.assert_close(got, h + 1.5 * g[..., None] * v)


def test_edit_on_attn_out_changes_resid_post_by_the_same_amount(setup):
    model, fp, ids = setup
    v = torch.randn(HIDDEN)
    h = hidden_after(model, ids)
    got = edited_resid_post(model, make(fp, SiteEdit(f"attn_out.{LAYER}", "add", vector=v, a=1.0)), ids)
    # Adding v to attention's write changes the MLP input too, so only the part before the MLP is linear:
    # check that the edit reached resid_post and that removing it restores the unsteered states exactly.
    assert (got - h).abs().max() > 1e-3
    torch.testing.assert_close(edited_resid_post(model, make(fp, SiteEdit(f"attn_out.{LAYER}", "add", vector=v, a=0.0)), ids), h)


def test_ablation_removes_the_direction_everywhere(setup):
    model, fp, ids = setup
    u = torch.randn(HIDDEN)
    unit = u / u.norm()
    edit = ablation(u, model)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)) for layer in model.model.layers]
    try:
        with edit.apply(model), torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    assert all((h @ unit).abs().max() < 1e-4 for h in seen)


def test_positions_prompt_generated_and_from_index(setup):
    model, fp, ids = setup
    v = torch.randn(HIDDEN)
    h = hidden_after(model, ids)
    site = SiteEdit(f"resid_post.{LAYER}", "add", vector=v)
    from_3 = edited_resid_post(model, make(fp, site, positions=3), ids)
    torch.testing.assert_close(from_3[:, :3], h[:, :3])
    torch.testing.assert_close(from_3[:, 3:], h[:, 3:] + v)
    # A single forward is all prompt: "prompt" edits everything, "generated" nothing.
    torch.testing.assert_close(edited_resid_post(model, make(fp, site, positions="prompt"), ids), h + v)
    torch.testing.assert_close(edited_resid_post(model, make(fp, site, positions="generated"), ids), h)


def test_generated_only_edit_leaves_the_prompt_alone_in_generate(setup, tokenizer):
    model, fp, _ = setup
    v = torch.randn(HIDDEN) * 5
    edit = make(fp, SiteEdit(f"resid_post.{LAYER}", "add", vector=v), positions="generated")
    ids = torch.randint(0, 1000, (1, 6))
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0] if args else kwargs["hidden_states"]).clone())

    probe = model.model.layers[LAYER + 1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with edit.apply(model), torch.no_grad():
            generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        probe.remove()
    torch.testing.assert_close(calls[0], hidden_after(model, ids))  # prefill: untouched
    assert len(calls) == 3 and all(c.shape[1] == 1 for c in calls[1:])
    # Decode steps are edited: the state of the first generated token is the plain one plus v.
    plain = hidden_after(model, generated[:, :7])[:, -1:]
    torch.testing.assert_close(calls[1], plain + v, atol=1e-4, rtol=1e-4)


def test_arithmetic_save_load_and_wrong_model(setup, tmp_path):
    model, fp, ids = setup
    v1, v2 = torch.randn(HIDDEN), torch.randn(HIDDEN)
    e1 = make(fp, SiteEdit("resid_post.0", "add", vector=v1, a=2.0))
    e2 = make(fp, SiteEdit("resid_post.0", "add", vector=v2), SiteEdit("resid_post.1", "add", vector=v2))
    combined = e1 + e2 * 3.0 - e2
    by_site = {e.site: e.a * e.vector for e in combined.edits}
    torch.testing.assert_close(by_site["resid_post.0"], 2 * v1 + 2 * v2)
    torch.testing.assert_close(by_site["resid_post.1"], 2 * v2)
    assert all(abs(e.vector.norm() - 1) < 1e-5 for e in e2.normalized().edits)
    with pytest.raises(InputError, match="needs additive"):
        make(fp, SiteEdit("resid_post.0", "project_out", direction=v1)) + e1

    path = combined.save(tmp_path / "user")
    loaded = UserEdit.load(path, model)
    assert edited_resid_post(model, loaded, ids).equal(edited_resid_post(model, combined, ids))
    other = build_tiny_model("llama", seed=5)
    with pytest.raises(InputError, match="was made for model"):
        UserEdit.load(path, other)
    with pytest.raises(InputError, match="was made for model"):
        combined.apply(other)
    import transformers

    narrow = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(InputError, match="has d_model 64, but the model has d_model 32"):
        combined.apply(narrow)


def test_hooks_removed_also_after_an_exception(setup):
    model, fp, ids = setup
    edit = make(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN)))
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with edit.apply(model):
            raise RuntimeError("boom")
    handle = edit.apply(model)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) > before
    handle.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before


def test_mixed_batch_rows_match_their_own_edit(setup):
    model, fp, _ = setup
    torch.manual_seed(3)
    edits = [
        make(fp, SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 3)),
        make(fp, SiteEdit("resid_post.1", "project_out", direction=torch.randn(HIDDEN))),
        make(fp, SiteEdit("resid_post.0", "clamp", direction=torch.randn(HIDDEN), target=1.0), positions=2),
    ]
    rows = [0, None, 1, 2, 0]
    lengths = [5, 7, 4, 6, 3]
    seqs = [torch.randint(0, 1000, (n,)).tolist() for n in lengths]
    ids, mask = left_pad(seqs, 0)
    with steer(model, edits, rows), torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    for b, r in enumerate(rows):
        solo = torch.tensor([seqs[b]])
        with (edits[r].apply(model) if r is not None else steer(model, [None], [None])), torch.no_grad():
            expected = model.generate(solo, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, solo.shape[1]:]
        assert batched[b].tolist() == expected.tolist(), f"row {b} (user {r})"


def test_mixed_batch_of_project_out_directions_and_subspaces(setup):
    """One site, one user projecting out a direction and one a subspace: each row gets its own projection."""
    model, fp, ids = setup
    torch.manual_seed(4)
    u, basis = torch.randn(HIDDEN), orthonormal(2)
    edits = [make(fp, SiteEdit("resid_post.1", "project_out", direction=u)), make(fp, SiteEdit("resid_post.1", "project_out", basis=basis))]
    seen = {}
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, a, k: seen.update(h=(a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
    try:
        with steer(model, edits, [0, 1]), torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    h = hidden_after(model, ids)
    unit = u / u.norm()
    torch.testing.assert_close(seen["h"][0], h[0] - (h[0] @ unit)[..., None] * unit)
    torch.testing.assert_close(seen["h"][1], h[1] - (h[1] @ basis.T) @ basis)


def test_batch_size_mismatch_is_an_error(setup):
    model, fp, ids = setup
    edit = make(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN)))
    with pytest.raises(InputError, match="set up for 3 rows, but the model got a batch of 2"):
        with steer(model, [edit], [0, None, 0]), torch.no_grad():
            model(ids)


@pytest.mark.default_model
def test_default_model_batch_equals_solo_for_four_users_and_an_unsteered_row(default_model_and_tokenizer):
    model, tokenizer = default_model_and_tokenizer
    torch.manual_seed(0)
    fp = repedit.model_fingerprint(model)
    # Moderate strengths (~0.3 x the residual norm at layer 12) keep the text fluent but different.
    edits = [UserEdit(f"u{i}", [SiteEdit("resid_post.12", "add", vector=torch.randn(576) / 24 * 30)], fp, 576) for i in range(4)]
    prompts = ["How can I sleep better?", "Suggest a weekend activity.", "Explain compound interest.", "What is a good breakfast?", "Tell me a joke."]
    rows = [0, 1, None, 2, 3]
    seqs = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    with steer(model, edits, rows), torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    unsteered_differs = 0
    for b, r in enumerate(rows):
        solo = torch.tensor([seqs[b]])
        with (edits[r].apply(model) if r is not None else steer(model, [None], [None])), torch.no_grad():
            expected = model.generate(solo, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, solo.shape[1]:]
        # A row that finished early is padded with the pad (= EOS) token after its own EOS.
        n = expected.numel()
        assert batched[b, :n].tolist() == expected.tolist(), f"row {b} (user {r})"
        assert all(token == tokenizer.pad_token_id for token in batched[b, n:].tolist())
        if r is not None:
            with torch.no_grad():
                plain = model.generate(solo, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, solo.shape[1]:]
            unsteered_differs += plain.tolist() != expected.tolist()
    assert unsteered_differs >= 3  # the edits really change the outputs
