"""The TransformerLens and nnsight backends read the same activations as the native torch backend.

Tiny random models (from ``conftest.build_tiny_model``) are switched to eager attention: the
TransformerLens bridge forces eager on its copy of the model, and sdpa vs eager differ by float
reordering (1e-6 on these models). With eager on both sides every backend agrees with the native
one to float rounding (measured: exactly 0, 1e-6 on GPT-2 through TransformerLens).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import ARCHS, HIDDEN, build_tiny_model

import repedit
from repedit.capture.backends import NNsightBackend, TorchBackend, TransformerLensBackend, make_backend
from repedit.io import InputError
from repedit.model.sites import Site

TEXTS = [
    "Hello there, how are you doing today, my good friend?",
    "Hi",
    "A sentence of medium length.",
    "Short one.",
]
SITES = [
    "resid_pre.0", "attn_out.0", "mlp_out.0", "resid_post.0",
    "attn_out.1", "mlp_out.1", "resid_post.1",
    "resid_pre.2", "attn_out.2", "mlp_out.2", "resid_post.2",
]
ATOL = 1e-5  # tiny fp32 models, eager attention on every side


def _eager_tiny(arch: str) -> torch.nn.Module:
    """A private tiny model (nnsight instruments the model it wraps, so the shared ones are not used)."""
    model = build_tiny_model(arch)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def tiny():
    return _eager_tiny("llama")


@pytest.fixture(scope="module")
def tl_backend(tiny, tokenizer):
    pytest.importorskip("transformer_lens")
    return make_backend("transformer_lens", tiny, tokenizer)


@pytest.fixture(scope="module")
def nnsight_backend(tiny, tokenizer):
    pytest.importorskip("nnsight")
    return make_backend("nnsight", tiny, tokenizer)


def _max_diff(a: repedit.Activations, b: repedit.Activations) -> dict[str, float]:
    assert a.sites == b.sites
    assert torch.equal(a.n_tokens, b.n_tokens)
    return {site: (a[site] - b[site]).abs().max().item() for site in a.sites}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("position", ["last", "mean", "all"])
@pytest.mark.parametrize("which", ["transformer_lens", "nnsight"])
def test_backend_matches_torch(request, tiny, tokenizer, which, position, padding_side):
    backend = request.getfixturevalue("tl_backend" if which == "transformer_lens" else "nnsight_backend")
    kwargs = dict(position=position, padding_side=padding_side, batch_size=8, progress=False)
    reference = repedit.capture(tiny, tokenizer, TEXTS, SITES, **kwargs)
    got = repedit.capture(tiny, tokenizer, TEXTS, SITES, backend=backend, **kwargs)
    assert got.backend == which
    assert got[SITES[0]].shape == reference[SITES[0]].shape
    diffs = _max_diff(got, reference)
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("which", ["transformer_lens", "nnsight"])
def test_backend_by_name(tiny, tokenizer, which):
    """``capture(backend="<name>")`` builds the backend itself and records its name."""
    pytest.importorskip("transformer_lens" if which == "transformer_lens" else "nnsight")
    reference = repedit.capture(tiny, tokenizer, TEXTS, ["resid_post.1", "mlp_out.2"], position="last", padding_side="left", progress=False)
    got = repedit.capture(tiny, tokenizer, TEXTS, ["resid_post.1", "mlp_out.2"], position="last", padding_side="left", backend=which, progress=False)
    assert got.backend == which
    assert max(_max_diff(got, reference).values()) <= ATOL


@pytest.mark.parametrize("which", ["torch", "transformer_lens", "nnsight"])
def test_run_padding_independent(request, tiny, tokenizer, which):
    """``Backend.run`` on a padded batch gives, at every real token, what each row gives alone."""
    if which == "torch":
        backend = TorchBackend(tiny, tokenizer)
    else:
        backend = request.getfixturevalue("tl_backend" if which == "transformer_lens" else "nnsight_backend")
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    width = max(len(r) for r in rows)
    sites = [Site("resid_post", 2), Site("mlp_out", 1), Site("resid_pre", 0), Site("attn_out", 2)]  # not in execution order
    for side in ("left", "right"):
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, where] = torch.tensor(row)
            mask[i, where] = 1
        # Pads get position 1 (not 0 as in capture): with position 0 transformers would infer packed
        # sequences from position_ids alone and hide a dropped attention mask.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        batch = backend.run(ids, mask, positions, sites)
        assert set(batch) == set(sites)
        for i, row in enumerate(rows):
            alone_ids = torch.tensor([row])
            alone = backend.run(alone_ids, torch.ones_like(alone_ids), torch.arange(len(row))[None], sites)
            for site in sites:
                assert batch[site].shape == (len(rows), width, HIDDEN)
                diff = (batch[site][i][mask[i].bool()] - alone[site][0]).abs().max().item()
                assert diff <= ATOL, (side, i, site, diff)


@pytest.mark.parametrize("which", ["transformer_lens", "nnsight"])
def test_run_uses_given_position_ids(tokenizer, which):
    """Backends use the position_ids they are given (both libraries would otherwise derive their own
    from the mask): GPT-2 has learned absolute positions, so shifted positions change every state."""
    pytest.importorskip(which)
    model = _eager_tiny("gpt2")
    backend = make_backend(which, model, tokenizer)
    reference = TorchBackend(model, tokenizer)
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    mask = torch.ones_like(ids)
    sites = [Site("resid_post", 1), Site("attn_out", 0)]
    plain = reference.run(ids, mask, torch.arange(5).expand(2, 5), sites)
    shifted_positions = torch.arange(5).expand(2, 5) + torch.tensor([[7], [3]])
    expected = reference.run(ids, mask, shifted_positions, sites)
    got = backend.run(ids, mask, shifted_positions, sites)
    for site in sites:
        assert (expected[site] - plain[site]).abs().max().item() > 1e-2
        assert (got[site] - expected[site]).abs().max().item() <= ATOL, site


@pytest.mark.parametrize("which", ["transformer_lens", "nnsight"])
def test_run_uses_given_attention_mask(request, tiny, tokenizer, which):
    """Backends mask the padding they are told about. Positions here run on contiguously through the
    pads, because transformers infers packed sequences from restarting position_ids when no mask is
    passed, which would hide a dropped mask."""
    backend = request.getfixturevalue("tl_backend" if which == "transformer_lens" else "nnsight_backend")
    reference = TorchBackend(tiny, tokenizer)
    ids = torch.tensor([[tokenizer.pad_token_id] * 3 + [11, 12, 13], [21, 22, 23, 24, 25, 26]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = torch.arange(6).expand(2, 6)
    sites = [Site("resid_post", 2), Site("attn_out", 1)]
    expected = reference.run(ids, mask, positions, sites)
    unmasked = reference.run(ids, torch.ones_like(mask), positions, sites)
    got = backend.run(ids, mask, positions, sites)
    for site in sites:
        assert (expected[site][0, 3:] - unmasked[site][0, 3:]).abs().max().item() > 1e-2
        assert (got[site][mask.bool()] - expected[site][mask.bool()]).abs().max().item() <= ATOL, site


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(tokenizer, arch):
    """Sequential and parallel residuals, learned positions, Gemma's post-norms; configs built in
    memory carry no ``architectures`` field (the TransformerLens backend supplies it)."""
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    model = _eager_tiny(arch)
    kwargs = dict(position="all", padding_side="left", progress=False)
    reference = repedit.capture(model, tokenizer, TEXTS, SITES, **kwargs)
    for which in ("transformer_lens", "nnsight"):
        got = repedit.capture(model, tokenizer, TEXTS, SITES, backend=which, **kwargs)
        diffs = _max_diff(got, reference)
        assert max(diffs.values()) <= ATOL, (which, diffs)


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "instance_forward": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attn": model.config._attn_implementation,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_transformer_lens_does_not_mutate_model(tokenizer):
    pytest.importorskip("transformer_lens")
    model = build_tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"  # the bridge forces eager on the model it is given
    before, logits = _snapshot(model), _logits(model)
    padding_side = tokenizer.padding_side
    backend = TransformerLensBackend(model, tokenizer)
    repedit.capture(model, tokenizer, TEXTS, ["resid_post.1"], backend=backend, progress=False)
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["instance_forward"] == before["instance_forward"] == []
    assert after["hooks"] == before["hooks"]
    assert after["attn"] == "sdpa"
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert torch.equal(_logits(model), logits)
    assert tokenizer.padding_side == padding_side
    assert backend.bridge.original_model is not model


def test_nnsight_keeps_model_behaviour(tokenizer):
    """nnsight instruments the modules it wraps (documented); names, weights and outputs stay the same.

    With ``copy_model=True`` the caller's modules are not touched at all.
    """
    pytest.importorskip("nnsight")
    model = _eager_tiny("llama")
    before, logits = _snapshot(model), _logits(model)
    padding_side = tokenizer.padding_side

    NNsightBackend(model, tokenizer, copy_model=True).run(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), torch.arange(3)[None], [Site("resid_post", 1)])
    assert _snapshot(model)["instance_forward"] == []

    reference = repedit.capture(model, tokenizer, TEXTS, ["resid_post.1"], progress=False)
    repedit.capture(model, tokenizer, TEXTS, ["resid_post.1"], backend="nnsight", progress=False)
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert torch.equal(_logits(model), logits)
    assert tokenizer.padding_side == padding_side  # wrapping set padding_side on a copy only
    # The native backend still works on the instrumented model and gives the same result.
    again = repedit.capture(model, tokenizer, TEXTS, ["resid_post.1"], progress=False)
    assert torch.equal(again["resid_post.1"], reference["resid_post.1"])


def test_unknown_backend(tiny, tokenizer):
    with pytest.raises(InputError, match="valid backends are torch, transformer_lens, nnsight"):
        make_backend("pyvene", tiny, tokenizer)
    with pytest.raises(InputError, match="unknown backend 'pyvene'"):
        repedit.capture(tiny, tokenizer, TEXTS, ["resid_post.0"], backend="pyvene", progress=False)


@pytest.mark.parametrize(("which", "module", "extra"), [("transformer_lens", "transformer_lens", "tl"), ("nnsight", "nnsight", "nnsight")])
def test_missing_library_names_extra(monkeypatch, tiny, tokenizer, which, module, extra):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install 'repedit\[{extra}\]'"):
        make_backend(which, tiny, tokenizer)


@pytest.mark.default_model
def test_default_model_three_backends(default_model_and_tokenizer):
    """SmolLM2-135M (sdpa attention as loaded): nnsight runs the same model, so it matches exactly;
    TransformerLens runs an eager copy, so it matches an eager native capture exactly and the sdpa one
    to float reordering (measured max 6e-5 absolute, 2e-6 relative per token at layer 20)."""
    pytest.importorskip("transformer_lens")
    pytest.importorskip("nnsight")
    model, tokenizer = default_model_and_tokenizer  # shared: wrapped only through private copies
    sites = ["resid_pre.0", "resid_post.5", "attn_out.12", "mlp_out.12", "resid_post.20"]
    kwargs = dict(position="all", padding_side="left", progress=False)
    native = repedit.capture(model, tokenizer, TEXTS, sites, **kwargs)
    via_nnsight = repedit.capture(model, tokenizer, TEXTS, sites, backend=NNsightBackend(model, tokenizer, copy_model=True), **kwargs)
    assert via_nnsight.backend == "nnsight"
    assert max(_max_diff(via_nnsight, native).values()) <= 1e-5

    via_tl = repedit.capture(model, tokenizer, TEXTS, sites, backend="transformer_lens", **kwargs)
    assert via_tl.backend == "transformer_lens"
    assert model.config._attn_implementation == "sdpa"  # the caller's model was not switched
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    native_eager = repedit.capture(eager, tokenizer, TEXTS, sites, **kwargs)
    assert max(_max_diff(via_tl, native_eager).values()) <= 1e-5
    assert max(_max_diff(via_tl, native).values()) <= 1e-3
    for site in sites:
        relative = (via_tl[site] - native[site]).norm(dim=-1) / native[site].norm(dim=-1)
        assert relative.max().item() <= 1e-4, site
