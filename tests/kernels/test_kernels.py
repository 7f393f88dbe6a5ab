"""Kernels: the pure-torch reference against per-row loops and HF's RMSNorm, the custom ops under
torch.compile, the steering hooks (bit-identical on CPU), the fused residual+edit+RMSNorm wiring on a
tiny llama, value-path edits, and the Triton kernels — in a subprocess under TRITON_INTERPRET=1 on
CPU, and directly on a GPU when there is one."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, build_tiny_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import repedit
from repedit import kernels, steering
from repedit.kernels import reference
from repedit.steering import SiteEdit, UserEdit, apply_operator, steer
from repedit.steering.operators import RowParams

CUDA = torch.cuda.is_available() and kernels.triton_available()
ON_REFERENCE = kernels.backend(torch.empty(1)) == "reference"  # False when this process runs the interpreter


# ------------------------------------------------------------------------ cases and per-row oracles


def make_case(B=3, T=5, d=37, R=4, k=2, dtype=torch.float32, device="cpu", seed=0, idx=(2, -1, 0)):
    """Random inputs of every op: hidden states, a table with R rows, orthonormal bases, strengths."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(R, d, k, generator=g)).Q.transpose(1, 2).contiguous()
    case = dict(
        h=torch.randn(B, T, d, generator=g) * 2,
        x=torch.randn(B, T, d, generator=g),
        idx=torch.tensor(idx, dtype=torch.long),
        table=torch.randn(R, d, generator=g),
        row_strength=torch.randn(B, generator=g),
        basis=basis,
        direction=basis[:, 0].contiguous(),
        strength=torch.rand(R, generator=g) + 0.5,
        weight=torch.randn(d, generator=g),
    )
    case = {k: v.to(device) for k, v in case.items()}
    for name in ("h", "x", "weight"):
        case[name] = case[name].to(dtype)
    return case


def naive_gather_add(h, idx, table, row_strength=None):
    out = h.clone()
    for b, i in enumerate(idx.tolist()):
        if i >= 0:
            v = table[i].float() * (float(row_strength[b]) if row_strength is not None else 1.0)
            out[b] = h[b] + v.to(h.dtype)
    return out


def naive_project_edit(h, idx, basis, strength=None, table=None, row_strength=None):
    """In float64, row by row: h − b·Σ_j (h·u_j) u_j + s·v."""
    out = h.double().clone()
    for b, i in enumerate(idx.tolist()):
        if i < 0:
            continue
        rows = basis[i].double().reshape(-1, h.shape[-1])
        row = out[b]
        removed = sum((row @ u)[:, None] * u for u in rows)
        row = row - (float(strength[i]) if strength is not None else 1.0) * removed
        if table is not None:
            row = row + table[i].double() * (float(row_strength[b]) if row_strength is not None else 1.0)
        out[b] = row
    return out


def hf_rms_norm(weight, eps):
    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.device)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
    return norm.to(weight.dtype)


def naive_add_edit_rms_norm(residual, idx, table, weight, eps, x=None, row_strength=None):
    r = residual + x if x is not None else residual
    r = naive_gather_add(r, idx, table, row_strength)
    with torch.no_grad():
        return r, hf_rms_norm(weight, eps)(r)


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    assert torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def tolerance(dtype):
    return dict(rtol=1.6e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ reference vs oracles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_row_strength", [False, True])
def test_reference_gather_add_matches_the_per_row_loop_bit_for_bit(dtype, with_row_strength):
    c = make_case(dtype=dtype)
    row_strength = c["row_strength"] if with_row_strength else None
    out = reference.gather_add(c["h"], c["idx"], c["table"], row_strength)
    assert_bits_equal(out, naive_gather_add(c["h"], c["idx"], c["table"], row_strength))
    assert_bits_equal(out[1], c["h"][1])  # idx = -1


def test_reference_handles_negative_zero_and_all_inactive_batches_bit_for_bit():
    c = make_case(idx=(-1, -1, -1))
    h = c["h"].clone()
    h[0, 0, :5] = -0.0
    for out in (
        reference.gather_add(h, c["idx"], c["table"], c["row_strength"]),
        reference.project_edit(h, c["idx"], c["basis"], c["strength"], c["table"], c["row_strength"]),
        reference.add_edit_rms_norm(h, c["idx"], c["table"], c["weight"], 1e-6)[0],
    ):
        assert_bits_equal(out, h)


def test_reference_per_token_layout():
    """[N, d] means one edit per token (idx [N])."""
    c = make_case(B=7, T=1)
    flat = c["h"][:, 0]
    idx = torch.tensor([0, -1, 3, 1, -1, 2, 0])
    assert_bits_equal(reference.gather_add(flat, idx, c["table"]), naive_gather_add(c["h"], idx, c["table"])[:, 0])


@pytest.mark.parametrize("subspace", [False, True])
@pytest.mark.parametrize("extras", [False, True])
def test_reference_project_edit_matches_the_per_row_formula(subspace, extras):
    c = make_case()
    basis = c["basis"] if subspace else c["direction"]
    args = (c["strength"], c["table"], c["row_strength"]) if extras else ()
    out = reference.project_edit(c["h"], c["idx"], basis, *args)
    torch.testing.assert_close(out.double(), naive_project_edit(c["h"], c["idx"], basis, *args), rtol=1e-5, atol=1e-5)
    if not extras:  # b = 1: the component along the direction(s) is gone
        rows = c["idx"] >= 0
        coords = torch.einsum("btd,bkd->btk", out[rows], c["basis"][c["idx"][rows]] if subspace else c["direction"][c["idx"][rows]][:, None])
        assert coords.abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_x", [False, True])
def test_reference_fused_add_edit_rms_norm_equals_hf_llama_rms_norm(dtype, with_x):
    c = make_case(dtype=dtype)
    x = c["x"] if with_x else None
    r, y = reference.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-5, x, c["row_strength"])
    r_hf, y_hf = naive_add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-5, x, c["row_strength"])
    assert_bits_equal(r, r_hf)
    assert_bits_equal(y, y_hf)  # same arithmetic as HF's module, hence the same bits


