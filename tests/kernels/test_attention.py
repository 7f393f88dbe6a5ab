"""The fused attention + edit (reference, in this process) against independent oracles — torch SDPA,
``F.linear`` and the per-row edit formulas written out — and its wiring as a Hugging Face attention
implementation against the steering hooks on a tiny llama. The Triton kernel runs the same cases
under the interpreter in tests/kernels/test_attention_triton.py (subprocess, see test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HIDDEN, build_tiny_model
from test_kernels import assert_bits_equal

import repedit
from repedit import kernels, steering
from repedit.kernels import attention as attention_reference
from repedit.model.generation import left_pad
from repedit.steering import SiteEdit, UserEdit, steer
from repedit.steering.fused_attention import ATTENTION_NAME

# B, H, Hkv, Tq, Tkv, hd, d: odd sizes, grouped-query (2 and 3 query heads per KV head), decode (Tq = 1),
# a chunk after a cache (Tq < Tkv) and a sequence longer than one key block.
SHAPES = [
    dict(B=3, H=4, Hkv=2, Tq=7, Tkv=7, hd=16, d=40),
    dict(B=2, H=3, Hkv=1, Tq=1, Tkv=9, hd=16, d=24),
    dict(B=3, H=2, Hkv=2, Tq=5, Tkv=17, hd=8, d=33),
    dict(B=2, H=6, Hkv=2, Tq=17, Tkv=17, hd=16, d=37),
]


def attention_case(B, H, Hkv, Tq, Tkv, hd, d, R=3, k=2, dtype=torch.float32, seed=0, idx=None, left_pad_lengths=None):
    """Inputs of attention_edit; ``padding [B, Tkv]`` is left padding of (1, 0, 3, ...) keys per row."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.ones(B, Tkv, dtype=torch.bool)
    for b, n in enumerate(left_pad_lengths if left_pad_lengths is not None else [(1, 0, 3)[b % 3] for b in range(B)]):
        padding[b, :n] = False
    basis = torch.linalg.qr(torch.randn(R, d, k, generator=g)).Q.transpose(1, 2).contiguous()
    case = dict(
        q=torch.randn(B, H, Tq, hd, generator=g), k=torch.randn(B, Hkv, Tkv, hd, generator=g), v=torch.randn(B, Hkv, Tkv, hd, generator=g),
        w=torch.randn(d, H * hd, generator=g) / (H * hd) ** 0.5, bias=torch.randn(d, generator=g),
        idx=torch.tensor(idx if idx is not None else [(2, -1, 0)[b % 3] for b in range(B)]), padding=padding,
        values=torch.randn(R, Hkv * hd, generator=g), basis=basis, direction=basis[:, 0].contiguous(),
        strength=torch.rand(R, generator=g) + 0.5, table=torch.randn(R, d, generator=g), row_strength=torch.randn(B, generator=g),
    )
    for name in ("q", "k", "v", "w", "bias"):
        case[name] = case[name].to(dtype)
    return case


