"""Triton kernels on CPU through the interpreter, against the reference (small odd shapes, fp32 and
bf16, rows with idx = -1, all-inactive batches), and through the steering hooks and the fused wiring.

Run by ``tests/kernels/test_kernels.py::test_triton_kernels_under_the_interpreter`` in a fresh process with
``TRITON_INTERPRET=1`` (Triton reads it when the kernels are defined, so it must be set before
``repedit`` is first imported); in any other process this module skips. By hand:
``TRITON_INTERPRET=1 python -m pytest -q tests/kernels/test_kernels_triton.py``.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in its own process with TRITON_INTERPRET=1 (see test_kernels.py)", allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
from conftest import HIDDEN, build_tiny_model  # noqa: E402
from test_kernels import assert_bits_equal, hf_rms_norm, make_case, tolerance  # noqa: E402

import repedit  # noqa: E402
from repedit import kernels, steering  # noqa: E402
from repedit.kernels import reference  # noqa: E402
from repedit.steering import SiteEdit, UserEdit, steer  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [dict(B=3, T=5, d=37, k=2), dict(B=4, T=1, d=64, k=1, idx=(3, 0, -1, 1))]


def idx_of(shape):
    return shape.get("idx", (2, -1, 0))


def test_the_kernels_run_under_the_interpreter():
    assert kernels.triton_available(), kernels.TRITON_IMPORT_ERROR
    assert kernels.backend(torch.empty(1)) == "triton-interpreter"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_row_strength", [False, True])
def test_gather_add(dtype, shape, with_row_strength):
    c = make_case(dtype=dtype, **shape)
    row_strength = c["row_strength"] if with_row_strength else None
    got = kernels.gather_add(c["h"], c["idx"], c["table"], row_strength)
    want = reference.gather_add(c["h"], c["idx"], c["table"], row_strength)
    if dtype == torch.float32:
        assert_bits_equal(got, want)
    else:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest, like torch)
        torch.testing.assert_close(got, want, **tolerance(dtype))
    for b, i in enumerate(idx_of(shape)):
        if i < 0:
            assert_bits_equal(got[b], c["h"][b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("subspace", [False, True])
def test_project_edit(dtype, shape, subspace):
    c = make_case(dtype=dtype, **shape)
    basis = c["basis"] if subspace else c["direction"]
    for extras in ((), (c["strength"],), (c["strength"], c["table"], c["row_strength"])):
        got = kernels.project_edit(c["h"], c["idx"], basis, *extras)
        want = reference.project_edit(c["h"].float(), c["idx"], basis, *extras)  # fp32 truth for both dtypes
        torch.testing.assert_close(got.float(), want, **tolerance(dtype))
        for b, i in enumerate(idx_of(shape)):
            if i < 0:
                assert_bits_equal(got[b], c["h"][b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_x", [False, True])
def test_add_edit_rms_norm_against_hf_rms_norm(dtype, shape, with_x):
    c = make_case(dtype=dtype, **shape)
    x = c["x"] if with_x else None
    r, y = kernels.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6, x, c["row_strength"])
    r_ref, y_ref = reference.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6, x, c["row_strength"])
    if dtype == torch.float32:
        assert_bits_equal(r, r_ref)
    torch.testing.assert_close(r, r_ref, **tolerance(dtype))
    with torch.no_grad():
        torch.testing.assert_close(y, hf_rms_norm(c["weight"], 1e-6)(r), **tolerance(dtype))  # HF's norm of our r'
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_inactive_batches_are_bit_identical(dtype):
    c = make_case(dtype=dtype, idx=(-1, -1, -1))
    h = c["h"].clone()
    h[0, 0, :4] = -0.0
    assert_bits_equal(kernels.gather_add(h, c["idx"], c["table"], c["row_strength"]), h)
    assert_bits_equal(kernels.project_edit(h, c["idx"], c["basis"], c["strength"], c["table"], c["row_strength"]), h)
    r, _ = kernels.add_edit_rms_norm(h, c["idx"], c["table"], c["weight"], 1e-6)
    assert_bits_equal(r, h)


def test_per_token_layout_and_the_custom_ops():
    c = make_case(B=7, T=1, idx=(0, -1, 3, 1, -1, 2, 0))
    flat = c["h"][:, 0]
    assert_bits_equal(kernels.gather_add(flat, c["idx"], c["table"]), reference.gather_add(flat, c["idx"], c["table"]))
    assert_bits_equal(torch.ops.repedit.gather_add(c["h"], c["idx"], c["table"], None), reference.gather_add(c["h"], c["idx"], c["table"]))
    r, y = torch.ops.repedit.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6, None, None)
    torch.testing.assert_close(y, reference.add_edit_rms_norm(c["h"], c["idx"], c["table"], c["weight"], 1e-6)[1])


def test_steering_hooks_and_fused_wiring_run_the_kernels():
    """add and project_out hooks (Triton) and the fused wiring (Triton) against the pure-torch operators."""
    torch.manual_seed(3)
    model = build_tiny_model("llama")
    fp = repedit.model_fingerprint(model)
    ids = torch.randint(0, 1000, (3, 5))
    v, u = torch.randn(HIDDEN) * 2, torch.randn(HIDDEN)
    edits = [
        UserEdit("a", [SiteEdit("resid_post.0", "add", vector=v), SiteEdit("resid_post.1", "project_out", direction=u, b=0.5)], fp, HIDDEN),
        UserEdit("b", [SiteEdit("resid_post.2", "add", vector=-v)], fp, HIDDEN),
    ]
    rows = [0, None, 1]
    seen = {}
    calls = []
    original = kernels.triton_kernels.gather_add

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    kernels.triton_kernels.gather_add = counting
    try:
        with torch.no_grad():
            with steer(model, edits, rows):
                seen["hooks"] = model(ids).logits
            assert calls, "the add hook did not run the Triton kernel"
            with steering.fused_steering(model, edits, rows, force=True) as handle:
                assert handle.fused_sites == ["resid_post.0", "resid_post.2"]
                seen["fused"] = model(ids).logits
    finally:
        kernels.triton_kernels.gather_add = original
    # The same edits through the operators' plain torch formulas, one hook per row group.
    from repedit.steering.operators import RowParams, apply_operator

    def manual(layer, fn):
        return model.model.layers[layer].register_forward_hook(lambda m, a, out: fn(out))

    unit = u / u.norm()
    active_a = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    active_b = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    handles = [
        manual(0, lambda h: h + active_a * v),
        manual(1, lambda h: apply_operator("project_out", h, RowParams(direction=unit.expand(3, -1), b=torch.tensor([0.5, 0.0, 0.0])))),
        manual(2, lambda h: h - active_b * v),
    ]
    try:
        with torch.no_grad():
            want = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen["hooks"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["fused"], want, rtol=1e-5, atol=1e-5)