def test_attn_out_edit_is_a_gather_add_on_the_attention_output():
    c = make_case()
    assert_bits_equal(reference.attn_out_edit(c["h"], c["idx"], c["table"]), naive_gather_add(c["h"], c["idx"], c["table"]))
    assert_bits_equal(kernels.attn_out_edit(c["h"], c["idx"], c["table"]), reference.gather_add(c["h"], c["idx"], c["table"]))


# ------------------------------------------------------------------------ dispatch and torch.compile


def test_backend_on_cpu_is_the_reference_unless_the_interpreter_is_on():
    expected = "triton-interpreter" if (kernels.INTERPRET and kernels.triton_available()) else "reference"
    assert kernels.backend(torch.empty(1)) == expected
    if not kernels.INTERPRET and not torch.cuda.is_available():
        assert not kernels.triton_available() and "TRITON_INTERPRET" in kernels.TRITON_IMPORT_ERROR


def _op_args(c):
    return {
        "gather_add": (c["h"], c["idx"], c["table"], c["row_strength"]),
        "project_edit": (c["h"], c["idx"], c["basis"], c["strength"], c["table"], c["row_strength"]),
        "add_edit_rms_norm": (c["h"], c["idx"], c["table"], c["weight"], 1e-6, c["x"], c["row_strength"]),
    }


@pytest.mark.parametrize("name", ["gather_add", "project_edit", "add_edit_rms_norm"])
def test_custom_ops_pass_opcheck_and_equal_the_reference(name):
    c = make_case()
    args = _op_args(c)[name]
    torch.library.opcheck(getattr(torch.ops.repedit, name).default, args)
    if ON_REFERENCE:
        got, want = getattr(torch.ops.repedit, name)(*args), getattr(reference, name)(*args)
        for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            assert_bits_equal(a, b)


def test_custom_ops_compile_with_fullgraph():
    c = make_case()

    def step(h, idx, table, basis, weight):
        h = torch.ops.repedit.gather_add(h, idx, table, None)
        h = torch.ops.repedit.project_edit(h, idx, basis, None, None, None)
        return torch.ops.repedit.add_edit_rms_norm(h, idx, table, weight, 1e-6, None, None)

    args = (c["h"], c["idx"], c["table"], c["basis"], c["weight"])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*args)
    want = step(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["gather_add", "project_edit", "add_edit_rms_norm"])
def test_compiled_reference_equals_eager(name):
    c = make_case()
    args = _op_args(c)[name]
    torch._dynamo.reset()
    got, want = kernels.compiled(name)(*args), getattr(reference, name)(*args)
    for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_bits_equal((got[0] if isinstance(got, tuple) else got)[1], c["h"][1] if name != "add_edit_rms_norm" else c["h"][1] + c["x"][1])


# ------------------------------------------------------------------------ the steering hooks


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(1)
    model = build_tiny_model("llama")
    return model, repedit.model_fingerprint(model)


def user(fp, *site_edits, positions="all", name="u"):
    return UserEdit(name, list(site_edits), fp, HIDDEN, positions=positions)