def sdpa_oracle(c, causal=True, padding=True, values=False, basis=None, strength=None, table=None, row_strength=None):
    """torch SDPA (enable_gqa, a bool mask built here) → value edit → F.linear → edit, per row in float64."""
    q, k, v = c["q"], c["k"], c["v"]
    B, H, Tq, hd = q.shape
    Hkv, Tkv = k.shape[1], k.shape[2]
    allowed = torch.ones(B, 1, Tq, Tkv, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(Tq, Tkv, dtype=torch.bool).tril(Tkv - Tq)
    if padding:
        allowed &= c["padding"][:, None, None, :]
    z = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=True)
    z = torch.nan_to_num(z, nan=0.0).transpose(1, 2)  # [B, Tq, H, hd]; a query with no key: 0
    for b, i in enumerate(c["idx"].tolist()):
        if values and i >= 0:
            z[b] = z[b] + c["values"][i].view(Hkv, 1, hd).repeat_interleave(H // Hkv, dim=0).view(1, H, hd)
    y = F.linear(z.reshape(B, Tq, H * hd).double(), c["w"].double(), c["bias"].double())
    for b, i in enumerate(c["idx"].tolist()):
        if i < 0:
            continue
        if basis is not None:
            u = basis[i].double().reshape(-1, y.shape[-1])
            y[b] = y[b] - (float(strength[i]) if strength is not None else 1.0) * (y[b] @ u.T) @ u
        if table is not None:
            y[b] = y[b] + table[i].double() * (float(row_strength[b]) if row_strength is not None else 1.0)
    return y


def edit_kwargs(c, kind):
    return {
        "none": {},
        "values": dict(values=c["values"]),
        "add": dict(table=c["table"], row_strength=c["row_strength"]),
        "project": dict(basis=c["direction"], strength=c["strength"]),
        "project_k_add": dict(basis=c["basis"], strength=c["strength"], table=c["table"]),
    }[kind]


def oracle_kwargs(c, kind):
    kw = edit_kwargs(c, kind)
    return dict(values=bool(kw.pop("values", None) is not None), **kw)


KINDS = ["none", "values", "add", "project", "project_k_add"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_equals_sdpa_then_edit(shape, kind):
    c = attention_case(**shape)
    got = kernels.attention.attention_edit(c["q"], c["k"], c["v"], c["w"], c["bias"], c["idx"], mask=c["padding"], **edit_kwargs(c, kind))
    want = sdpa_oracle(c, **oracle_kwargs(c, kind))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_reference_unedited_rows_are_bit_identical_and_masks_agree():
    c = attention_case(**SHAPES[0])
    plain = kernels.attention.attention_edit(c["q"], c["k"], c["v"], c["w"], c["bias"], mask=c["padding"])
    edited = kernels.attention.attention_edit(c["q"], c["k"], c["v"], c["w"], c["bias"], c["idx"], mask=c["padding"], **edit_kwargs(c, "project_k_add"), values=c["values"])
    assert_bits_equal(edited[1], plain[1])  # idx = -1
    assert (edited[0] - plain[0]).abs().max() > 1e-2
    # the same mask as [B, Tkv], [B, Tq, Tkv] and HF's [B, 1, Tq, Tkv] (causality folded in, causal=False)
    Tq, Tkv = 7, 7
    full = c["padding"][:, None, :] & torch.ones(Tq, Tkv, dtype=torch.bool).tril()
    for mask, causal in ((c["padding"], True), (full, False), (full[:, None], False)):
        assert_bits_equal(kernels.attention.attention_edit(c["q"], c["k"], c["v"], c["w"], c["bias"], mask=mask, causal=causal), plain)
    with pytest.raises(ValueError, match="bool"):
        kernels.attention.attention_edit(c["q"], c["k"], c["v"], c["w"], mask=c["padding"].float())


def test_reference_decode_step_equals_the_last_row_of_prefill():
    c = attention_case(**SHAPES[0])
    full = attention_reference.attention_edit(c["q"], c["k"], c["v"], c["w"], c["bias"], c["idx"], mask=c["padding"], table=c["table"])
    last = attention_reference.attention_edit(c["q"][:, :, -1:], c["k"], c["v"], c["w"], c["bias"], c["idx"], mask=c["padding"], table=c["table"])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


def test_value_path_edit_equals_a_v_proj_hook():
    """values=c in the kernel == adding c to every value vector (the hook on v_proj), through a tiny llama layer."""
    model = build_tiny_model("llama")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, HIDDEN, generator=g)
    c = torch.randn(attn.v_proj.out_features, generator=g)
    rotary = model.model.rotary_emb(x, torch.arange(6)[None].expand(2, -1))
    handle = attn.v_proj.register_forward_hook(lambda module, args, output: output + c)
    try:
        with torch.no_grad():
            want = attn(x, position_embeddings=rotary, attention_mask=None)[0]
    finally:
        handle.remove()
    seen = {}

    def capture(module, q, k, v, mask, **kwargs):
        seen.update(q=q, k=k, v=v)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register("test_capture_qkv", capture)
    model.set_attn_implementation("test_capture_qkv")
    try:
        with torch.no_grad():
            attn(x, position_embeddings=rotary, attention_mask=None)
    finally:
        model.set_attn_implementation("sdpa")
    got = attention_reference.attention_edit(seen["q"], seen["k"], seen["v"], attn.o_proj.weight, None, torch.tensor([0, 0]), values=c[None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ the Hugging Face wiring


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(1)
    model = build_tiny_model("llama")
    return model, repedit.model_fingerprint(model)


def attn_edits(fp):
    g = torch.Generator().manual_seed(4)
    return [
        UserEdit("a", [SiteEdit("attn_out.1", "project_out", direction=torch.randn(HIDDEN, generator=g), b=0.8),
                       SiteEdit("attn_out.1", "add", vector=torch.randn(HIDDEN, generator=g) * 2)], fp, HIDDEN),
        UserEdit("b", [SiteEdit("attn_out.1", "add", vector=torch.randn(HIDDEN, generator=g) * 2),
                       SiteEdit("attn_out.0", "project_out", basis=torch.linalg.qr(torch.randn(HIDDEN, 2, generator=g)).Q.T.contiguous()),
                       SiteEdit("resid_post.2", "add", vector=torch.randn(HIDDEN, generator=g))], fp, HIDDEN),
    ]


def logits_and_tokens(model, ids, mask):
    with torch.no_grad():
        return (model(ids, attention_mask=mask).logits,
                model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0))


def model_state(model):
    return (model.config._attn_implementation, sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            [n for n, m in model.named_modules() if "forward" in m.__dict__ or "_repedit_attention_edit" in m.__dict__])


def test_fused_attention_equals_the_hooks_with_left_padding_and_generation(llama):
    model, fp = llama
    torch.manual_seed(7)
    ids, mask = left_pad([torch.randint(0, 1000, (n,)).tolist() for n in (5, 7, 4, 6)], 0)
    edits, rows = attn_edits(fp), [0, None, 1, 0]
    before = model_state(model)
    with steer(model, edits, rows):
        want_logits, want_tokens = logits_and_tokens(model, ids, mask)
    with steering.fused_steering(model, edits, rows, force=True) as handle:
        assert handle.fused_sites == ["resid_post.2", "attn_out.0", "attn_out.1"]
        assert model.config._attn_implementation == ATTENTION_NAME
        got_logits, got_tokens = logits_and_tokens(model, ids, mask)
        assert handle.attention_tables[1].calls == 6  # prefill + 5 decode steps, each in the fused kernel
    assert model_state(model) == before
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_tokens.tolist() == want_tokens.tolist()
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
    assert (want_logits - plain).abs().max() > 1e-1  # the edits do change the outputs
    # batch row 1 has no user: unedited (bit for bit against the kernel without edits, tested above; here the
    # other path is SDPA, whose sums run in another order)
    torch.testing.assert_close(got_logits[1], plain[1], rtol=1e-5, atol=1e-5)


def test_fused_attention_leaves_what_it_cannot_apply_to_the_hooks(llama, tiny_model):
    model, fp = llama
    v, u = torch.randn(HIDDEN), torch.randn(HIDDEN)
    add_then_project = UserEdit("a", [SiteEdit("attn_out.1", "add", vector=v), SiteEdit("attn_out.1", "project_out", direction=u)], fp, HIDDEN)
    prompt_only = UserEdit("b", [SiteEdit("attn_out.0", "add", vector=v)], fp, HIDDEN, positions="prompt")
    ids = torch.randint(0, 1000, (2, 5))
    with steer(model, [add_then_project, prompt_only], [0, 1]), torch.no_grad():
        want = model(ids).logits
    with steering.fused_steering(model, [add_then_project, prompt_only], [0, 1], force=True) as handle, torch.no_grad():
        assert handle.fused_sites == [] and model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, want)
    with steering.fused_steering(model, [UserEdit("c", [SiteEdit("attn_out.1", "add", vector=v)], fp, HIDDEN)], force=True, attention=False) as handle:
        assert handle.fused_sites == []
    gemma2 = tiny_model("gemma2")  # attn_out is the post-attention norm's output: not the kernel's site
    edit = UserEdit("d", [SiteEdit("attn_out.0", "add", vector=v)], repedit.model_fingerprint(gemma2), HIDDEN)
    with steering.fused_steering(gemma2, [edit], force=True) as handle:
        assert handle.fused_sites == []


def test_fused_attention_batch_mismatch_and_value_edit(llama):
    model, fp = llama
    ids = torch.randint(0, 1000, (2, 5))
    attn = model.model.layers[1].self_attn
    c = torch.randn(attn.v_proj.out_features)
    handle = attn.v_proj.register_forward_hook(lambda module, args, output: output + c)
    try:
        with torch.no_grad():
            want = model(ids).logits
    finally:
        handle.remove()
    edit = UserEdit("v", [SiteEdit("attn_out.1", "add", vector=steering.value_edit_as_attn_out(model, 1, c))], fp, HIDDEN)
    with steering.fused_steering(model, [edit], force=True) as handle, torch.no_grad():
        assert handle.fused_sites == ["attn_out.1"]
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(repedit.InputError, match="set up for 3 rows, but the model got a batch of 2"):
        with steering.fused_steering(model, [edit], [0, None, 0], force=True), torch.no_grad():
            model(ids)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------ on a GPU (skipped without one)

CUDA = torch.cuda.is_available() and kernels.triton_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_on_gpu_against_the_oracle(dtype):
    for shape in SHAPES + [dict(B=32, H=9, Hkv=3, Tq=1, Tkv=300, hd=64, d=576), dict(B=4, H=9, Hkv=3, Tq=130, Tkv=130, hd=64, d=576)]:
        c = attention_case(**shape, dtype=dtype)
        exact = attention_case(**shape)
        cuda = {name: t.cuda() for name, t in c.items()}
        for kind in KINDS:
            args = (cuda["q"], cuda["k"], cuda["v"], cuda["w"], cuda["bias"], cuda["idx"])
            got = kernels.attention_edit(*args, mask=cuda["padding"], **edit_kwargs(cuda, kind)).cpu()
            want = sdpa_oracle(exact, **oracle_kwargs(exact, kind))
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)
            torch.testing.assert_close(got.double(), want, **tol)
        plain = kernels.attention_edit(*args[:5], mask=cuda["padding"])
        edited = kernels.attention_edit(*args, mask=cuda["padding"], values=cuda["values"], **edit_kwargs(cuda, "project_k_add"))
        assert_bits_equal(edited[1], plain[1])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
def test_fused_attention_on_gpu_equals_the_hooks(llama):
    import copy

    model, fp = llama
    model = copy.deepcopy(model).cuda()
    ids, mask = left_pad([torch.randint(0, 1000, (n,)).tolist() for n in (5, 7, 4)], 0)
    ids, mask = ids.cuda(), mask.cuda()
    edits, rows = attn_edits(fp), [0, None, 1]
    with steer(model, edits, rows):
        want_logits, want_tokens = logits_and_tokens(model, ids, mask)
    with steering.fused_steering(model, edits, rows) as handle:  # on CUDA without force
        assert "attn_out.1" in handle.fused_sites
        got_logits, got_tokens = logits_and_tokens(model, ids, mask)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens.tolist() == want_tokens.tolist()