def site_input(model, layer, run):
    """What block ``layer + 1`` (or the final norm) receives while ``run()`` executes."""
    seen = {}
    target = model.model.layers[layer + 1] if layer + 1 < len(model.model.layers) else model.model.norm

    def record(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = target.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["h"]


@pytest.mark.skipif(not ON_REFERENCE, reason="bit-identity with the previous hook arithmetic is a CPU-reference property")
@pytest.mark.parametrize("rows", [[0, None, 0], [1, 1, None]])
def test_steering_hooks_are_bit_identical_to_the_previous_arithmetic(llama, rows):
    """add and project_out now go through the kernel ops; on CPU the bits are those of the old hook."""
    model, fp = llama
    torch.manual_seed(5)
    ids = torch.randint(0, 1000, (3, 6))
    v, u = torch.randn(HIDDEN) * 3, torch.randn(HIDDEN)
    edits = [user(fp, SiteEdit("resid_post.1", "add", vector=v, a=1.5)), user(fp, SiteEdit("resid_post.1", "project_out", direction=u, b=0.7))]

    def steered():
        with steer(model, edits, rows):
            model(ids)

    with torch.no_grad():
        h = site_input(model, 1, lambda: model(ids))
        got = site_input(model, 1, steered)
    active = [r is not None for r in rows]
    if rows[0] == 0:  # the old add: h + table[index].to(dtype), table row 0 = zeros, row 1 = a·v
        want = h + torch.stack([1.5 * v if a else torch.zeros(HIDDEN) for a in active])[:, None, :]
    else:  # the old project_out: apply_operator on the gathered parameters
        direction = edits[1].edits[0].direction
        params = RowParams(direction=torch.stack([direction if a else torch.zeros(HIDDEN) for a in active]), b=torch.tensor([0.7 if a else 0.0 for a in active]))
        want = apply_operator("project_out", h, params)
    assert_bits_equal(got, want)


# ------------------------------------------------------------------------ fused residual + edit + RMSNorm wiring


def logits_and_generation(model, run_steering, ids, mask):
    with run_steering(), torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return logits, tokens


def norm_state(model):
    """Hooks and patched forwards: everything fused_steering may add to a model."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    patched = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    return hooks, patched


def test_fused_steering_equals_the_hook_path_and_restores_the_model(llama):
    model, fp = llama
    torch.manual_seed(7)
    from repedit.model.generation import left_pad

    seqs = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 7, 4, 6)]
    ids, mask = left_pad(seqs, 0)
    # resid_post.0 and the last block (its norm is the final norm) are fused; resid_post.1 also has a
    # project_out, so it stays on the hooks; user 2 edits only the prompt (positions), so its sites too.
    edits = [
        user(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN) * 2), SiteEdit("resid_post.2", "add", vector=torch.randn(HIDDEN), a=3.0), name="a"),
        user(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN) * 2), SiteEdit("resid_post.1", "project_out", direction=torch.randn(HIDDEN)), name="b"),
        user(fp, SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 2), positions="prompt", name="c"),
    ]
    rows = [0, 2, None, 1]
    before = norm_state(model)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    hook_logits, hook_tokens = logits_and_generation(model, lambda: steer(model, edits, rows), ids, mask)
    handle = steering.fused_steering(model, edits, rows, force=True)
    assert handle.fused_sites == ["resid_post.0", "resid_post.2"]
    assert norm_state(model) != before
    fused_logits, fused_tokens = logits_and_generation(model, lambda: handle, ids, mask)
    assert norm_state(model) == before  # `with handle` removed everything
    if ON_REFERENCE:  # same roundings as the hooks followed by HF's norm
        assert torch.equal(fused_logits, hook_logits)
    torch.testing.assert_close(fused_logits, hook_logits, rtol=1e-5, atol=1e-5)
    assert fused_tokens.tolist() == hook_tokens.tolist()
    assert (hook_logits - plain).abs().max() > 1e-2  # the edits do change the outputs
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, plain)


def test_fused_steering_one_edit_for_every_row_and_batch_mismatch(llama):
    model, fp = llama
    ids = torch.randint(0, 1000, (2, 5))
    edit = user(fp, SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN) * 2))
    with edit.apply(model), torch.no_grad():
        want = model(ids).logits
    with steering.fused_steering(model, [edit], force=True) as handle, torch.no_grad():
        assert handle.fused_sites == ["resid_post.1"]
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(repedit.InputError, match="set up for 3 rows, but the model got a batch of 2"):
        with steering.fused_steering(model, [edit], [0, None, 0], force=True), torch.no_grad():
            model(ids)
    assert norm_state(model)[1] == []


def test_fused_steering_leaves_non_llama_norms_to_the_hooks(tiny_model):
    model = tiny_model("gemma")  # Gemma's RMSNorm multiplies by (1 + w): not the fused op's norm
    fp = repedit.model_fingerprint(model)
    ids = torch.randint(0, 1000, (2, 5))
    edit = user(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN)))
    with edit.apply(model), torch.no_grad():
        want = model(ids).logits
    with steering.fused_steering(model, [edit], force=True) as handle, torch.no_grad():
        assert handle.fused_sites == []
        assert torch.equal(model(ids).logits, want)


def test_fused_steering_without_a_gpu_is_plain_steer(llama):
    model, fp = llama
    edit = user(fp, SiteEdit("resid_post.1", "add", vector=torch.randn(HIDDEN)))
    with steering.fused_steering(model, [edit]) as handle:
        assert handle.fused_sites == ([] if not (next(model.parameters()).is_cuda and kernels.triton_available()) else ["resid_post.1"])
        assert norm_state(model)[1] == []


# ------------------------------------------------------------------------ value-path edits


def test_value_edit_equals_its_attn_out_edit(llama):
    """Adding c to every value vector (GQA: 2 KV heads for 4 query heads) == adding W_O·c at attn_out."""
    model, fp = llama
    torch.manual_seed(11)
    ids = torch.randint(0, 1000, (2, 6))
    attn = model.model.layers[1].self_attn
    c = torch.randn(attn.v_proj.out_features)
    handle = attn.v_proj.register_forward_hook(lambda module, args, output: output + c)
    try:
        with torch.no_grad():
            want = model(ids).logits
    finally:
        handle.remove()
    delta = steering.value_edit_as_attn_out(model, 1, c)
    with user(fp, SiteEdit("attn_out.1", "add", vector=delta)).apply(model), torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(repedit.UnsupportedModelError, match="llama-style attention"):
        steering.value_edit_as_attn_out(build_tiny_model("gpt2"), 0, c)


# ------------------------------------------------------------------------ Triton: interpreter on CPU, kernels on GPU


def test_triton_kernels_under_the_interpreter():
    """tests/kernels/test_kernels_triton.py and test_attention_triton.py in a fresh process with
    TRITON_INTERPRET=1 set before any import (the attention file includes a default-model generation)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernels_triton.py", "tests/kernels/test_attention_triton.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, result.stdout[-3000:]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_gpu_against_the_reference(dtype):
    for shape in (dict(B=3, T=5, d=37), dict(B=32, T=1, d=576), dict(B=4, T=33, d=4096, k=3)):
        c = make_case(dtype=dtype, device="cuda", idx=(2, -1, 0, 1)[: shape["B"]] + (1,) * max(0, shape["B"] - 4), **shape)
        assert kernels.backend(c["h"]) == "triton"
        got = kernels.gather_add(c["h"], c["idx"], c["table"], c["row_strength"])
        assert_bits_equal(got, reference.gather_add(c["h"], c["idx"], c["table"], c["row_strength"]))  # GPU rounds like torch
        for basis in (c["direction"], c["basis"]):
            got = kernels.project_edit(c["h"], c["idx"], basis, c["strength"], c["table"], c["row_strength"])
            want = reference.project_edit(c["h"].float(), c["idx"], basis, c["strength"], c["table"], c["row_strength"])
            torch.testing.assert_close(got.float(), want, **tolerance(dtype))
            assert_bits_equal(got[1], c["h"][1])
        r, y = kernels.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6, c["x"], c["row_strength"])
        r_ref, y_ref = reference.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6, c["x"], c["row_strength"])
        assert_bits_equal(r, r_ref)
        torch.testing.assert_close(y, y_ref, **tolerance(dtype))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
def test_fused_steering_on_gpu_equals_the_hook_path(llama):
    model, fp = llama
    model = copy.deepcopy(model).cuda()
    ids = torch.randint(0, 1000, (3, 6), device="cuda")
    edits = [user(fp, SiteEdit("resid_post.0", "add", vector=torch.randn(HIDDEN) * 2)), user(fp, SiteEdit("resid_post.2", "add", vector=torch.randn(HIDDEN)))]
    with steer(model, edits, [0, None, 1]), torch.no_grad():
        want = model(ids).logits
    with steering.fused_steering(model, edits, [0, None, 1]) as handle, torch.no_grad():
        assert handle.fused_sites == ["resid_post.0", "resid_post.2"]
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    c = make_case(device="cuda")
    step = torch.compile(lambda h, idx, table: torch.ops.repedit.gather_add(h, idx, table, None) * 2, fullgraph=True)
    torch.testing.assert_close(step(c["h"], c["idx"], c["table"]), reference.gather_add(c["h"], c["idx"], c["table"]) * 2)
